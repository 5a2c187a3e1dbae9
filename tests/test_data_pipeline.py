"""The grain pipeline: shapes, epochs, per-process shards, resumable iterator state."""

import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest

from based_jax.data import mqar, pipeline


def make_slices():
  return [mqar.generate_mqar(40, 16, 2, seed=0), mqar.generate_mqar(24, 32, 4, seed=1)]


def test_batches_are_homogeneous_and_typed():
  it = pipeline.make_train_iterator(make_slices(), batch_size=8, seed=0)
  lengths = set()
  for _ in range(20):
    b = next(it)
    assert b["inputs"].dtype == np.int32 and b["inputs"].shape == b["labels"].shape
    assert b["inputs"].shape[0] == 8
    lengths.add(b["inputs"].shape[1])
  assert lengths == {16, 32}


def test_one_epoch_of_a_slice_covers_each_example_once():
  data = mqar.generate_mqar(40, 16, 2, seed=0)
  it = pipeline.make_train_iterator([data], batch_size=8, seed=0)
  rows = np.concatenate([next(it)["inputs"] for _ in range(5)])
  assert sorted(map(bytes, rows)) == sorted(map(bytes, data.inputs))


def test_process_shards_are_disjoint_and_cover():
  data = mqar.generate_mqar(40, 16, 2, seed=0)
  seen = []
  for index in range(2):
    it = pipeline.make_train_iterator([data], batch_size=4, seed=0, process_index=index,
                                      process_count=2)
    seen.append({bytes(r) for _ in range(5) for r in next(it)["inputs"]})
  assert not seen[0] & seen[1]
  assert seen[0] | seen[1] == {bytes(r) for r in data.inputs}


def test_state_restore_resumes_the_same_batches(tmp_path):
  it = pipeline.make_train_iterator(make_slices(), batch_size=4, seed=5)
  for _ in range(7):
    next(it)
  manager = ocp.CheckpointManager(tmp_path)
  manager.save(7, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
  manager.wait_until_finished()
  expected = [next(it) for _ in range(6)]
  fresh = pipeline.make_train_iterator(make_slices(), batch_size=4, seed=5)
  manager.restore(7, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh)))
  for want in expected:
    got = next(fresh)
    np.testing.assert_array_equal(got["inputs"], want["inputs"])
    np.testing.assert_array_equal(got["labels"], want["labels"])


def test_eval_batches_count_every_example_once():
  data = mqar.generate_mqar(10, 16, 2, seed=0)
  batches = list(pipeline.make_eval_batches(data.inputs, data.labels, batch_size=4))
  assert [b["inputs"].shape for b in batches] == [(4, 16)] * 3
  labels = np.concatenate([b["labels"] for b in batches])
  assert (labels != mqar.IGNORE).sum() == (data.labels != mqar.IGNORE).sum()
  assert np.all(labels[10:] == mqar.IGNORE)


def test_bad_arguments():
  with pytest.raises(ValueError, match="batch_size"):
    pipeline.make_train_iterator(make_slices(), batch_size=0, seed=0)
  with pytest.raises(ValueError, match="fewer than batch_size"):
    pipeline.make_train_iterator(make_slices(), batch_size=30, seed=0)
  with pytest.raises(ValueError, match="process_index"):
    pipeline.make_train_iterator(make_slices(), batch_size=2, seed=0, process_index=2,
                                 process_count=2)
  with pytest.raises(ValueError, match="weights"):
    pipeline.make_train_iterator(make_slices(), batch_size=2, seed=0, weights=[1.0])
