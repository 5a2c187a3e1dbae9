"""Every public entry point refuses bad input with a ValueError naming the argument; under
`jax.jit`, where values cannot raise, the affected rows get NaN logits (never a silently
wrong number)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from based_jax import LanguageModel, decode, generate, get_config, init_cache, init_params, prefill
from based_jax.cache import as_carry

BASED = get_config("based_tiny")
TPP = get_config("transformer_pp_tiny")


@pytest.fixture(scope="module")
def models():
  return {name: (config, init_params(config)) for name, config in
          (("based", BASED), ("tpp", TPP))}


@pytest.mark.parametrize("changes, message", [
    (dict(rope_base=0.0), "rope_base must be a finite number > 0"),
    (dict(rope_base=float("inf")), "rope_base"),
    (dict(linear_attention_impl="palas"), "linear_attention_impl must be one of"),
    (dict(d_model=64.0), "d_model must be an int"),
    (dict(n_layers=True), "n_layers must be an int"),
    (dict(window="8"), "window must be an int"),
    (dict(la_eps="1e-6"), "la_eps must be a float"),
    (dict(sliding_window_layers=(2.0,)), "sliding_window_layers must be a tuple of ints"),
    (dict(init_std=-0.1), "init_std"),
    (dict(dtype="float16"), "dtype must be one of"),
])
def test_every_config_field_is_validated_with_its_type(changes, message):
  with pytest.raises(ValueError, match=message):
    get_config("based_tiny", **changes)


def test_config_converts_numpy_scalars_and_sequences():
  config = get_config("based_tiny", window=np.int64(4), la_eps=1, linear_attention_layers=[1])
  assert (config.window, config.la_eps, config.linear_attention_layers) == (4, 1.0, (1,))
  assert type(config.window) is int and type(config.la_eps) is float


@pytest.mark.parametrize("kwargs, message", [
    (dict(lengths=jnp.array([4, 7])), r"lengths .* must lie in \[0, 6\]"),
    (dict(lengths=jnp.array([-1, 2])), "lengths"),
    (dict(lengths=jnp.array([1.0, 2.0])), "lengths must be an integer array"),
    (dict(lengths=jnp.array([1, 2, 3])), r"lengths must be an integer array of shape \[2\]"),
    (dict(logits_at=jnp.array([[0], [6]])), r"logits_at .* must lie in \[0, 5\]"),
    (dict(logits_at=jnp.array([[-1], [0]])), "logits_at"),
    (dict(logits_at=jnp.array([0, 1])), r"logits_at must be an integer array of shape \[2, any\]"),
])
def test_model_call_checks_lengths_and_logits_at(models, kwargs, message):
  config, params = models["based"]
  tokens = jnp.ones((2, 6), jnp.int32)
  with pytest.raises(ValueError, match=message):
    LanguageModel(config).apply(params, tokens, **kwargs)


def test_model_call_checks_the_cache(models):
  config, params = models["tpp"]
  model = LanguageModel(config)
  with pytest.raises(ValueError, match="cache is for batch 3"):
    model.apply(params, jnp.ones((2, 1), jnp.int32), cache=init_cache(config, 3, 8))
  with pytest.raises(ValueError, match="cache must be the ModelCache"):
    model.apply(params, jnp.ones((2, 1), jnp.int32), cache=init_cache(BASED, 2, 8))
  # Decoding past a full attention cache's max_len would wrap around: an error instead.
  _, cache = model.apply(params, jnp.ones((2, 8), jnp.int32), cache=init_cache(config, 2, 8))
  with pytest.raises(ValueError, match="max_len=8"):
    model.apply(params, jnp.ones((2, 1), jnp.int32), cache=cache)


def test_under_jit_bad_values_give_nan_rows_not_wrong_numbers(models):
  config, params = models["tpp"]
  model = LanguageModel(config)
  forward = jax.jit(lambda tokens, lengths, at: model.apply(params, tokens, lengths=lengths,
                                                            logits_at=at)[0])
  tokens = jnp.ones((4, 6), jnp.int32)
  tokens = tokens.at[1, 2].set(config.vocab_size).at[2, 0].set(-1)
  logits = forward(tokens, jnp.array([6, 6, 6, 7]), jnp.zeros((4, 1), jnp.int32))
  assert np.isfinite(logits[0]).all() and np.isnan(logits[1:]).all()
  logits = forward(jnp.ones((2, 6), jnp.int32), jnp.array([6, 6]), jnp.array([[5], [-1]]))
  assert np.isfinite(logits[0]).all() and np.isnan(logits[1]).all()
  # A full-attention cache overflowing inside a jitted loop flags the rows it overflows.
  step = jax.jit(lambda token, cache: model.apply(params, token, cache=cache))
  _, cache = model.apply(params, jnp.ones((2, 7), jnp.int32), lengths=jnp.array([7, 3]),
                         cache=init_cache(config, 2, 8))
  logits, cache = step(jnp.ones((2, 1), jnp.int32), as_carry(cache))
  assert np.isfinite(logits).all()
  logits, _ = step(jnp.ones((2, 1), jnp.int32), cache)
  assert np.isnan(logits[0]).all() and np.isfinite(logits[1]).all()


def test_prefill_checks_prompts_lengths_and_sizes(models):
  config, params = models["based"]
  prompts = jnp.ones((2, 5), jnp.int32)
  for lengths, message in (([6, 5], r"prompt_lengths .* must lie in \[1, 5\]"),
                           ([0, 5], "prompt_lengths"), ([5], "shape \\[2\\]")):
    with pytest.raises(ValueError, match=message):
      prefill(config, params, prompts, jnp.array(lengths), 8)
  with pytest.raises(ValueError, match="do not fit max_len=4"):
    prefill(config, params, prompts, jnp.array([5, 5]), 4)
  with pytest.raises(ValueError, match="vocab_size"):
    prefill(config, params, prompts.at[0, 0].set(config.vocab_size), jnp.array([5, 5]), 8)
  with pytest.raises(ValueError, match="chunk_size must be an int >= 1"):
    prefill(config, params, prompts, jnp.array([5, 5]), 8, chunk_size=0)
  with pytest.raises(ValueError, match="max_len must be an int >= 1"):
    prefill(config, params, prompts, jnp.array([5, 5]), 0)


def test_decode_refuses_to_run_past_a_full_attention_cache(models):
  config, params = models["tpp"]
  logits, cache = prefill(config, params, jnp.ones((2, 5), jnp.int32), jnp.array([5, 5]), 8)
  with pytest.raises(ValueError, match="max_len=8"):
    decode(config, params, logits, cache, jax.random.key(0), 4)
  with pytest.raises(ValueError, match="eos_id"):
    decode(config, params, logits, cache, jax.random.key(0), 3, eos_id=-2)
  with pytest.raises(ValueError, match="max_new_tokens must be an int >= 1"):
    decode(config, params, logits, cache, jax.random.key(0), 0)
  out, _ = decode(config, params, logits, cache, jax.random.key(0), 3)  # exactly fits
  assert out.tokens.shape == (2, 3)


@pytest.mark.parametrize("call, message", [
    (lambda c, p: generate(c, p, np.array([1, 2, 3]), max_new_tokens=2), r"\[batch, time\]"),
    (lambda c, p: generate(c, p, np.ones((1, 3), np.int32), max_new_tokens=2.5),
     "max_new_tokens must be an int"),
    (lambda c, p: generate(c, p, np.ones((1, 3), np.int32), np.array([4]), max_new_tokens=2),
     "prompt_lengths"),
    (lambda c, p: init_cache(c, 2, 0), "max_len must be an int >= 1"),
    (lambda c, p: init_cache(c, 2.0, 8), "batch must be an int >= 1"),
])
def test_generation_helpers_name_the_bad_argument(models, call, message):
  config, params = models["based"]
  with pytest.raises(ValueError, match=message):
    call(config, params)
