"""Decoding's few-row products: the GEMV kernel's tilings against XLA, in GB/s of weights read.

  python -m experiments.bench_gemv --out=experiments/results/gemv_h200

For each weight shape [K, N] (default: based_1b's dense layers) and row count M, one jitted
call multiplies `--layers` distinct x [M, K] by as many distinct bf16 matrices of that shape
(one per layer of the model, so the weights stream from HBM as in a decode step, not from L2,
and XLA cannot merge the products into one over concatenated weights, as it does for products
sharing an operand) and returns every product. Timed per implementation in one process (wall
time per call and, on a GPU, the kernels' own time from a profiler trace, which leaves out the
host's launch gaps): "xla" (`layers.matrix_dot_general`: XLA's product, a single row padded to
two, as the model runs it) and the kernel
(`pallas_kernels.gemv.pallas_triton`) at each `--tilings` entry. Every kernel result is
checked against XLA's (max relative error in the JSON). Writes <out>.json (device, versions,
shapes, command) and <out>.md (microseconds per product and GB/s per shape and M).
"""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from based_jax.layers import matrix_dot_general
from experiments.benchmarking import median_ms, parse_tiling, profile_kernels, run_metadata
from pallas_kernels.gemv import api, pallas_triton

_SHAPES = flags.DEFINE_list(
    "shapes", ["1792x7168", "3584x1792", "1792x5376", "1792x1792", "1792x256"],
    "Weight shapes KxN (default: based_1b's SwiGLU in and out, attention's Wqkv, a D x D "
    "projection, linear attention's feature projection).")
_ROWS = flags.DEFINE_list("rows", ["1", "2", "4"], "Rows M of x.")
_LAYERS = flags.DEFINE_integer("layers", 36, "Distinct matrices per call (based_1b: 36).")
_TILINGS = flags.DEFINE_list(
    "tilings", ["128:4096:528:4:4", "128:8192:264:4:3", "256:8192:528:4:3",
                "128:4096:1056:4:4", "64:4096:528:4:4"],
    "Kernel tilings, each block_n:block_elements:min_programs:num_warps:num_stages.")
_REPEATS = flags.DEFINE_integer("repeats", 10, "Timed repetitions (median reported).")
_INTERPRET = flags.DEFINE_bool("interpret", False, "Run the kernel in the Pallas interpreter "
                               "(a CPU smoke test of this script; its times mean nothing).")
_OUT = flags.DEFINE_string("out", "experiments/results/gemv", "Output path prefix.")


def products(rows: int, k: int, n: int, layers: int, seed: int = 0):
  """`layers` rows x [rows, k] and as many matrices [k, n], bf16, from N(0, 1)."""
  keys = jax.random.split(jax.random.key(seed), 2 * layers)
  xs = [jax.random.normal(key, (rows, k), jnp.bfloat16) for key in keys[:layers]]
  return xs, [jax.random.normal(key, (k, n), jnp.bfloat16) for key in keys[layers:]]


def competitors(tilings, interpret: bool) -> dict:
  """name -> f(x, w) for one product."""
  xla = lambda x, w: matrix_dot_general(x, w, (((1,), (0,)), ((), ())))
  impls = {"xla": xla}
  for spec in tilings:
    tiling = parse_tiling(spec, pallas_triton.Tiling)
    impls[f"gemv {spec}"] = lambda x, w, t=tiling: pallas_triton.matmul(
        x, w, out_dtype=x.dtype, interpret=interpret, tiling=t)
  return impls


def measure(k: int, n: int, rows: int, layers: int, impls: dict, repeats: int) -> list[dict]:
  xs, weights = products(rows, k, n, layers)
  reference = None
  out = []
  for name, product in impls.items():
    call = jax.jit(lambda xs, ws, f=product: tuple(f(x, w) for x, w in zip(xs, ws)))
    ys = call(xs, weights)
    y = np.asarray(jnp.stack(ys).astype(jnp.float32))
    if reference is None:
      reference = y
    error = float(np.max(np.abs(y - reference)) / max(np.max(np.abs(reference)), 1e-30))
    times = median_ms(lambda: call(xs, weights), jax.block_until_ready, repeats=repeats, inner=3)
    us = times["median_ms"] * 1e3 / layers
    row = {"k": k, "n": n, "rows": rows, "impl": name, "us_per_product": us,
           "min_us_per_product": times["min_ms"] * 1e3 / layers,
           "gb_per_s": k * n * 2 / (us * 1e-6) / 1e9, "max_rel_error_vs_xla": error}
    if jax.default_backend() == "gpu":
      kernels = profile_kernels(lambda: call(xs, weights), jax.block_until_ready)
      row["kernel_us_per_product"] = sum(kernels.values()) / layers
      row["kernel_gb_per_s"] = k * n * 2 / (row["kernel_us_per_product"] * 1e-6) / 1e9
      row["kernels_per_product"] = {name: round(t / layers, 3) for name, t in kernels.items()}
    if name != "xla":
      tiling = parse_tiling(name.split()[1], pallas_triton.Tiling)
      row["blocks"] = dict(zip(("bn", "bk", "splits"), pallas_triton.blocks(rows, k, n, tiling)))
    device = (f"  kernels {row['kernel_us_per_product']:7.2f} us {row['kernel_gb_per_s']:6.0f} GB/s"
              if "kernel_us_per_product" in row else "")
    print(f"K={k} N={n} M={rows} {name:24s} {us:8.2f} us  {row['gb_per_s']:7.0f} GB/s{device}  "
          f"err {error:.1e}", flush=True)
    out.append(row)
  return out


def markdown(rows: list[dict], device: str) -> str:
  lines = [f"Few-row products x [M, K] @ W [K, N], bf16 ({device}; microseconds per product "
           "and GB/s of W read, by wall time and by the kernels' own time)", "",
           "| K x N | M | impl | us | GB/s | kernel us | kernel GB/s | error vs XLA |",
           "|---|---|---|---|---|---|---|---|"]
  for r in rows:
    kernel = (f"{r['kernel_us_per_product']:.2f} | {r['kernel_gb_per_s']:.0f}"
              if "kernel_us_per_product" in r else "- | -")
    lines.append(f"| {r['k']} x {r['n']} | {r['rows']} | {r['impl']} | "
                 f"{r['us_per_product']:.2f} | {r['gb_per_s']:.0f} | {kernel} | "
                 f"{r['max_rel_error_vs_xla']:.1e} |")
  return "\n".join(lines) + "\n"


def main(argv):
  del argv
  impls = competitors(_TILINGS.value, _INTERPRET.value)
  rows = []
  for shape in _SHAPES.value:
    k, n = (int(v) for v in shape.split("x"))
    for m in (int(v) for v in _ROWS.value):
      if m not in api.ROWS:
        raise ValueError(f"--rows takes {api.ROWS} (the kernel's M), got {m}")
      rows += measure(k, n, m, _LAYERS.value, impls, _REPEATS.value)
  meta = {**run_metadata(), "layers": _LAYERS.value, "dtype": "bfloat16",
          "default_tiling": dataclasses.asdict(pallas_triton.TILING)}
  with open(f"{_OUT.value}.json", "w") as f:
    json.dump({"meta": meta, "rows": rows}, f, indent=1)
  with open(f"{_OUT.value}.md", "w") as f:
    f.write(markdown(rows, meta["device"]))


if __name__ == "__main__":
  app.run(main)
