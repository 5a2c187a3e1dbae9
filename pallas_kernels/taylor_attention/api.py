"""The one entry point for causal Taylor linear attention; picks the implementation.

Layout [batch, time, heads, dim]; see `reference.py` for the math and the dimension letters.
Implementations:
  "xla"               pure JAX, runs on every backend, differentiable by autodiff: the
                      quadratic form up to QUADRATIC_MAX_T tokens, the chunked form (`xla.py`)
                      beyond, `reference.feature_step` for decoding;
  "pallas"            the Pallas kernels (Triton lowering, GPU): `pallas_chunked.py` with its
                      custom VJP for training and prefill, `pallas_decode.py` for decoding;
  "pallas_interpret"  the same kernels in the Pallas interpreter (any backend; for tests);
  "triton"            as "pallas", but decoding through the jax-triton kernel
                      (`triton_decode.py`; needs jax-triton and a GPU);
  "auto"              "pallas" on GPU for the shapes the kernels support, else "xla"
                      (with a one-time warning when a GPU run falls back); decode steps
                      with D <= DECODE_XLA_MAX_VALUE_DIM take "xla", measured faster there.
A single-token call with a state (decoding) takes the decode step.
"""

import functools
import warnings
from typing import Optional

import jax
import jax.numpy as jnp

from pallas_kernels.taylor_attention import (pallas_chunked, pallas_decode, reference,
                                             triton_decode, xla)
from pallas_kernels.taylor_attention.state import TaylorState
from pallas_kernels.taylor_attention.feature_map import feature_width, taylor_feature_map

IMPLEMENTATIONS = ("auto", "xla", "pallas", "pallas_interpret", "triton")
KERNEL_FEATURE_DIMS = (16,)  # F the kernels are built for (tensor-core tiles, on-chip state)
KERNEL_MAX_VALUE_DIM = 128  # D, after padding to a power of two
KERNEL_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
# "xla" up to this T uses the quadratic form: no E-wide features or per-chunk states, so it
# trains 64-512 token sequences 1.3-14x faster than the chunked scan on a 2-core CPU, and is
# slower at 1024 (experiments/results/cpu_training.json).
QUADRATIC_MAX_T = 512
# On the H100 with the packed state, XLA's fused decode step beat the Pallas kernel by 8-23% at
# D = 64 (B = 256, 1024; float32 and bf16 kv) and lost by 15-23% at D = 112
# (experiments/results/decode_step_packed_h100.json, decode_step_packed_bf16_h100.json).
DECODE_XLA_MAX_VALUE_DIM = 64
_warned = set()
_USED: set = set()


def _check_inputs(q, k, v, state, lengths):
  for name, x in (("q", q), ("k", k), ("v", v)):
    if x.ndim != 4:
      raise ValueError(f"{name} must have rank 4 [batch, time, heads, dim], got shape {x.shape}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise ValueError(f"{name} must be floating point, got {x.dtype}")
  if q.shape != k.shape:
    raise ValueError(f"q and k must have the same shape, got {q.shape} and {k.shape}")
  if v.shape[:3] != q.shape[:3]:
    raise ValueError(f"v must match q in [batch, time, heads], got {v.shape} vs {q.shape}")
  b, _, h, f = q.shape
  if state is not None:
    want_kv = (b, h, feature_width(f), v.shape[-1])
    if state.kv.shape != want_kv or state.k.shape != want_kv[:3]:
      raise ValueError(f"state shapes {state.kv.shape}, {state.k.shape} do not match "
                       f"expected {want_kv}, {want_kv[:3]}")
    if state.kv.dtype not in (jnp.float32, jnp.bfloat16, jnp.float64):
      raise ValueError(f"state.kv must be float32 or bfloat16, got {state.kv.dtype}")
    if state.k.dtype not in (jnp.float32, jnp.float64):
      raise ValueError(f"state.k (the normaliser) must be float32, got {state.k.dtype}")
  if lengths is not None and (lengths.shape != (b,) or not jnp.issubdtype(lengths.dtype, jnp.integer)):
    raise ValueError(f"lengths must be an integer array of shape ({b},), got "
                     f"{lengths.shape} {lengths.dtype}")


def kernel_limits(q, k, v, state) -> Optional[str]:
  """Why the kernels cannot take these inputs, or None if they can."""
  f, d = q.shape[-1], v.shape[-1]
  if f not in KERNEL_FEATURE_DIMS:
    return f"feature dim F={f} (kernels support F in {KERNEL_FEATURE_DIMS})"
  if d > KERNEL_MAX_VALUE_DIM:
    return f"value head dim D={d} (kernels support D <= {KERNEL_MAX_VALUE_DIM})"
  if len({q.dtype, k.dtype, v.dtype}) != 1 or q.dtype not in KERNEL_DTYPES:
    return (f"dtypes q {q.dtype}, k {k.dtype}, v {v.dtype} (kernels need one dtype of "
            f"{[jnp.dtype(t).name for t in KERNEL_DTYPES]})")
  if state is not None and (state.kv.dtype not in (jnp.float32, jnp.bfloat16)
                            or state.k.dtype != jnp.float32):
    return (f"state dtypes {state.kv.dtype}, {state.k.dtype} (kernels take a float32 or "
            "bfloat16 kv and a float32 k)")
  return None


def _is_decode_step(q, state) -> bool:
  """A single-token call with a state: one step of the recurrence."""
  return q.shape[1] == 1 and state is not None


def _resolve(impl, q, k, v, state) -> str:
  """The implementation to run: a kernel name or "xla"."""
  if impl == "xla":
    return impl
  on_gpu = jax.default_backend() == "gpu"
  limit = kernel_limits(q, k, v, state)
  if impl == "auto":
    if not on_gpu:
      return "xla"
    if limit is not None:
      if limit not in _warned:
        _warned.add(limit)
        warnings.warn(f"causal_taylor_attention: falling back to XLA for {limit}")
      return "xla"
    small_d = v.shape[-1] <= DECODE_XLA_MAX_VALUE_DIM
    return "xla" if _is_decode_step(q, state) and small_d else "pallas"
  if limit is not None:
    raise ValueError(f"impl={impl!r} cannot run {limit}; use impl='xla' or 'auto'")
  if impl in ("pallas", "triton") and not on_gpu:
    raise ValueError(f"impl={impl!r} needs a GPU (backend is {jax.default_backend()!r}); "
                     "use 'pallas_interpret' to run the kernels in the interpreter, or 'xla'")
  if impl == "triton" and not triton_decode.available():
    raise ValueError("impl='triton' needs jax-triton with a CUDA jaxlib; use 'pallas'")
  return impl


def implementations_used() -> list[str]:
  """'<path>:<implementation>' for every call traced since the last reset, e.g. 'chunked:pallas',
  'decode:xla' (what "auto" resolved to; benchmarks record this)."""
  return sorted(_USED)


def reset_implementations_used() -> None:
  _USED.clear()


def _reference_step(phi_q, phi_k, v, state, valid, eps):
  y, new = reference.feature_step(phi_q, phi_k, v, state, eps=eps)
  return y, reference.select_state(valid, new, state)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 6))
def _kernel_step(step, phi_q, phi_k, v, state, valid, eps):
  """A decode-step kernel, differentiable through the reference step (decoding rarely is)."""
  return step(phi_q, phi_k, v, state, valid, eps=eps)


def _kernel_step_fwd(step, phi_q, phi_k, v, state, valid, eps):
  return step(phi_q, phi_k, v, state, valid, eps=eps), (phi_q, phi_k, v, state, valid)


def _kernel_step_bwd(step, eps, res, cot):
  phi_q, phi_k, v, state, valid = res
  _, vjp = jax.vjp(lambda *a: _reference_step(*a, valid, eps), phi_q, phi_k, v, state)
  return (*vjp(cot), None)


_kernel_step.defvjp(_kernel_step_fwd, _kernel_step_bwd)


def causal_taylor_attention(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, *,
                            state: Optional[TaylorState] = None,
                            lengths: Optional[jnp.ndarray] = None,
                            eps: float = 1e-6,
                            impl: str = "auto") -> tuple[jnp.ndarray, TaylorState]:
  """Causal Taylor linear attention with optional initial state, returning the final state.

  Args:
    q, k: [B, T, H, F] queries and keys (any float dtype; math is float32).
    v: [B, T, H, D] values.
    state: sums over earlier tokens (prefill continuation or decoding); zero if None.
    lengths: [B] int, number of valid leading tokens per sequence; later (padding) tokens
      do not enter the state and their outputs are meaningless. All T if None.
    eps: added to the normaliser.
    impl: one of IMPLEMENTATIONS.

  Returns:
    y: [B, T, H, D] in v's dtype; the state after each sequence's last valid token.
  """
  if impl not in IMPLEMENTATIONS:
    raise ValueError(f"impl must be one of {IMPLEMENTATIONS}, got {impl!r}")
  _check_inputs(q, k, v, state, lengths)
  impl = _resolve(impl, q, k, v, state)
  b, t = q.shape[:2]
  decoding = _is_decode_step(q, state)
  _USED.add(f"{'decode' if decoding else 'chunked'}:{impl}")
  if decoding:  # one step of the recurrence
    phi_q, phi_k = taylor_feature_map(q[:, 0]), taylor_feature_map(k[:, 0])
    valid = jnp.ones((b,), bool) if lengths is None else lengths > 0
    if impl == "xla":
      y, new = _reference_step(phi_q, phi_k, v[:, 0], state, valid, eps)
    else:
      step = (triton_decode.step if impl == "triton" else
              functools.partial(pallas_decode.step, interpret=impl == "pallas_interpret"))
      y, new = _kernel_step(step, phi_q, phi_k, v[:, 0], state, valid, eps)
    return y[:, None], new
  if impl == "xla":
    key_mask = None if lengths is None else jnp.arange(t)[None, :] < lengths[:, None]
    if t <= QUADRATIC_MAX_T:
      return reference.quadratic(q, k, v, state=state, key_mask=key_mask, eps=eps)
    return xla.chunked(q, k, v, state=state, key_mask=key_mask, eps=eps)
  lengths = jnp.full((b,), t, jnp.int32) if lengths is None else jnp.minimum(lengths, t)
  return pallas_chunked.chunked(q, k, v, state, lengths, eps=eps,
                                interpret=impl == "pallas_interpret")
