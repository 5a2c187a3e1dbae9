"""Causal long convolutions by FFT (H3's SSM kernels, Hyena's implicit filters).

Shapes use the dimension letters of `based_jax/__init__.py`; L is a filter's length and C the
channels of the convolved signal (kernel-local letters).
"""

import jax.numpy as jnp


def fft_causal_conv(x: jnp.ndarray, h: jnp.ndarray) -> jnp.ndarray:
  """y[:, t, c] = sum_{l <= t, l < L} h[l, c] x[:, t - l, c], by FFT in O(T log T).

  Args:
    x: [B, T, C] (any float dtype; computed in float32).
    h: [L, C] the filter, h[0] on the current input.

  Returns:
    [B, T, C] float32.
  """
  t = x.shape[1]
  h = h[:t].astype(jnp.float32)
  n = 1 << (t + h.shape[0] - 2).bit_length()  # a power of two >= T + L - 1: no wrap-around
  spectrum = jnp.fft.rfft(x.astype(jnp.float32), n=n, axis=1) * jnp.fft.rfft(h, n=n, axis=0)
  return jnp.fft.irfft(spectrum, n=n, axis=1)[:, :t]
