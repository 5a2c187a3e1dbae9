"""The plain-JAX decode attention the kernel computes (XLA: two batched products and a
softmax over every slot of the cache, masked)."""

from typing import Optional

import jax
import jax.numpy as jnp

MASKED = -1e30  # the logit of a slot a query may not see


def allowed_slots(pos: jnp.ndarray, q_pos: jnp.ndarray, window: Optional[int]) -> jnp.ndarray:
  """[B, S] bool: slot s holds a key (pos >= 0) at or before the query's position and, with a
  window W, no more than W positions before it."""
  qp = q_pos[:, None]
  allowed = (pos >= 0) & (pos <= qp)
  if window is not None:
    allowed &= pos >= qp - window
  return allowed


def decode_attention(q, k, v, pos, q_pos, *, window: Optional[int], scale: float):
  """q [B, H, K'] over k, v [B, H, S, K'] whose slots hold positions pos [B, S] (-1 empty),
  at query positions q_pos [B]: softmax(q k^T scale) v over the allowed slots, float32
  [B, H, K']."""
  logits = jnp.einsum("bhk,bhsk->bhs", q, k, preferred_element_type=jnp.float32)
  logits = jnp.where(allowed_slots(pos, q_pos, window)[:, None], logits * scale, MASKED)
  weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  return jnp.einsum("bhs,bhsk->bhk", weights, v, preferred_element_type=jnp.float32)
