"""The entry point for one decoded query per row over a key / value cache, and the choice of
implementation.

`decode_attention(q, new_k, new_v [B, H, K'], k, v [B, H, S, K'], pos [B, S], q_pos [B],
slot [B])` is the decode step of `based_jax.mixers.attention` (sliding window: S = W + 1 slots
of a ring; full attention: S = max_len): it stores each row's new key and value in its slot of
the cache and attends over the updated cache. Implementations (`impl`, the model's
`attention_decode_impl` for these values):
  "xla"               `reference.py`: a scatter, two batched products and a masked softmax;
  "pallas"            the Pallas kernel of `pallas_triton.py` (Triton lowering, GPU): each
                      (row, head) stores its new key and value and reads the cache once,
                      online softmax;
  "pallas_interpret"  the same kernel in the Pallas interpreter (any backend; for tests).
("cudnn", the model's third decode implementation, lives with the mixer: it calls cuDNN.)
Decoding needs no gradient: the kernel has none.
"""

from typing import Optional

import jax
import jax.numpy as jnp

from pallas_kernels.cache_attention import pallas_triton, reference
from pallas_kernels.dispatch import require_gpu

IMPLEMENTATIONS = ("xla", "pallas", "pallas_interpret")


def resolve(impl: str, backend: str) -> str:
  """`impl` if it can run on `backend` (as `jax.default_backend()` names it).

  Raises:
    ValueError: `impl` is unknown, or is the kernel and `backend` is not a GPU.
  """
  if impl not in IMPLEMENTATIONS:
    raise ValueError(f"impl must be one of {IMPLEMENTATIONS}, got {impl!r}")
  require_gpu(impl, backend)
  return impl


def _check(q, new_k, new_v, k, v, pos, q_pos, slot, window, impl) -> None:
  resolve(impl, jax.default_backend())
  if k.ndim != 4 or v.shape != k.shape:
    raise ValueError(f"k and v must be [B, H, S, K'] of one shape, got {tuple(k.shape)} and "
                     f"{tuple(v.shape)}")
  b, h, s, width = k.shape
  for name, x in (("q", q), ("new_k", new_k), ("new_v", new_v)):
    if tuple(x.shape) != (b, h, width):
      raise ValueError(f"{name} must be [B, H, K'] = {(b, h, width)}, got {tuple(x.shape)}")
  if tuple(pos.shape) != (b, s) or tuple(q_pos.shape) != (b,) or tuple(slot.shape) != (b,):
    raise ValueError(f"pos must be [B, S] = {(b, s)} and q_pos, slot [B] = {(b,)}, got "
                     f"{tuple(pos.shape)}, {tuple(q_pos.shape)} and {tuple(slot.shape)}")
  if not all(jnp.issubdtype(x.dtype, jnp.integer) for x in (pos, q_pos, slot)):
    raise ValueError(f"pos, q_pos and slot must be integers, got {pos.dtype}, {q_pos.dtype} "
                     f"and {slot.dtype}")
  if window is not None and (isinstance(window, bool) or not isinstance(window, int)
                             or window < 0):
    raise ValueError(f"window must be None or an int >= 0, got {window!r}")


def decode_attention(q, new_k, new_v, k, v, pos, q_pos, slot, *, window: Optional[int],
                     scale: float, impl: str = "xla"):
  """Stores new_k, new_v [B, H, K'] at slot [B] of k, v [B, H, S, K'] (slot S or more: not
  stored, a padding row), then softmax(q k^T scale) v over the slots each row's query may see:
  a slot holds a key at or before q_pos, and no more than `window` positions before it when a
  window is given. pos [B, S] must already hold the new keys' positions. Each row that is not
  padding sees at least its own key.

  Returns:
    The float32 output [B, H, K'] and the updated k, v (in place when donated).

  Raises:
    ValueError naming the argument for bad shapes, dtypes, window or impl.
  """
  _check(q, new_k, new_v, k, v, pos, q_pos, slot, window, impl)
  if impl == "xla":
    return reference.decode_attention(q, new_k, new_v, k, v, pos, q_pos, slot, window=window,
                                      scale=scale)
  return pallas_triton.decode_attention(q, new_k, new_v, k, v, pos.astype(jnp.int32), q_pos,
                                        slot, window=window, scale=float(scale),
                                        interpret=impl == "pallas_interpret")
