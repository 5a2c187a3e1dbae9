"""The second-order Taylor feature map of BASED's linear attention, in its packed basis.

Shapes use the dimension letters of `based_jax/__init__.py`.

    phi(x) = [1, x / F^(1/4), (w_ij x_i x_j / sqrt(F))_{i <= j}]      (width E = 1 + F + F(F+1)/2)

with w_ii = 1 / sqrt(2) and w_ij = 1 for i < j, so that phi(q) . phi(k) = 1 + s + s^2 / 2 with
s = q . k / sqrt(F), the Taylor expansion of exp(s) to second order. The polynomial is always
>= 1/2, so the attention weights are positive and the normaliser never vanishes.

The paper writes the quadratic block as the full outer product vec(x x^T) / (sqrt(2) sqrt(F))
(F^2 terms, a width of 273 at F = 16); x x^T is symmetric, so only its F(F+1)/2 distinct
terms are kept (E = 153), with the weights above making the inner products equal. Every state
this package hands out (prefill, decoding) is in the packed basis: 0.56x the bytes of the full
one, which is what a decoding step must read and write. The chunked kernels keep the same terms in
another order (`cyclic_basis.py`) and convert their state at the boundary.
"""

import jax
import jax.numpy as jnp
import numpy as np


def feature_width(feature_dim: int, packed: bool = True) -> int:
  """E, the width of phi for a query/key feature dimension F: 1 + F + F(F+1)/2 in the packed
  basis (153 at F = 16), 1 + F + F^2 for the paper's full outer product (273)."""
  quadratic = feature_dim * (feature_dim + 1) // 2 if packed else feature_dim**2
  return 1 + feature_dim + quadratic


def compute_dtype(dtype) -> jnp.dtype:
  """float32 for bf16 / float16 / float32 inputs; float64 stays float64 (the tests' truth)."""
  return jax.dtypes.canonicalize_dtype(jnp.promote_types(dtype, jnp.float32))


def quadratic_pairs(feature_dim: int) -> tuple[np.ndarray, np.ndarray]:
  """(i, j), i <= j, of each packed quadratic term, in row-major upper-triangle order."""
  return np.triu_indices(feature_dim)


def taylor_feature_map(x: jnp.ndarray) -> jnp.ndarray:
  """phi(x), computed in at least float32 (`compute_dtype`).

  Args:
    x: [..., F] queries or keys.

  Returns:
    [..., E] features (E = 1 + F + F(F+1)/2) in compute_dtype(x.dtype).
  """
  x = x.astype(compute_dtype(x.dtype))
  f = x.shape[-1]
  i, j = quadratic_pairs(f)
  weight = np.where(i == j, 2.0**-0.5, 1.0) / f**0.5
  ones = jnp.ones((*x.shape[:-1], 1), x.dtype)
  return jnp.concatenate([ones, x / f**0.25, x[..., i] * x[..., j] * weight], axis=-1)


def taylor_kernel(s: jnp.ndarray) -> jnp.ndarray:
  """phi(q) . phi(k) as a function of s = q . k / sqrt(F): 1 + s + s^2 / 2."""
  return 1.0 + s + 0.5 * s * s
