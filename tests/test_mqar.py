"""The MQAR generator follows the paper's definition: layout, labels, power-law gaps, seeds, errors."""

import jax.numpy as jnp
import numpy as np
import pytest

from based_jax.data import mqar

N, T, P, V = 400, 128, 8, 8192


@pytest.fixture(scope="module")
def batch():
  return mqar.generate_mqar(N, T, P, vocab_size=V, seed=3)


def test_shapes_and_dtypes(batch):
  assert batch.inputs.shape == batch.labels.shape == (N, T)
  assert batch.inputs.dtype == batch.labels.dtype == np.int32


def test_context_keys_and_values(batch):
  keys, values = batch.inputs[:, 0:2 * P:2], batch.inputs[:, 1:2 * P:2]
  assert keys.min() >= 1 and keys.max() < V // 2
  assert values.min() >= V // 2 and values.max() < V
  assert all(len(set(row)) == P for row in keys.tolist())  # keys distinct per example
  assert all(len(set(row)) == P for row in values.tolist())  # values too (documented choice)
  assert (batch.labels[:, :2 * P] == mqar.IGNORE).all()  # nothing scored in the context


def test_each_key_queried_once_with_its_value_as_label(batch):
  for x, y in zip(batch.inputs, batch.labels):
    pairs = dict(zip(x[0:2 * P:2].tolist(), x[1:2 * P:2].tolist()))
    where = np.nonzero(y != mqar.IGNORE)[0]
    assert len(where) == P and where.min() >= 2 * P and (where % 2 == 0).all()
    assert sorted(x[where].tolist()) == sorted(pairs)  # every key exactly once
    for t in where:
      assert y[t] == pairs[int(x[t])]
  # The token after a query is filler (zoology's layout), not the query's value: a random
  # token equals it with probability about 1 / V.
  rows, where = np.nonzero(batch.labels != mqar.IGNORE)
  after = where + 1 < T
  repeats = batch.inputs[rows[after], where[after] + 1] == batch.labels[rows[after], where[after]]
  assert repeats.mean() < 0.01


def test_labels_are_unambiguous(batch):
  # After the context a key token occurs only where it is queried (filler avoids the keys),
  # and the padding id 0 is never generated.
  keys = batch.inputs[:, 0:2 * P:2]
  rest = batch.inputs[:, 2 * P:]
  is_key = (rest[:, :, None] == keys[:, None, :]).any(axis=2)
  np.testing.assert_array_equal(is_key, batch.labels[:, 2 * P:] != mqar.IGNORE)
  assert batch.inputs.min() >= 1


def test_query_order_is_uniformly_random():
  # The i-th context key is equally likely to be asked first, second, ... (4 pairs).
  n, pairs = 4000, 4
  b = mqar.generate_mqar(n, 64, pairs, seed=0)
  queried = b.inputs[b.labels != mqar.IGNORE].reshape(n, pairs)  # in sequence order
  keys = b.inputs[:, 0:2 * pairs:2]
  rank = np.argmax(keys[:, :, None] == queried[:, None, :], axis=2)  # [n, context position]
  freq = np.stack([np.bincount(r, minlength=pairs) for r in rank.T]) / n
  np.testing.assert_allclose(freq, 1 / pairs, atol=0.04)


def test_single_query_gap_matches_the_power_law():
  # With one pair the gap (in slots, from 1) is drawn exactly from p(i) ~ a i^(a-1).
  n, a, seq_len = 20_000, 0.01, 64
  b = mqar.generate_mqar(n, seq_len, 1, power_a=a, seed=0)
  gaps = (np.nonzero(b.labels != mqar.IGNORE)[1] - 2) // 2 + 1
  slots = (seq_len + 1 - 2) // 2
  expected = np.arange(1, slots + 1) ** (a - 1.0)
  expected /= expected.sum()
  observed = np.bincount(gaps, minlength=slots + 1)[1:] / n
  np.testing.assert_array_less(np.abs(observed - expected), 5 * np.sqrt(expected / n) + 1e-3)


def test_query_gaps_skew_short():
  b = mqar.generate_mqar(4000, 256, 4, seed=0)
  gaps = (np.nonzero(b.labels != mqar.IGNORE)[1] - 8) // 2 + 1  # in slots, from 1
  counts = np.bincount(gaps, minlength=125)[1:]
  assert counts[:10].sum() > 3 * counts[-10:].sum()
  assert counts[:60].sum() > counts[60:].sum()
  flat = mqar.generate_mqar(4000, 256, 4, power_a=1.0, seed=0)  # a = 1: uniform gaps
  flat_gaps = (np.nonzero(flat.labels != mqar.IGNORE)[1] - 8) // 2 + 1
  assert gaps.mean() < 0.8 * flat_gaps.mean()


def test_determinism_per_seed():
  a = mqar.generate_mqar(50, 64, 4, seed=1)
  b = mqar.generate_mqar(50, 64, 4, seed=1)
  c = mqar.generate_mqar(50, 64, 4, seed=2)
  np.testing.assert_array_equal(a.inputs, b.inputs)
  np.testing.assert_array_equal(a.labels, b.labels)
  assert not np.array_equal(a.inputs, c.inputs)
  assert not np.array_equal(a.labels, c.labels)


@pytest.mark.parametrize("seq_len, pairs, vocab", [(15, 4, 16), (16, 4, 16), (63, 16, 64),
                                                   (64, 16, 8192), (9, 1, 4), (40, 7, 16)])
def test_tight_fits(seq_len, pairs, vocab):
  # seq_len = 4P - 1 fits (the last slot's filler is then only a label); P = V/2 - 1 uses every key.
  b = mqar.generate_mqar(200, seq_len, pairs, vocab_size=vocab, seed=0)
  assert ((b.labels != mqar.IGNORE).sum(axis=1) == pairs).all()
  keys = b.inputs[:, 0:2 * pairs:2]
  assert all(len(set(row)) == pairs for row in keys.tolist())
  assert keys.max() < vocab // 2 and b.inputs.min() >= 1


@pytest.mark.parametrize("args, match", [
    (dict(seq_len=62, num_kv_pairs=16), r"num_kv_pairs=16 does not fit seq_len=62.*>= .* = 63"),
    (dict(seq_len=64, num_kv_pairs=0), "num_kv_pairs must be >= 1"),
    (dict(seq_len=64, num_kv_pairs=4, vocab_size=3), "vocab_size must be >= 4"),
    (dict(seq_len=1024, num_kv_pairs=32, vocab_size=64), "num_kv_pairs=32 exceeds the 31"),
    (dict(seq_len=64, num_kv_pairs=4, num_examples=0), "num_examples must be >= 1"),
    (dict(seq_len=64, num_kv_pairs=4, power_a=0.0), "power_a"),
    (dict(seq_len=64, num_kv_pairs=4, seed=-1), "seed must be >= 0"),
])
def test_bad_arguments(args, match):
  with pytest.raises(ValueError, match=match):
    mqar.generate_mqar(**{"num_examples": 5, **args})


def test_presets():
  assert [(s.seq_len, s.num_kv_pairs, s.num_examples) for s in mqar.get_mix("paper_train")] == [
      (64, 4, 100_000), (128, 8, 20_000), (256, 16, 20_000), (256, 32, 20_000), (256, 64, 20_000)]
  assert [(s.seq_len, s.num_kv_pairs) for s in mqar.get_mix("paper_test")] == [
      (64, 4), (64, 8), (64, 16), (128, 32), (256, 64), (512, 128), (1024, 256)]
  assert {s.num_examples for s in mqar.get_mix("paper_test")} == {1000}
  for name in mqar.MIXES:
    for s in mqar.get_mix(name):
      mqar.check_fits(s.seq_len, s.num_kv_pairs, 8192)
  with pytest.raises(ValueError, match="valid names: .*paper_test"):
    mqar.get_mix("nope")
  with pytest.raises(ValueError, match="num_examples must be >= 1"):
    mqar.MqarSlice(64, 4, 0)


SLICES = (mqar.MqarSlice(16, 2, 30), mqar.MqarSlice(32, 4, 20))


def test_build_mix_pads_and_tags_each_slice():
  mix = mqar.build_mix(SLICES, split="train", seed=1)
  parts = mqar.generate_mix(SLICES, split="train", seed=1)
  assert mix.inputs.shape == mix.labels.shape == (50, 32) and mix.inputs.dtype == np.int32
  np.testing.assert_array_equal(mix.slice_ids, [0] * 30 + [1] * 20)
  np.testing.assert_array_equal(mix.inputs[:30, :16], parts[0].inputs)
  np.testing.assert_array_equal(mix.labels[:30, :16], parts[0].labels)
  assert (mix.inputs[:30, 16:] == mqar.PAD).all() and (mix.labels[:30, 16:] == mqar.IGNORE).all()
  np.testing.assert_array_equal(mix.inputs[30:], parts[1].inputs)
  wide = mqar.build_mix(SLICES, split="train", seed=1, pad_to=40)
  assert wide.inputs.shape == (50, 40)
  np.testing.assert_array_equal(wide.inputs[:, :32], mix.inputs)
  with pytest.raises(ValueError, match="pad_to=20 is shorter than the longest seq_len=32"):
    mqar.build_mix(SLICES, split="train", pad_to=20)


def test_slice_seeds_are_stable_and_splits_disjoint():
  train = mqar.generate_mix(SLICES, split="train")
  test = mqar.generate_mix(SLICES, split="test")
  for a, b in zip(train, test):
    assert not np.array_equal(a.inputs, b.inputs)
  # Inserting a slice in front, or repeating a shape, leaves the other slices unchanged.
  more = mqar.generate_mix((mqar.MqarSlice(64, 8, 10),) + SLICES + (SLICES[0],), split="train")
  np.testing.assert_array_equal(more[1].inputs, train[0].inputs)
  np.testing.assert_array_equal(more[2].labels, train[1].labels)
  assert not np.array_equal(more[3].inputs, more[1].inputs)
  other_seed = mqar.generate_mix(SLICES, split="train", seed=1)
  assert not np.array_equal(other_seed[0].inputs, train[0].inputs)
  with pytest.raises(ValueError, match="split must be one of"):
    mqar.generate_mix(SLICES, split="valid")
  with pytest.raises(ValueError, match="does not fit seq_len=32"):
    mqar.generate_mix((mqar.MqarSlice(32, 9, 100),), split="train")


def test_query_accuracy():
  labels = np.array([[-100, 5, -100, 7], [9, -100, -100, -100]])
  predictions = np.array([[5, 5, 0, 6], [9, 0, 0, 0]])
  assert mqar.query_accuracy(predictions, labels) == pytest.approx(2 / 3)
  assert mqar.query_accuracy(jnp.asarray(predictions), jnp.asarray(labels)) == pytest.approx(2 / 3)
  b = mqar.generate_mqar(20, 32, 4, seed=0)
  assert mqar.query_accuracy(b.labels, b.labels) == 1.0
  with pytest.raises(ValueError, match="no query positions"):
    mqar.query_accuracy(np.zeros((1, 4)), np.full((1, 4), -100))
  with pytest.raises(ValueError, match="differ in shape"):
    mqar.query_accuracy(np.zeros((1, 3)), labels)
