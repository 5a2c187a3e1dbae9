"""Batches of token rows of different lengths, for jitted calls that compile once per shape.

Rows are sorted longest first and padded to a bucket length T (a power of two, at least
`min_length`); a batch holds B = min(max_rows, token_budget // T) rows (at least 1), so a
batch's B x T tokens stay within the budget and every batch of a bucket has the same shape:
the last one is filled up with filler rows, which the caller ignores.
"""

from typing import NamedTuple, Sequence

import numpy as np

from based_jax.checks import check_positive_int


class Batch(NamedTuple):
  rows: list[int]  # indices of the real rows, in batch order (at most `size`).
  length: int  # T, the padded length of every row of the batch.
  size: int  # B, rows of the padded batch (rows beyond len(rows) are filler).


def bucket_length(n: int, min_length: int) -> int:
  """The padded length of a row of n tokens: the next power of two >= n, at least min_length."""
  return max(min_length, 1 << max(0, n - 1).bit_length())


def plan_batches(lengths: Sequence[int], token_budget: int, max_rows: int,
                 min_length: int = 64) -> list[Batch]:
  """Batches covering every row once (see the module docstring); rows of length 0 are
  refused."""
  for name, value in (("token_budget", token_budget), ("max_rows", max_rows),
                      ("min_length", min_length)):
    check_positive_int(name, value)
  lengths = [int(n) for n in lengths]
  if lengths and min(lengths) < 1:
    raise ValueError(f"row {lengths.index(min(lengths))} has no tokens")
  order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
  batches = []
  i = 0
  while i < len(order):
    length = bucket_length(lengths[order[i]], min_length)
    size = max(1, min(max_rows, token_budget // length))
    rows = []
    while i < len(order) and len(rows) < size and \
        bucket_length(lengths[order[i]], min_length) == length:
      rows.append(order[i])
      i += 1
    batches.append(Batch(rows, length, size))
  return batches


def pad_batch(rows: Sequence[Sequence[int]], batch: Batch, pad_id: int = 0
              ) -> tuple[np.ndarray, np.ndarray]:
  """tokens [B, T] int32 right-padded with `pad_id`, and lengths [B] int32, of the batch's
  rows (`rows` are all the rows, indexed by `batch.rows`); filler rows are one `pad_id`."""
  tokens = np.full((batch.size, batch.length), pad_id, np.int32)
  lengths = np.ones((batch.size,), np.int32)
  for slot, index in enumerate(batch.rows):
    row = rows[index]
    if len(row) > batch.length:
      raise ValueError(f"row {index} has {len(row)} tokens, more than the batch's {batch.length}")
    tokens[slot, :len(row)] = row
    lengths[slot] = len(row)
  return tokens, lengths
