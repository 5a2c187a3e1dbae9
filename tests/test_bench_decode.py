"""The decode benchmark times the real generation path: its tokens equal reference greedy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from based_jax.model import LanguageModel, init_params
from experiments import bench_decode


@pytest.mark.parametrize("preset", ["based_tiny", "transformer_pp_tiny"])
def test_benchmark_generation_equals_reference_greedy(preset):
  config = bench_decode.model_config(preset, "float32").replace(init_std=0.3)
  params = init_params(config, seed=4)
  prompts = jax.random.randint(jax.random.key(0), (3, 9), 0, config.vocab_size, jnp.int32)
  tokens, prefill_s, decode_s = bench_decode.run_generation(config, params, prompts, 7)
  assert prefill_s > 0 and decode_s > 0
  model = LanguageModel(config)
  seqs = np.asarray(prompts).tolist()
  forward = jax.jit(lambda p, t: model.apply(p, t)[0])
  for step in range(7):  # greedy by full causal forwards (padded: one compilation), no cache
    padded = jnp.asarray([row + [0] * (7 - step) for row in seqs])
    logits = forward(params, padded)[:, 9 + step - 1]
    for row, token in zip(seqs, np.asarray(jnp.argmax(logits, -1))):
      row.append(int(token))
  np.testing.assert_array_equal(tokens, np.asarray(seqs)[:, 9:])


def test_out_of_memory_is_recognised():
  assert bench_decode.is_oom(RuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating"))
  assert not bench_decode.is_oom(ValueError("shapes do not match"))


def test_floor_counts_weights_and_state():
  config = bench_decode.model_config("based_tiny", "float32")
  one = bench_decode.bytes_per_step(config, 1, 16, 16, param_bytes=1000)
  two = bench_decode.bytes_per_step(config, 2, 16, 16, param_bytes=1000)
  assert two - one == one - 1000 > 0  # state bytes scale with the batch, weights do not
