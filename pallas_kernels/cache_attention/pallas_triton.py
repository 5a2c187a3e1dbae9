"""Decode attention as a Pallas kernel (Triton lowering): one program per (row, head).

Letters local to this kernel:

    BS  cache slots one step of a program reads     SP, KP  S and K' rounded up to powers of 2

A decode step of a model with a sliding window reads the window's whole cache, so at large
batches it is bound by those bytes. The XLA path scatters the new key and value into the cache,
then reads the keys for the scores and the values for the weighted sum in separate passes, and
materialises the [B, H, S] scores in between. Program (b, h) owns its [S, K'] panels of keys
and values: it stores the row's new key and value in their slot (the caches are aliased to the
outputs: updated in place) and reads the panels once, in steps of BS slots, taking the new key
and value from registers where a step covers their slot. Each step computes the BS scores q.k
on the CUDA cores (one query: no tensor-core tile to fill), masks the slots the query may not
see (`reference.allowed_slots`), and folds them into a running max, normaliser and [K']
weighted sum (the online softmax of flash attention). It writes the float32 output [K'] once.
Loads past S slots or K' columns are masked (read as 0; positions as -1, an empty slot), so S
(the window's W + 1) and K' need not be powers of two. The query sees its own key, so every
row that is not padding (slot S or more: nothing stored) has an allowed slot.
"""

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from pallas_kernels.cache_attention.reference import MASKED, allowed_slots


@dataclasses.dataclass(frozen=True)
class Tiling:
  """How one program walks its cache panels (see the module docstring)."""
  block_slots: int = 32  # BS, a power of two
  num_warps: int = 2  # Triton warps per program
  num_stages: int = 2  # Triton software-pipelining stages of the walk over slots

  def __post_init__(self):
    x = self.block_slots
    if not isinstance(x, int) or x < 1 or x & (x - 1):
      raise ValueError(f"Tiling.block_slots must be a power of two >= 1, got {x!r}")
    if self.num_warps not in (1, 2, 4, 8, 16) or self.num_stages < 1:
      raise ValueError(f"bad Tiling num_warps={self.num_warps} num_stages={self.num_stages}")


TILING = Tiling()


def _kernel(q_pos_ref, slot_ref, pos_ref, q_ref, new_k_ref, new_v_ref, k_ref, v_ref, out_ref,
            k_out, v_out, *, slots: int, width: int, window: Optional[int], scale: float,
            bs: int):
  # q_pos_ref, slot_ref [1], pos_ref [SP], q_ref, new_k_ref, new_v_ref [KP],
  # k_ref, v_ref (aliased to k_out, v_out) [SP, KP], out_ref [KP].
  kp = q_ref.shape[0]
  columns = jax.lax.broadcasted_iota(jnp.int32, (kp,), 0) < width
  q, new_k, new_v = (plt.load(ref, mask=columns, other=0).astype(jnp.float32)
                     for ref in (q_ref, new_k_ref, new_v_ref))
  q_pos, written = plt.load(q_pos_ref)[0], plt.load(slot_ref)[0]

  def step(i, carry):
    running_max, norm, acc = carry
    slot = i * bs + jax.lax.broadcasted_iota(jnp.int32, (bs,), 0)
    present = slot < slots
    fresh = (slot == written)[:, None]  # the new key's slot: its old contents are gone
    pos = plt.load(pos_ref.at[pl.ds(i * bs, bs)], mask=present, other=-1)
    allowed = allowed_slots(pos, q_pos, window)
    panel = present[:, None] & columns[None, :]
    keys = plt.load(k_ref.at[pl.ds(i * bs, bs), :], mask=panel, other=0).astype(jnp.float32)
    keys = jnp.where(fresh, new_k[None, :], keys)
    logits = jnp.where(allowed, jnp.sum(keys * q[None, :], axis=1) * scale, MASKED)
    new_max = jnp.maximum(running_max, jnp.max(logits))
    weights = jnp.where(allowed, jnp.exp(logits - new_max), 0.0)
    rescale = jnp.exp(running_max - new_max)
    values = plt.load(v_ref.at[pl.ds(i * bs, bs), :], mask=panel, other=0).astype(jnp.float32)
    values = jnp.where(fresh, new_v[None, :], values)
    acc = acc * rescale + jnp.sum(weights[:, None] * values, axis=0)
    return new_max, norm * rescale + jnp.sum(weights), acc

  init = (jnp.float32(MASKED), jnp.float32(0), jnp.zeros((kp,), jnp.float32))
  _, norm, acc = jax.lax.fori_loop(0, pl.cdiv(slots, bs), step, init)
  plt.store(out_ref, acc / norm, mask=columns)
  row = (written < slots) & columns[None, :]  # [1, KP]; slot S or more: a padding row
  at = pl.ds(jnp.minimum(written, slots - 1), 1)  # in bounds even where the mask drops it
  for new, ref in ((new_k, k_out), (new_v, v_out)):
    plt.store(ref.at[at, :], new[None, :].astype(ref.dtype), mask=row)


@functools.partial(jax.jit, static_argnames=("window", "scale", "interpret", "tiling"))
def decode_attention(q, new_k, new_v, k, v, pos, q_pos, slot, *, window: Optional[int],
                     scale: float, interpret: bool = False, tiling: Tiling = TILING):
  """`reference.decode_attention` (same arguments and results: the float32 [B, H, K'] output
  and the updated k, v, in place when donated) as the kernel; `api.decode_attention` checks
  the arguments."""
  b, h, s, width = k.shape
  sp, kp = pl.next_power_of_2(s), pl.next_power_of_2(width)
  bs = min(tiling.block_slots, sp)
  row = pl.BlockSpec((1,), lambda i, j: (i,))
  head = pl.BlockSpec((None, None, kp), lambda i, j: (i, j, 0))
  panel = pl.BlockSpec((None, None, sp, kp), lambda i, j: (i, j, 0, 0))
  return pl.pallas_call(
      functools.partial(_kernel, slots=s, width=width, window=window, scale=scale, bs=bs),
      grid=(b, h),
      in_specs=[row, row, pl.BlockSpec((None, sp), lambda i, j: (i, 0)), head, head, head,
                panel, panel],
      out_specs=[head, panel, panel],
      out_shape=[jax.ShapeDtypeStruct((b, h, width), jnp.float32),
                 jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
      input_output_aliases={6: 1, 7: 2},
      compiler_params=plt.CompilerParams(num_warps=tiling.num_warps,
                                         num_stages=tiling.num_stages),
      interpret=interpret,
      name="cache_attention_decode",
  )(q_pos.astype(jnp.int32), slot.astype(jnp.int32), pos, q, new_k, new_v, k, v)
