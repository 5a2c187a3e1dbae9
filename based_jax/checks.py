"""Argument checks shared by the public entry points: each check defined once, each failure a
ValueError naming the argument. Values are checked only when they are concrete (outside
`jax.jit`); shapes and dtypes always are."""

import jax
import numpy as np


def is_concrete(x) -> bool:
  """Whether x has values now (not a tracer inside a jitted function)."""
  return not isinstance(x, jax.core.Tracer)


def check_token_ids(name: str, tokens, vocab_size: int) -> None:
  """tokens: an integer array [B, T] of ids in [0, vocab_size)."""
  if tokens.ndim != 2 or not np.issubdtype(tokens.dtype, np.integer):
    raise ValueError(f"{name} must be an integer array [batch, time], got shape "
                     f"{tuple(tokens.shape)} dtype {tokens.dtype}")
  if is_concrete(tokens) and tokens.size:
    host = np.asarray(tokens)
    lo, hi = int(host.min()), int(host.max())
    if lo < 0 or hi >= vocab_size:
      raise ValueError(f"{name}: token ids must lie in [0, vocab_size={vocab_size}), got min "
                       f"{lo} max {hi}")


def check_positive_int(name: str, value) -> None:
  if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
    raise ValueError(f"{name} must be an int >= 1, got {value!r}")


def check_index_array(name: str, x, shape: tuple, lo: int, hi: int, what: str) -> None:
  """x: an integer array of `shape` (None: any size) whose values (when concrete) lie in
  [lo, hi]."""
  fits = len(x.shape) == len(shape) and all(n is None or n == m for n, m in zip(shape, x.shape))
  if not fits or not np.issubdtype(x.dtype, np.integer):
    want = "[" + ", ".join("any" if n is None else str(n) for n in shape) + "]"
    raise ValueError(f"{name} must be an integer array of shape {want} ({what}), got "
                     f"shape {tuple(x.shape)} dtype {x.dtype}")
  if is_concrete(x) and x.size:
    host = np.asarray(x)
    if host.min() < lo or host.max() > hi:
      raise ValueError(f"{name} ({what}) must lie in [{lo}, {hi}], got min {host.min()} max "
                       f"{host.max()}")


def check_capacity(name: str, totals, capacity) -> None:
  """Rows that will hold `totals` [B] tokens fit a full-attention cache of `capacity` slots
  (None: the model has no full attention)."""
  if capacity is not None and is_concrete(totals) and totals.size:
    longest = int(np.max(np.asarray(totals)))
    if longest > capacity:
      raise ValueError(f"{name}: a row would reach {longest} tokens, more than the "
                       f"full-attention cache's max_len={capacity}; make the cache with "
                       "init_cache(..., max_len) large enough")
