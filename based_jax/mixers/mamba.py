"""Mamba: the selective state-space mixer (Gu and Dao, 2023), in its original (S6) form.

Shapes use the dimension letters of `based_jax/__init__.py`; I = EXPAND * D is the inner width,
N = config.ssm_state, R = ceil(D / 16) the rank of the step-size projection.

  [x, z] = in_proj(u)                      D -> 2I, no bias
  x = silu(conv(x) + conv_bias)            causal depthwise conv of CONV_TAPS taps (taps and
                                           bias U(+-1/sqrt(CONV_TAPS)), PyTorch's Conv1d init)
  [dt, B, C] = x_proj(x)                   I -> R + 2N, no bias
  dt = softplus(dt_proj(dt))               R -> I, kernel U(+-1/sqrt(R)), bias initialised
                                           so dt lies in [DT_MIN, DT_MAX] (log-uniform)
  h_t = exp(dt_t A) * h_{t-1} + dt_t x_t B_t      per channel i: h [N], A = -exp(A_log) [I, N]
  y_t = C_t . h_t + D_skip x_t;  out = out_proj(y * silu(z))     I -> D, no bias

Training and prefill run the recurrence through `pallas_kernels.selective_scan`, whose
implementation `config.ssm_impl` picks (an associative scan in chunks, or Pallas kernels that
walk the tokens with the state on chip); decoding runs one step. Padding gets dt = 0, which
leaves the state alone. Cache: the SSM state h [B, I, N] float32 (what the paper counts:
2 D N values at EXPAND = 2) and the conv's last CONV_TAPS - 1 inputs [B, CONV_TAPS - 1, I].
"""

import math
from typing import NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from based_jax.config import ModelConfig
from based_jax.layers import dense
from based_jax.mixers.short_conv import causal_conv, fan_in_uniform
from pallas_kernels.selective_scan import selective_scan

EXPAND = 2  # inner width I = EXPAND * D
CONV_TAPS = 4  # taps of the causal conv before the SSM
DT_MIN, DT_MAX = 1e-3, 1e-1  # range of the initial step sizes (log-uniform)


class MambaCache(NamedTuple):
  ssm: jnp.ndarray  # [B, I, N] float32: the selective SSM's state.
  conv: jnp.ndarray  # [B, CONV_TAPS - 1, I] compute dtype: the conv's last inputs.


def init_mamba_cache(config: ModelConfig, batch: int, max_len: int = 0) -> MambaCache:
  del max_len
  inner = EXPAND * config.d_model
  return MambaCache(jnp.zeros((batch, inner, config.ssm_state), jnp.float32),
                    jnp.zeros((batch, CONV_TAPS - 1, inner), jnp.dtype(config.dtype)))


def state_values(config: ModelConfig, seq_len: int, symmetric: bool = True) -> int:
  """I N = 2 D N: the SSM state (the conv's inputs are not counted, as in the paper)."""
  del seq_len, symmetric
  return EXPAND * config.d_model * config.ssm_state


def mixing_flops(config: ModelConfig, seq_len: int) -> float:
  """Forward FLOPs per token: the conv (2 taps I) and the SSM's decay, update, drive and
  readout (about 6 I N)."""
  del seq_len
  inner = EXPAND * config.d_model
  return 2 * CONV_TAPS * inner + 6 * inner * config.ssm_state


def dt_rank(d_model: int) -> int:
  return math.ceil(d_model / 16)


def _dt_bias_init(key, shape, dtype):
  """softplus^-1 of step sizes log-uniform in [DT_MIN, DT_MAX]."""
  dt = jnp.exp(jax.random.uniform(key, shape) * (math.log(DT_MAX) - math.log(DT_MIN))
               + math.log(DT_MIN))
  return (dt + jnp.log(-jnp.expm1(-dt))).astype(dtype)


def _a_log_init(key, shape, dtype):
  """log(1 .. N) for every channel (S4D-real)."""
  del key
  return jnp.broadcast_to(jnp.log(jnp.arange(1, shape[1] + 1, dtype=jnp.float32)),
                          shape).astype(dtype)


def selective_step(dt, x, b_in, c_out, a, h):
  """One token: dt, x [B, I]; b_in, c_out [B, N]; h [B, I, N] -> (y [B, I], new h)."""
  h = jnp.exp(dt[..., None] * a) * h + (dt * x)[..., None] * b_in[:, None, :]
  return jnp.einsum("bin,bn->bi", h, c_out), h


class Mamba(nn.Module):
  """Mamba's selective SSM block (no norm or residual: the model's Block adds those)."""
  config: ModelConfig

  @nn.compact
  def __call__(self, u: jnp.ndarray, positions: jnp.ndarray, lengths: Optional[jnp.ndarray],
               cache: Optional[MambaCache]) -> tuple[jnp.ndarray, Optional[MambaCache]]:
    """u: [B, T, D]; lengths: [B] valid tokens (padding never enters the cache)."""
    del positions
    cfg = self.config
    b, t, d = u.shape
    inner, n, rank = EXPAND * d, cfg.ssm_state, dt_rank(d)
    pdtype = jnp.dtype(cfg.param_dtype)
    x, z = jnp.split(dense(cfg, 2 * inner, use_bias=False, name="in_proj")(u), 2, axis=-1)
    kernel = self.param("conv_kernel", fan_in_uniform(CONV_TAPS), (CONV_TAPS, inner), pdtype)
    conv_bias = self.param("conv_bias", fan_in_uniform(CONV_TAPS), (inner,), pdtype)
    x, history = causal_conv(x, kernel, None if cache is None else cache.conv, lengths)
    x = nn.silu(x + conv_bias.astype(x.dtype)).astype(jnp.float32)
    dbc = dense(cfg, rank + 2 * n, use_bias=False, name="x_proj")(x.astype(u.dtype))
    dt, b_in, c_out = jnp.split(dbc.astype(jnp.float32), [rank, rank + n], axis=-1)
    dt_proj = nn.Dense(inner, name="dt_proj", param_dtype=pdtype,
                       kernel_init=fan_in_uniform(rank), bias_init=_dt_bias_init)
    dt = jax.nn.softplus(dt_proj(dt))
    if lengths is not None:
      dt = jnp.where((jnp.arange(t) < lengths[:, None])[..., None], dt, 0.0)
    a = -jnp.exp(self.param("A_log", _a_log_init, (inner, n), jnp.float32))
    skip = self.param("D", nn.initializers.ones, (inner,), jnp.float32)
    h0 = (jnp.zeros((b, inner, n), jnp.float32) if cache is None else cache.ssm)
    if cache is not None and t == 1:
      y, h = selective_step(dt[:, 0], x[:, 0], b_in[:, 0], c_out[:, 0], a, h0)
      y = y[:, None]
    else:
      y, h = selective_scan(dt, x, b_in, c_out, a, h0, impl=cfg.ssm_impl)
    y = (y + skip * x) * nn.silu(z.astype(jnp.float32))
    out = dense(cfg, d, use_bias=False, output=True, name="out_proj")(y.astype(u.dtype))
    return out, (None if cache is None else MambaCache(h, history))
