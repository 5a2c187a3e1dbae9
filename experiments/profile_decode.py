"""Where a decode step's GPU time goes: per-kernel totals from a profiler trace.

  python -m experiments.profile_decode --model=based_1b --batches=1,2,1024

Runs `--steps` cached single-token model calls in a jitted `fori_loop` (zero cache, positions
set as after a 1024-token prompt; BASED's per-step cost does not depend on the cache values),
prints the median time per step and the kernels that took the most time per step, read from a
`jax.profiler` Perfetto trace. Model names take '+field=value' overrides
(`benchmarking.parse_model`).
"""

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from based_jax.cache import as_carry, init_cache
from based_jax.model import LanguageModel, init_params
from experiments.benchmarking import model_config, profile_kernels

_MODEL = flags.DEFINE_string("model", "based_1b", "Preset, optionally with '+field=value'.")
_BATCHES = flags.DEFINE_list("batches", ["1", "2"], "Batch sizes to profile.")
_STEPS = flags.DEFINE_integer("steps", 16, "Decode steps per timed call.")
_TOP = flags.DEFINE_integer("top", 14, "Kernels to list.")


def main(argv):
  del argv
  config = model_config(_MODEL.value, "bfloat16")
  params = jax.jit(functools.partial(init_params, config))()
  model = LanguageModel(config)
  n = _STEPS.value

  @functools.partial(jax.jit, donate_argnums=2)
  def steps(params, token, cache):
    def body(_, carry):
      token, cache = carry
      logits, cache = model.apply(params, token, cache=cache)
      return jnp.argmax(logits, -1).astype(jnp.int32), cache
    return jax.lax.fori_loop(0, n, body, (token, cache))

  for b in (int(x) for x in _BATCHES.value):
    cache = as_carry(init_cache(config, b, 2048))
    cache = cache._replace(length=jnp.full((b,), 1024, jnp.int32))
    token = jnp.zeros((b, 1), jnp.int32)
    times = []
    for i in range(6):  # the first call compiles
      start = time.perf_counter()
      token, cache = jax.block_until_ready(steps(params, token, cache))
      times.append((time.perf_counter() - start) / n)
    # One traced call (it donates the cache, so it cannot be repeated).
    kernels = profile_kernels(lambda: steps(params, token, cache), jax.block_until_ready, calls=1)
    print(f"{_MODEL.value} B={b}: {1e3 * np.median(times[1:]):.3f} ms/step; kernels "
          f"{sum(kernels.values()) / n / 1e3:.3f} ms/step")
    for name, us in kernels.most_common(_TOP.value):
      print(f"  {us / n / 1e3:8.3f} ms  {name[:100]}")


if __name__ == "__main__":
  app.run(main)
