"""Hyena (Poli et al., 2023), order 2: gated long convolutions with an implicit filter.

Shapes use the dimension letters of `based_jax/__init__.py`; L = config.horizon is the long
filter's length (its longest lag) and O = FILTER_WIDTH the filter network's width.

  [x1, x2, v] = short_conv(in_proj(u))      D -> 3D (bias), causal depthwise conv of
                                            config.conv_kernel taps (bias; taps and bias
                                            U(+-1/sqrt(taps)), PyTorch's Conv1d init)
  z = x1 * v
  y = x2 * (h * z + filter_skip * z)        h [L, D]: the causal long filter, by FFT
  out = out_proj(y)                         D -> D, bias

The filter is a function of the lag l = 0 .. L-1 alone: an MLP with sine activations on the
positional features [l / (L - 1), cos(w l), -sin(w l)] (w = 2 pi 1e-4 / L), times an
exponential decay exp(-|delta_c| l / (L - 1)) per channel (fixed rates, fast to slow). So a
call, a chunk and a decoding step all see the same filter. Cache: the short conv's last
taps - 1 inputs [B, taps - 1, 3D] and the long conv's last L - 1 inputs z [B, L - 1, D]: a
long convolution has no smaller recurrent state (the paper counts D T values at length T).
"""

import math
from typing import NamedTuple, Optional

import flax.linen as nn
import jax.numpy as jnp

from based_jax.config import ModelConfig
from based_jax.layers import dense
from based_jax.mixers.long_conv import fft_causal_conv
from based_jax.mixers.short_conv import causal_conv, fan_in_uniform, last_inputs

FILTER_WIDTH = 64  # width of the implicit filter's MLP
FILTER_HIDDEN = 2  # hidden layers of that MLP
FILTER_FREQUENCY = 1.0  # initial frequency of its sine activations (learned)
DECAY_TARGET, FAST_DECAY, SLOW_DECAY = 1e-2, 0.3, 1.5  # channels fall to 1e-2 at 0.3 .. 1.5 L


class HyenaCache(NamedTuple):
  short: jnp.ndarray  # [B, taps - 1, 3D] compute dtype: the short conv's last inputs.
  long: jnp.ndarray  # [B, L - 1, D] float32: the long conv's last inputs z.


def init_hyena_cache(config: ModelConfig, batch: int, max_len: int = 0) -> HyenaCache:
  del max_len  # the filter reaches back L - 1 tokens, however long the sequence
  d = config.d_model
  return HyenaCache(jnp.zeros((batch, config.conv_kernel - 1, 3 * d), jnp.dtype(config.dtype)),
                    jnp.zeros((batch, config.horizon - 1, d), jnp.float32))


def state_values(config: ModelConfig, seq_len: int, symmetric: bool = True) -> int:
  """D T, as the paper counts a long convolution at sequence length T."""
  del symmetric
  return config.d_model * seq_len


def mixing_flops(config: ModelConfig, seq_len: int) -> float:
  """Forward FLOPs per token as a direct convolution counts them: the long filter over at most
  L lags (2 D each, (T + 1) / 2 on average) and the short conv over 3D channels."""
  d = config.d_model
  return 2 * d * min(config.horizon, (seq_len + 1) / 2) + 2 * config.conv_kernel * 3 * d


def positional_features(length: int) -> jnp.ndarray:
  """[L, 3]: the filter network's input at each lag."""
  lags = jnp.arange(length, dtype=jnp.float32)
  w = 2 * math.pi * 1e-4 * lags / length
  return jnp.stack([lags / max(length - 1, 1), jnp.cos(w), -jnp.sin(w)], axis=-1)


class ImplicitFilter(nn.Module):
  """h [L, D]: the long filter of every lag (parameters not named "kernel": no weight decay)."""
  config: ModelConfig

  @nn.compact
  def __call__(self) -> jnp.ndarray:
    cfg = self.config
    length, d = cfg.horizon, cfg.d_model
    x = positional_features(length)
    widths = [x.shape[-1]] + [FILTER_WIDTH] * (FILTER_HIDDEN + 1)
    for i, (fan_in, fan_out) in enumerate(zip(widths[:-1], widths[1:])):
      w = self.param(f"w{i}", nn.initializers.lecun_normal(), (fan_in, fan_out), jnp.float32)
      bias = self.param(f"b{i}", nn.initializers.zeros, (fan_out,), jnp.float32)
      freq = self.param(f"freq{i}", nn.initializers.constant(FILTER_FREQUENCY), (fan_out,),
                        jnp.float32)
      x = jnp.sin(freq * (x @ w + bias))
    h = x @ self.param("w_out", nn.initializers.lecun_normal(), (FILTER_WIDTH, d), jnp.float32)
    rates = jnp.linspace(math.log(DECAY_TARGET) / SLOW_DECAY, math.log(DECAY_TARGET) / FAST_DECAY,
                         d)
    t = positional_features(length)[:, :1]
    return h * jnp.exp(-t * jnp.abs(rates))


class Hyena(nn.Module):
  """The order-2 Hyena operator."""
  config: ModelConfig

  @nn.compact
  def __call__(self, u: jnp.ndarray, positions: jnp.ndarray, lengths: Optional[jnp.ndarray],
               cache: Optional[HyenaCache]) -> tuple[jnp.ndarray, Optional[HyenaCache]]:
    """u: [B, T, D]; lengths: [B] valid tokens (padding never enters the cache)."""
    del positions
    cfg = self.config
    b, t, d = u.shape
    pdtype = jnp.dtype(cfg.param_dtype)
    proj = dense(cfg, 3 * d, use_bias=True, name="in_proj")(u)
    kernel = self.param("conv_kernel", fan_in_uniform(cfg.conv_kernel), (cfg.conv_kernel, 3 * d),
                        pdtype)
    conv_bias = self.param("conv_bias", fan_in_uniform(cfg.conv_kernel), (3 * d,), pdtype)
    proj, short = causal_conv(proj, kernel, None if cache is None else cache.short, lengths)
    proj = proj.astype(jnp.float32) + conv_bias.astype(jnp.float32)
    x1, x2, v = jnp.split(proj, 3, axis=-1)
    z = x1 * v
    h = ImplicitFilter(cfg, name="filter")()
    skip = self.param("filter_skip", nn.initializers.normal(1.0), (d,), jnp.float32)
    if cache is None:
      conv, long = fft_causal_conv(z, h), None
    else:
      full = jnp.concatenate([cache.long, z], axis=1)  # [B, L - 1 + T, D]
      if t == 1:  # decoding: the filter against the last L inputs
        conv = jnp.einsum("bld,ld->bd", full, h[::-1])[:, None]
      else:
        conv = fft_causal_conv(full, h)[:, cfg.horizon - 1:]
      long = last_inputs(full, lengths, cfg.horizon - 1)
    y = x2 * (conv + skip * z)
    out = dense(cfg, d, use_bias=True, output=True, name="out_proj")(y.astype(u.dtype))
    return out, (None if cache is None else HyenaCache(short, long))
