"""The entry point for one decoded query per row over a key / value cache, and the choice of
implementation.

`decode_attention(q [B, H, K'], k, v [B, H, S, K'], pos [B, S], q_pos [B])` is the decode step
of `based_jax.mixers.attention` (sliding window: S = W + 1 slots of a ring; full attention:
S = max_len). Implementations (`impl`, the model's `attention_decode_impl` for these values):
  "xla"               `reference.py`: two batched products and a masked softmax;
  "pallas"            the Pallas kernel of `pallas_triton.py` (Triton lowering, GPU): each
                      (row, head) reads its keys and values once, online softmax;
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


def _check(q, k, v, pos, q_pos, window, impl) -> None:
  resolve(impl, jax.default_backend())
  if k.ndim != 4 or v.shape != k.shape:
    raise ValueError(f"k and v must be [B, H, S, K'] of one shape, got {tuple(k.shape)} and "
                     f"{tuple(v.shape)}")
  b, h, s, width = k.shape
  if tuple(q.shape) != (b, h, width):
    raise ValueError(f"q must be [B, H, K'] = {(b, h, width)}, got {tuple(q.shape)}")
  if tuple(pos.shape) != (b, s) or tuple(q_pos.shape) != (b,):
    raise ValueError(f"pos must be [B, S] = {(b, s)} and q_pos [B] = {(b,)}, got "
                     f"{tuple(pos.shape)} and {tuple(q_pos.shape)}")
  if not (jnp.issubdtype(pos.dtype, jnp.integer) and jnp.issubdtype(q_pos.dtype, jnp.integer)):
    raise ValueError(f"pos and q_pos must be integer positions, got {pos.dtype} and "
                     f"{q_pos.dtype}")
  if window is not None and (isinstance(window, bool) or not isinstance(window, int)
                             or window < 0):
    raise ValueError(f"window must be None or an int >= 0, got {window!r}")


def decode_attention(q, k, v, pos, q_pos, *, window: Optional[int], scale: float,
                     impl: str = "xla") -> jnp.ndarray:
  """softmax(q k^T scale) v over the slots each row's query may see (a slot holds a key at or
  before q_pos, and no more than `window` positions before it when a window is given), float32
  [B, H, K']. Each row must see at least one slot (its own key). Raises ValueError naming the
  argument for bad shapes, dtypes, window or impl."""
  _check(q, k, v, pos, q_pos, window, impl)
  if impl == "xla":
    return reference.decode_attention(q, k, v, pos, q_pos, window=window, scale=scale)
  return pallas_triton.decode_attention(q, k, v, pos.astype(jnp.int32), q_pos, window=window,
                                        scale=float(scale), interpret=impl == "pallas_interpret")
