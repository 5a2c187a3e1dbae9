"""The plain-JAX product the kernels compute: x [M, K] @ W [K, N], float32 accumulation."""

import jax
import jax.numpy as jnp


def matmul(x: jnp.ndarray, w: jnp.ndarray, out_dtype) -> jnp.ndarray:
  """x [M, K] @ w [K, N] accumulated in float32, returned in `out_dtype`."""
  y = jax.lax.dot_general(x, w, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)
  return y.astype(out_dtype)
