"""Gated linear attention (GLA; Yang et al., 2024): linear attention whose state decays by a
data-dependent gate on the key dim.

Shapes use the dimension letters of `based_jax/__init__.py`; H = config.la_heads heads, each
with keys of J = D / (2H) and values of K = D / H channels.

  q, k = q_proj(x), k_proj(x)           D -> D/2 each, no bias; q scaled by J^-1/2
  v, g = v_proj(x), g_proj(x)           D -> D each, no bias
  log_a = log_sigmoid(gate_up(gate_down(x))) / GATE_NORMALIZER     D -> 16 -> D/2 (bias)
  S_t = diag(exp(log_a_t)) S_{t-1} + k_t v_t^T;  o_t = q_t S_t      per head, S [J, K]
  out = out_proj(rms_norm(o) * silu(g))  per-head RMSNorm (scale [K]), D -> D, no bias

The recurrence is `linear_recurrence.causal` (chunked; one step when decoding). Cache: S
[B, H, J, K] float32 (H J K values, what is counted).
"""

from typing import NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from based_jax.config import ModelConfig
from based_jax.layers import dense
from based_jax.mixers import linear_recurrence

GATE_RANK = 16  # rank of the gate's low-rank projection
GATE_NORMALIZER = 16.0  # log_sigmoid(gate) / 16: decays start close to 1


class GlaCache(NamedTuple):
  state: jnp.ndarray  # [B, H, J, K] float32: sum of gated k v^T.


def init_gla_cache(config: ModelConfig, batch: int, max_len: int = 0) -> GlaCache:
  del max_len
  h = config.la_heads
  return GlaCache(jnp.zeros((batch, h, config.d_model // (2 * h), config.d_model // h),
                            jnp.float32))


def state_values(config: ModelConfig, seq_len: int, symmetric: bool = True) -> int:
  """H J K = (D / 2) (D / H)."""
  del seq_len, symmetric
  return (config.d_model // 2) * (config.d_model // config.la_heads)


def mixing_flops(config: ModelConfig, seq_len: int) -> float:
  """Forward FLOPs per token: update and read out the [J, K] states, 4 (D / 2) (D / H)."""
  del seq_len
  return 4 * (config.d_model // 2) * (config.d_model // config.la_heads)


class Gla(nn.Module):
  """Gated linear attention with an output gate."""
  config: ModelConfig

  @nn.compact
  def __call__(self, x: jnp.ndarray, positions: jnp.ndarray, lengths: Optional[jnp.ndarray],
               cache: Optional[GlaCache]) -> tuple[jnp.ndarray, Optional[GlaCache]]:
    """x: [B, T, D]; lengths: [B] valid tokens (padding never enters the cache)."""
    del positions
    cfg = self.config
    b, t, d = x.shape
    h = cfg.la_heads
    j, k_dim = d // (2 * h), d // h
    q = dense(cfg, d // 2, use_bias=False, name="q_proj")(x).reshape(b, t, h, j) * j**-0.5
    k = dense(cfg, d // 2, use_bias=False, name="k_proj")(x).reshape(b, t, h, j)
    v = dense(cfg, d, use_bias=False, name="v_proj")(x).reshape(b, t, h, k_dim)
    gate = dense(cfg, d // 2, use_bias=True, name="gate_up")(
        dense(cfg, GATE_RANK, use_bias=False, name="gate_down")(x))
    log_a = jax.nn.log_sigmoid(gate.astype(jnp.float32)).reshape(b, t, h, j) / GATE_NORMALIZER
    o, s = linear_recurrence.causal(q, k, v, state=None if cache is None else cache.state,
                                    lengths=lengths, log_decay=log_a)
    o = o * jax.lax.rsqrt(jnp.mean(o * o, axis=-1, keepdims=True) + cfg.norm_eps)
    o = o * self.param("norm_scale", nn.initializers.ones, (k_dim,), jnp.float32)
    g = nn.silu(dense(cfg, d, use_bias=False, name="g_proj")(x).astype(jnp.float32))
    out = dense(cfg, d, use_bias=False, output=True, name="out_proj")(
        (o.reshape(b, t, d) * g).astype(x.dtype))
    return out, (None if cache is None else GlaCache(s))
