"""BaseConv: a gated short causal convolution (most of BASED's layers).

in_proj: D -> 4D (bias), split into u1, u2 of width 2D; u1 goes through a causal depthwise
convolution of `conv_kernel` taps (no bias); y = out_proj(silu(conv(u1)) * u2), 2D -> D (bias).
The conv weight `kernel[i, c]` multiplies input t - (taps - 1) + i, as PyTorch's padded Conv1d.
"""

from typing import NamedTuple, Optional

import flax.linen as nn
import jax.numpy as jnp

from based_jax.config import ModelConfig
from based_jax.layers import SplitDense, dense, weight_init
from based_jax.mixers.short_conv import causal_conv


class ConvCache(NamedTuple):
  """The last taps - 1 inputs of the convolution; the current input arrives with the step."""
  x: jnp.ndarray  # [B, taps - 1, 2D] in the compute dtype.


def init_conv_cache(config: ModelConfig, batch: int, max_len: int = 0) -> ConvCache:
  del max_len
  return ConvCache(jnp.zeros((batch, config.conv_kernel - 1, 2 * config.d_model),
                             jnp.dtype(config.dtype)))


def state_values(config: ModelConfig, seq_len: int, symmetric: bool = True) -> int:
  """D * taps, as the paper counts a short convolution (the cache holds 2D (taps - 1))."""
  del seq_len, symmetric
  return config.d_model * config.conv_kernel


def mixing_flops(config: ModelConfig, seq_len: int) -> float:
  """Forward FLOPs per token of the depthwise conv over 2D channels."""
  del seq_len
  return 2 * config.conv_kernel * 2 * config.d_model


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
