"""BaseConv: a gated short causal convolution (most of BASED's layers), in two forms.

`BaseConv` (block_style "based", the released BASED layer): in_proj D -> 4D (bias), split into
u1, u2 of width 2D; u1 goes through a causal depthwise convolution of `conv_kernel` taps (no
bias); y = out_proj(silu(conv(u1)) * u2), 2D -> D (bias).

`ZoologyBaseConv` (block_style "zoology", the paper's MQAR layer): y = conv(u) * proj(u) + u,
with conv a causal depthwise convolution of `conv_kernel` taps over the D channels with a bias
(taps and bias U(+-1/sqrt(taps)), PyTorch's Conv1d default, which zoology keeps) and proj
D -> D (bias).

The conv weight `kernel[i, c]` multiplies input t - (taps - 1) + i, as PyTorch's padded Conv1d.
"""

from typing import NamedTuple, Optional

import flax.linen as nn
import jax.numpy as jnp

from based_jax.config import ModelConfig
from based_jax.layers import SplitDense, dense, weight_init
from based_jax.mixers.short_conv import causal_conv, fan_in_uniform


class ConvCache(NamedTuple):
  """The last taps - 1 inputs of the convolution; the current input arrives with the step."""
  x: jnp.ndarray  # [B, taps - 1, 2D] ("based") or [B, taps - 1, D] ("zoology"), compute dtype.


def conv_channels(config: ModelConfig) -> int:
  """Channels of the convolution: 2D ("based"), D ("zoology")."""
  return config.d_model if config.block_style == "zoology" else 2 * config.d_model


def init_conv_cache(config: ModelConfig, batch: int, max_len: int = 0) -> ConvCache:
  del max_len
  return ConvCache(jnp.zeros((batch, config.conv_kernel - 1, conv_channels(config)),
                             jnp.dtype(config.dtype)))


def state_values(config: ModelConfig, seq_len: int, symmetric: bool = True) -> int:
  """D * taps, as the paper counts a short convolution (zoology's ShortConvolution.state_size;
  the cache holds the conv's last taps - 1 inputs)."""
  del seq_len, symmetric
  return config.d_model * config.conv_kernel


def mixing_flops(config: ModelConfig, seq_len: int) -> float:
  """Forward FLOPs per token of the depthwise conv over its channels."""
  del seq_len
  return 2 * config.conv_kernel * conv_channels(config)


class BaseConv(nn.Module):
  """Gated short convolution; the cache holds the previous conv inputs."""
  config: ModelConfig

  @nn.compact
  def __call__(self, x: jnp.ndarray, positions: jnp.ndarray, lengths: Optional[jnp.ndarray],
               cache: Optional[ConvCache]) -> tuple[jnp.ndarray, Optional[ConvCache]]:
    """x: [B, T, D]; lengths: [B] valid tokens (padding never enters the cache)."""
    del positions
    cfg = self.config
    d = x.shape[-1]
    taps = cfg.conv_kernel
    u1, u2 = SplitDense(cfg, (2 * d, 2 * d), use_bias=True, name="in_proj")(x)
    kernel = self.param("conv_kernel", weight_init(cfg), (taps, 2 * d),
                        jnp.dtype(cfg.param_dtype))
    conv, history = causal_conv(u1, kernel, None if cache is None else cache.x, lengths)
    y = dense(cfg, d, use_bias=True, output=True, name="out_proj")(nn.silu(conv) * u2)
    return y, (None if cache is None else ConvCache(history))


class ZoologyBaseConv(nn.Module):
  """zoology's MQAR BaseConv, conv(u) * proj(u) + u; the cache holds the previous inputs."""
  config: ModelConfig

  @nn.compact
  def __call__(self, u: jnp.ndarray, positions: jnp.ndarray, lengths: Optional[jnp.ndarray],
               cache: Optional[ConvCache]) -> tuple[jnp.ndarray, Optional[ConvCache]]:
    """u: [B, T, D]; lengths: [B] valid tokens (padding never enters the cache)."""
    del positions
    cfg = self.config
    d, taps = u.shape[-1], cfg.conv_kernel
    dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    u = u.astype(dtype)
    kernel = self.param("conv_kernel", fan_in_uniform(taps), (taps, d), pdtype)
    conv_bias = self.param("conv_bias", fan_in_uniform(taps), (d,), pdtype)
    conv, history = causal_conv(u, kernel, None if cache is None else cache.x, lengths)
    # zoology names it `projection`: its init rescales only out_proj / fc2, so N(0, init_std)
    proj = dense(cfg, d, use_bias=True, name="proj")(u)
    y = (conv + conv_bias.astype(dtype)) * proj + u
    return y, (None if cache is None else ConvCache(history))
