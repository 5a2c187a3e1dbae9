"""Chunked causal Taylor linear attention in pure JAX: the portable fallback, linear in T.

Shapes use the dimension letters of `based_jax/__init__.py`. Time is cut into chunks of C
tokens. Inside a chunk the masked quadratic form is exact and cheap (C x C); across chunks the
running state (phi(k)^T v sums, [E, K] per head) carries everything earlier. A `lax.scan` over
chunks keeps memory at one state per chunk boundary. Cost per chunk: 2 C^2 (F + K) for the
local part plus 4 C E K for reading and updating the state. The Pallas kernels in this package
compute the same function faster on GPU.
"""

from typing import Optional

import jax
import jax.numpy as jnp

from pallas_kernels.taylor_attention import reference
from pallas_kernels.taylor_attention.state import TaylorState, for_compute, stored_like

DEFAULT_CHUNK = 64


def chunked(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, *,
            state: Optional[TaylorState] = None,
            key_mask: Optional[jnp.ndarray] = None,
            eps: float = 1e-6,
            chunk_size: int = DEFAULT_CHUNK) -> tuple[jnp.ndarray, TaylorState]:
  """Same contract as `reference.quadratic`; T need not be a multiple of `chunk_size`."""
  b, t = q.shape[:2]
  c = min(chunk_size, t)
  n = -(-t // c)
  pad = n * c - t
  if key_mask is None:
    key_mask = jnp.ones((b, t), bool)

  def split(x):  # [B, T, ...] -> [n, B, C, ...], zero-padded (padded keys are masked out)
    x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
    return jnp.moveaxis(x.reshape(b, n, c, *x.shape[2:]), 1, 0)

  def step(carry, xs):
    qc, kc, vc, mc = xs
    y, new = reference.quadratic(qc, kc, vc, state=carry, key_mask=mc, eps=eps)
    return new, y

  start = reference.initial_state(state, q, v)
  final, ys = jax.lax.scan(step, for_compute(start),  # a bf16 kv is rounded once, at the end
                           (split(q), split(k), split(v), split(key_mask)))
  y = jnp.moveaxis(ys, 0, 1).reshape(b, n * c, *ys.shape[3:])[:, :t]
  return y, stored_like(final, start)
