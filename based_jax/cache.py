"""Decoding caches: one small typed tuple per layer plus the tokens consumed per sequence."""

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp

from based_jax.checks import check_positive_int
from based_jax.config import ModelConfig
from based_jax.mixers import registry
from based_jax.mixers.attention import EmptyAttentionCache, plain_cache
from based_jax.mixers.linear_attention import EmptyTaylorState, plain_state


class ModelCache(NamedTuple):
  layers: tuple[Any, ...]  # per layer: its kind's cache (TaylorState, AttentionCache, ...).
  length: jnp.ndarray  # [B] int32 tokens consumed so far (the next token's position).


def init_cache(config: ModelConfig, batch: int, max_len: int, dtype: Any = None) -> ModelCache:
  """An empty cache for `batch` sequences of up to `max_len` tokens.

  Only full-attention layers grow with `max_len`; sliding windows keep window + 1 slots,
  linear attention a fixed float32 state, BaseConv its last taps - 1 inputs, and the other
  kinds what `based_jax.mixers.registry` says (docs/mixers.md).
  `dtype` overrides the config's compute dtype for attention and conv caches.
  Attention layers start as `EmptyAttentionCache` (the first call attends within itself, with
  flash attention where available) and linear attention as `EmptyTaylorState` (the first call
  starts from no state); loop carries need `as_carry(cache)`.
  """
  check_positive_int("batch", batch)
  check_positive_int("max_len", max_len)
  if dtype is not None:
    config = config.replace(dtype=jnp.dtype(dtype).name)
  layers = tuple(init_layer_cache(config, kind, batch, max_len) for kind in config.layer_kinds)
  return ModelCache(layers, jnp.zeros((batch,), jnp.int32))


def init_layer_cache(config: ModelConfig, kind: str, batch: int, max_len: int) -> Any:
  """The empty cache of one layer of `kind`."""
  return registry.spec(kind).init_cache(config, batch, max_len)


def _nbytes(tree) -> int:
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def cache_bytes_by_kind(config: ModelConfig, batch: int, max_len: int) -> dict[str, int]:
  """Bytes the decoding cache occupies per layer kind, summed over that kind's layers, and
  "length" for the [B] token counter (computed from shapes, nothing allocated)."""
  shapes = jax.eval_shape(lambda: init_cache(config, batch, max_len))
  out = {}
  for kind, layer in zip(config.layer_kinds, shapes.layers):
    out[str(kind)] = out.get(str(kind), 0) + _nbytes(layer)
  return {**out, "length": _nbytes(shapes.length)}


def cache_bytes(config: ModelConfig, batch: int, max_len: int) -> int:
  """Bytes the decoding cache actually occupies (computed from shapes, nothing allocated)."""
  return sum(cache_bytes_by_kind(config, batch, max_len).values())


def as_carry(cache: ModelCache) -> ModelCache:
  """The same cache with the same pytree type a model call returns (no 'empty' markers), so it
  can be a `lax.scan` / `lax.while_loop` carry. Nothing is copied."""
  layers = tuple(plain_cache(c) if isinstance(c, EmptyAttentionCache) else
                 plain_state(c) if isinstance(c, EmptyTaylorState) else c
                 for c in cache.layers)
  return ModelCache(layers, cache.length)


def attention_capacity(config: ModelConfig, cache: ModelCache) -> Optional[int]:
  """Tokens per row the model's caches can hold: the least `capacity` of its layers' kinds
  (full attention: its max_len), or None if no cache fills up."""
  slots = [registry.spec(kind).capacity(layer)
           for kind, layer in zip(config.layer_kinds, cache.layers)
           if registry.spec(kind).capacity is not None]
  return min(slots) if slots else None


def check_cache(config: ModelConfig, cache, batch: int) -> None:
  """`cache` is a ModelCache of `config` for `batch` rows."""
  if not isinstance(cache, ModelCache) or len(cache.layers) != config.n_layers:
    raise ValueError(f"cache must be the ModelCache of init_cache(config, ...) with "
                     f"{config.n_layers} layers, got {type(cache).__name__}")
  if cache.length.shape != (batch,):
    raise ValueError(f"cache is for batch {cache.length.shape[0]}, the tokens have batch {batch}")

