"""The grain pipeline: shapes, epochs, per-process shards, resumable state (also via Orbax)."""

import json

import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest

from data import mqar, pipeline


def make_slices():
  return [mqar.generate_mqar(40, 16, 2, seed=0), mqar.generate_mqar(24, 32, 4, seed=1)]


def rows_of(batches):
  """The examples of `batches` as hashable rows (inputs and labels together)."""
  return [bytes(x) + bytes(y) for b in batches for x, y in zip(b["inputs"], b["labels"])]


def all_rows(slices):
  return rows_of([{"inputs": s.inputs, "labels": s.labels} for s in slices])


def assert_same_batches(got, want):
  assert len(got) == len(want)
  for g, w in zip(got, want):
    np.testing.assert_array_equal(g["inputs"], w["inputs"])
    np.testing.assert_array_equal(g["labels"], w["labels"])


def test_batches_are_single_length_and_typed():
  it = pipeline.make_train_iterator(make_slices(), batch_size=8, seed=0)
  lengths = set()
  for _ in range(20):
    b = next(it)
    assert set(b) == {"inputs", "labels"}
    assert b["inputs"].dtype == b["labels"].dtype == np.int32
    assert b["inputs"].shape == b["labels"].shape and b["inputs"].shape[0] == 8
    lengths.add(b["inputs"].shape[1])
  assert lengths == {16, 32}


def test_each_epoch_covers_every_example_once_in_a_new_order():
  slices = make_slices()
  batches = list(pipeline.make_train_iterator(slices, batch_size=8, seed=0, num_epochs=2))
  assert len(batches) == 2 * (40 // 8 + 24 // 8)  # then the iterator stops
  first, second = rows_of(batches[:8]), rows_of(batches[8:])
  assert sorted(first) == sorted(second) == sorted(all_rows(slices))
  assert first != second


def test_partial_batches_are_dropped():
  data = mqar.generate_mqar(21, 16, 2, seed=0)
  batches = list(pipeline.make_train_iterator([data], batch_size=5, seed=0, num_epochs=1))
  assert [b["inputs"].shape for b in batches] == [(5, 16)] * 4
  assert len(set(rows_of(batches))) == 20


def test_a_padded_mix_is_one_slice():
  mix = mqar.build_mix((mqar.MqarSlice(16, 2, 12), mqar.MqarSlice(32, 4, 12)), split="train")
  it = pipeline.make_train_iterator([mqar.MqarBatch(mix.inputs, mix.labels)], batch_size=4,
                                    seed=0, num_epochs=1)
  batches = list(it)
  assert {b["inputs"].shape for b in batches} == {(4, 32)}
  assert sorted(rows_of(batches)) == sorted(all_rows([mix]))


def test_weights_set_the_slice_proportions():
  it = pipeline.make_train_iterator(make_slices(), batch_size=4, seed=0, weights=[3, 1])
  lengths = [next(it)["inputs"].shape[1] for _ in range(400)]
  assert lengths.count(16) == 300


def test_process_shards_are_disjoint_cover_and_stay_in_step():
  slices = make_slices()
  runs = [list(pipeline.make_train_iterator(slices, batch_size=4, seed=0, num_epochs=1,
                                            process_index=i, process_count=2)) for i in range(2)]
  shards = [rows_of(run) for run in runs]
  assert len(set(shards[0])) == len(shards[0]) == len(shards[1]) == 32
  assert not set(shards[0]) & set(shards[1])
  assert sorted(shards[0] + shards[1]) == sorted(all_rows(slices))
  # At every step both processes emit a batch of the same length.
  assert [b["inputs"].shape for b in runs[0]] == [b["inputs"].shape for b in runs[1]]


def test_uneven_shards_drop_the_remainder():
  data = mqar.generate_mqar(13, 16, 2, seed=0)
  shards = [rows_of(pipeline.make_train_iterator([data], batch_size=2, seed=0, num_epochs=1,
                                                 process_index=i, process_count=3))
            for i in range(3)]
  assert [len(s) for s in shards] == [4, 4, 4]
  assert len(set(sum(shards, []))) == 12


def test_state_restore_resumes_the_same_batches():
  it = pipeline.make_train_iterator(make_slices(), batch_size=4, seed=5)
  for _ in range(7):
    next(it)
  state = json.loads(json.dumps(it.get_state()))
  expected = [next(it) for _ in range(10)]
  fresh = pipeline.make_train_iterator(make_slices(), batch_size=4, seed=5)
  fresh.set_state(state)
  assert_same_batches([next(fresh) for _ in range(10)], expected)


@pytest.mark.parametrize("kwargs", [dict(num_epochs=None), dict(weights=[2.0, 1.0])])
def test_orbax_checkpoint_resumes_the_same_batches(tmp_path, kwargs):
  make = lambda: pipeline.make_train_iterator(make_slices(), batch_size=4, seed=5, **kwargs)
  it = make()
  for _ in range(7):
    next(it)
  with ocp.CheckpointManager(tmp_path) as manager:
    manager.save(7, args=ocp.args.Composite(
        step=ocp.args.JsonSave({"step": 7}), data=grain.checkpoint.CheckpointSave(it)))
    manager.wait_until_finished()
  expected = [next(it) for _ in range(12)]  # crosses an epoch boundary

  fresh = make()
  next(fresh)  # a restore overrides whatever the fresh iterator has read
  with ocp.CheckpointManager(tmp_path) as manager:
    assert manager.latest_step() == 7
    restored = manager.restore(7, args=ocp.args.Composite(
        step=ocp.args.JsonRestore(), data=grain.checkpoint.CheckpointRestore(fresh)))
  assert restored["step"] == {"step": 7} and restored["data"] is fresh
  assert_same_batches([next(fresh) for _ in range(12)], expected)


def test_seeds_change_the_order():
  a = [next(pipeline.make_train_iterator(make_slices(), batch_size=4, seed=s)) for s in (0, 0, 1)]
  assert_same_batches(a[:1], a[1:2])
  assert rows_of(a[:1]) != rows_of(a[2:])


def test_eval_batches_count_every_example_once():
  data = mqar.generate_mqar(10, 16, 2, seed=0)
  batches = pipeline.make_eval_batches(data.inputs, data.labels, batch_size=4)
  assert [b["inputs"].shape for b in batches] == [(4, 16)] * 3
  inputs = np.concatenate([b["inputs"] for b in batches])
  labels = np.concatenate([b["labels"] for b in batches])
  np.testing.assert_array_equal(inputs[:10], data.inputs)  # in order
  np.testing.assert_array_equal(labels[:10], data.labels)
  assert (inputs[10:] == mqar.PAD).all() and (labels[10:] == mqar.IGNORE).all()


def test_eval_shards_are_even_and_cover():
  data = mqar.generate_mqar(11, 16, 2, seed=0)
  shards = [pipeline.make_eval_batches(data.inputs, data.labels, batch_size=2, process_index=i,
                                       process_count=3) for i in range(3)]
  assert [len(s) for s in shards] == [2, 2, 2]
  real = [r for s in shards for r in rows_of(s) if r in set(all_rows([data]))]
  assert sorted(real) == sorted(all_rows([data]))


@pytest.mark.parametrize("kwargs, match", [
    (dict(batch_size=0), "batch_size must be >= 1"),
    (dict(batch_size=30), r"slice 1 has 24 examples .* fewer than batch_size=30"),
    (dict(batch_size=16, process_index=0, process_count=2),
     r"slice 1 has 12 examples on this process \(24 over 2 processes\)"),
    (dict(process_index=2, process_count=2), r"process_index=2 must be in \[0, process_count=2\)"),
    (dict(weights=[1.0]), "weights must be 2 positive numbers"),
    (dict(weights=[1.0, 0.0]), "weights must be 2 positive numbers"),
    (dict(weights=[1.0, 1.0], num_epochs=2), "cannot be combined with num_epochs"),
    (dict(num_epochs=0), "num_epochs must be >= 1"),
    (dict(seed=-1), "seed must be >= 0"),
])
def test_bad_train_arguments(kwargs, match):
  with pytest.raises(ValueError, match=match):
    pipeline.make_train_iterator(make_slices(), **{"batch_size": 2, "seed": 0, **kwargs})


def test_bad_eval_and_array_arguments():
  data = mqar.generate_mqar(10, 16, 2, seed=0)
  with pytest.raises(ValueError, match="batch_size must be >= 1"):
    pipeline.make_eval_batches(data.inputs, data.labels, batch_size=0)
  with pytest.raises(ValueError, match="must be equal"):
    pipeline.make_eval_batches(data.inputs, data.labels[:, :8], batch_size=2)
  with pytest.raises(ValueError, match="slice 0: inputs"):
    pipeline.make_train_iterator([mqar.MqarBatch(data.inputs, data.labels[:5])], batch_size=2,
                                 seed=0)
  with pytest.raises(ValueError, match="no training slices"):
    pipeline.make_train_iterator([], batch_size=2, seed=0)
