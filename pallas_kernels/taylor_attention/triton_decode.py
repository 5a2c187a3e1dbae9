"""The decoding step as a plain Triton kernel called through jax-triton (GPU only, optional).

Same contract and same one-pass design as `pallas_decode.py` (read the state once, add
phi(k_t) v_t^T, read out y_t, write the state in place); here the pointer arithmetic is
explicit, which lets the state rows of one (batch, head) be streamed as three tiles.
`available()` says whether jax-triton imports (it needs a CUDA jaxlib); `api.py` only offers
this path when it does. The benchmark `experiments/bench_decode_step.py` compares it with
the Pallas kernel and XLA.
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
  def _section(kv_ptr, ks_ptr, kv_out, ks_out, rows, cols, d: tl.constexpr, phi_q, phi_k, v,
               write_ks):
    offs = rows[:, None] * d + cols[None, :]
    mask = (cols < d)[None, :]
    kv = tl.load(kv_ptr + offs, mask=mask, other=0.0) + phi_k[:, None] * v[None, :]
    ks = tl.load(ks_ptr + rows) + phi_k
    tl.store(kv_out + offs, kv, mask=mask)
    if write_ks:
      tl.store(ks_out + rows, ks)
    return tl.sum(phi_q[:, None] * kv, axis=0), tl.sum(phi_q * ks, axis=0)

  @triton.jit
  def _kernel(valid_ptr, q_ptr, k_ptr, v_ptr, kv_ptr, ks_ptr, y_ptr, kv_out, ks_out,
              h: tl.constexpr, f: tl.constexpr, d: tl.constexpr, block_d: tl.constexpr,
              eps: tl.constexpr, lin: tl.constexpr, quad: tl.constexpr):
    b, i, c = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    e: tl.constexpr = 1 + f + f * f
    head = b * h + i
    valid = tl.load(valid_ptr + b).to(tl.float32)
    fs = tl.arange(0, f)
    cols = c * block_d + tl.arange(0, block_d)
    q = tl.load(q_ptr + head * f + fs).to(tl.float32)
    k = tl.load(k_ptr + head * f + fs).to(tl.float32)
    v = tl.load(v_ptr + head * d + cols, mask=cols < d, other=0.0).to(tl.float32) * valid
    qp = tl.reshape(q[:, None] * q[None, :], (f * f,)) * quad
    kp = tl.reshape(k[:, None] * k[None, :], (f * f,)) * (quad * valid)
    base_kv, base_ks = head * e * d, head * e
    write_ks = c == 0
    one = tl.full((1,), 1.0, tl.float32)
    n0, d0 = _section(kv_ptr + base_kv, ks_ptr + base_ks, kv_out + base_kv, ks_out + base_ks,
                      tl.arange(0, 1), cols, d, one, one * valid, v, write_ks)
    n1, d1 = _section(kv_ptr + base_kv, ks_ptr + base_ks, kv_out + base_kv, ks_out + base_ks,
                      1 + fs, cols, d, q * lin, k * (lin * valid), v, write_ks)
    n2, d2 = _section(kv_ptr + base_kv, ks_ptr + base_ks, kv_out + base_kv, ks_out + base_ks,
                      1 + f + tl.arange(0, f * f), cols, d, qp, kp, v, write_ks)
    y = (n0 + n1 + n2) / (d0 + d1 + d2 + eps)
    tl.store(y_ptr + head * d + cols, y.to(y_ptr.dtype.element_ty), mask=cols < d)


def step(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, state: TaylorState,
         valid: jnp.ndarray, *, eps: float, num_warps: int = 4) -> tuple[jnp.ndarray, TaylorState]:
  """Same contract as `pallas_decode.step`."""
  if _IMPORT_ERROR is not None:
    raise RuntimeError(f"the jax-triton decode path is unavailable: {_IMPORT_ERROR}")
  b, h, f = q.shape
  d = v.shape[-1]
  block_d = min(triton.next_power_of_2(d), 64)
  y, kv, ks = jax_triton.triton_call(
      valid.astype(jnp.int32), q, k, v, state.kv, state.k,
      kernel=_kernel,
      out_shape=[jax.ShapeDtypeStruct(v.shape, v.dtype),
                 jax.ShapeDtypeStruct(state.kv.shape, jnp.float32),
                 jax.ShapeDtypeStruct(state.k.shape, jnp.float32)],
      grid=(b, h, triton.cdiv(d, block_d)), num_warps=num_warps, num_stages=1,
      input_output_aliases={4: 1},
      h=h, f=f, d=d, block_d=block_d, eps=eps, lin=f ** -0.25, quad=1.0 / (2.0 * f) ** 0.5)
  return y, TaylorState(kv, ks)
