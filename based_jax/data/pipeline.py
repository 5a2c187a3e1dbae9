"""grain input pipelines over in-memory token arrays.

Training: one dataset per slice (so every batch has a single sequence length and no compute
is spent on padding), each shuffled with its own seed, repeated and batched, then mixed in
proportion to the slice sizes. Each process reads a disjoint shard. The iterator's state
(`get_state` / `set_state`, or grain.checkpoint with Orbax) makes the data order resumable.
Evaluation: a fixed order, every example exactly once, the last batch padded with IGNORE labels.
"""

import functools
import sys
from typing import Iterator, Optional, Sequence

import grain
import jax
import numpy as np

from based_jax.data.batch import IGNORE
from based_jax.data.mqar import PAD, MqarBatch


def _shard(n: int, process_index: int, process_count: int) -> np.ndarray:
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} outside [0, {process_count})")
  return np.arange(process_index, n, process_count)


def _shuffled_batches(num_rows: int, batch_size: int, seed: int) -> grain.MapDataset:
  """Endless batches of row indices, int [batch_size]: epoch e is a permutation of the rows
  drawn from (seed, e), cut into num_rows // batch_size batches (its last num_rows % batch_size
  rows left out).

  One permutation per epoch and one slice per batch, instead of grain's per-index shuffle and
  batching, which make batch_size Python calls per batch: about 2 ms for 256 rows, longer than
  a small MQAR model's whole step on a GPU. Index-addressed, so the iterator state is still one
  position and resumes exactly.
  """
  per_epoch = num_rows // batch_size

  @functools.lru_cache(maxsize=2)  # the epoch being read (and the one before, at a boundary)
  def permutation(epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(num_rows)

  def rows(b: int) -> np.ndarray:
    epoch, i = divmod(b, per_epoch)
    return permutation(epoch)[i * batch_size:(i + 1) * batch_size]

  return grain.MapDataset.range(sys.maxsize).map(rows)


def make_train_iterator(slices: Sequence[MqarBatch], *, batch_size: int, seed: int,
                        weights: Optional[Sequence[float]] = None,
                        process_index: Optional[int] = None,
                        process_count: Optional[int] = None) -> grain.DatasetIterator:
  """An endless, checkpointable iterator of {"inputs", "labels"}: int32 [batch_size, T].

  Args:
    slices: the training data, one MqarBatch per sequence length.
    batch_size: examples per batch for this process.
    seed: shuffling seed (each slice derives its own).
    weights: how often each slice is drawn; default proportional to its size.
    process_index, process_count: this host's shard (default: jax's).
  """
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  if not slices:
    raise ValueError("no training slices")
  index = jax.process_index() if process_index is None else process_index
  count = jax.process_count() if process_count is None else process_count
  datasets, sizes = [], []
  for i, data in enumerate(slices):
    rows = _shard(len(data.inputs), index, count)
    if len(rows) < batch_size:
      raise ValueError(f"slice {i} has {len(rows)} examples for this process, fewer than "
                       f"batch_size={batch_size}")
    inputs, labels = data.inputs[rows], data.labels[rows]
    ds = _shuffled_batches(len(rows), batch_size, seed * 1000 + i).map(
        lambda j, x=inputs, y=labels: {"inputs": x[j], "labels": y[j]})
    # No reader threads: a batch is one gather, which threads only slow down (GIL, wake-ups).
    datasets.append(ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)))
    sizes.append(len(rows))
  weights = sizes if weights is None else weights
  if len(weights) != len(slices) or min(weights) <= 0:
    raise ValueError(f"weights must be {len(slices)} positive numbers, got {weights}")
  mixed = datasets[0] if len(datasets) == 1 else grain.IterDataset.mix(datasets, list(weights))
  return iter(mixed)


def make_eval_batches(inputs: np.ndarray, labels: np.ndarray, *,
                      batch_size: int) -> Iterator[dict[str, np.ndarray]]:
  """Batches in order; the last is padded (token PAD, label IGNORE) so every example counts once."""
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  for start in range(0, len(inputs), batch_size):
    x, y = inputs[start:start + batch_size], labels[start:start + batch_size]
    pad = batch_size - len(x)
    if pad:
      x = np.concatenate([x, np.full((pad, x.shape[1]), PAD, x.dtype)])
      y = np.concatenate([y, np.full((pad, y.shape[1]), IGNORE, y.dtype)])
    yield {"inputs": x, "labels": y}
