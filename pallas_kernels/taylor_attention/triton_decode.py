"""The decoding step as a plain Triton kernel called through jax-triton (GPU only, optional).

Shapes use the dimension letters of `based_jax/__init__.py`. Same contract and same one-pass
design as `pallas_decode.py` (read the state once, add phi(k_t) v_t^T, read out y_t, write the
state in place, features precomputed); here the pointer arithmetic is explicit, value columns
come in blocks of up to 64 and the E state rows are one masked tile of the next power of two
rows. Only `impl="triton"` runs it ("auto" never does); `available()` says whether jax-triton
imports (it needs a CUDA jaxlib and `pip install -e ".[triton]"`), and `api.py` only offers
this path when it does. `experiments/bench_decode_step.py` compares it with the Pallas kernel
and XLA (docs/kernels.md).
"""

import os

import jax
import jax.numpy as jnp

from pallas_kernels.taylor_attention.state import TaylorState

_cache_dir = os.environ.get("TRITON_CACHE_DIR")
try:
  import jax_triton
  import triton
  import triton.language as tl
  _IMPORT_ERROR = None
except Exception as e:  # ImportError, or jax-triton refusing a CPU-only jaxlib
  _IMPORT_ERROR = e
finally:  # jax-triton blanks TRITON_CACHE_DIR at import, breaking Triton users (fla) beside us
  if _cache_dir is None:
    os.environ.pop("TRITON_CACHE_DIR", None)
  else:
    os.environ["TRITON_CACHE_DIR"] = _cache_dir


def available() -> bool:
  return _IMPORT_ERROR is None


if _IMPORT_ERROR is None:

  @triton.jit
  def _kernel(valid_ptr, phi_q_ptr, phi_k_ptr, v_ptr, kv_ptr, ks_ptr, y_ptr, kv_out, ks_out,
              e: tl.constexpr, block_e: tl.constexpr, d: tl.constexpr, block_d: tl.constexpr,
              eps: tl.constexpr):
    head, c = tl.program_id(0) * tl.num_programs(1) + tl.program_id(1), tl.program_id(2)
    valid = tl.load(valid_ptr + tl.program_id(0)).to(tl.float32)
    rows = tl.arange(0, block_e)  # all E rows as one tile, the power-of-two overhang masked
    cols = c * block_d + tl.arange(0, block_d)
    row_ok, col_ok = rows < e, cols < d
    phi_q = tl.load(phi_q_ptr + head * e + rows, mask=row_ok, other=0.0)
    phi_k = tl.load(phi_k_ptr + head * e + rows, mask=row_ok, other=0.0) * valid
    v = tl.load(v_ptr + head * d + cols, mask=col_ok, other=0.0).to(tl.float32) * valid
    offs = head * e * d + rows[:, None] * d + cols[None, :]
    mask = row_ok[:, None] & col_ok[None, :]
    kv = tl.load(kv_ptr + offs, mask=mask, other=0.0).to(tl.float32) + phi_k[:, None] * v[None, :]
    ks = tl.load(ks_ptr + head * e + rows, mask=row_ok, other=0.0) + phi_k
    tl.store(kv_out + offs, kv.to(kv_out.dtype.element_ty), mask=mask)
    if c == 0:  # every column block computes ks; one writes it
      tl.store(ks_out + head * e + rows, ks, mask=row_ok)
    y = tl.sum(phi_q[:, None] * kv, axis=0) / (tl.sum(phi_q * ks, axis=0) + eps)
    tl.store(y_ptr + head * d + cols, y.to(y_ptr.dtype.element_ty), mask=col_ok)


def step(phi_q: jnp.ndarray, phi_k: jnp.ndarray, v: jnp.ndarray, state: TaylorState,
         valid: jnp.ndarray, *, eps: float, num_warps: int = 4) -> tuple[jnp.ndarray, TaylorState]:
  """Same contract as `pallas_decode.step`."""
  if _IMPORT_ERROR is not None:
    raise RuntimeError(f"the jax-triton decode path is unavailable: {_IMPORT_ERROR}")
  b, h, e = phi_q.shape
  d = v.shape[-1]
  block_d = min(triton.next_power_of_2(d), 64)
  y, kv, ks = jax_triton.triton_call(
      valid.astype(jnp.int32), phi_q, phi_k, v, state.kv, state.k,
      kernel=_kernel,
      out_shape=[jax.ShapeDtypeStruct(v.shape, v.dtype),
                 jax.ShapeDtypeStruct(state.kv.shape, state.kv.dtype),
                 jax.ShapeDtypeStruct(state.k.shape, jnp.float32)],
      grid=(b, h, triton.cdiv(d, block_d)), num_warps=num_warps, num_stages=1,
      input_output_aliases={4: 1},
      e=e, block_e=triton.next_power_of_2(e), d=d, block_d=block_d, eps=eps)
  return y, TaylorState(kv, ks)
