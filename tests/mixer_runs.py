"""Running a mixer (or a model) through its decoding cache a few tokens at a time, for parity
tests."""

import jax
import jax.numpy as jnp
import numpy as np

from based_jax.cache import init_cache, init_layer_cache


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


def check_prefill_then_decode(config, model, params, tokens, lengths, full, pad=7):
  """Prefills each row's first lengths[b] tokens (right-padded with `pad` to lengths.max()) into
  a fresh cache, then decodes the rest one token a step, and checks both against the full
  forward's logits `full` [B, T, V] (causal: each row's prefix). Returns the prompts."""
  b, total = tokens.shape
  width = int(lengths.max())
  prompts = np.where(np.arange(width) < lengths[:, None], tokens[:, :width], pad)
  step = jax.jit(lambda p, t, c, n=None: model.apply(p, t, cache=c, lengths=n))
  prefill_logits, cache = step(params, jnp.asarray(prompts), init_cache(config, b, total),
                               jnp.asarray(lengths))
  decoded = []
  for s in range(total - width):
    logits, cache = step(params, jnp.asarray(tokens[np.arange(b), lengths + s][:, None]), cache)
    decoded.append(logits[:, 0])
  for i in range(b):
    assert rel(prefill_logits[i, :lengths[i]], full[i, :lengths[i]]) < 1e-5
    continuation = full[i, lengths[i]:lengths[i] + len(decoded)]
    assert rel(jnp.stack([d[i] for d in decoded]), continuation) < 1e-5
  return prompts
