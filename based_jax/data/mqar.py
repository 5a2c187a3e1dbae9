"""Multi-query associative recall (MQAR; Zoology, Arora et al. 2023, as the BASED paper uses
it): a vectorised, seeded generator.

One example is a token sequence `seq` of length T + 1 (T = seq_len); the model reads
`inputs = seq[:T]` and is trained on `labels = seq[1:]`, masked to IGNORE everywhere except
where the input is a query key:

    k1 v1 k2 v2 ... kP vP | x x kq x x x x kr x x ...
    '---- context -----'   '-- every key queried once, in a slot of two tokens --'

- Keys: P distinct tokens from [1, V/2). Values: P distinct tokens from [V/2, V), also without
  replacement (as zoology), so no two keys of an example share a value.
- Queries: the region after the context is cut into slots of two tokens at even offsets; P of them
  are drawn without replacement with p(gap = i) ~ a i^(a-1) (i = 1 for the slot right after the
  context; a = 0.01), so queries cluster soon after the context. Keys are assigned to the drawn
  slots in a random order. The value is only the query's label: the slot's second token is
  filler, as in zoology's generator (the paper's data), so the query region never repeats a
  pair of the context. Only the last slot's second token may fall on token T, which exists
  only as a label.
- Filler: every other position is a random token from [1, V) that is not one of the example's
  keys, so a key appears only in its context pair and at its query: each label is unambiguous.
  Token 0 never occurs; it is the padding id of `build_mix` and the eval pipeline.

Fit: the context takes 2P tokens and the P query slots 2P more, of which the last slot's second
token may be token T, so the condition is 4P <= T + 1. Keys bound P by V/2 - 1.
"""

import dataclasses
from collections import Counter
from typing import NamedTuple, Sequence

import numpy as np

from based_jax.data.batch import IGNORE

PAD = 0  # token id of padding (never generated).
SPLITS = ("train", "test")  # data splits; each derives disjoint seeds.


class MqarBatch(NamedTuple):
  """One slice of MQAR data."""
  inputs: np.ndarray  # int32 [N, T] token ids.
  labels: np.ndarray  # int32 [N, T], IGNORE except at query keys, where it is the key's value.


class MqarMix(NamedTuple):
  """Several slices right-padded to one length and stacked (see `build_mix`)."""
  inputs: np.ndarray  # int32 [N, T_max] token ids, PAD after each example's own length.
  labels: np.ndarray  # int32 [N, T_max], IGNORE in the padding.
  slice_ids: np.ndarray  # int32 [N], index into the slices each example came from.


@dataclasses.dataclass(frozen=True)
class MqarSlice:
  """One (length, pairs, size) block of a train or test mix."""
  seq_len: int  # input tokens per example.
  num_kv_pairs: int  # key-value pairs in the context, each queried once.
  num_examples: int  # examples in the slice.

  def __post_init__(self):
    for field in dataclasses.fields(self):
      if getattr(self, field.name) < 1:
        raise ValueError(f"{field.name} must be >= 1, got {getattr(self, field.name)}")

  @property
  def name(self) -> str:
    return f"{self.seq_len}x{self.num_kv_pairs}"


def _slices(*rows: tuple[int, int, int]) -> tuple[MqarSlice, ...]:
  return tuple(MqarSlice(*row) for row in rows)


MIXES: dict[str, tuple[MqarSlice, ...]] = {
    # The BASED paper's MQAR training and test data.
    "paper_train": _slices((64, 4, 100_000), (128, 8, 20_000), (256, 16, 20_000),
                           (256, 32, 20_000), (256, 64, 20_000)),
    "paper_test": _slices((64, 4, 1000), (64, 8, 1000), (64, 16, 1000), (128, 32, 1000),
                          (256, 64, 1000), (512, 128, 1000), (1024, 256, 1000)),
    # The laptop task's natural training mix (about 9M training tokens).
    "small_train": _slices((64, 4, 20_000), (128, 8, 20_000), (256, 16, 20_000)),
    # The CPU default's training mix: 16 pairs in every sequence, at most 128 tokens. Dense,
    # short sequences teach recall per CPU-second fastest and generalise to the 256-token,
    # filler-heavy test slice (measured: docs/training.md).
    "dense_train": _slices((64, 16, 30_000), (128, 16, 30_000)),
    "small_test": _slices((64, 4, 1000), (128, 8, 1000), (256, 16, 1000)),
    # Seconds on CPU, for tests.
    "tiny_train": _slices((16, 2, 256), (32, 4, 256)),
    "tiny_test": _slices((16, 2, 64), (32, 4, 64)),
}


def get_mix(name: str) -> tuple[MqarSlice, ...]:
  """The named preset of MIXES."""
  if name not in MIXES:
    raise ValueError(f"unknown MQAR mix {name!r}; valid names: {sorted(MIXES)}")
  return MIXES[name]


def check_fits(seq_len: int, num_kv_pairs: int, vocab_size: int) -> None:
  """Raises ValueError unless the context and all queries fit and keys/values suffice."""
  if vocab_size < 4:
    raise ValueError(f"vocab_size must be >= 4 (token 0 is padding), got {vocab_size}")
  if num_kv_pairs < 1:
    raise ValueError(f"num_kv_pairs must be >= 1, got {num_kv_pairs}")
  if num_kv_pairs > vocab_size // 2 - 1:
    raise ValueError(f"num_kv_pairs={num_kv_pairs} exceeds the {vocab_size // 2 - 1} distinct "
                     f"keys [1, {vocab_size // 2}) of vocab_size={vocab_size}")
  if 4 * num_kv_pairs > seq_len + 1:
    raise ValueError(f"num_kv_pairs={num_kv_pairs} does not fit seq_len={seq_len}: the context "
                     f"and the queries need seq_len >= 4 * num_kv_pairs - 1 = "
                     f"{4 * num_kv_pairs - 1}")


def _distinct(rng: np.random.Generator, n: int, k: int, low: int, high: int) -> np.ndarray:
  """int32 [n, k], each row k distinct integers from [low, high) in random order.

  Floyd's algorithm, one column per step (O(n k^2), no rejection loop, however dense k is).
  """
  size = high - low
  out = np.empty((n, k), np.int32)
  for col, j in enumerate(range(size - k, size)):
    t = rng.integers(0, j + 1, n, dtype=np.int32)
    taken = (out[:, :col] == t[:, None]).any(axis=1)
    out[:, col] = np.where(taken, j, t)
  return rng.permuted(out, axis=1) + low


def _replace_keys(rng: np.random.Generator, tokens: np.ndarray, keys: np.ndarray,
                  vocab_size: int) -> None:
  """Redraws, in place, every token of row r of `tokens` that is one of row r's `keys`."""
  # Offsetting row r by r * V makes one sorted table answer all rows' membership at once.
  table = np.sort((keys + np.arange(len(keys))[:, None] * vocab_size).ravel())

  def is_key(values, rows):
    query = values + rows * vocab_size
    return table[np.minimum(np.searchsorted(table, query), len(table) - 1)] == query

  rows, cols = np.nonzero(is_key(tokens, np.arange(len(tokens), dtype=np.int64)[:, None]))
  while rows.size:
    tokens[rows, cols] = rng.integers(1, vocab_size, rows.size, dtype=tokens.dtype)
    again = is_key(tokens[rows, cols], rows)
    rows, cols = rows[again], cols[again]


def generate_mqar(num_examples: int, seq_len: int, num_kv_pairs: int, *, vocab_size: int = 8192,
                  power_a: float = 0.01, seed: int = 0) -> MqarBatch:
  """`num_examples` MQAR sequences of `seq_len` tokens, a function of the arguments only.

  Vectorised over examples (loops only over the kv pairs); see the module doc for the layout.
  Raises ValueError for arguments that cannot fit (see `check_fits`).
  """
  check_fits(seq_len, num_kv_pairs, vocab_size)
  if num_examples < 1:
    raise ValueError(f"num_examples must be >= 1, got {num_examples}")
  if not 0 < power_a < np.inf:
    raise ValueError(f"power_a must be a positive number, got {power_a}")
  if seed < 0:
    raise ValueError(f"seed must be >= 0, got {seed}")
  rng = np.random.default_rng(seed)
  n, p, half = num_examples, num_kv_pairs, vocab_size // 2
  keys = _distinct(rng, n, p, 1, half)
  values = _distinct(rng, n, p, half, vocab_size)

  seq = rng.integers(1, vocab_size, (n, seq_len + 1), dtype=np.int32)
  _replace_keys(rng, seq, keys, vocab_size)
  seq[:, 0:2 * p:2] = keys
  seq[:, 1:2 * p:2] = values

  # Slot j holds a query key at 2p + 2j (< seq_len), then filler. Drawing p slots with
  # weights gap^(a-1) without replacement = top-p of log-weight + Gumbel noise.
  num_slots = (seq_len + 1 - 2 * p) // 2
  log_weight = (power_a - 1) * np.log(np.arange(1, num_slots + 1))
  slots = np.argpartition(-(log_weight + rng.gumbel(size=(n, num_slots))), p - 1, axis=1)[:, :p]
  which = rng.permuted(np.broadcast_to(np.arange(p), (n, p)), axis=1)  # key asked in each slot
  rows = np.arange(n)[:, None]
  query_pos = 2 * p + 2 * slots
  seq[rows, query_pos] = keys[rows, which]

  labels = np.full((n, seq_len), IGNORE, np.int32)
  labels[rows, query_pos] = values[rows, which]
  return MqarBatch(seq[:, :seq_len], labels)


def _slice_seeds(slices: Sequence[MqarSlice], split: str, seed: int) -> list[int]:
  """A seed per slice from (seed, split, seq_len, num_kv_pairs, repeat count of that shape).

  Not from the slice's position, so inserting or removing a slice leaves the others' data
  unchanged; the split is part of the seed, so train and test never share a data stream.
  """
  if split not in SPLITS:
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
  if seed < 0:
    raise ValueError(f"seed must be >= 0, got {seed}")
  seen, seeds = Counter(), []
  for s in slices:
    shape = (s.seq_len, s.num_kv_pairs)
    entropy = [seed, SPLITS.index(split), *shape, seen[shape]]
    seeds.append(int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0]))
    seen[shape] += 1
  return seeds


def generate_mix(slices: Sequence[MqarSlice], *, split: str, vocab_size: int = 8192,
                 seed: int = 0) -> list[MqarBatch]:
  """One MqarBatch per slice, each from its own derived seed (see `_slice_seeds`)."""
  for s in slices:  # fail before generating anything
    check_fits(s.seq_len, s.num_kv_pairs, vocab_size)
  return [generate_mqar(s.num_examples, s.seq_len, s.num_kv_pairs, vocab_size=vocab_size,
                        seed=slice_seed)
          for s, slice_seed in zip(slices, _slice_seeds(slices, split, seed))]


def build_mix(slices: Sequence[MqarSlice], *, split: str, vocab_size: int = 8192, seed: int = 0,
              pad_to: int | None = None) -> MqarMix:
  """All slices in one array set: `generate_mix`, right-padded to the longest seq_len (or to
  `pad_to`) with token PAD and label IGNORE, concatenated in slice order."""
  if not slices:
    raise ValueError("no slices to build")
  longest = max(s.seq_len for s in slices)
  width = longest if pad_to is None else pad_to
  if width < longest:
    raise ValueError(f"pad_to={pad_to} is shorter than the longest seq_len={longest}")
  parts = generate_mix(slices, split=split, vocab_size=vocab_size, seed=seed)
  total = sum(len(part.inputs) for part in parts)
  inputs = np.full((total, width), PAD, np.int32)
  labels = np.full((total, width), IGNORE, np.int32)
  start = 0
  for part in parts:
    n, t = part.inputs.shape
    inputs[start:start + n, :t] = part.inputs
    labels[start:start + n, :t] = part.labels
    start += n
  slice_ids = np.repeat(np.arange(len(parts), dtype=np.int32), [len(p.inputs) for p in parts])
  return MqarMix(inputs, labels, slice_ids)


def query_accuracy(predictions, labels) -> float:
  """Fraction of query positions (label != IGNORE) where the predicted token id is the label.

  predictions, labels: int [N, T] (NumPy or jax arrays). Every example of a slice has the same
  number of queries, so this is also the mean over examples of their per-query accuracy.
  """
  predictions, labels = np.asarray(predictions), np.asarray(labels)
  if predictions.shape != labels.shape:
    raise ValueError(f"predictions {predictions.shape} and labels {labels.shape} differ in shape")
  mask = labels != IGNORE
  if not mask.any():
    raise ValueError("labels contain no query positions")
  return float(np.mean(predictions[mask] == labels[mask]))
