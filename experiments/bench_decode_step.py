"""One Taylor linear-attention decoding step: Pallas kernel vs jax-triton kernel vs XLA.

  python -m experiments.bench_decode_step --out=experiments/results/decode_step_h100

The step is memory-bound: it must read and write the state (kv [B, H, E, D] in float32 or,
with --state_dtype=bfloat16, bf16, and float32 k [B, H, E]; E = 153 in the packed basis)
once. Each implementation runs jitted with the state donated and fed back, as in the decode
loop; the table reports the median time, the achieved bandwidth (state bytes read
plus written, plus q, k, v, y) and its fraction of the measured device copy bandwidth.
Defaults are the 360M model's shape at batch 256 (H=16, d'=16, D=64). `--pallas_tilings`
adds the Pallas kernel at explicit tilings (how its defaults were chosen).
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from experiments.benchmarking import copy_bandwidth, median_ms, run_metadata
from pallas_kernels.taylor_attention import (causal_taylor_attention, feature_width,
                                             pallas_decode, taylor_feature_map)
from pallas_kernels.taylor_attention.state import STATE_DTYPES, TaylorState

_B = flags.DEFINE_list("batch_sizes", ["1", "64", "256"], "Batch sizes.")
_H = flags.DEFINE_integer("heads", 16, "Heads.")
_F = flags.DEFINE_integer("feature_dim", 16, "Query/key feature dim d'.")
_DV = flags.DEFINE_list("value_dims", ["64", "112"], "Value head dims D.")
_IMPLS = flags.DEFINE_list("impls", ["pallas", "triton", "xla"], "What to time.")
_TILINGS = flags.DEFINE_list(
    "pallas_tilings", [], "Also time the Pallas kernel directly with these tilings, each "
    "num_warps:max_block_d:block_e (e.g. 4:128:32; see pallas_decode.step).")
_STATE_DTYPE = flags.DEFINE_enum("state_dtype", "float32", list(STATE_DTYPES),
                                  "Storage dtype of the numerator state kv (k stays float32).")
_REPEATS = flags.DEFINE_integer("repeats", 50, "Timed repetitions (median reported).")
_OUT = flags.DEFINE_string("out", "experiments/results/decode_step", "Output path prefix.")


def api_step(impl):
  return lambda q, k, v, s: causal_taylor_attention(q, k, v, state=s, impl=impl)


def tiled_step(tiling: str):
  """The Pallas decode kernel with an explicit 'num_warps:max_block_d:block_e' tiling."""
  warps, block_d, block_e = (int(x) for x in tiling.split(":"))

  def attend(q, k, v, s):
    y, s = pallas_decode.step(taylor_feature_map(q[:, 0]), taylor_feature_map(k[:, 0]), v[:, 0],
                              s, jnp.ones(q.shape[:1], bool), eps=1e-6, num_warps=warps,
                              max_block_d=block_d, block_e=block_e)
    return y[:, None], s
  return attend


def bench(attend, b, h, f, d, bandwidth):
  r = np.random.default_rng(b + d)
  q, k = (jnp.asarray(r.normal(size=(b, 1, h, f)), jnp.bfloat16) for _ in range(2))
  v = jnp.asarray(r.normal(size=(b, 1, h, d)), jnp.bfloat16)
  e = feature_width(f)
  # Drawn on the device: at batch 4096 a host-drawn float64 kv takes minutes.
  kv_key, k_key = jax.random.split(jax.random.key(b + d))
  state = [TaylorState(jax.random.normal(kv_key, (b, h, e, d), _STATE_DTYPE.value),
                       jax.random.uniform(k_key, (b, h, e), jnp.float32, 1, 2))]
  step = jax.jit(attend, donate_argnums=3)

  def call():
    y, state[0] = step(q, k, v, state[0])
    return y

  timing = median_ms(call, jax.block_until_ready, repeats=_REPEATS.value, inner=10)
  kv_bytes = jnp.dtype(_STATE_DTYPE.value).itemsize
  moved = 2 * b * h * e * (kv_bytes * d + 4) + 2 * (2 * b * h * f + 2 * b * h * d)
  achieved = moved / (timing["median_ms"] / 1e3)
  return {**timing, "bytes": moved, "achieved_Bps": achieved,
          "fraction_of_copy_bw": achieved / bandwidth}


def main(argv):
  del argv
  bandwidth = copy_bandwidth()
  meta = {**run_metadata("jax-triton", "triton"), "heads": _H.value,
          "feature_dim": _F.value, "feature_width": feature_width(_F.value),
          "copy_bandwidth_Bps": bandwidth, "input_dtype": "bfloat16",
          "state_dtype": {"kv": _STATE_DTYPE.value, "k": "float32"}}
  print(f"device {meta['device']}: copy bandwidth {bandwidth / 1e12:.2f} TB/s", flush=True)
  rows = []
  for d in (int(x) for x in _DV.value):
    for b in (int(x) for x in _B.value):
      cases = [(impl, api_step(impl)) for impl in _IMPLS.value]
      cases += [(f"pallas[{t}]", tiled_step(t)) for t in _TILINGS.value]
      for impl, attend in cases:
        row = {"impl": impl, "batch": b, "D": d}
        try:
          row.update(bench(attend, b, _H.value, _F.value, d, bandwidth))
          msg = (f"{row['median_ms'] * 1e3:8.1f} us  {row['achieved_Bps'] / 1e12:5.2f} TB/s "
                 f"({100 * row['fraction_of_copy_bw']:.0f}% of copy)")
        except Exception as e:  # noqa: BLE001 - record, keep benchmarking the rest
          row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
          msg = row["error"]
        rows.append(row)
        print(f"D={d:4d} B={b:5d} {impl:8s} {msg}", flush=True)
  os.makedirs(os.path.dirname(_OUT.value) or ".", exist_ok=True)
  with open(_OUT.value + ".json", "w") as fh:
    json.dump({"meta": meta, "rows": rows}, fh, indent=1)


if __name__ == "__main__":
  app.run(main)
