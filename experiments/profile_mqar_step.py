"""Where an MQAR training run's time goes: the trainer's loop against the bare step, and the
step's GPU time by module at each training length.

  python -m experiments.profile_mqar_step --out=experiments/results/mqar_step_h200
  python -m experiments.profile_mqar_step --run=mqar_small --model_set= --steps=20   # CPU
  python -m experiments.profile_mqar_step --lr_members=1e-3,3.2e-3,1e-2,3.2e-2   # one program

The default is the `paper_figure2` sweep's point BASED d=128 d'=16 as the grid trains it
(`mqar_zoology`, zoology's blocks, embedding dropout 0.1) in bf16. In one process it measures:
- `iterator_ms`: the grain iterator's time per batch alone;
- `loop_ms`: a step as the trainer takes it (a batch from the grain iterator, placed on the
  devices, the jitted step), per step over --steps steps;
- `device_batches_ms`: the same steps on batches already on the devices: the device's work or
  the host's dispatch, whichever bounds;
- `enqueue_ms`: the host's time to launch one step without waiting for it;
- `gpu_by_length`: on a GPU, one step's GPU time by module scope (a `jax.profiler` trace) at
  each training length of the mix, and its largest kernels;
- `first_eval_s` (compiling every test length) and `eval_s` (a second evaluation).
Writes <out>.json with the device, versions and command.
"""

import json
import time

import jax
import jax.numpy as jnp
from absl import app, flags

from based_jax.config import ModelConfig, get_config
from based_jax.model import LanguageModel
from based_jax.training import sharding, step as step_lib
from based_jax.training.optimizer import make_optimizer
from based_jax.training.run_config import RUN_PRESETS, get_run_config, parse_assignments
from based_jax.training.tasks import make_task
from experiments.benchmarking import module_scope, profile_scopes, run_metadata

_RUN = flags.DEFINE_enum("run", "mqar_zoology", sorted(RUN_PRESETS), "Run preset (MQAR).")
_MODEL = flags.DEFINE_string("model", "mqar_based", "Model preset.")
_MODEL_SET = flags.DEFINE_list(
    "model_set", ["d_model=128", "la_feature_dim=16", "embed_dropout=0.1",
                  "block_style=zoology", "dtype=bfloat16"],
    "Model field overrides field=value, comma-separated ('' for none).")
_MEMBERS = flags.DEFINE_list("lr_members", [], "Profile a run of these learning rates side "
                             "by side (RunConfig.lr_members; evaluations of member 0); empty: "
                             "one model at the run's rate.")
_STEPS = flags.DEFINE_integer("steps", 500, "Steps per timed loop.")
_TOP = flags.DEFINE_integer("top", 12, "Largest kernels recorded per training length.")
_OUT = flags.DEFINE_string("out", None, "Write <out>.json.")


def profile(run_name: str, config: ModelConfig, steps: int, top: int,
            members: tuple[float, ...] = ()) -> dict:
  run = get_run_config(run_name).replace(lr_members=members)
  if run.task != "mqar":
    raise ValueError(f"run {run_name!r} trains {run.task!r}; this profiles MQAR runs")
  mesh = sharding.make_mesh()
  task = make_task(run, config, mesh)
  model = LanguageModel(config)
  optimizer = make_optimizer(run.optimizer, unit_rate=bool(members))
  init = lambda count: lambda: step_lib.init_state(  # stacked, or one member (count 0)
      model, optimizer, run.seed, jnp.zeros((1, 8), jnp.int32), members=count)
  shardings = step_lib.state_shardings(mesh, jax.eval_shape(init(len(members))))
  param_shardings = step_lib.state_shardings(mesh, jax.eval_shape(init(0))).params
  state = jax.jit(init(len(members)), out_shardings=shardings)()
  train_step = step_lib.make_train_step(model, optimizer, mesh, shardings, 1, members)
  iterator = task.train_iterator

  def placed(batch):
    return sharding.global_batch(batch, mesh), task.max_labels(batch)

  def timed(batches, wait: bool = True) -> float:
    """Milliseconds per step over `batches` (an iterable of placed batches), from the first
    launch to the last step's end (or, `wait` False, to the last launch)."""
    nonlocal state
    start, count = time.perf_counter(), 0
    for batch in batches:
      state, metrics = train_step(state, *batch)
      count += 1
    if wait:
      jax.block_until_ready(metrics)
    ms = (time.perf_counter() - start) / count * 1e3
    jax.block_until_ready(metrics)
    return ms

  start = time.perf_counter()
  for _ in range(max(steps, 200)):
    next(iterator)
  iterator_ms = (time.perf_counter() - start) / max(steps, 200) * 1e3
  timed([placed(next(iterator)) for _ in range(50)])  # compiles every training length
  result = {"steps": steps, "iterator_ms": iterator_ms,
            "loop_ms": timed(placed(next(iterator)) for _ in range(steps))}  # as the trainer
  on_device = [placed(next(iterator)) for _ in range(steps)]
  jax.block_until_ready(on_device)
  result["device_batches_ms"] = timed(on_device)
  result["enqueue_ms"] = timed(on_device, wait=False)

  result["gpu_by_length"] = {}
  if jax.default_backend() == "gpu":
    by_length = {batch[0]["inputs"].shape[1]: batch for batch in on_device}
    for length, batch in sorted(by_length.items()):
      holder = [state]

      def call(batch=batch):
        holder[0], out = train_step(holder[0], *batch)
        return out

      text = train_step.lower(state, *batch).compile().as_text()
      by_scope, by_kernel, _ = profile_scopes(call, jax.block_until_ready, text,
                                              lambda op: module_scope(config.layer_kinds, op), 5)
      state = holder[0]
      result["gpu_by_length"][str(length)] = {
          "gpu_ms": sum(by_scope.values()) / 1e3,
          "by_scope_ms": {k: v / 1e3 for k, v in by_scope.most_common()},
          "top_kernels_ms": {k: v / 1e3 for k, v in by_kernel.most_common(top)}}

  eval_step = step_lib.make_eval_step(model, mesh, param_shardings)
  params = step_lib.member(state.params, 0) if members else state.params
  for key in ("first_eval_s", "eval_s"):
    start = time.perf_counter()
    task.evaluate(eval_step, params)
    result[key] = time.perf_counter() - start
  return result


def main(argv):
  del argv
  overrides = parse_assignments(ModelConfig, [a for a in _MODEL_SET.value if a])
  members = tuple(float(lr) for lr in _MEMBERS.value)
  result = {**run_metadata("optax", "grain"), "run": _RUN.value, "model": _MODEL.value,
            "model_set": _MODEL_SET.value, "lr_members": members,
            **profile(_RUN.value, get_config(_MODEL.value, **overrides), _STEPS.value,
                      _TOP.value, members)}
  summary = {k: v for k, v in result.items() if k.endswith(("_ms", "_s"))}
  summary.update({f"gpu_ms_T{k}": v["gpu_ms"] for k, v in result["gpu_by_length"].items()})
  print(json.dumps(summary, indent=1))
  if _OUT.value:
    with open(_OUT.value + ".json", "w") as f:
      json.dump(result, f, indent=1)


if __name__ == "__main__":
  app.run(main)
