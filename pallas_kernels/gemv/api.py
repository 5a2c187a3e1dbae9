"""The entry point for matrix products of a few rows, and the choice of implementation.

`matmul(x [M, K], w [K, N])` is the product of decoding's projections: M is the batch of
sequences decoding one token each. Which implementation runs is decided by `resolve`, a pure
function of the requested implementation, the shapes, the dtypes and the backend: the call
dispatches on it.

Implementations (`impl`):
  "xla"               `reference.py`: XLA's matrix product, on every backend;
  "pallas"            the Pallas kernel of `pallas_triton.py` (Triton lowering, GPU), built to
                      stream W at the GPU's bandwidth;
  "pallas_interpret"  the same kernel in the Pallas interpreter (any backend; for tests);
  "auto"              "pallas" for a single row (M in AUTO_ROWS) on a GPU where the kernel
                      takes the shapes, else "xla". For one row XLA pads x to two rows and
                      slices the result, two more kernels per product; for two or four rows
                      its product reads W about as fast as the kernel does.
Only M in ROWS is a few-row product: any other M runs XLA's matrix product under every impl.
For those M an explicit kernel that cannot take the shapes or dtypes, or needs a GPU it lacks,
is a ValueError. The gradient is XLA's under every impl (decoding needs none; it is there so
that a model of few rows still trains).
"""

import functools
from typing import Optional, Sequence

import jax
import jax.numpy as jnp

from pallas_kernels.dispatch import require_gpu
from pallas_kernels.gemv import pallas_triton, reference

IMPLEMENTATIONS = ("auto", "xla", "pallas", "pallas_interpret")
ROWS = (1, 2, 4)  # M the kernel takes (powers of two: a Triton block is)
AUTO_ROWS = (1,)  # M for which "auto" picks the kernel (see the module docstring)
KERNEL_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)  # of x and w


def kernel_limits(k: int, n: int, dtypes: Sequence) -> Optional[str]:
  """Why the kernel cannot take x [M, K] @ w [K, N] with these input dtypes (see `resolve`),
  or None if it can."""
  step = pallas_triton.MIN_BLOCK
  if n % step or k % step:
    return f"x [M, K={k}] @ w [K, N={n}] (the kernel takes K and N multiples of {step})"
  bad = [jnp.dtype(t).name for t in dtypes if jnp.dtype(t) not in KERNEL_DTYPES]
  if bad:
    return f"dtypes {bad} (the kernel takes {[jnp.dtype(t).name for t in KERNEL_DTYPES]})"
  return None


def resolve(impl: str, *, rows: int, k: int, n: int, dtypes: Sequence, backend: str) -> str:
  """The implementation a product x [rows, k] @ w [k, n] with input `dtypes` runs on `backend`
  (as `jax.default_backend()` names it): "xla", "pallas" or "pallas_interpret".

  Raises:
    ValueError: `impl` is unknown, or names a kernel that cannot take these shapes or dtypes
      (for `rows` in ROWS), or needs a GPU `backend` is not.
  """
  if impl not in IMPLEMENTATIONS:
    raise ValueError(f"impl must be one of {IMPLEMENTATIONS}, got {impl!r}")
  if impl == "xla" or rows not in ROWS:
    return "xla"
  limit = kernel_limits(k, n, dtypes)
  if impl == "auto":
    return "pallas" if backend == "gpu" and limit is None and rows in AUTO_ROWS else "xla"
  if limit is not None:
    raise ValueError(f"impl={impl!r} cannot run {limit}; use impl='xla' or 'auto'")
  require_gpu(impl, backend)
  return impl


def _check(x, w) -> None:
  for name, a in (("x", x), ("w", w)):
    if not hasattr(a, "shape") or not hasattr(a, "dtype"):
      raise ValueError(f"{name} must be an array, got {type(a).__name__}")
    if a.ndim != 2 or not jnp.issubdtype(a.dtype, jnp.floating):
      raise ValueError(f"{name} must be a 2-D floating-point array, got shape "
                       f"{tuple(a.shape)} dtype {a.dtype}")
  if x.shape[1] != w.shape[0]:
    raise ValueError(f"x [M, K] @ w [K, N] needs x.shape[1] == w.shape[0], got x "
                     f"{tuple(x.shape)} and w {tuple(w.shape)}")


def matmul(x: jnp.ndarray, w: jnp.ndarray, *, out_dtype=None, impl: str = "auto") -> jnp.ndarray:
  """x [M, K] @ w [K, N] -> [M, N] in `out_dtype` (default x's dtype), accumulated in float32.

  Differentiable in x and w. Raises ValueError naming the argument for bad shapes, dtypes or
  impl.
  """
  _check(x, w)
  out_dtype = jnp.dtype(x.dtype if out_dtype is None else out_dtype)
  choice = resolve(impl, rows=x.shape[0], k=x.shape[1], n=w.shape[1],
                   dtypes=(x.dtype, w.dtype), backend=jax.default_backend())
  if choice == "xla":
    return reference.matmul(x, w, out_dtype)
  return _kernel_matmul(x, w, out_dtype, choice == "pallas_interpret")


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _kernel_matmul(x, w, out_dtype, interpret):
  return pallas_triton.matmul(x, w, out_dtype=out_dtype, interpret=interpret)


def _kernel_matmul_fwd(x, w, out_dtype, interpret):
  return _kernel_matmul(x, w, out_dtype, interpret), (x, w)


def _kernel_matmul_bwd(out_dtype, interpret, residuals, g):
  del out_dtype, interpret
  x, w = residuals
  _, vjp = jax.vjp(lambda x, w: reference.matmul(x, w, g.dtype), x, w)
  return vjp(g)


_kernel_matmul.defvjp(_kernel_matmul_fwd, _kernel_matmul_bwd)
