"""Multi-query associative recall (MQAR), SPEC section 5: a vectorised, seeded generator.

A sequence of `seq_len` input tokens (N examples at once):

    k1 v1 k2 v2 ... kP vP | x x kq vq x x x kr vr x ...
    '---- context -----'   '--- queries, each key once, followed by its value ---'

Keys are distinct per example, drawn from [1, V/2); values are distinct per example, drawn from
[V/2, V). Every key is queried exactly once, in random order. Query slots are the token pairs
after the context; the gap (in pairs) from the context to a query is drawn from the power law
p(gap = i) ~ a i^(a-1), a = 0.01, without replacement, so queries cluster soon after the
context. Every other position holds a random filler token from [1, V) (0 is the padding id).
Labels are -100 everywhere except at a query key, whose label is its value: the model must
predict the value right after seeing the queried key.
"""

import dataclasses
from typing import NamedTuple, Sequence

import numpy as np

IGNORE = -100
PAD = 0


class MqarBatch(NamedTuple):
  inputs: np.ndarray  # int32 [N, T] token ids.
  labels: np.ndarray  # int32 [N, T], -100 except at query keys.


@dataclasses.dataclass(frozen=True)
class MqarSlice:
  """One (length, pairs, size) block of a train or test mix."""
  seq_len: int  # tokens per example.
  num_kv_pairs: int  # key-value pairs in the context, each queried once.
  num_examples: int  # examples in the slice.

  @property
  def name(self) -> str:
    return f"{self.seq_len}x{self.num_kv_pairs}"


def _slices(*rows: tuple[int, int, int]) -> tuple[MqarSlice, ...]:
  return tuple(MqarSlice(*row) for row in rows)


MIXES: dict[str, tuple[MqarSlice, ...]] = {
    # The paper's training and test data (SPEC section 5).
    "paper_train": _slices((64, 4, 100_000), (128, 8, 20_000), (256, 16, 20_000),
                           (256, 32, 20_000), (256, 64, 20_000)),
    "paper_test": _slices((64, 4, 1000), (64, 8, 1000), (64, 16, 1000), (128, 32, 1000),
                          (256, 64, 1000), (512, 128, 1000), (1024, 256, 1000)),
    # The laptop default of `experiments/train.py`.
    "small_train": _slices((64, 4, 20_000), (128, 8, 20_000), (256, 16, 20_000)),
    "small_test": _slices((64, 4, 1000), (128, 8, 1000), (256, 16, 1000)),
    # Tiny, for tests.
    "tiny_train": _slices((16, 2, 256), (32, 4, 256)),
    "tiny_test": _slices((16, 2, 64), (32, 4, 64)),
}


def get_mix(name: str) -> tuple[MqarSlice, ...]:
  if name not in MIXES:
    raise ValueError(f"unknown MQAR mix {name!r}; known: {sorted(MIXES)}")
  return MIXES[name]


def check_fits(seq_len: int, num_kv_pairs: int, vocab_size: int) -> None:
  """Raises ValueError unless the context and all queries fit and keys/values suffice."""
  if num_kv_pairs < 1:
    raise ValueError(f"num_kv_pairs must be >= 1, got {num_kv_pairs}")
  if vocab_size < 4 or vocab_size % 2:
    raise ValueError(f"vocab_size must be even and >= 4, got {vocab_size}")
  if num_kv_pairs > vocab_size // 2 - 1:
    raise ValueError(f"num_kv_pairs={num_kv_pairs} exceeds the {vocab_size // 2 - 1} distinct "
                     f"keys of vocab_size={vocab_size}")
  if 4 * num_kv_pairs > seq_len:
    raise ValueError(f"num_kv_pairs={num_kv_pairs} does not fit seq_len={seq_len}: the context "
                     f"and the queries need 4 * num_kv_pairs = {4 * num_kv_pairs} tokens")


def _distinct(rng: np.random.Generator, n: int, k: int, low: int, high: int) -> np.ndarray:
  """[n, k] integers from [low, high), distinct within each row (resampling collisions)."""
  out = rng.integers(low, high, (n, k))
  while True:
    order = np.argsort(out, axis=1)
    srt = np.take_along_axis(out, order, axis=1)
    dup = np.zeros_like(out, bool)
    np.put_along_axis(dup, order[:, 1:], srt[:, 1:] == srt[:, :-1], axis=1)
    if not dup.any():
      return out
    out[dup] = rng.integers(low, high, int(dup.sum()))


def generate_mqar(num_examples: int, seq_len: int, num_kv_pairs: int, *, vocab_size: int = 8192,
                  power_a: float = 0.01, seed: int = 0) -> MqarBatch:
  """Generates `num_examples` MQAR sequences (deterministic for a seed); see module doc."""
  check_fits(seq_len, num_kv_pairs, vocab_size)
  if num_examples < 1:
    raise ValueError(f"num_examples must be >= 1, got {num_examples}")
  if not 0 < power_a <= 1:
    raise ValueError(f"power_a must be in (0, 1], got {power_a}")
  rng = np.random.default_rng(seed)
  n, p, half = num_examples, num_kv_pairs, vocab_size // 2
  keys = _distinct(rng, n, p, 1, half)
  values = _distinct(rng, n, p, half, vocab_size)

  # One extra token so the last query's value exists; inputs drop it.
  seq = rng.integers(1, vocab_size, (n, seq_len + 1))
  seq[:, 0:2 * p:2] = keys
  seq[:, 1:2 * p:2] = values

  # Query slots: pairs (key, value) starting at 2p + 2j, j < num_slots. Sample p of them per
  # row without replacement with weight gap^(a-1) (Gumbel top-k).
  num_slots = (seq_len + 1 - 2 * p) // 2
  gaps = np.arange(1, num_slots + 1)
  scores = (power_a - 1) * np.log(gaps) + rng.gumbel(size=(n, num_slots))
  slots = np.argpartition(-scores, p - 1, axis=1)[:, :p]
  order = rng.permuted(np.tile(np.arange(p), (n, 1)), axis=1)  # which key each slot asks
  query_pos = 2 * p + 2 * slots
  rows = np.arange(n)[:, None]
  seq[rows, query_pos] = keys[rows, order]
  seq[rows, query_pos + 1] = values[rows, order]

  labels = np.full((n, seq_len), IGNORE, np.int64)
  labels[rows, query_pos] = values[rows, order]
  return MqarBatch(seq[:, :-1].astype(np.int32), labels.astype(np.int32))


def slice_seed(seed: int, split: str, index: int) -> int:
  """Independent seeds per (run seed, split, slice): train and test never share data."""
  if split not in ("train", "test"):
    raise ValueError(f"split must be 'train' or 'test', got {split!r}")
  return int(np.random.SeedSequence([seed, split == "test", index]).generate_state(1)[0])


def generate_mix(slices: Sequence[MqarSlice], *, split: str, vocab_size: int = 8192,
                 seed: int = 0) -> list[MqarBatch]:
  """One MqarBatch per slice; each slice has its own derived seed, so adding a slice does not
  change the others."""
  return [generate_mqar(s.num_examples, s.seq_len, s.num_kv_pairs, vocab_size=vocab_size,
                        seed=slice_seed(seed, split, i)) for i, s in enumerate(slices)]


def query_accuracy(predictions: np.ndarray, labels: np.ndarray) -> float:
  """Fraction of labelled positions (label != -100) where predictions [N, T] == labels."""
  mask = labels != IGNORE
  if not mask.any():
    raise ValueError("labels contain no query positions")
  return float(np.mean(predictions[mask] == labels[mask]))
