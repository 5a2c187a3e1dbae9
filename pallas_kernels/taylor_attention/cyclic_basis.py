"""The chunked kernels' layout of the quadratic features: a diagonal block and cyclic pairs.

Shapes use the dimension letters of `based_jax/__init__.py`.

The packed basis of `feature_map.py` keeps the F(F+1)/2 distinct terms x_i x_j, i <= j, in
triangle order, which a kernel cannot form from a [C, F] register tile with 2-D tensor
operations. The kernels use the same terms in a cyclic order instead, split into two blocks
whose widths are powers of two (Triton's tiles need that):

    diag(x)  [F]        quad x_i^2                          for i < F
    off(x)   [F^2 / 2]  x_i x_((i + m) mod F) / sqrt F      at column (m - 1) F + i, 1 <= m <= F/2

with quad = 1 / (sqrt 2 sqrt F), the packed basis's weights. For m = F/2 the pairs (i, i + F/2)
and (i + F/2, i) are the same term: it is kept at i < F/2 and the F/2 columns i >= F/2 of that
block are dead (always zero). So diag(q).diag(k) + off(q).off(k) = s^2 / 2 as in the other
bases, with F + F^2/2 = 144 quadratic rows at F = 16 instead of the full basis's 256 (0.56x
the state products in the kernels), 8 rows more than the packed basis.

`off` is formed in registers as (x / sqrt F) @ tile * (x @ roll) from two exact 0/1 matrices
[F, F^2/2] (`spreading_rows`; tile's dead columns are zero), so everything stays in 2-D
tensor-core layouts and the weight costs a multiply of the [C, F] tile, not of the [C, F^2/2]
block (x / sqrt F is exact in bf16 for F = 4^n, such as 16).

Conversion of a state's quadratic rows to and from the packed basis is the isometry
kernel = M packed (M^T M = I): every packed term has one kernel row, which copies it, and the
dead rows are zero (`to_kernel`; `from_kernel` is M^T, a gather).
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


def live(p, f: int):
  """Whether off-diagonal column p holds a term (False for the dead half of block m = F/2)."""
  return (p // f + 1 < f // 2) | (p % f < f // 2)


def spreading_rows(f: int, p, rows):
  """(tile, roll) [F, F^2/2] 0/1 masks from integer grids `rows` (i) and `p` (column):
  x @ tile puts x_i at live column p (dead columns get 0), x @ roll puts x_partner(p) there."""
  return (p % f == rows) & live(p, f), partner(p, f) == rows


def features(x: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
  """(diag(x) [..., F], off(x) [..., F^2/2]) by gathers: the kernels' `_features` spelled out."""
  f = x.shape[-1]
  p = np.arange(off_width(f))
  quad = 1.0 / (2.0 ** 0.5 * f ** 0.5)
  return x * x * quad, x[..., p % f] * x[..., partner(p, f)] * np.where(live(p, f), f**-0.5, 0.0)


def _packed_index(f: int) -> tuple[np.ndarray, np.ndarray]:
  """For each kernel quadratic row (diag, then off): its packed term and whether it is live."""
  i, j = quadratic_pairs(f)
  index = np.zeros((f, f), np.int32)
  index[i, j] = index[j, i] = np.arange(len(i))
  p = np.arange(off_width(f))
  rows = np.concatenate([np.arange(f), p % f]), np.concatenate([np.arange(f), partner(p, f)])
  return index[rows], np.concatenate([np.ones(f, bool), live(p, f)])


def _along(x: np.ndarray, ndim: int, axis: int) -> np.ndarray:
  shape = [1] * ndim
  shape[axis] = -1
  return x.reshape(shape)


def to_kernel(packed: jnp.ndarray, f: int, axis: int) -> jnp.ndarray:
  """A state's F(F+1)/2 packed quadratic rows along `axis` -> the F + F^2/2 kernel rows."""
  index, is_live = _packed_index(f)
  return jnp.take(packed, index, axis=axis) * _along(is_live, packed.ndim, axis).astype(
      packed.dtype)


def from_kernel(rows: jnp.ndarray, f: int, axis: int) -> jnp.ndarray:
  """The adjoint M^T: F + F^2/2 kernel rows -> F(F+1)/2 packed rows (a gather of the live
  rows, dead rows dropped)."""
  index, is_live = _packed_index(f)
  row_of_term = np.zeros(f * (f + 1) // 2, np.int64)
  row_of_term[index[is_live]] = np.flatnonzero(is_live)
  return jnp.take(rows, row_of_term, axis=axis)
