"""The first call on a new cache: nothing computes on its zeros (XLA would constant-fold it)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend.core import Literal, jaxprs_in_params

from based_jax import config as config_lib
from based_jax import get_config, init_params, prefill
from based_jax.cache import ModelCache, as_carry, init_layer_cache
from based_jax.mixers.linear_attention import EmptyTaylorState, plain_state
from based_jax.model import make_mixer
from pallas_kernels.taylor_attention import TaylorState

# Primitives whose sub-jaxpr takes the call's inputs one to one (loops and kernels do not:
# their bodies see carries and refs, which are not constants even from a constant start).
_CALLS = {"pjit", "jit", "closed_call", "core_call", "custom_jvp_call", "custom_vjp_call",
          "remat", "checkpoint"}


def constant_gathers(jaxpr, constant_inputs) -> list[str]:
  """Gathers in `jaxpr` and the calls it makes whose operand is known at compile time (made
  from literals and constants alone): XLA evaluates such a gather while compiling."""
  known = {v for v, c in zip(jaxpr.invars, constant_inputs) if c} | set(jaxpr.constvars)
  found = []
  for eqn in jaxpr.eqns:
    inputs = [isinstance(x, Literal) or x in known for x in eqn.invars]
    if eqn.primitive.name == "gather" and inputs[0]:
      found.append(str(eqn.outvars[0].aval))
    for sub in jaxprs_in_params(eqn.params):
      passed = inputs if eqn.primitive.name in _CALLS else [False] * len(sub.invars)
      found += constant_gathers(sub, passed)
    if all(inputs) and not eqn.effects:
      known.update(eqn.outvars)
  return found


def kernel_config(**overrides):
  """based_tiny with the kernels' feature dim, its Taylor attention in the Pallas interpreter
  (the path a GPU runs, whose state basis change is a gather) unless `overrides` say."""
  return get_config("based_tiny", **{"la_feature_dim": 16,
                                     "linear_attention_impl": "pallas_interpret", **overrides})


def test_the_walker_finds_a_gather_on_constant_zeros():
  def f(x):
    zeros = jnp.zeros((4, 6))
    return jnp.take(zeros, jnp.array([2, 0, 1]), axis=1) + jnp.take(x, jnp.array([1]), axis=1)
  jaxpr = jax.make_jaxpr(f)(jnp.ones((4, 6))).jaxpr
  assert constant_gathers(jaxpr, [False]) == ["float32[4,3]"]  # the one on x is not constant


@pytest.mark.parametrize("chunk", [32, 8])  # one call; a first call then a scan over the cache
def test_prefill_computes_nothing_on_the_new_cache(chunk):
  config = kernel_config()
  params = jax.eval_shape(lambda: init_params(config))
  tokens, lengths = jnp.zeros((4, 32), jnp.int32), jnp.full((4,), 32, jnp.int32)
  run = functools.partial(prefill, config, max_len=40, chunk_size=chunk)
  closed = jax.make_jaxpr(run)(params, tokens, lengths)
  assert constant_gathers(closed.jaxpr, [False] * len(closed.jaxpr.invars)) == []


@pytest.mark.parametrize("impl", ["xla", "pallas_interpret"])
@pytest.mark.parametrize("state_dtype", ["float32", "bfloat16"])
def test_starting_from_no_state_equals_reading_the_zero_state(state_dtype, impl):
  config = kernel_config(la_state_dtype=state_dtype, linear_attention_impl=impl)
  mixer = make_mixer(config, config_lib.LINEAR_ATTENTION, "mixer")
  b, t = 2, 12
  x = jax.random.normal(jax.random.key(0), (b, t, config.d_model))
  positions, lengths = jnp.broadcast_to(jnp.arange(t), (b, t)), jnp.asarray([12, 5])
  params = mixer.init(jax.random.key(1), x, positions, None, None)
  cache = init_layer_cache(config, config_lib.LINEAR_ATTENTION, b, t)
  assert isinstance(cache, EmptyTaylorState)
  assert type(as_carry(ModelCache((cache,), jnp.zeros((b,), jnp.int32))).layers[0]) is (
      TaylorState)
  apply = jax.jit(mixer.apply)
  y, fresh = apply(params, x, positions, lengths, cache)
  y_read, read = apply(params, x, positions, lengths, plain_state(cache))  # zeros read in
  assert type(fresh) is TaylorState
  assert (fresh.kv.dtype, fresh.k.dtype) == (jnp.dtype(state_dtype), jnp.float32)
  np.testing.assert_array_equal(y, y_read)
  for new, old in zip(fresh, read, strict=True):
    np.testing.assert_array_equal(np.asarray(new, np.float32), np.asarray(old, np.float32))
