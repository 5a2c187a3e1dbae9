"""Where a decode step's GPU time goes: per layer kind and module, and per kernel.

  python -m experiments.profile_decode --model=based_1b+la_state_dtype=bfloat16 \
    --batches=1,4096 --out=experiments/results/decode_1b_profile

Runs `--steps` cached single-token model calls in a jitted `fori_loop` (zero cache, positions
set as after a 1024-token prompt; BASED's per-step cost does not depend on the cache values),
prints the median time per step, the GPU time per step of each "<layer kind> <module>" scope
(`benchmarking.module_scope`: e.g. "linear_attention mixer", "base_conv mlp", "head"; ops of
the loop outside the model are "sampling and loop") and the kernels that took the most, read
from a `jax.profiler` trace and the compiled module's HLO. `--out` writes them as JSON with
the run's metadata. Model names take '+field=value' overrides (`benchmarking.parse_model`).
"""

import functools
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from based_jax.cache import as_carry, init_cache
from based_jax.model import LanguageModel, init_params
from experiments.benchmarking import model_config, module_scope, profile_scopes, run_metadata

_MODEL = flags.DEFINE_string("model", "based_1b", "Preset, optionally with '+field=value'.")
_BATCHES = flags.DEFINE_list("batches", ["1", "2"], "Batch sizes to profile.")
_STEPS = flags.DEFINE_integer("steps", 16, "Decode steps per timed call.")
_TOP = flags.DEFINE_integer("top", 14, "Kernels to list.")
_OUT = flags.DEFINE_string("out", None, "Write <out>.json (optional).")


def decode_scope(layer_kinds: tuple[str, ...], op_name: str) -> str:
  """`module_scope` for an op of the model; the decode loop's own ops (argmax, the loop's
  bookkeeping) as one scope."""
  return module_scope(layer_kinds, op_name) if "LanguageModel" in op_name else "sampling and loop"


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

  rows = []
  for b in (int(x) for x in _BATCHES.value):
    cache = as_carry(init_cache(config, b, 2048))
    cache = cache._replace(length=jnp.full((b,), 1024, jnp.int32))
    token = jnp.zeros((b, 1), jnp.int32)
    compiled = steps.lower(params, token, cache).compile()
    times = []
    for _ in range(6):  # the first call is a warm-up, not timed
      start = time.perf_counter()
      token, cache = jax.block_until_ready(compiled(params, token, cache))
      times.append((time.perf_counter() - start) / n)
    holder = [(token, cache)]

    def call():  # each call donates the cache, so it carries the last one on
      holder[0] = compiled(params, *holder[0])
      return holder[0]

    by_scope, by_kernel, launches = profile_scopes(
        call, jax.block_until_ready, compiled.as_text(),
        functools.partial(decode_scope, config.layer_kinds), calls=2)
    per_step = lambda counter, k=None: {name: us / n / 1e3 for name, us in counter.most_common(k)}
    row = {"model": _MODEL.value, "batch": b, "ms_per_step": 1e3 * float(np.median(times[1:])),
           "gpu_ms_per_step": sum(by_scope.values()) / n / 1e3,
           "launches_per_step": sum(launches.values()) / n,
           "by_scope_ms": per_step(by_scope),
           "by_scope_launches": {name: launches[name] / n for name in by_scope},
           "top_kernels_ms": per_step(by_kernel, _TOP.value)}
    rows.append(row)
    print(f"{_MODEL.value} B={b}: {row['ms_per_step']:.3f} ms/step; GPU "
          f"{row['gpu_ms_per_step']:.3f} ms/step in {row['launches_per_step']:.0f} kernels")
    for name, ms in row["by_scope_ms"].items():
      print(f"  {ms:8.3f} ms {row['by_scope_launches'][name]:6.0f} kernels  {name}")
    for name, ms in row["top_kernels_ms"].items():
      print(f"  {ms:8.3f} ms  {name[:110]}")
  if _OUT.value:
    meta = {**run_metadata(), "steps_per_call": n, "cache": "length 1024 of 2048, zeros",
            "params": "random bf16 (init_params)"}
    with open(f"{_OUT.value}.json", "w") as f:
      json.dump({"meta": meta, "rows": rows}, f, indent=1)


if __name__ == "__main__":
  app.run(main)
