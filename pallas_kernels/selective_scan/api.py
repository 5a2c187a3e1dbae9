"""The one entry point for Mamba's selective scan, and the choice of implementation.

Letters: those of `based_jax/__init__.py`, with I the channels (Mamba's inner width) and N the
state per channel (`ssm_state`; not the legend's generated tokens).

    h_t = exp(dt_t a) * h_{t-1} + (dt_t x_t)[:, None] * b_t[None, :]    per row, h [I, N]
    y_t = h_t . c_t                                                       [I]

Implementations (`impl`), chosen by `resolve`, a pure function of the request and the backend
that `selective_scan` dispatches on and the benchmarks record:
  "xla"               pure JAX on every backend, differentiable by autodiff: the associative
                      scan in chunks of `reference.CHUNK` tokens (`reference.py`);
  "pallas"            the Pallas kernels (Triton lowering, GPU) that walk the tokens with the
                      state on chip, with their custom VJP (`pallas_triton.py`);
  "pallas_interpret"  the same kernels in the Pallas interpreter (any backend; for tests);
  "auto"              "pallas" on a GPU (its train step measured faster than XLA's scan,
                      docs/kernels.md), "xla" elsewhere.
An explicit "pallas" without a GPU is a ValueError.
"""

import jax
import jax.numpy as jnp

from pallas_kernels.dispatch import require_gpu
from pallas_kernels.selective_scan import pallas_triton, reference

IMPLEMENTATIONS = ("auto", "xla", "pallas", "pallas_interpret")


def resolve(impl: str, *, backend: str) -> str:
  """The implementation a call runs on `backend` (as `jax.default_backend()` names it):
  "xla", "pallas" or "pallas_interpret". ValueError for an unknown `impl` or "pallas" off a
  GPU."""
  if impl not in IMPLEMENTATIONS:
    raise ValueError(f"impl must be one of {IMPLEMENTATIONS}, got {impl!r}")
  if impl == "auto":
    return "pallas" if backend == "gpu" else "xla"
  require_gpu(impl, backend)
  return impl


def _check_inputs(dt, x, b_in, c_out, a, h0):
  named = (("dt", dt), ("x", x), ("b_in", b_in), ("c_out", c_out), ("a", a), ("h0", h0))
  for name, v in named:
    if not jnp.issubdtype(v.dtype, jnp.floating):
      raise ValueError(f"{name} must be floating point, got {v.dtype}")
  if dt.ndim != 3:
    raise ValueError(f"dt must have rank 3 [batch, time, channels], got shape {dt.shape}")
  bsz, t, inner = dt.shape
  if b_in.ndim != 3 or b_in.shape[:2] != (bsz, t):
    raise ValueError(f"b_in must be [batch, time, state] = [{bsz}, {t}, N], got shape "
                     f"{b_in.shape}")
  n = b_in.shape[2]
  want = {"x": (bsz, t, inner), "c_out": (bsz, t, n), "a": (inner, n), "h0": (bsz, inner, n)}
  for name, v in named:
    if name in want and v.shape != want[name]:
      raise ValueError(f"{name} must have shape {want[name]} (from dt {dt.shape} and b_in "
                       f"{b_in.shape}), got {v.shape}")


def selective_scan(dt: jnp.ndarray, x: jnp.ndarray, b_in: jnp.ndarray, c_out: jnp.ndarray,
                   a: jnp.ndarray, h0: jnp.ndarray, *,
                   impl: str = "auto") -> tuple[jnp.ndarray, jnp.ndarray]:
  """The selective SSM over T tokens from the state h0.

  Args:
    dt, x: [B, T, I] step sizes (>= 0; dt = 0 is the identity step, which padding uses) and
      inputs; b_in, c_out: [B, T, N]; a: [I, N] (negative); h0: [B, I, N]. Any float dtypes;
      the arithmetic is float32.
    impl: one of IMPLEMENTATIONS; what runs is `resolve`'s answer.

  Returns:
    y [B, T, I] and the final state [B, I, N], float32; differentiable in every input.
  """
  _check_inputs(dt, x, b_in, c_out, a, h0)
  impl = resolve(impl, backend=jax.default_backend())
  args = tuple(v.astype(jnp.float32) for v in (dt, x, b_in, c_out, a, h0))
  if dt.shape[1] == 0:
    return jnp.zeros(dt.shape, jnp.float32), args[-1]
  if impl == "xla":
    return reference.associative_scan(*args)
  return pallas_triton.scan(*args, interpret=impl == "pallas_interpret")
