"""The one entry point for causal Taylor linear attention, and the choice of implementation.

Layout [B, T, H, F] for q and k, [B, T, H, K] for v (letters of `based_jax/__init__.py`).
`causal_taylor_attention` takes one of two paths: a single-token call with a state is a
decode step (one step of the recurrence); any other call is a chunked (parallel) pass. Which
implementation runs the path is decided by `resolve`, a pure function of the requested
implementation and a few facts of the call (F, K, dtypes, state dtypes, decode step or not,
backend): the call itself dispatches on it, and benchmarks call it to record what ran.

Implementations (`impl`):
  "xla"               pure JAX, every backend, differentiable by autodiff: the quadratic form
                      up to QUADRATIC_MAX_T tokens, the chunked scan (`xla.py`) beyond, and
                      `reference.feature_step` for a decode step;
  "pallas"            the Pallas kernels (Triton lowering, GPU): `pallas_chunked.py`, with its
                      custom VJP, for chunked calls; `pallas_decode.py` for decode steps;
  "pallas_interpret"  the same kernels in the Pallas interpreter (any backend; for tests);
  "triton"            decode steps through the jax-triton kernel (`triton_decode.py`; needs
                      jax-triton and a GPU), chunked calls as "pallas";
  "mosaic"            chunked calls with the Mosaic GPU forward (`mosaic_chunked.py`: Hopper,
                      bf16 or float16 inputs) and the Pallas backward, decode steps as
                      "pallas";
  "mosaic_interpret"  the same in the Pallas GPU interpreter (any backend; for tests);
  "auto"              on a GPU "pallas" where the kernels take the inputs (`kernel_limits`),
                      except decode steps with K <= DECODE_XLA_MAX_VALUE_DIM, which take "xla",
                      and chunked calls of 16-bit inputs on a Hopper GPU, which take "mosaic"
                      (its forward was measured faster at every T and K benchmarked);
                      elsewhere "xla". A GPU call that falls back for the kernels' limits
                      warns once per reason.
An explicit kernel that cannot take the inputs, or needs a GPU it lacks, is a ValueError.
"""

import functools
import warnings
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.taylor_attention import (pallas_chunked, pallas_decode, reference,
                                             triton_decode, xla)
from pallas_kernels.taylor_attention.state import TaylorState
from pallas_kernels.taylor_attention.feature_map import feature_width, taylor_feature_map

IMPLEMENTATIONS = ("auto", "xla", "pallas", "pallas_interpret", "triton", "mosaic",
                   "mosaic_interpret")
KERNEL_FEATURE_DIMS = (16,)  # F the kernels are built for (tensor-core tiles, on-chip state)
KERNEL_MAX_VALUE_DIM = 128  # K, after padding to a power of two
KERNEL_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)  # of q, k and v (one of them)
KERNEL_STATE_DTYPES = ((jnp.float32, jnp.bfloat16), (jnp.float32,))  # of state.kv, state.k
MOSAIC_DTYPES = (jnp.bfloat16, jnp.float16)  # of q, k and v: the Mosaic forward's wgmma operands
# "xla" up to this T uses the quadratic form: no E-wide features or per-chunk states, so it
# trained 64-512 token sequences 1.3-14x faster than the chunked scan on a 2-core CPU, and was
# slower at 1024.
QUADRATIC_MAX_T = 512
# With the packed state, XLA's fused decode step was measured 8-23% faster than the Pallas
# kernel on an H100 at K = 64 (B = 256 and 1024, float32 and bfloat16 kv) and 15-23% slower at
# K = 112.
DECODE_XLA_MAX_VALUE_DIM = 64
_warned: set = set()


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
  if lengths is not None and (lengths.shape != (b,)
                              or not jnp.issubdtype(lengths.dtype, jnp.integer)):
    raise ValueError(f"lengths must be an integer array of shape ({b},), got "
                     f"{lengths.shape} {lengths.dtype}")
  if lengths is not None and not isinstance(lengths, jax.core.Tracer) and lengths.size:
    host = np.asarray(lengths)  # concrete: checked on the host, never staged into a trace
    lo, hi, t = int(host.min()), int(host.max()), q.shape[1]
    if lo < 0 or hi > t:
      raise ValueError(f"lengths must lie in [0, T={t}], got min {lo} max {hi}")


def kernel_limits(feature_dim: int, value_dim: int, dtypes: Sequence,
                  state_dtypes: Optional[Sequence] = None) -> Optional[str]:
  """Why the kernels cannot take a call with these facts (see `resolve`), or None if they can."""
  dtypes = [jnp.dtype(t) for t in dtypes]
  if feature_dim not in KERNEL_FEATURE_DIMS:
    return f"feature dim F={feature_dim} (kernels support F in {KERNEL_FEATURE_DIMS})"
  if value_dim > KERNEL_MAX_VALUE_DIM:
    return f"value head dim K={value_dim} (kernels support K <= {KERNEL_MAX_VALUE_DIM})"
  if len(set(dtypes)) != 1 or dtypes[0] not in KERNEL_DTYPES:
    return (f"dtypes q {dtypes[0]}, k {dtypes[1]}, v {dtypes[2]} (kernels need one dtype of "
            f"{[jnp.dtype(t).name for t in KERNEL_DTYPES]})")
  if state_dtypes is not None and not all(
      jnp.dtype(t) in allowed for t, allowed in zip(state_dtypes, KERNEL_STATE_DTYPES)):
    return (f"state dtypes {', '.join(jnp.dtype(t).name for t in state_dtypes)} (kernels take "
            "a float32 or bfloat16 kv and a float32 k)")
  return None


def resolve(impl: str, *, feature_dim: int, value_dim: int, dtypes: Sequence,
            state_dtypes: Optional[Sequence], decoding: bool, backend: str,
            hopper: bool = False) -> str:
  """The implementation a call with these facts runs; `causal_taylor_attention` dispatches
  on it. Pure but for the one-time warning of an "auto" fallback on a GPU.

  Args:
    impl: the requested implementation, one of IMPLEMENTATIONS.
    feature_dim: F of q and k.
    value_dim: K of v.
    dtypes: the dtypes of q, k and v.
    state_dtypes: the dtypes of state.kv and state.k; None for a call without a state.
    decoding: whether the call is a decode step (one token, with a state).
    backend: the platform the call runs on, as `jax.default_backend()` names it.
    hopper: whether that GPU is a Hopper (`on_hopper()`): "auto" takes the Mosaic forward
      there.

  Returns:
    "xla", "pallas", "pallas_interpret", "triton" (only for a decode step: chunked calls
    under "triton" run "pallas"), "mosaic" or "mosaic_interpret" (only for chunked calls:
    their decode steps run "pallas" or "pallas_interpret").

  Raises:
    ValueError: `impl` is unknown, a decode step has no state, or `impl` names a kernel that
      cannot take these inputs or needs a GPU `backend` is not.
  """
  if impl not in IMPLEMENTATIONS:
    raise ValueError(f"impl must be one of {IMPLEMENTATIONS}, got {impl!r}")
  if len(dtypes) != 3 or (state_dtypes is not None and len(state_dtypes) != 2):
    raise ValueError(f"dtypes must be those of (q, k, v) and state_dtypes those of "
                     f"(state.kv, state.k), got {dtypes} and {state_dtypes}")
  if decoding and state_dtypes is None:
    raise ValueError("a decode step needs a state: state_dtypes must not be None")
  if impl == "xla":
    return impl
  on_gpu = backend == "gpu"
  limit = kernel_limits(feature_dim, value_dim, dtypes, state_dtypes)
  if impl == "auto":
    if not on_gpu:
      return "xla"
    if limit is not None:
      if limit not in _warned:
        _warned.add(limit)
        warnings.warn(f"causal_taylor_attention: falling back to XLA for {limit}")
      return "xla"
    if decoding:
      return "xla" if value_dim <= DECODE_XLA_MAX_VALUE_DIM else "pallas"
    return "mosaic" if hopper and jnp.dtype(dtypes[0]) in MOSAIC_DTYPES else "pallas"
  if limit is not None:
    raise ValueError(f"impl={impl!r} cannot run {limit}; use impl='xla' or 'auto'")
  if impl in ("pallas", "triton", "mosaic") and not on_gpu:
    raise ValueError(f"impl={impl!r} needs a GPU (backend is {backend!r}); use "
                     f"'{impl.replace('triton', 'pallas')}_interpret' to run the kernels in the "
                     "interpreter, or 'xla'")
  if impl == "triton":
    if not triton_decode.available():
      raise ValueError("impl='triton' needs jax-triton with a CUDA jaxlib; use 'pallas'")
    return impl if decoding else "pallas"
  if impl.startswith("mosaic"):
    if decoding:
      return impl.replace("mosaic", "pallas")
    if jnp.dtype(dtypes[0]) not in MOSAIC_DTYPES:
      raise ValueError(f"impl={impl!r} takes bfloat16 or float16 q, k, v (its products are "
                       f"16-bit wgmma operands), got {jnp.dtype(dtypes[0]).name}; use 'pallas'")
  return impl


def _is_decode_step(q, state) -> bool:
  """A single-token call with a state: one step of the recurrence."""
  return q.shape[1] == 1 and state is not None


def _resolve(impl: str, q, k, v, state) -> str:
  """`resolve` for these arrays on the default backend."""
  return resolve(impl, feature_dim=q.shape[-1], value_dim=v.shape[-1],
                 dtypes=(q.dtype, k.dtype, v.dtype),
                 state_dtypes=None if state is None else (state.kv.dtype, state.k.dtype),
                 decoding=_is_decode_step(q, state), backend=jax.default_backend(),
                 hopper=on_hopper())


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


def _decode_step(impl, q, k, v, state, lengths, eps):
  """One step of the recurrence: q, k [B, 1, H, F], v [B, 1, H, K]."""
  phi_q, phi_k = taylor_feature_map(q[:, 0]), taylor_feature_map(k[:, 0])
  valid = jnp.ones((q.shape[0],), bool) if lengths is None else lengths > 0
  if impl == "xla":
    y, new = _reference_step(phi_q, phi_k, v[:, 0], state, valid, eps)
  else:
    step = (triton_decode.step if impl == "triton" else
            functools.partial(pallas_decode.step, interpret=impl == "pallas_interpret"))
    y, new = _kernel_step(step, phi_q, phi_k, v[:, 0], state, valid, eps)
  return y[:, None], new


def _chunked(impl, q, k, v, state, lengths, eps):
  """All T tokens at once: q, k [B, T, H, F], v [B, T, H, K]."""
  b, t = q.shape[:2]
  if impl == "xla":
    key_mask = None if lengths is None else jnp.arange(t)[None, :] < lengths[:, None]
    form = reference.quadratic if t <= QUADRATIC_MAX_T else xla.chunked
    return form(q, k, v, state=state, key_mask=key_mask, eps=eps)
  lengths = jnp.full((b,), t, jnp.int32) if lengths is None else jnp.clip(lengths, 0, t)
  if impl == "mosaic" and not on_hopper():
    raise ValueError(f"impl='mosaic' needs a Hopper GPU (compute capability 9.x), this one is "
                     f"{jax.devices()[0].device_kind}; use 'pallas'")
  return pallas_chunked.chunked(q, k, v, state, lengths, eps=eps,
                                interpret=impl.endswith("_interpret"),
                                forward_kernel="mosaic" if impl.startswith("mosaic") else "triton")


def on_hopper() -> bool:
  """Whether the default device is a Hopper GPU (compute capability 9.x), whose wgmma and TMA
  the Mosaic forward uses."""
  return str(getattr(jax.devices()[0], "compute_capability", "")).startswith("9")


def causal_taylor_attention(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, *,
                            state: Optional[TaylorState] = None,
                            lengths: Optional[jnp.ndarray] = None,
                            eps: float = 1e-6,
                            impl: str = "auto") -> tuple[jnp.ndarray, TaylorState]:
  """Causal Taylor linear attention with optional initial state, returning the final state.

  Args:
    q, k: [B, T, H, F] queries and keys (any float dtype; math is float32).
    v: [B, T, H, K] values.
    state: sums over earlier tokens (prefill continuation or decoding); zero if None.
    lengths: [B] int in [0, T], number of valid leading tokens per sequence; later
      (padding) tokens do not enter the state and their outputs are meaningless. All T if
      None. Outside [0, T] a ValueError when concrete; under `jax.jit` the values are
      clipped to [0, T] (the model above this API flags such rows with NaN logits).
    eps: added to the normaliser.
    impl: one of IMPLEMENTATIONS; what runs is `resolve`'s answer.

  Returns:
    y: [B, T, H, K] in v's dtype; the state after each sequence's last valid token.
  """
  _check_inputs(q, k, v, state, lengths)
  impl = _resolve(impl, q, k, v, state)
  if _is_decode_step(q, state):
    return _decode_step(impl, q, k, v, state, lengths, eps)
  return _chunked(impl, q, k, v, state, lengths, eps)
