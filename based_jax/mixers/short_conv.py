"""Causal depthwise convolutions with a history: BaseConv's, Mamba's, H3's shift SSM, Hyena's
short and long filters and RWKV's token shift all read the last few inputs of each channel.

Shapes use the dimension letters of `based_jax/__init__.py`; G is the number of taps and
C the channels of the convolved signal (a kernel-local letter).
"""

import math
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp


def fan_in_uniform(fan_in: int) -> nn.initializers.Initializer:
  """U(-1/sqrt(fan_in), 1/sqrt(fan_in)): PyTorch's default weight and bias of a layer with this
  fan-in (also Mamba's dt_proj kernel, fan-in its rank). A depthwise convolution's fan-in is
  its taps, so Mamba's and Hyena's convolutions (taps and biases) and H3's shift filter start
  at order one, as in the reference code, which keeps that default for them: they pass their
  input on at full scale, where N(0, init_std) taps would shrink it by about init_std, and the
  gated products behind them by a power of that."""
  bound = 1.0 / math.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init


def last_inputs(full: jnp.ndarray, lengths: Optional[jnp.ndarray], count: int) -> jnp.ndarray:
  """The `count` inputs just before each row's end.

  Args:
    full: [B, count + T, C] the history (oldest first) followed by the call's T inputs.
    lengths: [B] valid inputs of the call per row (the rest is padding); all T if None.
    count: history length to keep.

  Returns:
    [B, count, C]: full[b, length_b : length_b + count], so padding never enters a history.
  """
  if lengths is None:  # every row ends at T: a static slice (decoding), not a gather
    return full[:, full.shape[1] - count:]
  return jax.vmap(lambda f, e: jax.lax.dynamic_slice_in_dim(f, e, count, 0))(full, lengths)


def causal_conv(x: jnp.ndarray, kernel: jnp.ndarray, history: Optional[jnp.ndarray],
                lengths: Optional[jnp.ndarray]) -> tuple[jnp.ndarray, jnp.ndarray]:
  """y[t, c] = sum_i kernel[i, c] x[t - (G - 1) + i, c], as PyTorch's padded Conv1d.

  Args:
    x: [B, T, C] the call's inputs.
    kernel: [G, C] taps, kernel[G - 1] on the current input.
    history: [B, G - 1, C] the inputs before the call (oldest first); zeros if None.
    lengths: [B] valid inputs per row, for the returned history; all T if None.

  Returns:
    y [B, T, C] in x's dtype and the history after each row's last valid input [B, G - 1, C].
  """
  b, t, c = x.shape
  taps = kernel.shape[0]
  if history is None:
    history = jnp.zeros((b, taps - 1, c), x.dtype)
  full = jnp.concatenate([history.astype(x.dtype), x], axis=1)  # [B, G - 1 + T, C]
  kernel = kernel.astype(x.dtype)
  y = sum(full[:, i:i + t] * kernel[i] for i in range(taps))
  return y, last_inputs(full, lengths, taps - 1)
