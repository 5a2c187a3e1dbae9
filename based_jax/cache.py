"""Decoding caches: one small typed tuple per layer plus the tokens consumed per sequence."""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from based_jax import config as config_lib
from based_jax.config import ModelConfig
from based_jax.mixers.attention import init_attention_cache
from based_jax.mixers.base_conv import init_conv_cache
from based_jax.mixers.linear_attention import init_linear_attention_cache


class ModelCache(NamedTuple):
  layers: tuple[Any, ...]  # per layer: TaylorState, AttentionCache or ConvCache.
  length: jnp.ndarray  # [B] int32 tokens consumed so far (the next token's position).


def init_cache(config: ModelConfig, batch: int, max_len: int, dtype: Any = None) -> ModelCache:
  """An empty cache for `batch` sequences of up to `max_len` tokens.

  Only full-attention layers grow with `max_len`; sliding windows keep window + 1 slots,
  linear attention a fixed float32 state and BaseConv its last taps - 1 inputs.
  `dtype` overrides the config's compute dtype for attention and conv caches.
  """
  if batch < 1 or max_len < 1:
    raise ValueError(f"batch and max_len must be >= 1, got {batch}, {max_len}")
  if dtype is not None:
    config = config.replace(dtype=jnp.dtype(dtype).name)
  layers = []
  for kind in config.layer_kinds:
    if kind == config_lib.LINEAR_ATTENTION:
      layers.append(init_linear_attention_cache(config, batch))
    elif kind == config_lib.SLIDING_WINDOW:
      layers.append(init_attention_cache(config, batch, config.window + 1))
    elif kind == config_lib.ATTENTION:
      layers.append(init_attention_cache(config, batch, max_len))
    else:
      layers.append(init_conv_cache(config, batch))
  return ModelCache(tuple(layers), jnp.zeros((batch,), jnp.int32))


def cache_bytes(config: ModelConfig, batch: int, max_len: int) -> int:
  """Bytes the decoding cache actually occupies (computed from shapes, nothing allocated)."""
  shapes = jax.eval_shape(lambda: init_cache(config, batch, max_len))
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(shapes))
