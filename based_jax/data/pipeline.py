"""grain input pipelines over in-memory token arrays.

Training batches have a single sequence length each (no compute is spent on padding between
lengths), in one of two orders (`DATA_ORDERS`):
  "mixed"   one dataset per slice, each reshuffled every epoch with its own seed, repeated and
            batched, then mixed in proportion to the slice sizes; each process reads a
            disjoint shard of every slice;
  "epochs"  the order of zoology's MQAR DataLoader (the code behind the BASED paper's
            figures): every epoch walks the slices in the mix's order and each slice's
            examples in generation order, no shuffling; a slice's last batch is partial,
            its missing rows padded with ignored labels; each process reads its share of
            every global batch.
The iterator's state (`get_state` / `set_state`, or grain.checkpoint with Orbax) makes either
order resumable. Evaluation: a fixed order, every example exactly once, the last batch padded
with ignored labels.
"""

import functools
import sys
from typing import Iterator, Optional, Sequence

import grain
import jax
import numpy as np

from based_jax.data.batch import IGNORE
from based_jax.data.mqar import PAD, MqarBatch


def _check_process(process_index: int, process_count: int) -> None:
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} outside [0, {process_count})")


def _shard(n: int, process_index: int, process_count: int) -> np.ndarray:
  _check_process(process_index, process_count)
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


def _epoch_batches(slices: Sequence[MqarBatch], batch_size: int, process_index: int,
                   process_count: int) -> grain.MapDataset:
  """Endless batches in the "epochs" order: {"inputs", "labels"} int32 [batch_size, T].

  Global batch g of an epoch covers rows [start, start + G) of one slice (G = batch_size x
  process_count); this process reads its batch_size of them. Rows past the slice's end are
  padding (`_pad_rows`), so every process sees the same sequence of shapes.
  """
  _check_process(process_index, process_count)
  global_batch = batch_size * process_count
  plan = [(data, start) for data in slices for start in range(0, len(data.inputs), global_batch)]

  def batch(b: int) -> dict[str, np.ndarray]:
    data, start = plan[b % len(plan)]
    lo = min(start + process_index * batch_size, start + global_batch, len(data.inputs))
    hi = min(lo + batch_size, start + global_batch, len(data.inputs))
    return _pad_rows(data.inputs[lo:hi], data.labels[lo:hi], batch_size)

  return grain.MapDataset.range(sys.maxsize).map(batch)


DATA_ORDERS = ("mixed", "epochs")  # the training orders (module docstring)


def make_train_iterator(slices: Sequence[MqarBatch], *, batch_size: int, seed: int,
                        order: str = "mixed", weights: Optional[Sequence[float]] = None,
                        process_index: Optional[int] = None,
                        process_count: Optional[int] = None) -> grain.DatasetIterator:
  """An endless, checkpointable iterator of {"inputs", "labels"}: int32 [batch_size, T].

  Args:
    slices: the training data, one MqarBatch per sequence length.
    batch_size: examples per batch for this process.
    seed: shuffling seed of the "mixed" order (each slice derives its own).
    order: one of DATA_ORDERS (module docstring).
    weights: how often each slice is drawn in the "mixed" order; default proportional to its
      size.
    process_index, process_count: this host's shard (default: jax's).
  """
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  if not slices:
    raise ValueError("no training slices")
  if order not in DATA_ORDERS:
    raise ValueError(f"order must be one of {DATA_ORDERS}, got {order!r}")
  index = jax.process_index() if process_index is None else process_index
  count = jax.process_count() if process_count is None else process_count
  # No reader threads: a batch is one gather, which threads only slow down (GIL, wake-ups).
  read = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
  if order == "epochs":
    if weights is not None:
      raise ValueError("weights apply to the 'mixed' order; the 'epochs' order reads every "
                       "slice once per epoch")
    return iter(_epoch_batches(slices, batch_size, index, count).to_iter_dataset(read))
  datasets, sizes = [], []
  for i, data in enumerate(slices):
    rows = _shard(len(data.inputs), index, count)
    if len(rows) < batch_size:
      raise ValueError(f"slice {i} has {len(rows)} examples for this process, fewer than "
                       f"batch_size={batch_size}")
    inputs, labels = data.inputs[rows], data.labels[rows]
    ds = _shuffled_batches(len(rows), batch_size, seed * 1000 + i).map(
        lambda j, x=inputs, y=labels: {"inputs": x[j], "labels": y[j]})
    datasets.append(ds.to_iter_dataset(read))
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
    yield _pad_rows(inputs[start:start + batch_size], labels[start:start + batch_size],
                    batch_size)


def _pad_rows(inputs: np.ndarray, labels: np.ndarray, batch_size: int) -> dict[str, np.ndarray]:
  """{"inputs", "labels"} [batch_size, T]: these rows, then rows of PAD tokens with IGNORE
  labels (which no loss or accuracy counts)."""
  pad = batch_size - len(inputs)
  if pad:
    inputs = np.concatenate([inputs, np.full((pad, inputs.shape[1]), PAD, inputs.dtype)])
    labels = np.concatenate([labels, np.full((pad, labels.shape[1]), IGNORE, labels.dtype)])
  return {"inputs": inputs, "labels": labels}
