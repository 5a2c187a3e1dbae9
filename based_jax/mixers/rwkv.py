"""RWKV-5 ("Eagle"; Peng et al., 2024) time mixing: a matrix-valued state per head with a
learned per-channel decay and a bonus for the current token.

Shapes use the dimension letters of `based_jax/__init__.py`; H = config.la_heads heads of
K = D / H channels.

  x'_c = mu_c x_t + (1 - mu_c) x_{t-1}      token shift, one mix mu [D] for each of r, k, v, g
  r, k, v = W_r x'_r, W_k x'_k, W_v x'_v    D -> D each, no bias;  g = silu(W_g x'_g)
  S_t = diag(w) S_{t-1} + k_t v_t^T         per head, w = exp(-exp(decay)) in (0, 1) [H, K]
  o_t = r_t S_{t-1} + (r_t . (bonus * k_t)) v_t
  out = out_proj(group_norm(o) * g)         per-head normalisation, D -> D, no bias

The recurrence is `linear_recurrence.causal` (strict, with bonus). Cache: the last input [B, 1, D]
(token shift) and the state S [B, H, K, K] float32 (what is counted: H K K values).
"""

from typing import NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from based_jax.config import ModelConfig
from based_jax.layers import dense
from based_jax.mixers import linear_recurrence
from based_jax.mixers.short_conv import causal_conv

GROUP_NORM_EPS = 64e-5  # RWKV-5's per-head normalisation epsilon (1e-5 times 8^2)


class RwkvCache(NamedTuple):
  shift: jnp.ndarray  # [B, 1, D] compute dtype: the previous token's input.
  state: jnp.ndarray  # [B, H, K, K] float32: sum of decayed k v^T.


def init_rwkv_cache(config: ModelConfig, batch: int, max_len: int = 0) -> RwkvCache:
  del max_len
  h, k = config.la_heads, config.d_model // config.la_heads
  return RwkvCache(jnp.zeros((batch, 1, config.d_model), jnp.dtype(config.dtype)),
                   jnp.zeros((batch, h, k, k), jnp.float32))


def state_values(config: ModelConfig, seq_len: int, symmetric: bool = True) -> int:
  """H K K: the matrix states (the token-shift input is not counted)."""
  del seq_len, symmetric
  return config.d_model * (config.d_model // config.la_heads)


def mixing_flops(config: ModelConfig, seq_len: int) -> float:
  """Forward FLOPs per token: update and read out the [K, K] states, 4 D K."""
  del seq_len
  return 4 * config.d_model * (config.d_model // config.la_heads)


def _ramp(start: float, stop: float):
  """Initialiser: start .. stop across the channels (RWKV's layer-free initial profile)."""
  def init(key, shape, dtype):
    del key
    return jnp.linspace(start, stop, shape[-1], dtype=jnp.float32).astype(dtype)
  return init


class Rwkv(nn.Module):
  """RWKV-5 time mixing."""
  config: ModelConfig

  @nn.compact
  def __call__(self, x: jnp.ndarray, positions: jnp.ndarray, lengths: Optional[jnp.ndarray],
               cache: Optional[RwkvCache]) -> tuple[jnp.ndarray, Optional[RwkvCache]]:
    """x: [B, T, D]; lengths: [B] valid tokens (padding never enters the cache)."""
    del positions
    cfg = self.config
    b, t, d = x.shape
    h = cfg.la_heads
    k_dim = d // h
    # previous[t] = x[t - 1] (the cache's input at t = 0): a 2-tap conv with taps [1, 0]
    previous, shift = causal_conv(x, jnp.array([[1.0], [0.0]], x.dtype),
                                  None if cache is None else cache.shift, lengths)
    mixed = {}
    for name in ("r", "k", "v", "g"):
      mu = self.param(f"mix_{name}", _ramp(1.0, 0.0), (d,), jnp.float32).astype(x.dtype)
      mixed[name] = x * mu + previous * (1 - mu)
    r = dense(cfg, d, use_bias=False, name="r_proj")(mixed["r"]).reshape(b, t, h, k_dim)
    k = dense(cfg, d, use_bias=False, name="k_proj")(mixed["k"]).reshape(b, t, h, k_dim)
    v = dense(cfg, d, use_bias=False, name="v_proj")(mixed["v"]).reshape(b, t, h, k_dim)
    g = nn.silu(dense(cfg, d, use_bias=False, name="g_proj")(mixed["g"]).astype(jnp.float32))
    decay = self.param("decay", _ramp(-6.0, -1.0), (d,), jnp.float32).reshape(h, k_dim)
    bonus = self.param("bonus", _ramp(1.0, 0.0), (d,), jnp.float32).reshape(h, k_dim)
    log_w = jnp.broadcast_to(-jnp.exp(decay), (b, t, h, k_dim))
    o, s = linear_recurrence.causal(r, k, v, state=None if cache is None else cache.state,
                                    lengths=lengths, log_decay=log_w, bonus=bonus, strict=True)
    mean = jnp.mean(o, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(o - mean), axis=-1, keepdims=True)
    o = ((o - mean) * jax.lax.rsqrt(var + GROUP_NORM_EPS)).reshape(b, t, d)
    o = (o * self.param("norm_scale", nn.initializers.ones, (d,), jnp.float32)
         + self.param("norm_bias", nn.initializers.zeros, (d,), jnp.float32))
    out = dense(cfg, d, use_bias=False, output=True, name="out_proj")((o * g).astype(x.dtype))
    return out, (None if cache is None else RwkvCache(shift, s))
