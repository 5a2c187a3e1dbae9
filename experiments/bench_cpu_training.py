"""The CPU costs behind the MQAR default: linear-attention forms and dense-layer contractions.

  python -m experiments.bench_cpu_training --out=experiments/results/cpu_training

Times, with gradients and jitted, (1) the quadratic vs the chunked pure-JAX form of causal
Taylor linear attention (`QUADRATIC_MAX_T` in the dispatch picks between them) and (2) a
dense layer x [B, T, D] @ W as a rank-3 contraction vs the flattened matrix product that
`based_jax.layers.dense` uses. Median milliseconds per call to <out>.json and a table.
"""

import json
import os

import jax
import jax.numpy as jnp
from absl import app, flags

from based_jax.layers import matrix_dot_general
from experiments.benchmarking import median_ms, run_metadata
from pallas_kernels.taylor_attention import reference, xla

_OUT = flags.DEFINE_string("out", "experiments/results/cpu_training", "Output path prefix.")
_REPEATS = flags.DEFINE_integer("repeats", 10, "Timed repetitions (median reported).")

# (B, T) at the MQAR default's shapes and beyond; F = 16, D = 64, one head.
ATTENTION_SHAPES = ((32, 64), (32, 128), (32, 256), (16, 512), (8, 1024))


def timed_grad(loss, *args) -> float:
  grad = jax.jit(jax.grad(loss, argnums=tuple(range(len(args)))))
  return median_ms(lambda: grad(*args), jax.block_until_ready, repeats=_REPEATS.value,
                   inner=1)["median_ms"]


def attention_rows() -> list[dict]:
  rows = []
  for b, t in ATTENTION_SHAPES:
    keys = jax.random.split(jax.random.key(t), 3)
    q, k = (jax.random.normal(key, (b, t, 1, 16)) for key in keys[:2])
    v = jax.random.normal(keys[2], (b, t, 1, 64))
    row = {"batch": b, "seq_len": t}
    for name, form in (("quadratic", reference.quadratic), ("chunked", xla.chunked)):
      row[f"{name}_ms"] = timed_grad(lambda q, k, v, f=form: jnp.sum(f(q, k, v)[0] ** 2), q, k, v)
    row["chunked_over_quadratic"] = row["chunked_ms"] / row["quadratic_ms"]
    rows.append(row)
  return rows


def dense_row() -> dict:
  x = jax.random.normal(jax.random.key(0), (32, 256, 64))
  w = jax.random.normal(jax.random.key(1), (64, 256))
  dims = (((2,), (0,)), ((), ()))
  row = {"x": list(x.shape), "w": list(w.shape)}
  for name, dot in (("rank3", jax.lax.dot_general), ("matrix", matrix_dot_general)):
    row[f"{name}_ms"] = timed_grad(lambda w, x, d=dot: jnp.sum(d(x, w, dims) ** 2), w, x)
  row["rank3_over_matrix"] = row["rank3_ms"] / row["matrix_ms"]
  return row


def main(argv):
  del argv
  result = {"meta": {**run_metadata(), "cpu_count": os.cpu_count(),
                     "what": "median ms of jitted value+gradient, float32, F=16, D=64"},
            "attention": attention_rows(), "dense": dense_row()}
  with open(_OUT.value + ".json", "w") as f:
    json.dump(result, f, indent=1)
  print("| B | T | quadratic ms | chunked ms | chunked / quadratic |\n|---|---|---|---|---|")
  for r in result["attention"]:
    print(f"| {r['batch']} | {r['seq_len']} | {r['quadratic_ms']:.1f} | {r['chunked_ms']:.1f} "
          f"| {r['chunked_over_quadratic']:.2f} |")
  d = result["dense"]
  print(f"dense {d['x']} @ {d['w']} with gradients: rank-3 {d['rank3_ms']:.1f} ms, "
        f"matrix {d['matrix_ms']:.1f} ms ({d['rank3_over_matrix']:.2f}x)")


if __name__ == "__main__":
  app.run(main)
