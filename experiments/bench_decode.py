"""Generation throughput: BASED vs Transformer++ (random weights), batch swept until OOM.

  python -m experiments.bench_decode --models=based_1b,transformer_pp_1b --prompt_len=1024

For each model and batch size: prefill time, decode time per step (the whole jitted
`lax.while_loop` of `based_jax.generate.decode`, no host round trip per token), generated
tokens/s, peak device memory, and the bandwidth floor per step: bytes that must move per step
(weights once, plus the state or KV cache read and written) over the measured copy bandwidth.
The sweep over batch sizes stops at the first out-of-memory error, which is recorded.
Writes <out>.json (device, versions, shapes) and <out>.png (tokens/s vs batch).
"""

import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
from absl import app, flags

from based_jax import config as config_lib
from based_jax.cache import cache_bytes
from based_jax.config import get_config
from based_jax.generate import decode, prefill
from based_jax.model import init_params
from experiments.benchmarking import copy_bandwidth, run_metadata

_MODELS = flags.DEFINE_list("models", ["based_360m", "transformer_pp_360m", "based_1b",
                                       "transformer_pp_1b"], "Model presets.")
_PROMPT = flags.DEFINE_integer("prompt_len", 1024, "Prompt tokens per sequence.")
_NEW = flags.DEFINE_integer("new_tokens", 1024, "Generated tokens per sequence.")
_BATCHES = flags.DEFINE_list("batch_sizes", ["1", "8", "32", "64", "128", "256", "512", "1024"],
                             "Batch sizes, increasing; the sweep stops at the first OOM.")
_DTYPE = flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "Params and compute.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed repetitions (median reported).")
_OUT = flags.DEFINE_string("out", "experiments/results/decode", "Output path prefix.")


def model_config(preset: str, dtype: str):
  return get_config(preset, dtype=dtype, param_dtype=dtype)


def run_generation(config, params, prompts, new_tokens: int, seed: int = 0):
  """Exactly what is timed: prefill then the jitted greedy decode loop. Returns the tokens
  [B, new_tokens] and the two wall times in seconds."""
  lengths = jnp.full((prompts.shape[0],), prompts.shape[1], jnp.int32)
  max_len = prompts.shape[1] + new_tokens
  start = time.perf_counter()
  logits, cache = prefill(config, params, prompts, lengths, max_len)
  jax.block_until_ready(logits)
  mid = time.perf_counter()
  out, _ = decode(config, params, logits, cache, jax.random.key(seed), new_tokens)
  tokens = jax.block_until_ready(out.tokens)
  return tokens, mid - start, time.perf_counter() - mid


def bytes_per_step(config, batch: int, prompt_len: int, new_tokens: int, param_bytes: int) -> int:
  """Weights once, plus every layer's state read and written; a full-attention KV cache is
  read up to the average length and one token written."""
  total = param_bytes
  itemsize = jnp.dtype(config.dtype).itemsize
  for kind in config.layer_kinds:
    one = config.replace(n_layers=1, linear_attention_layers=(), sliding_window_layers=(),
                         attention_layers=())
    if kind == config_lib.ATTENTION:
      avg_len = prompt_len + new_tokens // 2
      total += batch * 2 * config.d_model * (avg_len + 1) * itemsize
    else:
      layer = {config_lib.LINEAR_ATTENTION: dict(linear_attention_layers=(0,)),
               config_lib.SLIDING_WINDOW: dict(sliding_window_layers=(0,))}.get(kind, {})
      total += 2 * cache_bytes(one.replace(**layer), batch, 1)
  return total


def is_oom(error: Exception) -> bool:
  text = str(error)
  return "RESOURCE_EXHAUSTED" in text or "Out of memory" in text or "out of memory" in text


def bench_model(preset: str, bandwidth: float) -> dict:
  config = model_config(preset, _DTYPE.value)
  params = jax.jit(init_params, static_argnums=0)(config)
  param_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
  rows, oom = [], None
  for batch in (int(b) for b in _BATCHES.value):
    prompts = jax.random.randint(jax.random.key(batch), (batch, _PROMPT.value), 0,
                                 config.vocab_size, jnp.int32)
    try:
      run_generation(config, params, prompts, _NEW.value)  # compile + warm up
      times = [run_generation(config, params, prompts, _NEW.value)[1:]
               for _ in range(_REPEATS.value)]
    except Exception as e:  # noqa: BLE001 - only out-of-memory is expected here
      if not is_oom(e):
        raise
      oom = {"batch": batch, "error": str(e).splitlines()[0][:300]}
      print(f"{preset}: batch {batch} out of memory; stopping the sweep")
      break
    prefill_s = statistics.median(t[0] for t in times)
    decode_s = statistics.median(t[1] for t in times)
    step_s = decode_s / _NEW.value
    floor_bytes = bytes_per_step(config, batch, _PROMPT.value, _NEW.value, param_bytes)
    stats = jax.devices()[0].memory_stats() or {}
    row = {"batch": batch, "prefill_ms": 1e3 * prefill_s, "decode_ms_per_step": 1e3 * step_s,
           "tokens_per_s": batch * _NEW.value / decode_s,
           "peak_memory_gb": stats.get("peak_bytes_in_use", 0) / 1e9,
           "floor_bytes_per_step": floor_bytes,
           "floor_ms_per_step": 1e3 * floor_bytes / bandwidth,
           "ratio_to_floor": step_s / (floor_bytes / bandwidth)}
    rows.append(row)
    print(f"{preset:20s} B={batch:5d} prefill {row['prefill_ms']:9.1f} ms  step "
          f"{row['decode_ms_per_step']:7.3f} ms (floor {row['floor_ms_per_step']:.3f}, "
          f"x{row['ratio_to_floor']:.2f})  {row['tokens_per_s']:>10,.0f} tok/s  "
          f"peak {row['peak_memory_gb']:.1f} GB", flush=True)
  del params
  return {"preset": preset, "param_bytes": param_bytes, "rows": rows, "oom": oom}


def plot(results: list[dict], path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6, 4))
  for r in results:
    ax.plot([x["batch"] for x in r["rows"]], [x["tokens_per_s"] for x in r["rows"]], "o-",
            label=r["preset"])
  ax.set_xscale("log", base=2)
  ax.set_yscale("log")
  ax.set_xlabel("batch size")
  ax.set_ylabel("generated tokens / s")
  ax.set_title(f"prompt {_PROMPT.value}, {_NEW.value} new tokens, {_DTYPE.value}")
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=150)


def main(argv):
  del argv
  bandwidth = copy_bandwidth()
  print(f"device {jax.devices()[0].device_kind}: copy bandwidth {bandwidth / 1e12:.2f} TB/s")
  meta = {**run_metadata(), "prompt_len": _PROMPT.value,
          "new_tokens": _NEW.value, "dtype": _DTYPE.value, "copy_bandwidth_Bps": bandwidth,
          "attention": "XLA einsum attention over a preallocated KV cache",
          "linear_attention": "pallas_kernels dispatch 'auto'"}
  os.makedirs(os.path.dirname(_OUT.value) or ".", exist_ok=True)
  results = []
  for preset in _MODELS.value:
    result = bench_model(preset, bandwidth)
    result["best"] = max(result["rows"], key=lambda x: x["tokens_per_s"], default=None)
    results.append(result)
    with open(_OUT.value + ".json", "w") as f:  # after every model: partial runs keep data
      json.dump({"meta": meta, "results": results}, f, indent=1)
    plot(results, _OUT.value + ".png")


if __name__ == "__main__":
  app.run(main)
