"""The chunked kernels' layout of the quadratic features: a diagonal block and cyclic pairs.

The packed basis of `feature_map.py` keeps the F(F+1)/2 distinct terms x_i x_j, i <= j, in
triangle order, which a kernel cannot form from a [C, F] register tile with 2-D tensor
operations. The kernels use the same terms in a cyclic order instead, split into two blocks
whose widths are powers of two (Triton's tiles need that):

    diag(x)  [F]        quad x_i^2                          for i < F
    off(x)   [F^2 / 2]  w_m x_i x_((i + m) mod F)           at column (m - 1) F + i, 1 <= m <= F/2

with quad = 1 / (sqrt 2 sqrt F) (the full outer product's scale), w_m = sqrt 2 quad for
m < F/2 and w_{F/2} = quad: for m = F/2 the pairs (i, i + F/2) and (i + F/2, i) are the same
term, kept twice at half weight. So diag(q).diag(k) + off(q).off(k) = s^2 / 2 as in the other
bases, with F + F^2/2 = 144 quadratic rows at F = 16 instead of the full basis's 256 (0.56x
the state products in the kernels) and only 8 rows more than the packed basis.

`off` is formed in registers as (x @ tile) * (x @ roll) * w from two exact 0/1 matrices
[F, F^2/2] (`spreading_rows`), so everything stays in 2-D tensor-core layouts.

Conversion of a state's quadratic rows to and from the packed basis is the isometry
kernel = M packed (M^T M = I): a row copies its packed term, except the two rows of an
m = F/2 pair, which each take 1/sqrt 2 of it (`to_kernel`; `from_kernel` is M^T).
"""

import jax.numpy as jnp
import numpy as np

from pallas_kernels.taylor_attention.feature_map import quadratic_pairs


def off_width(f: int) -> int:
  """Columns of the off-diagonal block: F^2 / 2 (F even)."""
  return f * f // 2


def partner(p, f: int):
  """j of off-diagonal column p (its i is p mod F); numpy or jax integer arrays."""
  return (p % f + p // f + 1) % f


def off_weight(p, f: int):
  """w of off-diagonal column p: quad sqrt 2, or quad for the doubled m = F/2 pairs."""
  quad = 1.0 / (2.0 ** 0.5 * f ** 0.5)
  return jnp.where(p // f + 1 == f // 2, quad, quad * 2.0 ** 0.5)


def spreading_rows(f: int, p, rows):
  """(tile, roll) [F, F^2/2] 0/1 masks from integer grids `rows` (i) and `p` (column):
  x @ tile puts x_i at column p, x @ roll puts x_partner(p) there."""
  return p % f == rows, partner(p, f) == rows


def features(x: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
  """(diag(x) [..., F], off(x) [..., F^2/2]) by gathers: the kernels' `_features` spelled out."""
  f = x.shape[-1]
  p = np.arange(off_width(f))
  quad = 1.0 / (2.0 ** 0.5 * f ** 0.5)
  return x * x * quad, x[..., p % f] * x[..., partner(p, f)] * off_weight(p, f)


def _packed_index(f: int) -> tuple[np.ndarray, np.ndarray]:
  """For each kernel quadratic row (diag, then off): its packed term and M's coefficient."""
  i, j = quadratic_pairs(f)
  index = np.zeros((f, f), np.int32)
  index[i, j] = index[j, i] = np.arange(len(i))
  p = np.arange(off_width(f))
  rows = np.concatenate([np.arange(f), p % f]), np.concatenate([np.arange(f), partner(p, f)])
  coefficient = np.where(np.concatenate([np.zeros(f), p // f + 1]) == f // 2, 2.0**-0.5, 1.0)
  return index[rows], coefficient


def _along(x: np.ndarray, ndim: int, axis: int) -> np.ndarray:
  shape = [1] * ndim
  shape[axis] = -1
  return x.reshape(shape)


def to_kernel(packed: jnp.ndarray, f: int, axis: int) -> jnp.ndarray:
  """A state's F(F+1)/2 packed quadratic rows along `axis` -> the F + F^2/2 kernel rows."""
  index, coefficient = _packed_index(f)
  return jnp.take(packed, index, axis=axis) * _along(coefficient, packed.ndim, axis).astype(
      packed.dtype)


def from_kernel(rows: jnp.ndarray, f: int, axis: int) -> jnp.ndarray:
  """The adjoint M^T: F + F^2/2 kernel rows -> F(F+1)/2 packed rows (doubled rows add up).

  Two gathers, of each packed term's first and last kernel row (the same row for a term held
  once, then weighted 0), which XLA fuses into one pass: no scatter, no transposed copy."""
  index, coefficient = _packed_index(f)
  by_term = np.argsort(index, kind="stable")
  counts = np.bincount(index)
  first = by_term[np.cumsum(counts) - counts]
  last = by_term[np.cumsum(counts) - 1]
  weight = lambda w: _along(w, rows.ndim, axis).astype(rows.dtype)
  return (jnp.take(rows, first, axis=axis) * weight(coefficient[first])
          + jnp.take(rows, last, axis=axis) * weight(np.where(last != first,
                                                              coefficient[last], 0.0)))
