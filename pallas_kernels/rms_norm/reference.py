"""Residual add + RMSNorm (or LayerNorm) in plain JAX: the "xla" implementation, and the
numerics the kernels of `pallas_fused.py` reproduce up to rounding.

Shapes use the dimension letters of `based_jax/__init__.py`; rows are [..., D].

    x = residual + delta,   normed = x * rsqrt(mean(x^2) + eps) * scale

With `center` the rows are first centred on their mean and with a `bias` it is added last:
both together are LayerNorm, (x - mean(x)) * rsqrt(var(x) + eps) * scale + bias with the biased
variance (torch.nn.LayerNorm's). The kernels compute the plain RMSNorm only.

Everything is float32: the delta, the scale and the bias are cast to float32 first, the sum
stays float32 (the model's residual stream), the row's mean square and the product with the
scale are float32, and the normed rows are rounded once, to `out_dtype` (the compute dtype).
"""

from typing import Optional

import jax
import jax.numpy as jnp


def rms_norm(x: jnp.ndarray, scale: jnp.ndarray, *, eps: float, out_dtype, center: bool = False,
             bias: Optional[jnp.ndarray] = None) -> jnp.ndarray:
  """x [..., D] (any float dtype) / rms(x) * scale [D], computed in float32, in `out_dtype`;
  `center`: x minus its row mean first, `bias` [D]: added last (both: LayerNorm)."""
  x = x.astype(jnp.float32)
  if center:
    x = x - jnp.mean(x, axis=-1, keepdims=True)
  x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps)
  y = x * scale.astype(jnp.float32)
  if bias is not None:
    y = y + bias.astype(jnp.float32)
  return y.astype(out_dtype)


def add_rms_norm(residual: jnp.ndarray, delta: jnp.ndarray, scale: jnp.ndarray, *, eps: float,
                 out_dtype, center: bool = False,
                 bias: Optional[jnp.ndarray] = None) -> tuple[jnp.ndarray, jnp.ndarray]:
  """(residual [..., D] float32 + delta [..., D], `rms_norm` of that sum)."""
  new_residual = residual + delta.astype(jnp.float32)
  return new_residual, rms_norm(new_residual, scale, eps=eps, out_dtype=out_dtype,
                                center=center, bias=bias)
