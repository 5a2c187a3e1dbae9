"""BaseConv: a gated short causal convolution (most of BASED's layers).

in_proj: D -> 4D (bias), split into u1, u2 of width 2D; u1 goes through a causal depthwise
convolution of `conv_kernel` taps (no bias); y = out_proj(silu(conv(u1)) * u2), 2D -> D (bias).
The conv weight `kernel[i, c]` multiplies input t - (taps - 1) + i, as PyTorch's padded Conv1d.
"""

from typing import NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from based_jax.config import ModelConfig
from based_jax.layers import dense, weight_init


class ConvCache(NamedTuple):
  """The last taps - 1 inputs of the convolution; the current input arrives with the step."""
  x: jnp.ndarray  # [B, taps - 1, 2D] in the compute dtype.


def init_conv_cache(config: ModelConfig, batch: int) -> ConvCache:
  return ConvCache(jnp.zeros((batch, config.conv_kernel - 1, 2 * config.d_model),
                             jnp.dtype(config.dtype)))


class BaseConv(nn.Module):
  """Gated short convolution; the cache holds the previous conv inputs."""
  config: ModelConfig

  @nn.compact
  def __call__(self, x: jnp.ndarray, positions: jnp.ndarray, lengths: Optional[jnp.ndarray],
               cache: Optional[ConvCache]) -> tuple[jnp.ndarray, Optional[ConvCache]]:
    """x: [B, T, D]; lengths: [B] valid tokens (padding never enters the cache)."""
    del positions
    cfg = self.config
    b, t, d = x.shape
    taps = cfg.conv_kernel
    u1, u2 = jnp.split(dense(cfg, 4 * d, use_bias=True, name="in_proj")(x), 2, axis=-1)
    kernel = self.param("conv_kernel", weight_init(cfg), (taps, 2 * d),
                        jnp.dtype(cfg.param_dtype)).astype(u1.dtype)
    history = (cache.x if cache is not None
               else jnp.zeros((b, taps - 1, 2 * d), u1.dtype)).astype(u1.dtype)
    full = jnp.concatenate([history, u1], axis=1)  # [B, taps - 1 + T, 2D]
    conv = sum(full[:, i:i + t] * kernel[i] for i in range(taps))
    y = dense(cfg, d, use_bias=True, output=True, name="out_proj")(nn.silu(conv) * u2)
    if cache is None:
      return y, None
    ends = jnp.full((b,), t) if lengths is None else lengths
    # The taps - 1 inputs just before each sequence's end: full[length : length + taps - 1].
    new_x = jax.vmap(lambda f, e: jax.lax.dynamic_slice_in_dim(f, e, taps - 1, 0))(full, ends)
    return y, ConvCache(new_x)
