"""The plain-JAX decode step the kernel computes (XLA: a scatter of the new key and value, two
batched products and a softmax over every slot of the cache, masked)."""

from typing import Optional

import jax
import jax.numpy as jnp

MASKED = -1e30  # the logit of a slot a query may not see


def allowed_slots(key_pos, query_pos, window: Optional[int]):
  """Whether a query at `query_pos` may see a slot holding the key at `key_pos` (-1: empty):
  the slot holds a key at or before the query's position and, with a window W, no more than W
  positions before it. Elementwise over broadcastable arrays (or scalars)."""
  allowed = (key_pos >= 0) & (key_pos <= query_pos)
  if window is not None:
    allowed &= key_pos >= query_pos - window
  return allowed


def write(cache, new, slot):
  """cache [B, H, S, K'] with new [B, T, H, K'] stored at slots slot [B, T] (S or more:
  dropped), in place when the cache is donated."""
  rows = jnp.arange(cache.shape[0])[:, None]  # cache[rows, :, slot] is [B, T, H, K']
  return cache.at[rows, :, slot].set(new.astype(cache.dtype), mode="drop")


def attend(q, k, v, pos, q_pos, *, window: Optional[int], scale: float):
  """q [B, H, K'] over k, v [B, H, S, K'] whose slots hold positions pos [B, S] (-1 empty),
  at query positions q_pos [B]: softmax(q k^T scale) v over the allowed slots, float32
  [B, H, K']."""
  logits = jnp.einsum("bhk,bhsk->bhs", q, k, preferred_element_type=jnp.float32)
  logits = jnp.where(allowed_slots(pos, q_pos[:, None], window)[:, None], logits * scale, MASKED)
  weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  return jnp.einsum("bhs,bhsk->bhk", weights, v, preferred_element_type=jnp.float32)


def decode_attention(q, new_k, new_v, k, v, pos, q_pos, slot, *, window: Optional[int],
                     scale: float):
  """`api.decode_attention`: new_k, new_v [B, H, K'] written to slot [B] of k, v, then `attend`
  over the updated caches (pos [B, S] already holds the new keys' positions). Returns the
  float32 output [B, H, K'] and the updated k, v."""
  k, v = (write(cache, new[:, None], slot[:, None]) for cache, new in ((k, new_k), (v, new_v)))
  return attend(q, k, v, pos, q_pos, window=window, scale=scale), k, v
