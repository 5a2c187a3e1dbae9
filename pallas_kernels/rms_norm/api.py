"""The entry points for residual add + RMSNorm (or LayerNorm), and the choice of implementation.

Rows are [..., D] (letters of `based_jax/__init__.py`): the model's float32 residual stream
[B, T, D] and the delta a layer adds to it. `add_rms_norm` returns the new residual and its
normed rows in one pass, `rms_norm` the normed rows of a stream with nothing to add. Both
take `center` and `bias`, which together make the norm a LayerNorm (`reference.py`). Which
implementation runs is decided by `resolve`, a pure function of the requested implementation,
the row width, the dtypes, the norm's form and the backend: the calls dispatch on it.

Implementations (`impl`):
  "xla"               `reference.py`: plain JAX on every backend, differentiable by autodiff;
  "pallas"            the Pallas kernels of `pallas_fused.py` (Triton lowering, GPU), with
                      their custom VJP;
  "pallas_interpret"  the same kernels in the Pallas interpreter (any backend; for tests);
  "auto"              "pallas" on a GPU for an RMSNorm the kernels can take (the train step
                      measured faster than XLA's fusions, docs/kernels.md), else "xla".
An explicit kernel that cannot take the inputs, or needs a GPU it lacks, is a ValueError, and
so is a kernel asked for a centred or biased norm (LayerNorm: only "xla" computes it; "auto"
resolves to "xla"). Both implementations compute the same float32 math; they differ only in
rounding.
"""

import math
from typing import Optional, Sequence

import jax
import jax.numpy as jnp

from pallas_kernels.dispatch import require_gpu
from pallas_kernels.rms_norm import pallas_fused, reference

IMPLEMENTATIONS = ("auto", "xla", "pallas", "pallas_interpret")
KERNEL_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)  # of every input and of the output
KERNEL_MAX_WIDTH = 8192  # D: a row block is [M, D rounded up to a power of two] in registers


def kernel_limits(width: int, dtypes: Sequence) -> Optional[str]:
  """Why the kernels cannot take rows of `width` D and these input / output dtypes (see
  `resolve`), or None if they can."""
  if width > KERNEL_MAX_WIDTH:
    return f"width D={width} (the kernels take D <= {KERNEL_MAX_WIDTH})"
  bad = [jnp.dtype(t).name for t in dtypes if jnp.dtype(t) not in KERNEL_DTYPES]
  if bad:
    return (f"dtypes {bad} (the kernels take "
            f"{[jnp.dtype(t).name for t in KERNEL_DTYPES]})")
  return None


def resolve(impl: str, *, width: int, dtypes: Sequence, backend: str,
            layer_norm: bool = False) -> str:
  """The implementation a call with these facts runs; `add_rms_norm` and `rms_norm` dispatch
  on it.

  Args:
    impl: the requested implementation, one of IMPLEMENTATIONS.
    width: D, the length of a row.
    dtypes: the dtypes of the inputs (residual, delta, scale) and of the normed output.
    backend: the platform the call runs on, as `jax.default_backend()` names it.
    layer_norm: the norm is centred or biased (LayerNorm), which the kernels do not compute.

  Returns:
    "xla", "pallas" or "pallas_interpret".

  Raises:
    ValueError: `impl` is unknown, or names a kernel that cannot take these inputs or needs
      a GPU `backend` is not, or a kernel for a `layer_norm`.
  """
  if impl not in IMPLEMENTATIONS:
    raise ValueError(f"impl must be one of {IMPLEMENTATIONS}, got {impl!r}")
  if impl == "xla":
    return "xla"
  if impl == "auto":
    usable = backend == "gpu" and not layer_norm and kernel_limits(width, dtypes) is None
    return "pallas" if usable else "xla"
  if layer_norm:
    raise ValueError(f"impl={impl!r}: the Pallas kernels compute RMSNorm only; a centred or "
                     "biased norm (LayerNorm) runs on impl 'xla' or 'auto'")
  limit = kernel_limits(width, dtypes)
  if limit is not None:
    raise ValueError(f"impl={impl!r} cannot run {limit}; use impl='xla' or 'auto'")
  require_gpu(impl, backend)
  return impl


def _check_rows(name: str, x, shape: Optional[tuple] = None) -> None:
  """x: a floating-point array [..., D] with D >= 1 (of `shape` when given)."""
  if not hasattr(x, "shape") or not hasattr(x, "dtype"):
    raise ValueError(f"{name} must be an array, got {type(x).__name__}")
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"{name} must be floating point, got {x.dtype}")
  if shape is not None and tuple(x.shape) != tuple(shape):
    raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(x.shape)}")
  if x.ndim < 1 or x.shape[-1] < 1:
    raise ValueError(f"{name} must be rows [..., D] with D >= 1, got shape {tuple(x.shape)}")


def _check_common(x, scale, eps, out_dtype, center, bias) -> None:
  _check_rows("scale", scale, (x.shape[-1],))
  if not isinstance(center, bool):
    raise ValueError(f"center must be a bool, got {center!r}")
  if bias is not None:
    _check_rows("bias", bias, (x.shape[-1],))
  if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < math.inf:
    raise ValueError(f"eps must be a finite number > 0 (a Python number), got {eps!r}")
  try:
    floating = jnp.issubdtype(jnp.dtype(out_dtype), jnp.floating)
  except TypeError:
    floating = False
  if not floating:
    raise ValueError(f"out_dtype must be a floating-point dtype, got {out_dtype!r}")


def _rows(x):
  return x.reshape(-1, x.shape[-1])


def add_rms_norm(residual: jnp.ndarray, delta: jnp.ndarray, scale: jnp.ndarray, *, eps: float,
                 out_dtype, impl: str = "auto", center: bool = False,
                 bias: Optional[jnp.ndarray] = None) -> tuple[jnp.ndarray, jnp.ndarray]:
  """The residual stream plus a delta, and that sum's RMSNorm, in one pass.

  Args:
    residual: [..., D] float32.
    delta: [..., D] (same shape), any float dtype; added in float32.
    scale: [D], any float dtype.
    eps: added to the mean square (a Python number > 0).
    out_dtype: dtype of the normed rows (the compute dtype).
    impl: one of IMPLEMENTATIONS; what runs is `resolve`'s answer.
    center: subtract each row's mean before the norm (with `bias`: LayerNorm).
    bias: [D] added after the scale, any float dtype; None: no bias.

  Returns:
    new_residual = residual + delta [..., D] float32 and
    normed = new_residual * rsqrt(mean(new_residual^2) + eps) * scale [..., D] in `out_dtype`
    (centred first with `center`, plus `bias`); differentiable in residual, delta, scale and
    bias.

  Raises:
    ValueError naming the argument for bad shapes, dtypes, eps or impl.
  """
  _check_rows("residual", residual)
  if residual.dtype != jnp.float32:
    raise ValueError(f"residual must be float32 (the residual stream), got {residual.dtype}")
  _check_rows("delta", delta, residual.shape)
  _check_common(residual, scale, eps, out_dtype, center, bias)
  impl = resolve(impl, width=residual.shape[-1],
                 dtypes=(residual.dtype, delta.dtype, scale.dtype, out_dtype),
                 backend=jax.default_backend(), layer_norm=center or bias is not None)
  if impl == "xla":
    return reference.add_rms_norm(residual, delta, scale, eps=eps, out_dtype=out_dtype,
                                  center=center, bias=bias)
  new_residual, normed = pallas_fused.add_rms_norm(
      _rows(residual), _rows(delta), scale, eps=eps, out_dtype=out_dtype,
      interpret=impl == "pallas_interpret")
  return new_residual.reshape(residual.shape), normed.reshape(residual.shape)


def rms_norm(x: jnp.ndarray, scale: jnp.ndarray, *, eps: float, out_dtype,
             impl: str = "auto", center: bool = False,
             bias: Optional[jnp.ndarray] = None) -> jnp.ndarray:
  """x / rms(x) * scale, computed in float32: x [..., D] any float dtype, scale [D]; returns
  [..., D] in `out_dtype`, differentiable in x, scale and bias. Arguments (`center`, `bias`:
  LayerNorm) and errors as `add_rms_norm`'s."""
  _check_rows("x", x)
  _check_common(x, scale, eps, out_dtype, center, bias)
  impl = resolve(impl, width=x.shape[-1], dtypes=(x.dtype, scale.dtype, out_dtype),
                 backend=jax.default_backend(), layer_norm=center or bias is not None)
  if impl == "xla":
    return reference.rms_norm(x, scale, eps=eps, out_dtype=out_dtype, center=center, bias=bias)
  return pallas_fused.rms_norm(_rows(x), scale, eps=eps, out_dtype=out_dtype,
                               interpret=impl == "pallas_interpret").reshape(x.shape)
