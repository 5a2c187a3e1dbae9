"""x [M, K] @ W [K, N] for M in (1, 2, 4) rows as a Pallas kernel (Triton lowering).

Letters local to this kernel:

    BN  output columns one program writes       BK  rows of W one step of a program reads
    S   programs along K (split-K)              KS  = K / S rows of W one program reads

Decoding a batch of one multiplies one row by every weight matrix of the model: the step is
the time to read the weights. XLA runs such a product as a matrix kernel of padded rows or as a
reduction, and reads the weights well below the GPU's bandwidth; this kernel is built only to
stream W. Program (j, s) walks its KS rows of W's column block j in steps of [BK, BN],
multiplying each by the matching [M, BK] slice of x on the CUDA cores (M x BK x BN products
in registers, summed over BK: at these M a tensor-core tile would be mostly padding) and
accumulating [M, BN] in float32. A matrix too narrow to give the GPU enough programs in
column blocks alone (N / BN < `Tiling.min_programs`) is also split along K: S programs per
column block write float32 partial sums [S, M, N], which XLA adds. S is the smallest divisor
of K / BK that reaches `min_programs` programs.

No load or store is masked: BN divides N and BK divides K (`blocks`: powers of two of at
least MIN_BLOCK, so K and N must be multiples of it), and every output element is written by
exactly one program.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt


@dataclasses.dataclass(frozen=True)
class Tiling:
  """How the kernel tiles W (see the module docstring)."""
  block_n: int = 128  # BN, a power of two
  block_elements: int = 4096  # M x BK x BN products one step holds: BK = this / (M BN)
  min_programs: int = 528  # split K until this many programs run (4 per SM of an H200)
  num_warps: int = 4  # Triton warps per program
  num_stages: int = 4  # Triton software-pipelining stages of the walk over K

  def __post_init__(self):
    for name in ("block_n", "block_elements"):
      x = getattr(self, name)
      if not isinstance(x, int) or x < 1 or x & (x - 1):
        raise ValueError(f"Tiling.{name} must be a power of two >= 1, got {x!r}")
    if self.block_elements < 4 * self.block_n:
      raise ValueError(f"Tiling.block_elements must be >= 4 block_n, got {self.block_elements}")
    if self.min_programs < 1 or self.num_warps not in (1, 2, 4, 8, 16) or self.num_stages < 1:
      raise ValueError(f"bad Tiling min_programs={self.min_programs} "
                       f"num_warps={self.num_warps} num_stages={self.num_stages}")


TILING = Tiling()


MIN_BLOCK = 8  # BN and BK are at least this: K and N must be multiples of it


def _power_of_two_factor(x: int, cap: int) -> int:
  """The largest power of two that divides x, at most cap."""
  return min(x & -x, cap)


def blocks(rows: int, k: int, n: int, tiling: Tiling = TILING) -> tuple[int, int, int]:
  """(BN, BK, S) for x [M = rows, K] @ W [K, N]: BN the largest power of two dividing N up to
  `block_n`, BK the largest dividing K up to block_elements / (M BN), S the smallest divisor
  of K / BK with (N / BN) S >= min_programs (or K / BK)."""
  bn = _power_of_two_factor(n, tiling.block_n)
  bk = _power_of_two_factor(k, tiling.block_elements // (rows * bn))
  steps, columns = k // bk, n // bn
  s = next(s for s in range(1, steps + 1)
           if steps % s == 0 and (columns * s >= tiling.min_programs or s == steps))
  return bn, bk, s


def _kernel(x_ref, w_ref, out_ref, *, steps: int, bk: int):
  # x_ref [M, KS], w_ref [KS, BN], out_ref [M, BN] (or [1, M, BN] of the partial sums).
  def step(i, acc):
    x = x_ref[:, pl.ds(i * bk, bk)].astype(jnp.float32)  # [M, BK]
    w = w_ref[pl.ds(i * bk, bk), :].astype(jnp.float32)  # [BK, BN]
    return acc + jnp.sum(x[:, :, None] * w[None, :, :], axis=1)

  acc = jax.lax.fori_loop(0, steps, step,
                          jnp.zeros((x_ref.shape[0], w_ref.shape[1]), jnp.float32))
  out_ref[...] = acc.reshape(out_ref.shape).astype(out_ref.dtype)


@functools.partial(jax.jit, static_argnames=("out_dtype", "interpret", "tiling"))
def matmul(x: jnp.ndarray, w: jnp.ndarray, *, out_dtype, interpret: bool = False,
           tiling: Tiling = TILING) -> jnp.ndarray:
  """x [M, K] @ w [K, N] -> [M, N] in `out_dtype`, float32 accumulation (shapes as
  `kernel_limits` allows; `api.matmul` checks them)."""
  (m, k), n = x.shape, w.shape[1]
  bn, bk, s = blocks(m, k, n, tiling)
  ks = k // s
  partial = s > 1
  out_shape = (s, m, n) if partial else (m, n)
  y = pl.pallas_call(
      functools.partial(_kernel, steps=ks // bk, bk=bk),
      grid=(n // bn, s),
      in_specs=[pl.BlockSpec((m, ks), lambda j, i: (0, i)),
                pl.BlockSpec((ks, bn), lambda j, i: (i, j))],
      out_specs=(pl.BlockSpec((1, m, bn), lambda j, i: (i, 0, j)) if partial else
                 pl.BlockSpec((m, bn), lambda j, i: (0, j))),
      out_shape=jax.ShapeDtypeStruct(out_shape, jnp.float32 if partial else out_dtype),
      compiler_params=plt.CompilerParams(num_warps=tiling.num_warps,
                                         num_stages=tiling.num_stages),
      interpret=interpret,
      name="gemv",
  )(x, w)
  return jnp.sum(y, axis=0).astype(out_dtype) if partial else y
