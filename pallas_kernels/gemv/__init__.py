"""Matrix products of a few rows, x [M, K] @ W [K, N] (decoding's projections): reference,
kernels, dispatch.

Shapes in every module use the dimension letters of `based_jax/__init__.py`.
"""

from pallas_kernels.gemv.api import IMPLEMENTATIONS, ROWS, matmul, resolve
