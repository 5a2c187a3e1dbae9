"""Training throughput: tokens/s and MFU of the real train step, BASED against Transformer++.

  python -m experiments.bench_train --out=experiments/results/train_h200

For every model and sequence length, in one run (each point in a fresh child process, so an
out-of-memory point becomes a recorded result): the jitted train step of `experiments/train.py`
(`based_jax.training.step.make_train_step`: AdamW, clipping, the full LM head, the state
donated) on random tokens, bf16 compute with float32 parameters and residual (the paper's
recipe), softmax attention through `attention_impl=auto` (cuDNN flash attention on a CUDA GPU
in bf16: the strongest baseline). MFU counts `based_jax.training.flops.train_flops_per_token`
(6 N plus the sequence mixing) against the datasheet dense bf16 peak of the device.
Writes <out>.json (device, versions, shapes, command) and <out>.md.

Scaling over devices (weak scaling, the FSDP + data-parallel mesh of `training.sharding`):

  python -m experiments.bench_train --models=based_1b --seq_lens=2048 --devices=1,2,4,8 \
      --out=experiments/results/train_scaling_h200

runs every point on the first 1, 2, 4 and 8 devices with --tokens_per_step tokens per device
(the global batch grows with the device count) and reports tokens/s per device and the
weak-scaling efficiency: tokens/s per device over that of the fewest devices of the same model
and sequence length. Whether XLA overlaps the FSDP all-gathers and gradient reduce-scatters
with compute is read off a profile of the multi-GPU step (`jax.profiler`), not from this
table. A smoke check on fake CPU devices:

  XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \
      python -m experiments.bench_train --models=based_tiny --seq_lens=64 \
      --tokens_per_step=128 --devices=1,2,4,8 --steps=2
"""

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import json  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from based_jax.config import get_config  # noqa: E402
from based_jax.implementations import implementations  # noqa: E402
from based_jax.model import LanguageModel, count_params  # noqa: E402
from based_jax.training import flops, sharding, step as step_lib  # noqa: E402
from based_jax.training.optimizer import OptimizerConfig, make_optimizer  # noqa: E402
from experiments import child_process  # noqa: E402
from experiments.benchmarking import (module_scope, parse_model, profile_scopes,  # noqa: E402
                                     run_metadata)

_MODELS = flags.DEFINE_list("models", ["based_360m", "transformer_pp_360m"],
                            "Model specs 'preset+field=value+...'.")
_SEQ_LENS = flags.DEFINE_list("seq_lens", ["2048", "8192"], "Sequence lengths.")
_TOKENS = flags.DEFINE_integer(
    "tokens_per_step", 16384,
    "Tokens per optimizer step per device (batch = this / seq_len x devices).")
_DEVICES = flags.DEFINE_list("devices", ["1"],
                             "Device counts: each point on the first N devices (weak scaling).")
_ACCUM = flags.DEFINE_integer("grad_accum_steps", 1, "Micro-batches per step.")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps per point (after 3 warm-up steps).")
_OUT = flags.DEFINE_string("out", None, "Write <out>.json and <out>.md.")
_TIMEOUT = flags.DEFINE_integer("timeout_s", 300, "Per-point limit.")
_PROFILE = flags.DEFINE_integer("profile_top", 0, "Also trace one step per point and record "
                                 "its GPU time by layer kind and module, and this many of its "
                                 "largest kernels (0: no profile).")
_CHILD = flags.DEFINE_string("child_request", None, "Internal: run one point (child process).")

WARMUP = 3


def _config(spec: str):
  preset, overrides = parse_model(spec)
  return get_config(preset, **{"dtype": "bfloat16", **overrides})


def profile_step(step, state, data, layer_kinds, top: int) -> dict:
  """GPU milliseconds per step by module scope, and the `top` largest (scope | kernel)."""
  holder = [state]

  def call():
    holder[0], metrics = step(holder[0], data, None)
    return metrics

  text = step.lower(state, data, None).compile().as_text()
  by_scope, by_kernel, _ = profile_scopes(call, jax.block_until_ready, text,
                                          lambda op: module_scope(layer_kinds, op))
  return {"gpu_ms": sum(by_scope.values()) / 1e3,
          "by_scope_ms": {k: v / 1e3 for k, v in by_scope.most_common()},
          "top_kernels_ms": {k: v / 1e3 for k, v in by_kernel.most_common(top)}}


def measure(request: dict, progress) -> dict:
  """One (model, seq_len, devices) point: seconds per step and what follows from it."""
  del progress
  config = _config(request["model"])
  seq_len, batch, devices = request["seq_len"], request["batch"], request["devices"]
  if devices > jax.device_count():
    raise ValueError(f"the point needs {devices} devices; this machine has "
                     f"{jax.device_count()}")
  model, optimizer = LanguageModel(config), make_optimizer(OptimizerConfig())
  mesh = sharding.make_mesh(jax.devices()[:devices])
  init = lambda: step_lib.init_state(model, optimizer, 0, jnp.zeros((1, 8), jnp.int32))
  shardings = step_lib.state_shardings(mesh, jax.eval_shape(init))
  state = jax.jit(init, out_shardings=shardings)()
  step = step_lib.make_train_step(model, optimizer, mesh, shardings, request["grad_accum_steps"])
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, config.vocab_size, (batch, seq_len + 1), dtype=np.int32)
  data = sharding.global_batch({"inputs": tokens[:, :-1], "labels": tokens[:, 1:]}, mesh)
  try:
    compile_start = time.perf_counter()
    for _ in range(WARMUP):
      state, metrics = step(state, data, None)
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - compile_start
    start = time.perf_counter()
    for _ in range(request["steps"]):
      state, metrics = step(state, data, None)
    loss = float(metrics["loss"])
    seconds = (time.perf_counter() - start) / request["steps"]
  except Exception as e:  # noqa: BLE001 - an OOM is a result
    if child_process.is_oom(e):
      raise child_process.OutOfMemory("train_step", child_process.first_line(e)) from e
    raise
  profile = (profile_step(step, state, data, config.layer_kinds, request["profile_top"])
             if request["profile_top"] else None)
  tokens_per_s = batch * seq_len / seconds
  per_token = flops.train_flops_per_token(config, seq_len)
  peak = flops.peak_flops()
  peak_bytes = max((d.memory_stats() or {}).get("peak_bytes_in_use", 0)
                   for d in jax.devices()[:devices])
  return {"model": request["model"], "seq_len": seq_len, "batch": batch, "devices": devices,
          "grad_accum_steps": request["grad_accum_steps"], "params": count_params(config),
          "step_ms": seconds * 1e3, "tokens_per_s": tokens_per_s,
          "tokens_per_s_per_device": tokens_per_s / devices,
          "train_flops_per_token": per_token, "peak_flops": peak,
          "mfu": tokens_per_s * per_token / peak / devices if peak else None,
          "loss": loss, "warmup_s": compile_s,
          "peak_memory_gib": peak_bytes / 2**30,  # the fullest device
          "implementations": implementations(config), "profile": profile}


def add_scaling(rows: list[dict]) -> None:
  """Sets each measured row's "weak_scaling_efficiency": its tokens/s per device over that of
  the measured row with the fewest devices of the same model and sequence length."""
  base = {}
  for r in sorted((r for r in rows if "tokens_per_s" in r), key=lambda r: r["devices"]):
    key = (r["model"], r["seq_len"])
    base.setdefault(key, r["tokens_per_s"] / r["devices"])
    r["weak_scaling_efficiency"] = r["tokens_per_s"] / r["devices"] / base[key]


def _table(rows: list[dict]) -> str:
  lines = ["| model | seq | devices | batch | step ms | tokens/s | tokens/s/device | scaling | "
           "MFU | peak GiB | vs first model |", "|---|---|---|---|---|---|---|---|---|---|---|"]
  base = {}
  for r in rows:
    devices = r.get("devices", 1)
    if "error" in r or "oom" in r:
      lines.append(f"| {r['model']} | {r['seq_len']} | {devices} | {r['batch']} | "
                   f"{'out of memory' if 'oom' in r else 'error'} | | | | | | |")
      continue
    base.setdefault((r["seq_len"], devices), r["tokens_per_s"])
    mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a"
    scaling = r.get("weak_scaling_efficiency")
    lines.append(f"| {r['model']} | {r['seq_len']} | {devices} | {r['batch']} | "
                 f"{r['step_ms']:.1f} | {r['tokens_per_s']:,.0f} | "
                 f"{r['tokens_per_s'] / devices:,.0f} | "
                 f"{'' if scaling is None else f'{scaling:.0%}'} | {mfu} | "
                 f"{r['peak_memory_gib']:.1f} | "
                 f"{r['tokens_per_s'] / base[(r['seq_len'], devices)]:.2f}x |")
  return "\n".join(lines)


def main(argv):
  del argv
  if _CHILD.value:
    child_process.serve(_CHILD.value, measure)
    return
  rows = []
  for seq_len in (int(t) for t in _SEQ_LENS.value):
    if _TOKENS.value % seq_len:
      raise app.UsageError(f"--tokens_per_step={_TOKENS.value} is not a multiple of {seq_len}")
    for spec in _MODELS.value:
      for devices in (int(d) for d in _DEVICES.value):
        request = {"model": spec, "seq_len": seq_len, "devices": devices,
                   "batch": _TOKENS.value // seq_len * devices,
                   "grad_accum_steps": _ACCUM.value, "steps": _STEPS.value,
                   "profile_top": _PROFILE.value}
        try:
          row = child_process.run_child("experiments.bench_train", request, 0.95,
                                        _TIMEOUT.value)
        except child_process.OutOfMemory as e:
          row = {**request, "oom": str(e)}
        except (RuntimeError, TimeoutError) as e:
          row = {**request, "error": str(e)[-2000:]}
        rows.append(row)
        print(json.dumps(row), flush=True)
  add_scaling(rows)
  table = _table(rows)
  print(table)
  if _OUT.value:
    os.makedirs(os.path.dirname(_OUT.value) or ".", exist_ok=True)
    with open(_OUT.value + ".json", "w") as f:
      json.dump({**run_metadata("optax", "jax-triton"), "mfu_peak": "datasheet dense bf16",
                 "rows": rows}, f, indent=1)
    with open(_OUT.value + ".md", "w") as f:
      f.write(f"Train step, bf16 compute, float32 params ({jax.devices()[0].device_kind}; "
              f"MFU of the datasheet dense bf16 peak)\n\n{table}\n")


if __name__ == "__main__":
  app.run(main)
