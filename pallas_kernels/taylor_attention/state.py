"""The recurrent state of causal Taylor linear attention.

Shapes use the dimension letters of `based_jax/__init__.py`.
"""

from typing import NamedTuple

import jax.numpy as jnp

from pallas_kernels.taylor_attention.feature_map import compute_dtype, feature_width


class TaylorState(NamedTuple):
  """Running sums over the keys seen so far, per head.

  The normaliser k is always float32: it grows like the token count, and a bf16 copy stops
  counting (`experiments/state_precision.py` simulates one; docs/results.md). The numerator kv
  is stored in float32 or bfloat16 (`STATE_DTYPES`); a bf16 kv halves the bytes a decoding
  step moves. All arithmetic is float32: a bf16 kv is rounded once per update, when
  it is stored, and outputs are read out before that rounding.
  """
  kv: jnp.ndarray  # [B, H, E, K]: sum_j phi(k_j) v_j^T, the numerator state.
  k: jnp.ndarray  # [B, H, E]: sum_j phi(k_j), the normaliser state.


STATE_DTYPES = ("float32", "bfloat16")  # storage dtypes of kv


def zero_state(batch: int, heads: int, feature_dim: int, value_dim: int,
               kv_dtype: str = "float32") -> TaylorState:
  """The state before any token."""
  if kv_dtype not in STATE_DTYPES:
    raise ValueError(f"kv_dtype must be one of {STATE_DTYPES}, got {kv_dtype!r}")
  e = feature_width(feature_dim)
  return TaylorState(
      kv=jnp.zeros((batch, heads, e, value_dim), kv_dtype),
      k=jnp.zeros((batch, heads, e), jnp.float32),
  )


def for_compute(state: TaylorState) -> TaylorState:
  """The state with kv in at least float32, for arithmetic."""
  return state._replace(kv=state.kv.astype(compute_dtype(state.kv.dtype)))


def stored_like(new: TaylorState, old: TaylorState) -> TaylorState:
  """`new` (computed in float32) with kv rounded to the storage dtype of `old`."""
  return new._replace(kv=new.kv.astype(old.kv.dtype))
