"""Running a mixer through its decoding cache a few tokens at a time, for parity tests."""

import jax.numpy as jnp

from based_jax.cache import init_layer_cache


def run_in_pieces(config, kind, apply, params, x, piece):
  """Feeds x [B, T, D] through a fresh cache of `kind` `piece` tokens at a time with
  `apply(params, x, positions, lengths, cache)`; returns the outputs [B, T, D] and the cache."""
  b, t, _ = x.shape
  cache = init_layer_cache(config, kind, b, max_len=t)
  outs = []
  for start in range(0, t, piece):
    chunk = x[:, start:start + piece]
    positions = start + jnp.broadcast_to(jnp.arange(chunk.shape[1]), chunk.shape[:2])
    y, cache = apply(params, chunk, positions, None, cache)
    outs.append(y)
  return jnp.concatenate(outs, axis=1), cache


def rel(a, b) -> float:
  """Relative error of a against b (Frobenius norms)."""
  return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))
