"""Causal softmax attention with rotary embeddings: sliding-window (BASED) or full (Transformer++).

Wqkv: D -> 3D packed, no bias; out_proj: D -> D, no bias; scale K^-1/2; softmax in float32.

Window convention: with `window = W` a query at position p sees positions p - W .. p, i.e. itself
and W earlier tokens. The released BASED configs say `window_size: 256` and their code halves it,
so they see 128 earlier tokens: our presets say `window=128`.

Cache: `S` slots of already-rotated keys and values plus the position each slot holds (-1 when
empty). Token at position p goes to slot p mod S. Sliding window: S = W + 1, a ring buffer.
Full attention: S = max_len, so nothing is ever overwritten (callers check the length).
A call attends over the cache as it was plus the call's own tokens, then writes those tokens:
this one path serves training (no cache), ragged prefill and decoding.
"""

from typing import NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from based_jax.config import ModelConfig
from based_jax.layers import apply_rotary, dense

_MASKED = -1e30


class AttentionCache(NamedTuple):
  k: jnp.ndarray  # [B, S, H, K] rotated keys, compute dtype.
  v: jnp.ndarray  # [B, S, H, K] values, compute dtype.
  pos: jnp.ndarray  # [B, S] int32 position held by each slot, -1 if empty.


def init_attention_cache(config: ModelConfig, batch: int, slots: int) -> AttentionCache:
  h = config.attn_heads
  shape = (batch, slots, h, config.d_model // h)
  dtype = jnp.dtype(config.dtype)
  return AttentionCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype),
                        jnp.full((batch, slots), -1, jnp.int32))


def _write(cache: AttentionCache, k, v, key_pos) -> AttentionCache:
  """Writes the call's valid tokens to slot pos mod S; only the last S can survive anyway."""
  b, s = cache.pos.shape
  last = jnp.max(key_pos, axis=1, keepdims=True)
  keep = (key_pos >= 0) & (key_pos > last - s)
  slot = jnp.where(keep, key_pos % s, s)  # slot s is out of range: dropped
  rows = jnp.arange(b)[:, None]
  return AttentionCache(
      k=cache.k.at[rows, slot].set(k.astype(cache.k.dtype), mode="drop"),
      v=cache.v.at[rows, slot].set(v.astype(cache.v.dtype), mode="drop"),
      pos=cache.pos.at[rows, slot].set(key_pos, mode="drop"))


class Attention(nn.Module):
  """Multi-head causal attention; `window=None` for full attention."""
  config: ModelConfig
  window: Optional[int]

  @nn.compact
  def __call__(self, x: jnp.ndarray, positions: jnp.ndarray, lengths: Optional[jnp.ndarray],
               cache: Optional[AttentionCache]) -> tuple[jnp.ndarray, Optional[AttentionCache]]:
    """x: [B, T, D]; positions: [B, T] absolute; lengths: [B] valid tokens or None."""
    cfg = self.config
    b, t, d = x.shape
    h = cfg.attn_heads
    qkv = dense(cfg, 3 * d, use_bias=False, name="Wqkv")(x).reshape(b, t, 3, h, d // h)
    q = apply_rotary(qkv[:, :, 0], positions, cfg.rope_base)
    k = apply_rotary(qkv[:, :, 1], positions, cfg.rope_base)
    v = qkv[:, :, 2]
    valid = jnp.ones((b, t), bool) if lengths is None else jnp.arange(t) < lengths[:, None]
    key_pos = jnp.where(valid, positions, -1)

    def scores(keys, kpos):  # [B, H, T, S'] with causal/window/empty-slot masking
      logits = jnp.einsum("bthk,bshk->bhts", q, keys, preferred_element_type=jnp.float32)
      qp, kp = positions[:, None, :, None], kpos[:, None, None, :]
      allowed = (kp >= 0) & (kp <= qp)
      if self.window is not None:
        allowed &= kp >= qp - self.window
      return jnp.where(allowed, logits * (d // h) ** -0.5, _MASKED)

    parts = [(k, v, key_pos)] if cache is None else [(cache.k, cache.v, cache.pos), (k, v, key_pos)]
    logits = [scores(pk, pp) for pk, _, pp in parts]
    weights = jax.nn.softmax(jnp.concatenate(logits, axis=-1), axis=-1)
    bounds = np.cumsum([lg.shape[-1] for lg in logits[:-1]]).tolist()
    out = sum(jnp.einsum("bhts,bshk->bthk", w.astype(pv.dtype), pv)
              for w, (_, pv, _) in zip(jnp.split(weights, bounds, axis=-1), parts))
    y = dense(cfg, d, use_bias=False, output=True, name="out_proj")(out.reshape(b, t, d))
    return y, (None if cache is None else _write(cache, k, v, key_pos))
