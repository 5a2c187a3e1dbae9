"""The second-order Taylor feature map of BASED's linear attention.

    phi(x) = [1, x / F^(1/4), vec(x x^T) / (sqrt(2) sqrt(F))]      (width E = 1 + F + F^2)

so that phi(q) . phi(k) = 1 + s + s^2 / 2 with s = q . k / sqrt(F), the Taylor expansion of
exp(s) to second order. The polynomial is always >= 1/2, so the attention weights are positive
and the normaliser never vanishes.
"""

import jax
import jax.numpy as jnp


def feature_width(feature_dim: int) -> int:
  """E, the width of phi for a query/key feature dimension F."""
  return 1 + feature_dim + feature_dim * feature_dim


def compute_dtype(dtype) -> jnp.dtype:
  """float32 for bf16 / float16 / float32 inputs; float64 stays float64 (the tests' truth)."""
  return jax.dtypes.canonicalize_dtype(jnp.promote_types(dtype, jnp.float32))


def taylor_feature_map(x: jnp.ndarray) -> jnp.ndarray:
  """phi(x), computed in at least float32 (`compute_dtype`).

  Args:
    x: [..., F] queries or keys.

  Returns:
    [..., 1 + F + F^2] features in compute_dtype(x.dtype).
  """
  x = x.astype(compute_dtype(x.dtype))
  f = x.shape[-1]
  linear = x / f**0.25
  quadratic = (x[..., :, None] * x[..., None, :]).reshape(*x.shape[:-1], f * f)
  quadratic = quadratic / (2.0**0.5 * f**0.5)
  ones = jnp.ones((*x.shape[:-1], 1), x.dtype)
  return jnp.concatenate([ones, linear, quadratic], axis=-1)


def taylor_kernel(s: jnp.ndarray) -> jnp.ndarray:
  """phi(q) . phi(k) as a function of s = q . k / sqrt(F): 1 + s + s^2 / 2."""
  return 1.0 + s + 0.5 * s * s
