"""H3 (Hungry Hungry Hippos; Fu, Dao et al., 2023): a shift SSM on keys, a diagonal SSM on
key-value outer products, read out by queries.

Shapes use the dimension letters of `based_jax/__init__.py`; N = config.ssm_state, G = D / P
heads of P = H3_HEAD_DIM channels, M = N / 2 complex modes per head.

  q, k, v = q_proj(u), k_proj(u), v_proj(u)                    D -> D each, bias
  k = shift(k) + shift_skip * k     shift SSM = a causal FIR of N taps per channel (taps
                                    U(+-1/sqrt(N)), the reference's Conv1d-style init)
  kv[g, i, j] = k[g, i] v[g, j]     per head: P x P products
  s = ssm_g(kv) + ssm_skip_g * kv   diagonal SSM per head (S4D-Lin, ZOH), kernel
                                    K_g[l] = 2 Re(sum_m C_gm Bbar_gm Abar_gm^l)
  y[g, j] = sum_i q[g, i] s[g, i, j];  out = out_proj(y)      D -> D, bias

Training and prefill convolve with K by FFT (`long_conv.py`); decoding runs the complex
recurrence h = Abar h + Bbar x, s = 2 Re(C . h) + skip x. Cache: the shift SSM's last N - 1
keys [B, N - 1, D] (the paper counts this SSM's state, D N values) and the diagonal SSM's
state [B, G, P, P, M] complex64 (D P N real values, not counted by the paper).
"""

import math
from typing import NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from based_jax.config import H3_HEAD_DIM, ModelConfig
from based_jax.layers import dense
from based_jax.mixers.long_conv import fft_causal_conv
from based_jax.mixers.short_conv import causal_conv, fan_in_uniform

DT_MIN, DT_MAX = 1e-3, 1e-1  # range of the initial SSM step sizes (log-uniform)


class H3Cache(NamedTuple):
  shift: jnp.ndarray  # [B, N - 1, D] compute dtype: the last keys (the shift SSM's state).
  ssm: jnp.ndarray  # [B, G, P, P, M] complex64: the diagonal SSM's state.


def init_h3_cache(config: ModelConfig, batch: int, max_len: int = 0) -> H3Cache:
  del max_len
  d, n, p = config.d_model, config.ssm_state, H3_HEAD_DIM
  return H3Cache(jnp.zeros((batch, n - 1, d), jnp.dtype(config.dtype)),
                 jnp.zeros((batch, d // p, p, p, n // 2), jnp.complex64))


def state_values(config: ModelConfig, seq_len: int, symmetric: bool = True) -> int:
  """D N, as the paper counts H3 (its shift SSM's state)."""
  del seq_len, symmetric
  return config.d_model * config.ssm_state


def mixing_flops(config: ModelConfig, seq_len: int) -> float:
  """Forward FLOPs per token as the recurrence counts them: the shift filter (2 N D), the
  products and query readout (3 D P) and the diagonal SSM on D P channels (about 4 N each)."""
  del seq_len
  d, n, p = config.d_model, config.ssm_state, H3_HEAD_DIM
  return 2 * n * d + 3 * d * p + 4 * n * d * p


def _log_dt_init(key, shape, dtype):
  return (jax.random.uniform(key, shape) * (math.log(DT_MAX) - math.log(DT_MIN))
          + math.log(DT_MIN)).astype(dtype)


def _imag_init(key, shape, dtype):
  del key  # S4D-Lin: A_m = -1/2 + i pi m
  return jnp.broadcast_to(jnp.pi * jnp.arange(shape[-1], dtype=jnp.float32), shape).astype(dtype)


class H3(nn.Module):
  """The H3 layer."""
  config: ModelConfig

  def _ssm(self, heads: int, modes: int):
    """Abar, Bbar * C (for the kernel and the readout), C and the skip: [G, M] complex, [G]."""
    log_dt = self.param("ssm_log_dt", _log_dt_init, (heads,), jnp.float32)
    log_neg_re = self.param("ssm_log_neg_re", nn.initializers.constant(math.log(0.5)),
                            (heads, modes), jnp.float32)
    imag = self.param("ssm_imag", _imag_init, (heads, modes), jnp.float32)
    c = self.param("ssm_c", nn.initializers.normal(0.5**0.5), (heads, modes, 2), jnp.float32)
    skip = self.param("ssm_skip", nn.initializers.normal(1.0), (heads,), jnp.float32)
    a = -jnp.exp(log_neg_re) + 1j * imag
    dt_a = jnp.exp(log_dt)[:, None] * a
    a_bar = jnp.exp(dt_a)
    b_bar = (a_bar - 1.0) / a
    return dt_a, a_bar, b_bar, c[..., 0] + 1j * c[..., 1], skip

  @nn.compact
  def __call__(self, u: jnp.ndarray, positions: jnp.ndarray, lengths: Optional[jnp.ndarray],
               cache: Optional[H3Cache]) -> tuple[jnp.ndarray, Optional[H3Cache]]:
    """u: [B, T, D]; lengths: [B] valid tokens (padding never enters the cache)."""
    del positions
    cfg = self.config
    b, t, d = u.shape
    n, p = cfg.ssm_state, H3_HEAD_DIM
    g = d // p
    q = dense(cfg, d, use_bias=True, name="q_proj")(u).astype(jnp.float32)
    k = dense(cfg, d, use_bias=True, name="k_proj")(u)
    v = dense(cfg, d, use_bias=True, name="v_proj")(u).astype(jnp.float32)
    shift_kernel = self.param("shift_kernel", fan_in_uniform(n), (n, d),
                              jnp.dtype(cfg.param_dtype))
    shift_skip = self.param("shift_skip", nn.initializers.normal(1.0), (d,), jnp.float32)
    shifted, history = causal_conv(k, shift_kernel, None if cache is None else cache.shift,
                                   lengths)
    k = shifted.astype(jnp.float32) + shift_skip * k.astype(jnp.float32)
    kv = k.reshape(b, t, g, p, 1) * v.reshape(b, t, g, 1, p)  # [B, T, G, P, P]
    dt_a, a_bar, b_bar, c, skip = self._ssm(g, n // 2)
    h0 = None if cache is None else cache.ssm
    if h0 is not None and t == 1:  # decoding: one step of the recurrence
      h = a_bar[:, None, None] * h0 + b_bar[:, None, None] * kv[:, 0, ..., None]
      s = 2.0 * jnp.real(jnp.einsum("bgijm,gm->bgij", h, c))[:, None]
      if lengths is not None:
        h = jnp.where((lengths > 0)[:, None, None, None, None], h, h0)
    else:
      lags = jnp.arange(t, dtype=jnp.float32)
      powers = jnp.exp(lags[:, None, None] * dt_a)  # Abar^l [T, G, M]
      kernel = 2.0 * jnp.real(jnp.einsum("gm,lgm->lg", c * b_bar, powers))  # [T, G]
      s = fft_causal_conv(kv.reshape(b, t, g * p * p),
                          jnp.repeat(kernel, p * p, axis=1)).reshape(kv.shape)
      h = None
      if h0 is not None:
        s = s + 2.0 * jnp.real(jnp.einsum("lgm,gm,bgijm->blgij", powers * a_bar, c, h0))
        h = self._final_state(kv, h0, dt_a, a_bar, b_bar, lengths)
    s = s + skip[:, None, None] * kv
    y = jnp.einsum("btgi,btgij->btgj", q.reshape(b, t, g, p), s).reshape(b, t, d)
    out = dense(cfg, d, use_bias=True, output=True, name="out_proj")(y.astype(u.dtype))
    return out, (None if cache is None else H3Cache(history, h))

  @staticmethod
  def _final_state(kv, h0, dt_a, a_bar, b_bar, lengths):
    """Abar^L h0 + sum_{s < L} Abar^(L-1-s) Bbar kv_s per row, L its valid tokens."""
    b, t = kv.shape[:2]
    ends = jnp.full((b,), t) if lengths is None else lengths
    steps = ends[:, None] - 1 - jnp.arange(t)  # [B, T]
    valid = steps >= 0
    weights = jnp.where(valid[..., None, None],
                        jnp.exp(jnp.where(valid, steps, 0)[..., None, None] * dt_a), 0.0)
    carried = jnp.exp(ends[:, None, None] * dt_a)  # Abar^L [B, G, M]
    return (carried[:, :, None, None] * h0
            + jnp.einsum("btgm,gm,btgij->bgijm", weights, b_bar, kv.astype(jnp.complex64)))
