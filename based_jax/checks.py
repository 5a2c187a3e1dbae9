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
