"""One decode step of attention over a key / value cache: the Pallas kernel's tilings vs XLA.

  python -m experiments.bench_cache_attention --out=experiments/results/cache_attention_h200

The step stores each row's new key and value and reads the whole cache once (keys and values
[B, H, S, K'], bf16), so it is bound by those bytes. Defaults are based_1b's sliding window at
its best decode batch: B = 4096, H = 16, K' = 112, a window of W = 128 (S = W + 1 slots, every
slot full, in ring order). Timed in one process, jitted with the caches donated and fed back
as in the decode loop: "xla" (`reference.decode_attention`) and the kernel
(`pallas_kernels.cache_attention.pallas_triton`) at each `--tilings` entry, by wall time per
call and, on a GPU, by the kernels' own time from a profiler trace. Each first output is
checked against XLA's (max relative error). The table reports bandwidth (the cache read, the
new keys and values read and stored, positions, q and the float32 output) as a fraction of
the measured device copy bandwidth. Writes <out>.json (device, versions, shapes, command) and
<out>.md.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from experiments.benchmarking import (copy_bandwidth, median_ms, parse_tiling, profile_kernels,
                                      run_metadata)
from pallas_kernels.cache_attention import pallas_triton, reference

_B = flags.DEFINE_list("batch_sizes", ["4096"], "Batch sizes B.")
_H = flags.DEFINE_integer("heads", 16, "Heads H.")
_K = flags.DEFINE_integer("head_dim", 112, "Head dim K'.")
_WINDOW = flags.DEFINE_integer("window", 128, "Window W (the cache holds W + 1 slots).")
_TILINGS = flags.DEFINE_list(
    "tilings", ["32:2:2", "32:4:2", "16:2:2", "64:2:2", "32:2:3", "32:1:2"],
    "Kernel tilings, each block_slots:num_warps:num_stages.")
_REPEATS = flags.DEFINE_integer("repeats", 20, "Timed repetitions (median reported).")
_INTERPRET = flags.DEFINE_bool("interpret", False, "Run the kernel in the Pallas interpreter "
                               "(a CPU smoke test of this script; its times mean nothing).")
_OUT = flags.DEFINE_string("out", "experiments/results/cache_attention", "Output path prefix.")


def inputs(b: int, h: int, width: int, window: int, seed: int = 0):
  """q, new_k, new_v, k, v (bf16, N(0, 1)), a full ring of positions (slot s of row r holds
  the key at q_pos - ((q_pos - s) mod S), q_pos = 1000 + r) and the new keys' slots."""
  s = window + 1
  keys = jax.random.split(jax.random.key(seed), 5)
  q, new_k, new_v = (jax.random.normal(key, (b, h, width), jnp.bfloat16) for key in keys[:3])
  k, v = (jax.random.normal(key, (b, h, s, width), jnp.bfloat16) for key in keys[3:])
  q_pos = 1000 + jnp.arange(b, dtype=jnp.int32)
  pos = q_pos[:, None] - (q_pos[:, None] - jnp.arange(s, dtype=jnp.int32)[None]) % s
  return q, new_k, new_v, k, v, pos, q_pos, q_pos % s


def competitors(tilings, window: int, scale: float, interpret: bool) -> dict:
  """name -> f(q, new_k, new_v, k, v, pos, q_pos, slot) -> (out, k, v), jitted with the caches
  donated."""
  jit = lambda f: jax.jit(f, donate_argnums=(3, 4))
  impls = {"xla": jit(lambda *a: reference.decode_attention(*a, window=window, scale=scale))}
  for spec in tilings:
    tiling = parse_tiling(spec, pallas_triton.Tiling)
    impls[f"pallas {spec}"] = jit(lambda *a, t=tiling: pallas_triton.decode_attention(
        *a, window=window, scale=scale, interpret=interpret, tiling=t))
  return impls


def measure(b: int, h: int, width: int, window: int, impls: dict, bandwidth: float,
            repeats: int) -> list[dict]:
  args = inputs(b, h, width, window)
  q, _, _, k, _, pos, _, _ = args
  heads = q.size * q.dtype.itemsize  # one [B, H, K'] bf16 array
  moved = 2 * k.size * k.dtype.itemsize + pos.size * 4 + 5 * heads + 2 * heads
  reference_out, out = None, []
  for name, attend in impls.items():
    state = [jnp.copy(args[3]), jnp.copy(args[4])]  # this implementation's caches

    def call(f=attend, state=state):
      y, state[0], state[1] = f(*args[:3], *state, *args[5:])
      return y

    y = np.asarray(call())
    if reference_out is None:
      reference_out = y
    error = float(np.max(np.abs(y - reference_out)) / np.max(np.abs(reference_out)))
    times = median_ms(call, jax.block_until_ready, repeats=repeats, inner=3)
    row = {"batch": b, "heads": h, "head_dim": width, "slots": window + 1, "impl": name,
           "bytes": moved, **times, "max_rel_error_vs_xla": error}
    ms = times["median_ms"]
    if jax.default_backend() == "gpu":
      ms = sum(profile_kernels(call, jax.block_until_ready).values()) / 1e3
      row["kernel_ms"] = ms
    row["fraction_of_copy_bw"] = moved / (ms * 1e-3) / bandwidth
    kernel = f"  {ms * 1e3:8.1f} us kernels" if "kernel_ms" in row else ""
    print(f"B={b} {name:18s} {times['median_ms'] * 1e3:8.1f} us wall{kernel}  "
          f"{100 * row['fraction_of_copy_bw']:5.1f}% of copy  err {error:.1e}", flush=True)
    out.append(row)
  return out


def markdown(rows: list[dict], meta: dict) -> str:
  lines = [f"Decode attention over a bf16 cache ({meta['device']}, copy bandwidth "
           f"{meta['copy_bandwidth_Bps'] / 1e12:.2f} TB/s; H={meta['heads']}, "
           f"K'={meta['head_dim']}, S={meta['window'] + 1})", "",
           "| B | impl | wall us | kernel us | % of copy bandwidth | error vs XLA |",
           "|---|---|---|---|---|---|"]
  for r in rows:
    kernel = f"{r['kernel_ms'] * 1e3:.1f}" if "kernel_ms" in r else "-"
    lines.append(f"| {r['batch']} | {r['impl']} | {r['median_ms'] * 1e3:.1f} | {kernel} | "
                 f"{100 * r['fraction_of_copy_bw']:.1f} | {r['max_rel_error_vs_xla']:.1e} |")
  return "\n".join(lines) + "\n"


def main(argv):
  del argv
  bandwidth = copy_bandwidth()
  width, window = _K.value, _WINDOW.value
  impls = competitors(_TILINGS.value, window, width ** -0.5, _INTERPRET.value)
  rows = []
  for b in (int(x) for x in _B.value):
    rows += measure(b, _H.value, width, window, impls, bandwidth, _REPEATS.value)
  meta = {**run_metadata(), "heads": _H.value, "head_dim": width, "window": window,
          "dtype": "bfloat16", "copy_bandwidth_Bps": bandwidth}
  with open(f"{_OUT.value}.json", "w") as f:
    json.dump({"meta": meta, "rows": rows}, f, indent=1)
  with open(f"{_OUT.value}.md", "w") as f:
    f.write(markdown(rows, meta))


if __name__ == "__main__":
  app.run(main)
