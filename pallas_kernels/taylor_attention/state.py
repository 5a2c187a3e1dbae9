"""The recurrent state of causal Taylor linear attention."""

from typing import NamedTuple

import jax.numpy as jnp

from pallas_kernels.taylor_attention.feature_map import feature_width


class TaylorState(NamedTuple):
  """Running sums over the keys seen so far, per head, always float32.

  Shapes use B = batch, H = heads, E = feature width 1 + F + F(F+1)/2, D = value head dim.
  """
  kv: jnp.ndarray  # [B, H, E, D]: sum_j phi(k_j) v_j^T, the numerator state.
  k: jnp.ndarray  # [B, H, E]: sum_j phi(k_j), the normaliser state.


def zero_state(batch: int, heads: int, feature_dim: int, value_dim: int) -> TaylorState:
  """The state before any token."""
  e = feature_width(feature_dim)
  return TaylorState(
      kv=jnp.zeros((batch, heads, e, value_dim), jnp.float32),
      k=jnp.zeros((batch, heads, e), jnp.float32),
  )
