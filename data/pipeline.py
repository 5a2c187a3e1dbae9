"""grain input pipelines over in-memory MQAR arrays.

Training (`make_train_iterator`): each slice is a grain MapDataset over its row indices, cut to
this process's shard, shuffled and batched on its own, so every batch has a single sequence
length and no compute goes to padding (a `build_mix` array set is just one slice). The slices
are then combined either
- by epochs (default): all batches of all slices, in an order shuffled afresh every epoch,
  repeated `num_epochs` times (None: forever); or
- by `weights`: an endless, fixed interleave drawing slice i in proportion to weights[i].
Shards are equal-sized (strided rows, the last `len % process_count` rows dropped) and all
processes share the seeds, so at every step all processes emit a batch of the same slice, as a
global batch assembled from per-process parts needs.

The iterator is a `grain.DatasetIterator`: `get_state()` is a small JSON-able dict, and
`set_state()` on an iterator built with the same arguments resumes the exact batch sequence.
To keep it beside a train state in one Orbax checkpoint (orbax-checkpoint 0.12.8):
    manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(iterator)))
    manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), data=grain.checkpoint.CheckpointRestore(iterator)))
grain writes one `process_{i}-of-{n}.json` per JAX process, so a restore needs the same
process count.

Evaluation (`make_eval_batches`): a fixed order, every example exactly once, padding rows
(token 0, labels -100) completing the last batch.
"""

from typing import Optional, Sequence

import grain
import jax
import numpy as np

from data.mqar import IGNORE, PAD, MqarBatch

# Gathering a batch is one NumPy fancy index; a few threads and batches ahead hide it.
_READ_OPTIONS = grain.ReadOptions(num_threads=2, prefetch_buffer_size=8)


def _process(process_index: Optional[int], process_count: Optional[int]) -> tuple[int, int]:
  """(index, count) of this process: the given values, else jax's."""
  index = jax.process_index() if process_index is None else process_index
  count = jax.process_count() if process_count is None else process_count
  if count < 1 or not 0 <= index < count:
    raise ValueError(f"process_index={index} must be in [0, process_count={count})")
  return index, count


def shard_rows(num_examples: int, process_index: int, process_count: int) -> slice:
  """The rows of process `process_index`: strided, all shards of equal length."""
  return slice(process_index, num_examples - num_examples % process_count, process_count)


def _seed32(*entropy: int) -> int:
  """A 32-bit grain shuffle seed. Hashed, because grain reseeds epoch e with seed + e, so plain
  consecutive seeds would replay each other's orders one epoch apart."""
  return int(np.random.SeedSequence(list(entropy)).generate_state(1)[0])


def _check_arrays(inputs: np.ndarray, labels: np.ndarray, what: str) -> None:
  if inputs.ndim != 2 or inputs.shape != labels.shape:
    raise ValueError(f"{what}: inputs {inputs.shape} and labels {labels.shape} must be equal "
                     "[N, T] shapes")


def make_train_iterator(slices: Sequence[MqarBatch], *, batch_size: int, seed: int,
                        num_epochs: Optional[int] = None,
                        weights: Optional[Sequence[float]] = None,
                        process_index: Optional[int] = None,
                        process_count: Optional[int] = None) -> grain.DatasetIterator:
  """A checkpointable iterator of {"inputs", "labels"}: int32 [batch_size, T_slice] batches.

  Args:
    slices: the training data, one MqarBatch (inputs, labels [N_i, T_i]) per slice.
    batch_size: examples per batch on this process; each slice drops its last partial batch
      (a different one each epoch, as the shuffle changes).
    seed: shuffling seed (>= 0); slices and the batch order derive their own.
    num_epochs: passes over all batches of all slices; None repeats forever.
    weights: draw slice i in proportion to weights[i], forever, instead of by epochs.
    process_index, process_count: this process's shard (default: jax's).
  """
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  if not slices:
    raise ValueError("no training slices")
  if seed < 0:
    raise ValueError(f"seed must be >= 0, got {seed}")
  if num_epochs is not None and num_epochs < 1:
    raise ValueError(f"num_epochs must be >= 1 or None, got {num_epochs}")
  if weights is not None:
    if num_epochs is not None:
      raise ValueError("weights mix slices forever; they cannot be combined with num_epochs")
    if len(weights) != len(slices) or min(weights) <= 0:
      raise ValueError(f"weights must be {len(slices)} positive numbers, got {list(weights)}")
  index, count = _process(process_index, process_count)

  per_slice = []
  for i, data in enumerate(slices):
    _check_arrays(data.inputs, data.labels, f"slice {i}")
    rows = shard_rows(len(data.inputs), index, count)
    inputs, labels = data.inputs[rows], data.labels[rows]  # views, no copy
    if len(inputs) < batch_size:
      raise ValueError(f"slice {i} has {len(inputs)} examples on this process "
                       f"({len(data.inputs)} over {count} processes), fewer than "
                       f"batch_size={batch_size}")
    per_slice.append(
        grain.MapDataset.range(len(inputs))
        .shuffle(seed=_seed32(seed, i))
        .batch(batch_size, drop_remainder=True)
        .map(lambda idx, x=inputs, y=labels: {"inputs": x[idx], "labels": y[idx]}))

  if weights is None:
    dataset = (grain.MapDataset.concatenate(per_slice)
               .shuffle(seed=_seed32(seed, len(slices)))
               .repeat(num_epochs))
  else:
    dataset = grain.MapDataset.mix([ds.repeat() for ds in per_slice], list(weights))
  return iter(dataset.to_iter_dataset(_READ_OPTIONS))


def make_eval_batches(inputs: np.ndarray, labels: np.ndarray, *, batch_size: int,
                      process_index: Optional[int] = None,
                      process_count: Optional[int] = None) -> list[dict[str, np.ndarray]]:
  """This process's eval batches {"inputs", "labels"}: [batch_size, T], in a fixed order.

  The set is padded (token 0, label -100) to a multiple of batch_size * process_count and
  shared out by strided rows, so every process gets the same number of full batches and every
  real example is scored exactly once over all processes; padding rows score nothing.
  """
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  _check_arrays(inputs, labels, "eval set")
  index, count = _process(process_index, process_count)
  pad = -len(inputs) % (batch_size * count)
  inputs = np.pad(inputs, ((0, pad), (0, 0)), constant_values=PAD)[index::count]
  labels = np.pad(labels, ((0, pad), (0, 0)), constant_values=IGNORE)[index::count]
  return [{"inputs": inputs[start:start + batch_size], "labels": labels[start:start + batch_size]}
          for start in range(0, len(inputs), batch_size)]
