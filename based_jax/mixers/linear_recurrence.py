"""Causal linear attention with an optional decay on the key dim: the recurrence shared by GLA,
RWKV and linear attention with a non-Taylor feature map.

Shapes use the dimension letters of `based_jax/__init__.py`, with J the key width and U the
value width of one head (kernel-local letters). Per head, with S a [J, U] state:

    S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T
    o_t = q_t S_t                                   (strict=False: GLA, linear attention)
    o_t = q_t S_{t-1} + (q_t . (u * k_t)) v_t       (strict=True with bonus u: RWKV)

with g_t <= 0 the log decay (None: no decay). `step` is one token of the recurrence (decoding).
`chunked` is the same function over T tokens: inside a chunk of C tokens the masked quadratic
form (with decays, weights q_t . (k_s * exp(b_t - b_s)) for b the cumulative log decay, every
exponent <= 0, so nothing overflows), across chunks the state. `quadratic` is the one-chunk
form from a zero state without decays, when no state is wanted (training); `causal` picks one
of the three for a mixer's call. Everything is float32.
"""

from typing import Optional

import jax
import jax.numpy as jnp

CHUNK = 64  # tokens per chunk without decays: a [C, C] score matrix per head
QUADRATIC_MAX_T = 512  # `causal` trains up to this T by `quadratic` (as the Taylor XLA path)
DECAY_CHUNK = 16  # with decays, whose weights are [C, C, J] per head


def _f32(x):
  return None if x is None else x.astype(jnp.float32)


def step(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, state: jnp.ndarray, *,
         log_decay: Optional[jnp.ndarray] = None, bonus: Optional[jnp.ndarray] = None,
         strict: bool = False) -> tuple[jnp.ndarray, jnp.ndarray]:
  """One token: q, k, log_decay [B, H, J], v [B, H, U], state [B, H, J, U], bonus [H, J].

  Returns o [B, H, U] and the new state, float32."""
  q, k, v, log_decay = _f32(q), _f32(k), _f32(v), _f32(log_decay)
  state = state.astype(jnp.float32)
  new = state if log_decay is None else jnp.exp(log_decay)[..., None] * state
  new = new + k[..., :, None] * v[..., None, :]
  o = jnp.einsum("bhj,bhju->bhu", q, state if strict else new)
  if bonus is not None:
    o = o + jnp.sum(q * bonus * k, axis=-1, keepdims=True) * v
  return o, new


def quadratic(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, *,
              mask: Optional[jnp.ndarray] = None) -> jnp.ndarray:
  """o_t = sum_{s <= t} (q_t . k_s) v_s from a zero state, without decays or the final state
  (training): one masked [T, T] score matrix per head, no [J, U] state is formed.

  q, k: [B, T, H, J]; v: [B, T, H, U]; mask: [B, T] bool (False: padding keys) or None.
  Returns o [B, T, H, U] float32."""
  t = q.shape[1]
  scores = jnp.einsum("bthj,bshj->bhts", _f32(q), _f32(k))
  keep = jnp.tril(jnp.ones((t, t), bool))[None, None]
  if mask is not None:
    keep = keep & mask[:, None, None, :]
  return jnp.einsum("bhts,bshu->bthu", jnp.where(keep, scores, 0.0), _f32(v))


def chunked(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, *,
            state: Optional[jnp.ndarray] = None, log_decay: Optional[jnp.ndarray] = None,
            bonus: Optional[jnp.ndarray] = None, strict: bool = False,
            mask: Optional[jnp.ndarray] = None,
            chunk: Optional[int] = None) -> tuple[jnp.ndarray, jnp.ndarray]:
  """The recurrence over T tokens.

  Args:
    q, k: [B, T, H, J]; v: [B, T, H, U]; log_decay: [B, T, H, J] (<= 0) or None.
    state: [B, H, J, U] before the call; zeros if None.
    bonus: [H, J] RWKV's weight of the current token (with strict=True), or None.
    strict: the query reads the state before its own token (RWKV) instead of after (GLA).
    mask: [B, T] bool, False for padding, which leaves the state alone; all True if None.
    chunk: tokens per chunk (default CHUNK, DECAY_CHUNK with decays).

  Returns:
    o [B, T, H, U] and the state after the last valid token [B, H, J, U], float32.
  """
  b, t, h, j = q.shape
  u = v.shape[-1]
  q, k, v, log_decay = _f32(q), _f32(k), _f32(v), _f32(log_decay)
  if mask is not None:
    k = k * mask[:, :, None, None]
    if log_decay is not None:
      log_decay = log_decay * mask[:, :, None, None]
  state = jnp.zeros((b, h, j, u), jnp.float32) if state is None else state.astype(jnp.float32)
  c = min(chunk or (CHUNK if log_decay is None else DECAY_CHUNK), t)
  n = -(-t // c)
  causal = jnp.tril(jnp.ones((c, c), bool), -1 if strict else 0)

  def split(x):  # [B, T, ...] -> [n, B, C, ...], zero-padded (zero keys and decays: no-ops)
    x = jnp.pad(x, [(0, 0), (0, n * c - t)] + [(0, 0)] * (x.ndim - 2))
    return jnp.moveaxis(x.reshape(b, n, c, *x.shape[2:]), 1, 0)

  def body(s, xs):
    qc, kc, vc, gc = xs
    if gc is None:
      scores = jnp.where(causal[:, :, None], jnp.einsum("bthj,bshj->btsh", qc, kc), 0.0)
      o = jnp.einsum("bthj,bhju->bthu", qc, s)
      s_new = s + jnp.einsum("bshj,bshu->bhju", kc, vc)
    else:
      cum = jnp.cumsum(gc, axis=1)  # b_t, inclusive
      cum_q = cum - gc if strict else cum  # the decay a query's state has seen
      rel = jnp.where(causal[None, :, :, None, None], cum_q[:, :, None] - cum[:, None], -jnp.inf)
      scores = jnp.einsum("bthj,bshj,btshj->btsh", qc, kc, jnp.exp(rel))
      o = jnp.einsum("bthj,bhju->bthu", qc * jnp.exp(cum_q), s)
      last = cum[:, -1]  # [B, H, J]
      s_new = (jnp.exp(last)[..., None] * s
               + jnp.einsum("bshj,bshu->bhju", kc * jnp.exp(last[:, None] - cum), vc))
    o = o + jnp.einsum("btsh,bshu->bthu", scores, vc)
    if bonus is not None:
      o = o + jnp.sum(qc * bonus * kc, axis=-1)[..., None] * vc
    return s_new, o

  xs = (split(q), split(k), split(v), None if log_decay is None else split(log_decay))
  final, os = jax.lax.scan(body, state, xs)
  return jnp.moveaxis(os, 0, 1).reshape(b, n * c, h, u)[:, :t], final


def causal(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, *, state: Optional[jnp.ndarray],
           lengths: Optional[jnp.ndarray], log_decay: Optional[jnp.ndarray] = None,
           bonus: Optional[jnp.ndarray] = None,
           strict: bool = False) -> tuple[jnp.ndarray, Optional[jnp.ndarray]]:
  """A mixer's call: one `step` when decoding (T = 1 with a state), `quadratic` for training
  (no state, no decays, T <= QUADRATIC_MAX_T), else `chunked`. Arguments as `chunked`, with
  lengths [B] (valid tokens per row) for its mask.

  Returns o [B, T, H, U] float32 and the state after each row's valid tokens (None without a
  state)."""
  t = q.shape[1]
  if state is not None and t == 1:
    o, new = step(q[:, 0], k[:, 0], v[:, 0], state, log_decay=None if log_decay is None
                  else log_decay[:, 0], bonus=bonus, strict=strict)
    if lengths is not None:  # a row of length 0 keeps its state
      new = jnp.where((lengths > 0)[:, None, None, None], new, state.astype(jnp.float32))
    return o[:, None], new
  mask = None if lengths is None else jnp.arange(t) < lengths[:, None]
  if state is None and log_decay is None and bonus is None and not strict and t <= QUADRATIC_MAX_T:
    return quadratic(q, k, v, mask=mask), None
  o, new = chunked(q, k, v, state=state, log_decay=log_decay, bonus=bonus, strict=strict,
                   mask=mask)
  return o, (None if state is None else new)
