"""The MQAR generator follows SPEC section 5 exactly."""

import numpy as np
import pytest

from data import mqar


@pytest.fixture(scope="module")
def batch():
  return mqar.generate_mqar(500, 128, 8, vocab_size=8192, seed=3)


def test_shapes_and_dtypes(batch):
  assert batch.inputs.shape == batch.labels.shape == (500, 128)
  assert batch.inputs.dtype == batch.labels.dtype == np.int32


def test_context_keys_and_values(batch):
  keys, values = batch.inputs[:, 0:16:2], batch.inputs[:, 1:16:2]
  assert keys.min() >= 1 and keys.max() < 4096
  assert values.min() >= 4096 and values.max() < 8192
  for row in keys:
    assert len(set(row.tolist())) == 8  # distinct keys per example


def test_labels_only_at_queries_and_each_is_the_paired_value(batch):
  for x, y, in zip(batch.inputs, batch.labels):
    pairs = dict(zip(x[0:16:2].tolist(), x[1:16:2].tolist()))
    where = np.nonzero(y != mqar.IGNORE)[0]
    assert len(where) == 8 and where.min() >= 16  # each key queried once, after the context
    assert sorted(x[where].tolist()) == sorted(pairs)  # the queried tokens are the keys
    for t in where:
      assert y[t] == pairs[int(x[t])]
      if t + 1 < len(x):
        assert x[t + 1] == y[t]  # the value follows its query in the sequence


def test_query_gaps_follow_a_decreasing_power_law():
  b = mqar.generate_mqar(4000, 256, 4, seed=0)
  gaps = (np.nonzero(b.labels != mqar.IGNORE)[1] - 8) // 2 + 1  # in pairs, from 1
  counts = np.bincount(gaps, minlength=125)[1:]
  # p(gap = i) ~ i^(a-1): early gaps are far more likely than late ones.
  assert counts[:10].sum() > 3 * counts[-10:].sum()
  assert counts[:60].sum() > counts[60:].sum()


def test_determinism_per_seed():
  a = mqar.generate_mqar(50, 64, 4, seed=1)
  b = mqar.generate_mqar(50, 64, 4, seed=1)
  c = mqar.generate_mqar(50, 64, 4, seed=2)
  np.testing.assert_array_equal(a.inputs, b.inputs)
  np.testing.assert_array_equal(a.labels, b.labels)
  assert not np.array_equal(a.inputs, c.inputs)


def test_train_and_test_splits_use_different_seeds():
  slices = mqar.get_mix("tiny_test")
  train = mqar.generate_mix(slices, split="train")
  test = mqar.generate_mix(slices, split="test")
  assert not np.array_equal(train[0].inputs, test[0].inputs)
  # Adding a slice leaves the earlier slices unchanged.
  more = mqar.generate_mix(slices + (mqar.MqarSlice(64, 8, 10),), split="test")
  np.testing.assert_array_equal(more[0].inputs, test[0].inputs)


def test_tight_fit_and_paper_mixes_generate():
  tight = mqar.generate_mqar(10, 64, 16, seed=0)  # 4 * 16 == 64
  assert (tight.labels != mqar.IGNORE).sum(axis=1).tolist() == [16] * 10
  for s in mqar.get_mix("paper_test"):
    mqar.check_fits(s.seq_len, s.num_kv_pairs, 8192)


@pytest.mark.parametrize("args, match", [
    (dict(seq_len=63, num_kv_pairs=16), "does not fit seq_len"),
    (dict(seq_len=64, num_kv_pairs=0), "num_kv_pairs"),
    (dict(seq_len=64, num_kv_pairs=4, vocab_size=7), "vocab_size"),
    (dict(seq_len=1024, num_kv_pairs=40, vocab_size=64), "distinct keys"),
    (dict(seq_len=64, num_kv_pairs=4, num_examples=0), "num_examples"),
])
def test_bad_arguments(args, match):
  args = {"num_examples": 5, **args}
  with pytest.raises(ValueError, match=match):
    mqar.generate_mqar(**args)


def test_unknown_mix_and_accuracy():
  with pytest.raises(ValueError, match="unknown MQAR mix"):
    mqar.get_mix("nope")
  labels = np.array([[-100, 5, -100, 7]])
  assert mqar.query_accuracy(np.array([[0, 5, 0, 6]]), labels) == 0.5
