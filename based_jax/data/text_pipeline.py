"""Language-modelling batches from a token stream, through grain.

The stream (a memory-mapped token file, `token_files`) is cut into consecutive, non-overlapping
windows of T + 1 tokens: window i is `tokens[i (T+1) : (i+1) (T+1)]`, its inputs the first T
tokens and its labels the last T, so every token of the stream is in exactly one window (the
tail shorter than a window is left out). Documents are already separated by EOS in the stream,
so a window may span documents, as in the paper's (GPT-style) packing.

The split is fixed by the stream alone: every k-th window (k = round(1 / val_fraction)) is
validation, spread over the whole corpus, whatever the seed or the model. grain does the rest:
a `MapDataset` over the training windows, shuffled anew each epoch by `data_seed` (so runs of
different architectures with the same seed see the same batches), sharded per process, batched
and prefetched; its iterator state is checkpointed with the train state.
"""

import dataclasses
from typing import Iterator, Optional

import grain
import jax
import numpy as np


@dataclasses.dataclass(frozen=True)
class WindowSplit:
  """Window indices of the training and validation parts of a stream."""
  seq_len: int  # T: tokens per example (a window holds T + 1).
  train: np.ndarray  # int64 window indices.
  val: np.ndarray  # int64 window indices.


def split_windows(num_tokens: int, seq_len: int, val_fraction: float) -> WindowSplit:
  """The deterministic split of a stream of `num_tokens` into T + 1 token windows."""
  if seq_len < 1:
    raise ValueError(f"seq_len must be >= 1, got {seq_len}")
  if not 0 <= val_fraction < 1:
    raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
  windows = num_tokens // (seq_len + 1)
  need = 2 if val_fraction else 1
  if windows < need:
    raise ValueError(f"the corpus has {num_tokens:,} tokens, fewer than the {need} window(s) "
                     f"of seq_len + 1 = {seq_len + 1} tokens that training"
                     f"{' and validation' if val_fraction else ''} need: use a shorter "
                     "seq_len or more text")
  index = np.arange(windows)
  if not val_fraction:
    return WindowSplit(seq_len, index, index[:0])
  every = max(2, min(windows, round(1 / val_fraction)))
  is_val = index % every == every - 1
  return WindowSplit(seq_len, index[~is_val], index[is_val])


class _Windows:
  """Random access to windows of a token stream (a grain data source)."""

  def __init__(self, tokens: np.ndarray, windows: np.ndarray, seq_len: int):
    self._tokens, self._windows, self._width = tokens, windows, seq_len + 1

  def __len__(self) -> int:
    return len(self._windows)

  def __getitem__(self, i: int) -> dict[str, np.ndarray]:
    start = int(self._windows[i]) * self._width
    window = np.asarray(self._tokens[start:start + self._width], np.int32)
    return {"inputs": window[:-1], "labels": window[1:]}


def _process_shard(process_index: Optional[int], process_count: Optional[int]):
  index = jax.process_index() if process_index is None else process_index
  count = jax.process_count() if process_count is None else process_count
  if not 0 <= index < count:
    raise ValueError(f"process_index={index} outside [0, {count})")
  return index, count


def make_train_iterator(tokens: np.ndarray, split: WindowSplit, *, batch_size: int,
                        data_seed: int, process_index: Optional[int] = None,
                        process_count: Optional[int] = None) -> grain.DatasetIterator:
  """An endless, checkpointable iterator of {"inputs", "labels"}: int32 [batch_size, T].

  `batch_size` is this process's part of the global batch; the processes read disjoint
  windows of every global batch (the shuffled order is shared, then strided by process).
  """
  index, count = _process_shard(process_index, process_count)
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  if len(split.train) < batch_size * count:
    raise ValueError(f"the corpus has {len(split.train):,} training windows of "
                     f"{split.seq_len + 1} tokens, fewer than one global batch of "
                     f"{batch_size * count}: use a smaller batch_size or seq_len, or more text")
  ds = (grain.MapDataset.source(_Windows(tokens, split.train, split.seq_len))
        .shuffle(seed=data_seed)
        .repeat())
  ds = ds[index::count].batch(batch_size, drop_remainder=True)
  return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=4, prefetch_buffer_size=8)))


def make_eval_batches(tokens: np.ndarray, split: WindowSplit, *, batch_size: int,
                      max_batches: Optional[int] = None, process_index: Optional[int] = None,
                      process_count: Optional[int] = None) -> Iterator[dict[str, np.ndarray]]:
  """The validation windows in order, whole batches only (at most `max_batches`), this
  process's rows of each."""
  index, count = _process_shard(process_index, process_count)
  per_batch = batch_size * count
  n = len(split.val) // per_batch
  if max_batches is not None:
    n = min(n, max_batches)
  if n == 0:
    raise ValueError(f"{len(split.val)} validation windows make no batch of {per_batch}: "
                     "raise val_fraction or lower batch_size")
  source = _Windows(tokens, split.val, split.seq_len)
  for b in range(n):
    rows = [source[b * per_batch + index + count * r] for r in range(batch_size)]
    yield {k: np.stack([row[k] for row in rows]) for k in ("inputs", "labels")}
