"""Residual add + RMSNorm over rows as Pallas kernels (Triton lowering), with a custom VJP.

Shapes use the dimension letters of `based_jax/__init__.py`. Letters local to these kernels:

    R   rows: the [B, T, D] stream flattened to [R, D]      BD  D rounded up to a power of two
    M   rows one step of a program holds (a power of two)   J   steps of M rows one program
                                                                walks (1 in the forward)

Forward. One program per block of M rows reads the float32 residual and the delta once and
writes the float32 sum and the normed rows (the math and casts of `reference.py`):

    x = residual + delta,   r = rsqrt(sum(x^2) / D + eps),   normed = (x r) scale

A block is [M, BD] in registers: every load masks columns >= D and rows >= R (read as 0) and
every store masks them off, so D need not be a power of two and R need not be a multiple of M,
and nothing is padded in HBM. `rms_norm` is the same kernel without the delta and without the
float32 output.

Backward. One kernel recomputes r per row from the saved sum x (the forward's float32 output;
for `rms_norm` its input). With g = d normed in float32, x^ = x r and gs = g scale:

    dx = r (gs - x^ mean(gs x^)) + d new_residual

written as float32 (the residual's cotangent) and, when the delta is not float32, a second
time in the delta's dtype (its cotangent: one rounding of the same values, no XLA pass). The
scale's cotangent, the sum over rows of g x^, crosses programs: each program walks J blocks
of M rows (J chosen so that at most `Tiling.max_programs` programs run), keeps its partial sum
[BD] in registers and writes it to a float32 [R / (J M), D] array that XLA sums. An unused
float32 output (the model's final norm) reaches the VJP as a symbolic zero: the kernel then
reads no d new_residual.

Bytes moved per element of the stream (bf16 delta and normed): forward 12 (f32 residual and
bf16 delta in, f32 sum and bf16 normed out), backward 16 (f32 x, bf16 g and f32 d new_residual
in, f32 and bf16 dx out); `rms_norm` 6 and 10 (float32 x). Nothing else reaches HBM but the
[R / (J M), D] partial sums. At based_360m's training shape (R = 16384, D = 1024) that is
0.20 GB forward and 0.27 GB backward per fused norm, about 42 and 56 us at the H200's 4.8 TB/s.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from pallas_kernels.rms_norm import reference


@dataclasses.dataclass(frozen=True)
class Tiling:
  """How one kernel tiles the rows (see the module docstring)."""
  block_elements: int = 4096  # M BD: M = this / BD rows per step (>= 1, <= R rounded up to 2^k)
  max_programs: int = 0  # 0: one program per block of M rows; else J blocks a program, <= this many
  num_warps: int = 4  # Triton warps per program
  num_stages: int = 1  # Triton software-pipelining stages (of the backward's walk)

  def __post_init__(self):
    x = self.block_elements
    if not isinstance(x, int) or x < 1 or x & (x - 1):
      raise ValueError(f"Tiling.block_elements must be a power of two >= 1, got {x!r}")
    if not isinstance(self.max_programs, int) or self.max_programs < 0:
      raise ValueError(f"Tiling.max_programs must be an int >= 0, got {self.max_programs!r}")
    if self.num_warps not in (1, 2, 4, 8, 16) or self.num_stages < 1:
      raise ValueError(f"bad Tiling num_warps={self.num_warps} num_stages={self.num_stages}")


# Not measured on a GPU yet (docs/kernels.md says how to): 4096 elements a step is 4 rows at
# D = 1024 (32 float32 values a thread a tensor with 4 warps); the backward holds three such
# tensors, so it takes 8 warps, and walks rows so that about 8 programs per SM of an H200
# (132 SMs) write partial scale sums: 1024 x D floats, 4 MB at D = 1024.
FORWARD_TILING = Tiling(block_elements=4096, max_programs=0, num_warps=4)
BACKWARD_TILING = Tiling(block_elements=4096, max_programs=1024, num_warps=8)


def layout(r: int, d: int, tiling: Tiling) -> tuple[int, int, int]:
  """(M, BD, J) of a kernel over [R, D] rows: rows per step, padded width, steps per program."""
  bd = pl.next_power_of_2(d)
  m = min(pl.next_power_of_2(r), max(1, tiling.block_elements // bd))
  blocks = pl.cdiv(r, m)
  steps = pl.cdiv(blocks, tiling.max_programs) if tiling.max_programs else 1
  return m, bd, steps


def _masks(start, m, bd, n_rows, d):
  """The [M, BD] mask of rows start.. start + M - 1 that exist (< n_rows) and columns < d."""
  rows = start + jax.lax.broadcasted_iota(jnp.int32, (m, bd), 0)
  cols = jax.lax.broadcasted_iota(jnp.int32, (m, bd), 1)
  return (rows < n_rows) & (cols < d)


def _load(ref, mask):
  """A masked block as float32: 0 where the mask is False."""
  return plt.load(ref, mask=mask, other=0).astype(jnp.float32)


def _load_scale(scale_ref, d):
  bd = scale_ref.shape[0]
  return _load(scale_ref, jax.lax.broadcasted_iota(jnp.int32, (bd,), 0) < d)


def _inverse_rms(x, d, eps):
  """r [M] = rsqrt(mean(x^2) + eps) per row of x [M, BD] (its masked columns are 0)."""
  return jax.lax.rsqrt(jnp.sum(x * x, axis=1) / d + eps)


# --- Kernels. Refs hold one program's rows: [J M, BD] (the last block's rows past R and the
# columns past D are masked), the scale [BD], the partial scale sum [BD]. ---

def _forward_kernel(*refs, n_rows, d, eps, has_delta):
  if has_delta:
    residual_ref, delta_ref, scale_ref, sum_ref, out_ref = refs
  else:
    (residual_ref, scale_ref, out_ref), sum_ref = refs, None
  m, bd = out_ref.shape
  mask = _masks(pl.program_id(0) * m, m, bd, n_rows, d)
  x = _load(residual_ref, mask)
  if has_delta:
    x = x + _load(delta_ref, mask)
    plt.store(sum_ref, x, mask=mask)
  x_hat = x * _inverse_rms(x, d, eps)[:, None]
  normed = x_hat * _load_scale(scale_ref, d)[None, :]
  plt.store(out_ref, normed.astype(out_ref.dtype), mask=mask)


def _backward_kernel(*refs, n_rows, d, eps, m, steps, has_dsum, n_dx):
  x_ref, g_ref, *refs = refs
  dsum_ref = refs.pop(0) if has_dsum else None
  scale_ref, *dx_refs, dscale_ref = refs
  span, bd = x_ref.shape
  scale = _load_scale(scale_ref, d)
  first_row = pl.program_id(0) * span

  def body(i, dscale):
    rows = pl.ds(i * m, m)
    mask = _masks(first_row + i * m, m, bd, n_rows, d)
    x, g = _load(x_ref.at[rows, :], mask), _load(g_ref.at[rows, :], mask)
    r = _inverse_rms(x, d, eps)[:, None]
    x_hat = x * r
    gs = g * scale[None, :]
    dx = r * (gs - x_hat * (jnp.sum(gs * x_hat, axis=1) / d)[:, None])
    if has_dsum:
      dx = dx + _load(dsum_ref.at[rows, :], mask)
    for ref in dx_refs:
      plt.store(ref.at[rows, :], dx.astype(ref.dtype), mask=mask)
    return dscale + jnp.sum(g * x_hat, axis=0)

  dscale = jax.lax.fori_loop(0, steps, body, jnp.zeros((bd,), jnp.float32))
  plt.store(dscale_ref, dscale, mask=jax.lax.broadcasted_iota(jnp.int32, (bd,), 0) < d)


# --- pallas_call wrappers over [R, D] rows ---

def _call(kernel, tiling, interpret, static, **kw):
  return pl.pallas_call(
      functools.partial(kernel, **static),
      compiler_params=plt.CompilerParams(num_warps=tiling.num_warps,
                                         num_stages=tiling.num_stages),
      interpret=interpret, **kw)


def _rows_spec(span, bd):
  return pl.BlockSpec((span, bd), lambda i: (i, 0))


def _scale_spec(bd):
  return pl.BlockSpec((bd,), lambda i: (0,))


def _forward(x, delta, scale, opt):
  """The normed rows of x [R, D] (+ delta [R, D]); with a delta first the float32 sum."""
  r, d = x.shape
  m, bd, _ = layout(r, d, opt.forward)
  has_delta = delta is not None
  inputs = (x, delta, scale) if has_delta else (x, scale)
  shapes = [jax.ShapeDtypeStruct((r, d), jnp.float32)] * has_delta
  shapes.append(jax.ShapeDtypeStruct((r, d), opt.out_dtype))
  return _call(
      _forward_kernel, opt.forward, opt.interpret,
      dict(n_rows=r, d=d, eps=opt.eps, has_delta=has_delta),
      grid=(pl.cdiv(r, m),),
      in_specs=[_rows_spec(m, bd)] * (1 + has_delta) + [_scale_spec(bd)],
      out_specs=[_rows_spec(m, bd)] * len(shapes), out_shape=shapes,
      name="add_rms_norm_fwd" if has_delta else "rms_norm_fwd")(*inputs)


def _backward(x, g, dsum, scale, dx_dtypes, opt):
  """dx [R, D] in each of `dx_dtypes` (the same values) and d scale, given g = d normed and
  dsum = d of the float32 sum (None: zero)."""
  r, d = x.shape
  m, bd, steps = layout(r, d, opt.backward)
  programs = pl.cdiv(r, m * steps)
  has_dsum = dsum is not None
  inputs = (x, g, dsum, scale) if has_dsum else (x, g, scale)
  span = _rows_spec(m * steps, bd)
  *dxs, partials = _call(
      _backward_kernel, opt.backward, opt.interpret,
      dict(n_rows=r, d=d, eps=opt.eps, m=m, steps=steps, has_dsum=has_dsum,
           n_dx=len(dx_dtypes)),
      grid=(programs,),
      in_specs=[span] * (2 + has_dsum) + [_scale_spec(bd)],
      out_specs=[span] * len(dx_dtypes) + [pl.BlockSpec((None, bd), lambda i: (i, 0))],
      out_shape=[jax.ShapeDtypeStruct((r, d), t) for t in dx_dtypes]
      + [jax.ShapeDtypeStruct((programs, d), jnp.float32)],
      name="rms_norm_bwd")(*inputs)
  return dxs, jnp.sum(partials, axis=0).astype(scale.dtype)


@dataclasses.dataclass(frozen=True)
class _Options:
  """Static settings of one call (hashable: the custom VJPs' nondiff argument)."""
  eps: float
  out_dtype: jnp.dtype  # of the normed rows
  forward: Tiling
  backward: Tiling
  interpret: bool
  delta_dtype: jnp.dtype | None = None  # add_rms_norm: the dtype of the delta's cotangent


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _add_norm(residual, delta, scale, opt):
  return tuple(_forward(residual, delta, scale, opt))


def _add_norm_fwd(residual, delta, scale, opt):
  residual, delta, scale = (x.value for x in (residual, delta, scale))  # symbolic_zeros
  new_residual, normed = _forward(residual, delta, scale, opt)
  return (new_residual, normed), (new_residual, scale)


def _add_norm_bwd(opt, res, cotangents):
  new_residual, scale = res
  dsum, dnormed = cotangents
  if isinstance(dnormed, SymbolicZero):
    dnormed = jnp.zeros(new_residual.shape, opt.out_dtype)
  dsum = None if isinstance(dsum, SymbolicZero) else dsum
  dtypes = (jnp.float32,) if opt.delta_dtype == jnp.float32 else (jnp.float32, opt.delta_dtype)
  dxs, dscale = _backward(new_residual, dnormed, dsum, scale, dtypes, opt)
  return dxs[0], dxs[-1], dscale


_add_norm.defvjp(_add_norm_fwd, _add_norm_bwd, symbolic_zeros=True)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _norm(x, scale, opt):
  return _forward(x, None, scale, opt)[0]


def _norm_fwd(x, scale, opt):
  return _norm(x, scale, opt), (x, scale)


def _norm_bwd(opt, res, dnormed):
  x, scale = res
  dxs, dscale = _backward(x, dnormed, None, scale, (x.dtype,), opt)
  return dxs[0], dscale


_norm.defvjp(_norm_fwd, _norm_bwd)


def add_rms_norm(residual: jnp.ndarray, delta: jnp.ndarray, scale: jnp.ndarray, *, eps: float,
                 out_dtype, forward: Tiling = FORWARD_TILING,
                 backward: Tiling = BACKWARD_TILING,
                 interpret: bool = False) -> tuple[jnp.ndarray, jnp.ndarray]:
  """`reference.add_rms_norm` through the kernels.

  Args:
    residual: [R, D] float32.
    delta: [R, D], any float dtype.
    scale: [D], any float dtype.
    eps: added to the mean square.
    out_dtype: dtype of the normed rows.
    forward, backward: the tilings of the two kernels.
    interpret: run the kernels in the Pallas interpreter (CPU tests).

  Returns:
    new_residual [R, D] float32 and normed [R, D] in `out_dtype`; differentiable in residual,
    delta and scale (their cotangents in their own dtypes).
  """
  if residual.shape[0] == 0:  # no rows: nothing to launch
    return reference.add_rms_norm(residual, delta, scale, eps=eps, out_dtype=out_dtype)
  opt = _Options(eps=float(eps), out_dtype=jnp.dtype(out_dtype), forward=forward,
                 backward=backward, interpret=interpret, delta_dtype=jnp.dtype(delta.dtype))
  return _add_norm(residual, delta, scale, opt)


def rms_norm(x: jnp.ndarray, scale: jnp.ndarray, *, eps: float, out_dtype,
             forward: Tiling = FORWARD_TILING, backward: Tiling = BACKWARD_TILING,
             interpret: bool = False) -> jnp.ndarray:
  """`reference.rms_norm` of x [R, D] (any float dtype) through the kernels; differentiable in
  x and scale [D]. Arguments as `add_rms_norm`'s."""
  if x.shape[0] == 0:
    return reference.rms_norm(x, scale, eps=eps, out_dtype=out_dtype)
  opt = _Options(eps=float(eps), out_dtype=jnp.dtype(out_dtype), forward=forward,
                 backward=backward, interpret=interpret)
  return _norm(x, scale, opt)
