"""Causal softmax attention with rotary embeddings: sliding-window (BASED) or full (Transformer++).
With `config.rotary` False queries and keys carry no position (the paper's MQAR models).

Wqkv: D -> 3D packed, out_proj: D -> D, both without a bias (with biases under block_style
"zoology", as zoology's MHA and SlidingAttn); scale K^-1/2; softmax in float32.

Window convention: with `window = W` a query at position p sees positions p - W .. p, i.e. itself
and W earlier tokens. The released BASED configs say `window_size: 256` and their code halves it,
so they see 128 earlier tokens: our presets say `window=128`.

Cache: `S` slots of already-rotated keys (plain ones without rotary) and values, laid out
[B, H, S, K'] (batch and head most major, so a decode step's dots are plain batched
matrix-vector products over contiguous [S, K'] panels, with no transposed copy of the cache),
plus the position each slot holds (-1 when empty). Token at position p goes to slot p mod S.
Sliding window: S = W + 1, a ring buffer. Full attention: S = max_len, so nothing is ever
overwritten (callers check the length). K' is the head dim K, rounded up to a multiple of 8 only
when decoding uses cuDNN (its kernels need that; the padding is zeros and changes no score).

One call serves four cases, chosen at trace time:
  - no cache (training, a plain forward): causal (windowed) attention within the call;
  - an `EmptyAttentionCache` (what `init_attention_cache` returns, so the first call on a new
    cache: a prefill): the same attention within the call, then the call's keys and values are
    written to the cache;
  - one token per row (decoding): write it, then attend over the cache;
  - several tokens against a non-empty cache (chunked prefill): the general masked path, in
    query blocks so no [B, H, T, S] score tensor larger than a fixed budget is materialised.
Within-call attention is `jax.nn.dot_product_attention` with causal masking, a left window and
per-row `query_seq_lengths` / `key_value_seq_lengths` for right-padded prompts: on a CUDA GPU
with bfloat16 that is cuDNN flash attention (nothing quadratic is materialised), elsewhere
JAX's XLA implementation. `config.attention_impl` ("auto", "xla", "cudnn") and
`config.attention_decode_impl` (those and the Pallas kernel of `pallas_kernels.cache_attention`)
choose; `resolve_implementation` says what each path runs.
Cache writes are scatters into the existing buffers (in place under donation / loop carries):
the cache is never concatenated or copied whole.
"""

import warnings
from typing import NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from based_jax.config import ModelConfig
from based_jax.layers import SplitDense, apply_rotary, dense
from pallas_kernels import cache_attention
from pallas_kernels.cache_attention.reference import MASKED, allowed_slots, write

# Scores the general cached path materialises at once (float32 elements): 2^28 = 1 GiB, about
# the size of a prefill chunk's MLP activations; beyond it queries go in blocks (a lax.map).
_SCORE_BUDGET = 2**28
PATHS = ("prefill", "decode", "chunked_prefill")


class AttentionCache(NamedTuple):
  k: jnp.ndarray  # [B, H, S, K'] keys (rotated unless rotary=False), compute dtype.
  v: jnp.ndarray  # [B, H, S, K'] values, compute dtype.
  pos: jnp.ndarray  # [B, S] int32 position held by each slot, -1 if empty.


class EmptyAttentionCache(AttentionCache):
  """An `AttentionCache` known, at trace time, to hold nothing yet: the first call on it
  attends within its own tokens (flash attention where available) and returns a plain
  `AttentionCache`. Loop carries must use the plain type (`cache.as_carry`)."""


def cache_head_dim(config: ModelConfig) -> int:
  """K' of the cache: the head dim, padded to a multiple of 8 for cuDNN decoding."""
  k = config.d_model // config.attn_heads
  return _round_up(k, 8) if config.attention_decode_impl == "cudnn" else k


def init_attention_cache(config: ModelConfig, batch: int, slots: int) -> EmptyAttentionCache:
  shape = (batch, config.attn_heads, slots, cache_head_dim(config))
  dtype = jnp.dtype(config.dtype)
  return EmptyAttentionCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype),
                             jnp.full((batch, slots), -1, jnp.int32))


def state_values_full(config: ModelConfig, seq_len: int, symmetric: bool = True) -> int:
  """2 D T: every key and value of a T-token sequence."""
  del symmetric
  return 2 * config.d_model * seq_len


def state_values_window(config: ModelConfig, seq_len: int, symmetric: bool = True) -> int:
  """2 D W: the keys and values of the window (the ring holds W + 1 slots)."""
  del seq_len, symmetric
  return 2 * config.d_model * config.window


def mixing_flops_full(config: ModelConfig, seq_len: int) -> float:
  """Forward FLOPs per token of q k^T and the weighted sum of v: 4 D (T + 1) / 2 on average."""
  return 4 * config.d_model * (seq_len + 1) / 2


def mixing_flops_window(config: ModelConfig, seq_len: int) -> float:
  """Forward FLOPs per token over at most W + 1 keys."""
  return 4 * config.d_model * min(config.window + 1, (seq_len + 1) / 2)


def plain_cache(cache: AttentionCache) -> AttentionCache:
  """The same arrays as a plain `AttentionCache` (drops the trace-time 'empty' marker)."""
  return AttentionCache(*cache)


def _round_up(x: int, m: int) -> int:
  return -(-x // m) * m


def _on_cuda() -> bool:
  try:
    device = jax.devices()[0]
    return device.platform == "gpu" and "rocm" not in device.client.platform_version.lower()
  except Exception:  # noqa: BLE001 - no backend information: not CUDA
    return False


def resolve_implementation(config: ModelConfig, path: str) -> str:
  """The implementation that `config` runs on this backend for `path` ("xla" or "cudnn";
  decoding also "pallas" or "pallas_interpret": `pallas_kernels.cache_attention`), one
  of PATHS: 'prefill' (attention within a call: training, the first prefill chunk), 'decode'
  (one token against the cache) or 'chunked_prefill' (several tokens against a non-empty
  cache: always the masked XLA path).

  'auto' means cuDNN flash attention for the within-call path on a CUDA GPU in bfloat16 with a
  (padded) head dim <= 128, else XLA; for decoding 'auto' is the Pallas kernel on a GPU when
  every attention layer has a window (it reads each ring of W + 1 slots once, where the XLA
  einsums read it in two passes and materialise the scores between), else the XLA einsum over
  the cache: a full-attention cache of max_len slots would be one serial walk per (row, head)
  in the kernel, which small batches cannot spread over the GPU. 'cudnn' decoding reads only
  each row's valid slots but pads the head dim.
  This answer does not ask cuDNN: if cuDNN rejects a within-call attention under 'auto' (its
  version or the GPU lacks a feature), that call runs XLA and warns, so a 'cudnn' answer holds
  unless that warning was given. An explicit 'cudnn' that cuDNN rejects raises instead.
  """
  if path not in PATHS:
    raise ValueError(f"path must be one of {PATHS}, got {path!r}")
  if path == "chunked_prefill":
    return "xla"
  requested = config.attention_impl if path == "prefill" else config.attention_decode_impl
  if requested in cache_attention.IMPLEMENTATIONS:  # "pallas" needs a GPU
    return cache_attention.resolve(requested, jax.default_backend())
  if requested != "auto":
    return requested
  if path == "decode":
    windowed = not config.attention_layers  # only sliding-window layers attend
    return "pallas" if jax.default_backend() == "gpu" and windowed else "xla"
  head_dim = config.d_model // config.attn_heads
  if _on_cuda() and config.dtype == "bfloat16" and _round_up(head_dim, 8) <= 128:
    return "cudnn"
  return "xla"


def _pad_head(x: jnp.ndarray, size: int) -> jnp.ndarray:
  extra = size - x.shape[-1]
  return x if extra == 0 else jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, extra)])


def _within_call(q, k, v, lengths, window, scale, impl, auto: bool):
  """Causal (windowed) attention of a call's tokens among themselves. q, k, v [B, T, H, K]."""
  kwargs = dict(scale=scale, is_causal=True,
                local_window_size=None if window is None else (window, 0))
  if lengths is not None:
    lengths = lengths.astype(jnp.int32)
    kwargs.update(query_seq_lengths=lengths, key_value_seq_lengths=lengths)
  if impl == "cudnn":
    size = _round_up(q.shape[-1], 8)  # cuDNN needs a multiple of 8: zero columns, same scores
    try:
      out = jax.nn.dot_product_attention(_pad_head(q, size), _pad_head(k, size),
                                         _pad_head(v, size), implementation="cudnn", **kwargs)
      return out[..., :q.shape[-1]]
    except (NotImplementedError, RuntimeError) as e:
      if not auto:
        raise
      warnings.warn(f"attention: cuDNN rejected this call, which runs XLA instead of the "
                    f"'cudnn' that resolve_implementation reports: {e}")
  return jax.nn.dot_product_attention(q, k, v, implementation="xla", **kwargs)


def _masked_attention(q, keys, values, q_pos, k_pos, window, scale):
  """Queries q [B, T, H, K] over keys/values [B, H, S, K'] holding positions k_pos [B, S]
  (-1 empty) at query positions q_pos [B, T]; float32 output [B, T, H, K]. Queries go in
  blocks so that at most _SCORE_BUDGET float32 scores exist at once."""
  b, t, h, kd = q.shape
  s, size = keys.shape[2], keys.shape[3]
  q = _pad_head(q, size)

  def attend(qb, qpb):
    logits = jnp.einsum("bthk,bhsk->bhts", qb, keys, preferred_element_type=jnp.float32)
    allowed = allowed_slots(k_pos[:, None, :], qpb[:, :, None], window)  # [B, T, S]
    logits = jnp.where(allowed[:, None], logits * scale, MASKED)
    weights = jax.nn.softmax(logits, axis=-1).astype(values.dtype)
    return jnp.einsum("bhts,bhsk->bthk", weights, values, preferred_element_type=jnp.float32)

  block = max(1, min(t, _SCORE_BUDGET // (b * h * s)))
  if block >= t:
    out = attend(q, q_pos)
  else:
    n = -(-t // block)
    qs = jnp.pad(q, ((0, 0), (0, n * block - t), (0, 0), (0, 0)))
    ps = jnp.pad(q_pos, ((0, 0), (0, n * block - t)))
    outs = jax.lax.map(lambda xs: attend(*xs),
                       (qs.reshape(b, n, block, h, size).swapaxes(0, 1),
                        ps.reshape(b, n, block).swapaxes(0, 1)))
    out = outs.swapaxes(0, 1).reshape(b, n * block, h, size)[:, :t]
  return out[..., :kd]


def _slots(cache: AttentionCache, key_pos) -> jnp.ndarray:
  """[B, T] the slot of each of the call's tokens (key_pos [B, T], -1 for padding): pos mod S
  for valid ones; S (out of range: dropped) for padding and for tokens a later token of the
  same call evicts (only the last S can survive, so they are dropped rather than written
  twice)."""
  s = cache.pos.shape[1]
  last = jnp.max(key_pos, axis=1, keepdims=True)
  keep = (key_pos >= 0) & (key_pos > last - s)
  return jnp.where(keep, key_pos % s, s)


def _write_positions(cache: AttentionCache, key_pos, slot) -> jnp.ndarray:
  return cache.pos.at[jnp.arange(cache.pos.shape[0])[:, None], slot].set(key_pos, mode="drop")


def _write(cache: AttentionCache, k, v, key_pos) -> AttentionCache:
  """The call's valid tokens (k, v [B, T, H, K]) stored at their slots (`_slots`), in place."""
  size = cache.k.shape[-1]
  slot = _slots(cache, key_pos)
  return AttentionCache(k=write(cache.k, _pad_head(k, size), slot),
                        v=write(cache.v, _pad_head(v, size), slot),
                        pos=_write_positions(cache, key_pos, slot))


def _decode(q, k, v, key_pos, cache: AttentionCache, q_pos, window, scale, impl):
  """One token per row, q, k, v [B, 1, H, K]: stores its key and value (the query sees its own
  key), then attends over the cache. Returns the output [B, 1, H, K] and the new cache."""
  kd = q.shape[-1]
  b, h, s, size = cache.k.shape
  q, k, v = (_pad_head(x, size) for x in (q, k, v))
  if impl == "cudnn":
    # Slots 0 .. min(p, S - 1) are the valid ones (positions are contiguous from 0 and slot =
    # position mod S), so a key length per row is the whole mask; softmax ignores slot order.
    try:  # jax.nn.dot_product_attention takes BTNH only; the cache is BNTH: private API
      from jax._src.cudnn import fused_attention_stablehlo as cudnn
    except ImportError as e:
      raise NotImplementedError("attention_decode_impl='cudnn' needs jax._src.cudnn") from e
    cache = _write(cache, k, v, key_pos)
    kv_len = jnp.minimum(q_pos[:, 0] + 1, s).astype(jnp.int32)
    out = cudnn.dot_product_attention(
        q.swapaxes(1, 2), cache.k, cache.v, q_seqlen=jnp.ones((b,), jnp.int32),
        kv_seqlen=kv_len, scale=scale, mask_type=cudnn.MaskType.PADDING, qkv_layout="BNTH")
    return out.swapaxes(1, 2)[..., :kd], cache
  slot = _slots(cache, key_pos)
  pos = _write_positions(cache, key_pos, slot)
  out, keys, values = cache_attention.decode_attention(
      q[:, 0], k[:, 0], v[:, 0], cache.k, cache.v, pos, q_pos[:, 0], slot[:, 0], window=window,
      scale=scale, impl=impl)
  return out[:, None, :, :kd], AttentionCache(keys, values, pos)


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
    dtype = jnp.dtype(cfg.dtype)
    scale = (d // h) ** -0.5
    biased = cfg.block_style == "zoology"
    q, k, v = (y.reshape(b, t, h, d // h)
               for y in SplitDense(cfg, (d, d, d), use_bias=biased, name="Wqkv")(x))
    if cfg.rotary:  # every path below (and the cache) sees q and k as they are here
      q = apply_rotary(q, positions, cfg.rope_base, cfg.rotary_dims)
      k = apply_rotary(k, positions, cfg.rope_base, cfg.rotary_dims)
    q, k = q.astype(dtype), k.astype(dtype)
    valid = jnp.ones((b, t), bool) if lengths is None else jnp.arange(t) < lengths[:, None]
    key_pos = jnp.where(valid, positions, -1)

    if cache is None or isinstance(cache, EmptyAttentionCache):
      impl = resolve_implementation(cfg, "prefill")
      out = _within_call(q, k, v, lengths, self.window, scale, impl,
                         auto=cfg.attention_impl == "auto")
      new_cache = None if cache is None else _write(cache, k, v, key_pos)
    elif t == 1:
      out, new_cache = _decode(q, k, v, key_pos, cache, positions, self.window, scale,
                               resolve_implementation(cfg, "decode"))
    elif self.window is None:
      new_cache = _write(cache, k, v, key_pos)  # S = max_len: writing clobbers nothing
      out = _masked_attention(q, new_cache.k, new_cache.v, positions, new_cache.pos, None, scale)
    else:
      # A ring buffer: this call's writes could evict keys its own earlier queries need, so
      # attend over the old ring plus the call's tokens (both small), then write.
      size = cache.k.shape[-1]
      keys = jnp.concatenate([cache.k, _pad_head(k, size).swapaxes(1, 2)], axis=2)
      values = jnp.concatenate([cache.v, _pad_head(v, size).swapaxes(1, 2)], axis=2)
      out = _masked_attention(q, keys, values, positions,
                              jnp.concatenate([cache.pos, key_pos], axis=1), self.window, scale)
      new_cache = _write(cache, k, v, key_pos)
    out = jnp.where(valid[:, :, None, None], out, 0).astype(dtype)  # padding rows: exact zeros
    y = dense(cfg, d, use_bias=biased, output=True, name="out_proj")(out.reshape(b, t, d))
    return y, new_cache
