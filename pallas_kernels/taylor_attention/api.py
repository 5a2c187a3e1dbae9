"""The one entry point for causal Taylor linear attention; picks the implementation.

Layout [batch, time, heads, dim]; see `reference.py` for the math and the dimension letters.
Implementations:
  "xla"   the chunked pure-JAX form (`xla.py`), runs everywhere, differentiable by autodiff;
  "auto"  the fastest implementation available for the backend and shapes.
A single-token call with a state (decoding) goes to the recurrent step.
"""

from typing import Optional

import jax.numpy as jnp

from pallas_kernels.taylor_attention import reference, xla
from pallas_kernels.taylor_attention.state import TaylorState
from pallas_kernels.taylor_attention.feature_map import feature_width

IMPLEMENTATIONS = ("auto", "xla")


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
  if lengths is not None and (lengths.shape != (b,) or not jnp.issubdtype(lengths.dtype, jnp.integer)):
    raise ValueError(f"lengths must be an integer array of shape ({b},), got "
                     f"{lengths.shape} {lengths.dtype}")


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
  b, t = q.shape[:2]
  key_mask = None if lengths is None else jnp.arange(t)[None, :] < lengths[:, None]
  if t == 1 and state is not None:
    y, new = reference.recurrent_step(q[:, 0], k[:, 0], v[:, 0], state, eps=eps)
    if key_mask is not None:
      new = reference.select_state(key_mask[:, 0], new, state)
    return y[:, None], new
  return xla.chunked(q, k, v, state=state, key_mask=key_mask, eps=eps)
