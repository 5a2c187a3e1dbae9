"""One table of mixers: every kind has an entry, and the model, the caches and the state count
know a kind only through it; `layer_mixers` and the index fields build the same models."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from based_jax import cache_bytes, get_config, init_cache, init_params, state_size_bytes
from based_jax.cache import attention_capacity
from based_jax.config import FEATURE_MAPS, MixerKind, ModelConfig
from based_jax.mixers import feature_maps, registry
from based_jax.model import LanguageModel, make_mixer
from experiments.bench_decode import DEFAULT_PREFILL_CHUNK, auto_prefill_chunk

BASE = dict(vocab_size=64, d_model=16, n_layers=2, mlp_inner=0, la_heads=2, attn_heads=2,
            la_feature_dim=4, ssm_state=4, horizon=8, window=4)


def test_every_kind_has_an_entry():
  assert set(registry.MIXERS) == set(MixerKind)
  with pytest.raises(ValueError, match="unknown mixer kind 'lstm'"):
    registry.spec("lstm")
  for name in FEATURE_MAPS:  # every configurable map has a width
    assert feature_maps.feature_width(name, 4) >= 4


@pytest.mark.parametrize("kind", list(MixerKind))
def test_each_kind_builds_caches_and_counts_through_its_entry(kind):
  config = ModelConfig(layer_mixers=f"base_conv,{kind}", **BASE)
  entry = registry.spec(kind)
  params = jax.eval_shape(lambda: init_params(config))
  mixer = make_mixer(config, kind, "mixer")
  assert jax.tree.structure(params["params"]["layers_1"]["mixer"]) == jax.tree.structure(
      jax.eval_shape(lambda: mixer.init(jax.random.key(0), jnp.zeros((1, 1, 16)),
                                        jnp.zeros((1, 1), jnp.int32), None, None)["params"]))
  cache = init_cache(config, 2, max_len=12)
  assert jax.tree.structure(cache.layers[1]) == jax.tree.structure(entry.init_cache(config, 2, 12))
  assert state_size_bytes(config, 12).per_layer[1] == (kind, 4 * entry.state_values(config, 12,
                                                                                     True))
  assert entry.mixing_flops(config, 12) > 0
  capacity = attention_capacity(config, cache)
  assert capacity == (12 if kind == MixerKind.ATTENTION else None)
  assert auto_prefill_chunk(config, 100) == (100 if capacity else DEFAULT_PREFILL_CHUNK)


def test_the_model_reads_a_kind_only_from_the_table(monkeypatch):
  # Swap Mamba's entry for a stand-in: the model, cache and count follow the table.
  class Doubling(nn.Module):
    def __call__(self, x, positions, lengths, cache):
      return 2 * x, cache
  stand_in = registry.MixerSpec(
      module=lambda config, name: Doubling(name=name),
      init_cache=lambda config, batch, max_len: (jnp.zeros((batch, 3)),),
      state_values=lambda config, seq_len, symmetric: 7,
      mixing_flops=lambda config, seq_len: 1.0)
  monkeypatch.setitem(registry.MIXERS, MixerKind.MAMBA, stand_in)
  config = ModelConfig(layer_mixers="mamba,mamba", **BASE)
  assert state_size_bytes(config, 5).total == 2 * 4 * 7
  assert cache_bytes(config, 1, 5) == 2 * 3 * 4 + 4
  params = init_params(config)
  assert set(params["params"]["layers_0"]) == {"norm1"}  # the stand-in has no parameters
  logits, cache = LanguageModel(config).apply(params, jnp.array([[1, 2]]),
                                              cache=init_cache(config, 1, 5))
  assert logits.shape == (1, 2, 64) and cache.layers[0][0].shape == (1, 3)


def test_layer_mixers_builds_the_same_model_as_the_index_fields():
  by_index = get_config("based_tiny")
  by_name = by_index.replace(linear_attention_layers=(), sliding_window_layers=(),
                             layer_mixers="base_conv,linear_attention,sliding_window,base_conv")
  assert by_name.layer_kinds == by_index.layer_kinds
  params = jax.jit(lambda: init_params(by_index, seed=4))()
  assert jax.tree.structure(params) == jax.tree.structure(
      jax.eval_shape(lambda: init_params(by_name, seed=4)))
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 512, (1, 5)))
  a, _ = jax.jit(LanguageModel(by_index).apply)(params, tokens)
  b, _ = jax.jit(LanguageModel(by_name).apply)(params, tokens)
  np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("changes, message", [
    (dict(layer_mixers="mamba"), "names 1 kinds for n_layers=2"),
    (dict(layer_mixers="mamba,lstm"), r"unknown kinds \['lstm'\]"),
    (dict(layer_mixers="mamba,mamba", attention_layers=(1,)), "give one of them"),
])
def test_bad_layer_mixers_say_why(changes, message):
  with pytest.raises(ValueError, match=message):
    ModelConfig(**{**BASE, **changes})
