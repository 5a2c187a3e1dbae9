"""Plain-JAX truth for causal Taylor linear attention: the quadratic and the recurrent forms.

Shapes use the dimension letters of `based_jax/__init__.py` (K is the value head dim, E the
Taylor feature width of `feature_map.py`).

    y_t = sum_{j<=t} phi(q_t).phi(k_j) v_j / (phi(q_t) . sum_{j<=t} phi(k_j) + eps)

Everything is computed in at least float32 (`compute_dtype`): the normaliser grows like O(T)
and a bf16 copy of it loses the answer. A state whose kv is stored in bf16 (`state.py`) is
read in float32 and its updated kv rounded once, on return. Float64 inputs (under jax x64) are
computed in float64, which is how the tests get their truth (float32 einsums on a GPU follow JAX's
default matmul precision, TF32, so a float32 run of this module there is not IEEE). Keys
whose `key_mask` is False contribute nothing, neither to outputs nor to the returned state
(that is how padding is kept out of the state).
"""

from typing import Optional

import jax
import jax.numpy as jnp

from pallas_kernels.taylor_attention.feature_map import (compute_dtype, taylor_feature_map,
                                                         taylor_kernel)
from pallas_kernels.taylor_attention.state import TaylorState, stored_like, zero_state


def initial_state(state: Optional[TaylorState], q: jnp.ndarray, v: jnp.ndarray) -> TaylorState:
  """`state`, or the zero state matching q [B, T, H, F] and v [B, T, H, K]."""
  if state is not None:
    return state
  b, _, h, f = q.shape
  return zero_state(b, h, f, v.shape[-1])


def quadratic(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, *,
              state: Optional[TaylorState] = None,
              key_mask: Optional[jnp.ndarray] = None,
              eps: float = 1e-6) -> tuple[jnp.ndarray, TaylorState]:
  """Masked quadratic form, O(T^2): phi(q) phi(k)^T evaluated as 1 + s + s^2/2.

  Args:
    q, k: [B, T, H, F].
    v: [B, T, H, K].
    state: running sums of earlier tokens (zero if None).
    key_mask: [B, T] bool, False for keys to ignore (padding); all True if None.
    eps: added to the normaliser.

  Returns:
    y: [B, T, H, K] in v's dtype, and the state after the last (unmasked) key.
  """
  b, t, _, f = q.shape
  if key_mask is None:
    key_mask = jnp.ones((b, t), bool)
  qf, kf, vf = (x.astype(compute_dtype(x.dtype)) for x in (q, k, v))
  s = jnp.einsum("bthf,bshf->bhts", qf, kf) / f**0.5
  causal = jnp.tril(jnp.ones((t, t), bool))
  weights = jnp.where(causal & key_mask[:, None, None, :], taylor_kernel(s), 0.0)
  num = jnp.einsum("bhts,bshd->bthd", weights, vf)
  den = jnp.einsum("bhts->bth", weights)
  if state is not None:  # no state: skip reading zeros through the E-wide features
    phi_q = taylor_feature_map(qf)
    num += jnp.einsum("bthe,bhed->bthd", phi_q, state.kv)
    den += jnp.einsum("bthe,bhe->bth", phi_q, state.k)
  y = num / (den[..., None] + eps)

  # Unused (training) -> removed under jit.
  state = initial_state(state, q, v)
  phi_k = taylor_feature_map(kf) * key_mask[:, :, None, None]
  new_state = TaylorState(
      kv=state.kv + jnp.einsum("bthe,bthd->bhed", phi_k, vf),
      k=state.k + jnp.einsum("bthe->bhe", phi_k),
  )
  return y.astype(v.dtype), stored_like(new_state, state)


def select_state(valid: jnp.ndarray, new: TaylorState, old: TaylorState) -> TaylorState:
  """Per sequence, `new` where valid [B] is True, else `old` (padding leaves the state alone)."""
  return jax.tree.map(
      lambda n, o: jnp.where(valid.reshape((-1,) + (1,) * (n.ndim - 1)), n, o), new, old)


def recurrent_step(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, state: TaylorState, *,
                   eps: float = 1e-6) -> tuple[jnp.ndarray, TaylorState]:
  """One decoding step: add phi(k_t) v_t^T to the state, then read out y_t.

  Args:
    q, k: [B, H, F] for the current token.
    v: [B, H, K].
    state: the sums over all earlier tokens.

  Returns:
    y: [B, H, K] in v's dtype, and the updated state.
  """
  return feature_step(taylor_feature_map(q), taylor_feature_map(k), v, state, eps=eps)


def feature_step(phi_q: jnp.ndarray, phi_k: jnp.ndarray, v: jnp.ndarray, state: TaylorState, *,
                 eps: float = 1e-6) -> tuple[jnp.ndarray, TaylorState]:
  """`recurrent_step` given the features phi_q, phi_k [B, H, E] (the decode kernels' contract)."""
  vf = v.astype(compute_dtype(v.dtype))
  kv = state.kv + phi_k[..., :, None] * vf[..., None, :]  # float32 even for a bf16 state.kv
  ks = state.k + phi_k
  num = jnp.einsum("bhe,bhed->bhd", phi_q, kv)
  den = jnp.einsum("bhe,bhe->bh", phi_q, ks)
  y = (num / (den[..., None] + eps)).astype(v.dtype)
  return y, stored_like(TaylorState(kv, ks), state)


def recurrent(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, *,
              state: Optional[TaylorState] = None,
              key_mask: Optional[jnp.ndarray] = None,
              eps: float = 1e-6) -> tuple[jnp.ndarray, TaylorState]:
  """`recurrent_step` scanned over time: same contract as `quadratic`, O(T) memory-light."""
  b, t = q.shape[:2]
  state = initial_state(state, q, v)
  if key_mask is None:
    key_mask = jnp.ones((b, t), bool)

  def step(carry, xs):
    qt, kt, vt, valid = xs
    y, new = recurrent_step(qt, kt, vt, carry, eps=eps)
    return select_state(valid, new, carry), y

  xs = (jnp.moveaxis(q, 1, 0), jnp.moveaxis(k, 1, 0), jnp.moveaxis(v, 1, 0), key_mask.T)
  final, ys = jax.lax.scan(step, state, xs)
  return jnp.moveaxis(ys, 0, 1), final
