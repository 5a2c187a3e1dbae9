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


def test_epochs_order_walks_the_slices_in_turn_unshuffled_as_zoology():
  slices = make_slices()  # 40 rows of 16 tokens, then 24 rows of 32
  it = pipeline.make_train_iterator(slices, batch_size=16, seed=0, order="epochs")
  for _ in range(2):  # every epoch the same: 3 batches of slice 0, then 2 of slice 1
    for data, starts in ((slices[0], (0, 16, 32)), (slices[1], (0, 16))):
      for start in starts:
        batch = next(it)
        rows = data.inputs[start:start + 16]
        np.testing.assert_array_equal(batch["inputs"][:len(rows)], rows)
        np.testing.assert_array_equal(batch["labels"][:len(rows)], data.labels[start:start + 16])
        assert batch["inputs"].shape == (16, data.inputs.shape[1])
        assert np.all(batch["labels"][len(rows):] == mqar.IGNORE)  # the partial last batch
        assert np.all(batch["inputs"][len(rows):] == mqar.PAD)


def test_epochs_order_splits_each_global_batch_over_processes():
  slices = make_slices()
  batches = [[next(it) for _ in range(5)] for it in (
      pipeline.make_train_iterator(slices, batch_size=8, seed=0, order="epochs",
                                   process_index=i, process_count=2) for i in range(2))]
  alone = pipeline.make_train_iterator(slices, batch_size=16, seed=0, order="epochs")
  for first, second in zip(*batches):
    want = next(alone)
    assert first["inputs"].shape == second["inputs"].shape  # the processes stay in step
    got = {bytes(r) for b in (first, second) for r, y in zip(b["inputs"], b["labels"])
           if (y != mqar.IGNORE).any()}
    assert got == {bytes(r) for r, y in zip(want["inputs"], want["labels"])
                   if (y != mqar.IGNORE).any()}


def test_epochs_order_resumes_mid_epoch():
  it = pipeline.make_train_iterator(make_slices(), batch_size=16, seed=0, order="epochs")
  for _ in range(4):
    next(it)
  state = it.get_state()
  want = [next(it) for _ in range(4)]
  fresh = pipeline.make_train_iterator(make_slices(), batch_size=16, seed=0, order="epochs")
  fresh.set_state(state)
  for w in want:
    np.testing.assert_array_equal(next(fresh)["inputs"], w["inputs"])


def test_bad_orders():
  with pytest.raises(ValueError, match="order must be one of"):
    pipeline.make_train_iterator(make_slices(), batch_size=2, seed=0, order="sorted")
  with pytest.raises(ValueError, match="weights apply to the 'mixed' order"):
    pipeline.make_train_iterator(make_slices(), batch_size=2, seed=0, order="epochs",
                                 weights=[1.0, 1.0])
