"""The fused decoding step of Taylor linear attention as a Pallas kernel (Triton lowering).

Shapes use the dimension letters of `based_jax/__init__.py` (E = 153 at F = 16).

One pass. For each (batch, head) and block of value columns one program reads the state (kv
[E, block] float32 or bf16, k [E] float32) once, adds phi(k_t) v_t^T and phi(k_t), reads out
y_t = phi(q_t) kv / (phi(q_t) . k + eps) and writes the state back in place (the kv buffer is
aliased to the output; the small k state is written to a fresh buffer, since several column
blocks read it). The features phi(q_t), phi(k_t) [E] come in precomputed by
`feature_map.taylor_feature_map` (one definition of the packed basis; they are 2 E floats per
head, against the 2 E (K + 1) of reading and writing the state).

Tiling. Value columns come in blocks of `max_block_d` (a power of two); a head dim such as 112
is covered by a block of 128 whose overhanging columns are masked (no padded copies). The E
state rows are loaded and stored `block_e` rows at a time (`row_blocks`): equal power-of-two
blocks, the last one ending at row E over its predecessor's last rows, which it masks (E = 153,
block_e = 32: rows 0, 32, 64, 96 and 121, with 121-127 masked).

Roofline. Memory-bound: per step and head the floor is one read and one write of the state,
2 * 4 * E * (K + 1) bytes (about 79 KB at E = 153, K = 64; a bf16 kv about halves it); the
flops (about 6 E K) are negligible. With impl="auto", `api` sends decode steps with
K <= DECODE_XLA_MAX_VALUE_DIM to XLA's fused step instead, measured faster there. The
measurements and the designs tried are in docs/kernels.md.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from pallas_kernels.taylor_attention.state import TaylorState


def row_blocks(e: int, block_e: int) -> tuple[int, list[tuple[int, int]]]:
  """Blocks of rows covering E state rows: the block size (block_e, at most the largest power
  of two <= E) and each block's (start, first_new): the last block ends at row E, overlapping
  its predecessor, and rows before first_new are masked (an earlier block owns them)."""
  if block_e < 1 or block_e & (block_e - 1):
    raise ValueError(f"block_e must be a power of two, got {block_e}")
  size = min(block_e, 1 << (e.bit_length() - 1))
  return size, [(min(start, e - size), start) for start in range(0, e, size)]


def _kernel(valid_ref, phi_q_ref, phi_k_ref, v_ref, kv_ref, ks_ref, y_ref, kv_out, ks_out, *,
            eps, d, block_e):
  block_d = v_ref.shape[0]
  col_ok = pl.program_id(2) * block_d + jnp.arange(block_d) < d  # block may overhang K
  valid = valid_ref[0].astype(jnp.float32)
  v = plt.load(v_ref, mask=col_ok, other=0.0).astype(jnp.float32) * valid
  num = jnp.zeros(v.shape, jnp.float32)
  den = jnp.zeros((), jnp.float32)
  size, blocks = row_blocks(phi_q_ref.shape[0], block_e)
  for start, first_new in blocks:
    rows = pl.ds(start, size)
    new = start + jnp.arange(size) >= first_new
    mask = new[:, None] & col_ok[None, :]
    phi_q = jnp.where(new, phi_q_ref[rows], 0.0)  # masked rows add nothing to y
    phi_k = phi_k_ref[rows] * valid
    kv = plt.load(kv_ref.at[rows, :], mask=mask, other=0.0).astype(jnp.float32)
    kv += phi_k[:, None] * v[None, :]
    ks = ks_ref[rows] + phi_k
    plt.store(kv_out.at[rows, :], kv.astype(kv_out.dtype), mask=mask)
    num += jnp.sum(phi_q[:, None] * kv, axis=0)
    den += jnp.sum(phi_q * ks)

    @pl.when(pl.program_id(2) == 0)  # every column block computes ks; one writes it
    def _():
      plt.store(ks_out.at[rows], ks, mask=new)

  plt.store(y_ref, (num / (den + eps)).astype(y_ref.dtype), mask=col_ok)


def step(phi_q: jnp.ndarray, phi_k: jnp.ndarray, v: jnp.ndarray, state: TaylorState,
         valid: jnp.ndarray, *, eps: float, num_warps: int = 4, max_block_d: int = 128,
         block_e: int = 32, interpret: bool = False) -> tuple[jnp.ndarray, TaylorState]:
  """One decoding step for a batch.

  Args:
    phi_q, phi_k: float32 [B, H, E] features of q_t, k_t; v: [B, H, K];
    state: [B, H, E, K] float32 or bfloat16 (updated in float32, rounded when stored) and
      float32 [B, H, E].
    valid: [B] bool; rows that are False leave their state unchanged (padding).

  Returns:
    y [B, H, K] in v's dtype and the updated state (written in place when donated).
  """
  b, h, e = phi_q.shape
  d = v.shape[-1]
  row_blocks(e, block_e)  # validates block_e
  block_d = min(pl.next_power_of_2(d), max_block_d)

  def spec(*shape):  # the whole trailing block of one (batch, head)
    return pl.BlockSpec((None, None) + shape, lambda i, j, c: (i, j) + (0,) * len(shape))

  def col_spec(*shape):  # one block of value columns
    return pl.BlockSpec((None, None) + shape,
                        lambda i, j, c: (i, j) + (0,) * (len(shape) - 1) + (c,))

  y, kv, ks = pl.pallas_call(
      functools.partial(_kernel, eps=eps, d=d, block_e=block_e),
      grid=(b, h, pl.cdiv(d, block_d)),
      in_specs=[pl.BlockSpec((None, 1), lambda i, j, c: (i, 0)), spec(e), spec(e),
                col_spec(block_d), col_spec(e, block_d), spec(e)],
      out_specs=[col_spec(block_d), col_spec(e, block_d), spec(e)],
      out_shape=[jax.ShapeDtypeStruct(v.shape, v.dtype),
                 jax.ShapeDtypeStruct(state.kv.shape, state.kv.dtype),
                 jax.ShapeDtypeStruct(state.k.shape, jnp.float32)],
      input_output_aliases={4: 1},
      compiler_params=plt.CompilerParams(num_warps=num_warps, num_stages=1),
      interpret=interpret,
      name="taylor_attention_decode",
  )(valid.astype(jnp.int32).reshape(b, 1), phi_q, phi_k, v, state.kv, state.k)
  return y, TaylorState(kv, ks)
