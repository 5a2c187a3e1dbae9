"""The train loop of `experiments/train.py` (and the MQAR sweeps), for every task.

Builds the task's data (`tasks.py`: MQAR or text), the mesh, state and jitted steps, resumes
from the newest readable checkpoint when there is one (or starts from `init_from`'s
parameters), and trains with a progress bar (loss, tokens/s, MFU on GPUs with a known peak),
periodic evaluation, metrics (JSONL, TensorBoard), checkpoints and early stopping.

Faults: one run per workdir at a time (`workdir.WorkdirLock`); the data are read and checked
before the workdir is touched; whether the run finished is part of every checkpoint, so a
rerun of a finished run trains nothing even if it crashed before writing `results.json`;
SIGTERM and SIGINT (a preempted job, Ctrl-C) stop the run at the next step boundary with a
checkpoint, and a second signal acts as usual.

Multi-host: every process runs this loop (call `jax.distributed.initialize` first); each reads
its share of every batch, Orbax saves and restores on all of them, and only process 0 prints
and writes metrics. Whatever one process finds that changes the course of the run is agreed
by all (`multihost`): process 0's workdir lock, an unreadable checkpoint, and a stop signal,
which stops every process at the same step: the first log step (`log_every`) after any
process received it.
"""

import concurrent.futures
import dataclasses
import json
import os
import signal
import threading
import time
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from based_jax.config import ModelConfig
from based_jax.model import LanguageModel
from based_jax.training import flops, multihost, sharding, step as step_lib
from based_jax.training.checkpointing import (Checkpointer, abstract_like, checkpoint_dir,
                                              load_checkpoint)
from based_jax.training.metrics import MetricWriter
from based_jax.training.optimizer import make_optimizer
from based_jax.training.run_config import MODEL_RUNTIME_FIELDS, RunConfig, json_defaults
from based_jax.training.tasks import make_task
from based_jax.training.workdir import WorkdirLock

RESULTS_FILE = "results.json"


class StopRequest:
  """While active, SIGTERM and SIGINT set `signal` (their name) instead of ending the process,
  and the previous handlers return, so a second signal acts as usual. Only the main thread can
  install handlers; elsewhere this does nothing."""

  def __init__(self):
    self.signal: Optional[str] = None
    self._previous = {}

  def __enter__(self) -> "StopRequest":
    if threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame) -> None:
    del frame
    self.signal = signal.Signals(signum).name
    self._restore()

  def _restore(self) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous = {}

  def __exit__(self, *exc) -> None:
    self._restore()

  def agreed(self, step: int, every: int) -> Optional[str]:
    """The signal that stops the run after `step`. One process: its own, at once. Several:
    every `every` steps, any process's (the others report it as SIGTERM), so that all stop at
    the same step; a collective there."""
    if jax.process_count() == 1:
      return self.signal
    if step % every:
      return None
    return (self.signal or "SIGTERM") if multihost.any_true(self.signal is not None) else None


def _member_key(key: str, lr: float) -> str:
  """A member's name for the task's result or metric `key` (`RunConfig.lr_members`)."""
  return f"{key}/lr{lr:g}"


class _MembersEval:
  """The task's evaluation and done test, and the metric names, for one model or for the
  members of `RunConfig.lr_members`: member results are the task's keys with "/lr<rate>"
  appended (e.g. "test/mean/lr0.001"), and the run is done when every member is."""

  def __init__(self, task, eval_step, members: tuple[float, ...], param_shardings):
    self._task, self.eval_step, self._members = task, eval_step, members
    self._take = jax.jit(step_lib.member, static_argnums=1, out_shardings=param_shardings)

  def __call__(self, params) -> dict[str, float]:
    if not self._members:
      return self._task.evaluate(self.eval_step, params)
    return {_member_key(k, lr): v for m, lr in enumerate(self._members)
            for k, v in self._task.evaluate(self.eval_step, self._take(params, m)).items()}

  def of_member(self, results: dict, lr: float) -> dict:
    suffix = _member_key("", lr)
    return {k[:-len(suffix)]: v for k, v in results.items() if k.endswith(suffix)}

  def done(self, results: dict) -> bool:
    if not self._members:
      return self._task.done(results)
    return bool(results) and all(self._task.done(self.of_member(results, lr))
                                 for lr in self._members)

  def scalars(self, prefix: str, metrics: dict) -> dict[str, float]:
    """Per-step metrics (arrays: scalars, or [members]) as named floats."""
    if not self._members:
      return {prefix + k: float(v) for k, v in metrics.items()}
    return {_member_key(prefix + k, lr): float(v[m]) for k, v in metrics.items()
            for m, lr in enumerate(self._members)}

  def show(self, values) -> str:
    """A metric for the progress bar: one number, or one per member."""
    return "/".join(f"{v:.3f}" for v in np.ravel(np.asarray(values)))

  def headline(self, results: dict) -> dict[str, str]:
    """The task's headline result for the progress bar, if evaluated."""
    key = self._task.headline
    values = [r[key] for r in ([results] if not self._members else
                               [self.of_member(results, lr) for lr in self._members])
              if key in r]
    return {key.split("/")[-1]: "/".join(f"{v:.3f}" for v in values)} if values else {}


def train(run: RunConfig, model_config: ModelConfig, workdir: str,
          steps_this_run: Optional[int] = None) -> tuple[dict, step_lib.TrainState]:
  """Trains (or resumes) and returns a summary and the final train state.

  The summary holds "step", the task's facts (MQAR: "state_bytes") and the evaluation of the
  final step (with `run.lr_members`: "members", one {"lr", evaluation} per member); a run
  stopped by a signal has "interrupted" (the signal's name) instead.
  `steps_this_run` stops (with a checkpoint) after that many steps; rerun to continue.
  """
  mesh = sharding.make_mesh()
  task = make_task(run, model_config, mesh)  # data errors surface before the workdir is used
  with WorkdirLock(workdir), StopRequest() as stop:
    return _train(run, model_config, workdir, steps_this_run, stop, task, mesh)


def _initial_params(run: RunConfig, model_config: ModelConfig):
  """The parameters of `run.init_from`, checked against the run's model config."""
  config, params = load_checkpoint(run.init_from)
  params = jax.device_get(params)  # host arrays: the same on every process, placed by jit
  mine, theirs = (
      {k: v for k, v in dataclasses.asdict(c).items() if k not in MODEL_RUNTIME_FIELDS}
      for c in (model_config, config))
  diffs = sorted(k for k in mine if mine[k] != theirs.get(k))
  if diffs:
    raise ValueError(f"init_from={run.init_from!r} holds a different model: " + ", ".join(
        f"{k} {theirs.get(k)!r} (run: {mine[k]!r})" for k in diffs))
  return params


def compile_ahead(train_step, eval_step, state, params, task, batch_size: int, mesh) -> int:
  """Compiles every program the run's steps will call, all at once in threads: the train step
  and the eval step at each of the task's batch shapes (`task.programs`). XLA compiles outside
  the GIL, so a run with several shapes (MQAR: one per training length and per test slice)
  waits about its longest compile instead of their sum; jit's own cache then serves the loop.
  `state` and `params` are the arguments (arrays or ShapeDtypeStructs with shardings).
  Returns the number of programs."""
  spec = sharding.batch_sharding(mesh)
  batch = lambda t: {k: jax.ShapeDtypeStruct((batch_size, t), jnp.int32, sharding=spec)
                     for k in ("inputs", "labels")}
  jobs = ([(train_step, state, t, q) for t, q in task.programs["train"]] +
          [(eval_step, params, t, q) for t, q in task.programs["eval"]])
  build = lambda step, args, t, max_labels: step.lower(args, batch(t), max_labels).compile()
  with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
    list(pool.map(lambda job: build(*job), jobs))  # raises the first failure
  return len(jobs)


def _train(run: RunConfig, model_config: ModelConfig, workdir: str,
           steps_this_run: Optional[int], stop: StopRequest, task,
           mesh) -> tuple[dict, step_lib.TrainState]:
  run_json = run.to_json(model_config)
  lead = jax.process_index() == 0
  checkpointer = Checkpointer(checkpoint_dir(workdir), run.keep_checkpoints)
  checkpointer.check_compatible(run_json, json_defaults())

  members = run.lr_members
  model = LanguageModel(model_config)
  optimizer = make_optimizer(run.optimizer, unit_rate=bool(members))
  example = jnp.zeros((1, 8), jnp.int32)

  def init(params=None) -> step_lib.TrainState:
    return step_lib.init_state(model, optimizer, run.seed, example, params, len(members))

  shapes = jax.eval_shape(init)
  shardings = step_lib.state_shardings(mesh, shapes)
  one_shapes = shapes if not members else jax.eval_shape(
      lambda: step_lib.init_state(model, optimizer, run.seed, example))  # one member's
  single = shardings if not members else step_lib.state_shardings(mesh, one_shapes)
  iterator = task.train_iterator
  restored = checkpointer.restore(abstract_like(shapes, shardings), iterator,
                                  task.global_data_state)
  if restored is not None:
    state, progress = restored
    if lead:
      print(f"resumed from step {int(state.step)} in {workdir}")
  else:
    params = _initial_params(run, model_config) if run.init_from else None
    state = jax.jit(init, out_shardings=shardings)(params)
    progress = {}
  train_step = step_lib.make_train_step(model, optimizer, mesh, shardings, run.grad_accum_steps,
                                        members)
  members_eval = _MembersEval(task, step_lib.make_eval_step(model, mesh, single.params),
                              members, single.params)

  if lead:
    print(f"model {run.model}: d_model {model_config.d_model}; {task.description}; "
          f"devices: {jax.device_count()}")
  start = int(state.step)
  last = run.optimizer.total_steps
  # The evaluation of the checkpointed step, if it had one.
  results = (progress.get("results") or {}) if progress.get("results_step") == start else {}
  if members_eval.done(results):
    if lead:
      print(f"step {start} already reached the target: nothing to train")
    last = start
  elif start < last:
    tick = time.perf_counter()
    count = compile_ahead(train_step, members_eval.eval_step, state,
                          abstract_like(one_shapes.params, single.params), task,
                          run.batch_size, mesh)
    if lead:
      print(f"compiled {count} programs in {time.perf_counter() - tick:.1f} s")
  peak = flops.peak_flops()
  flops_per_token = None
  writer = MetricWriter(workdir) if lead else None
  bar = tqdm.tqdm(total=run.optimizer.total_steps, initial=start, unit="step",
                  dynamic_ncols=True, disable=not lead)
  interrupted = None  # the signal that stopped the run
  try:
    tokens, tick = 0, time.perf_counter()
    for step in range(start + 1, last + 1):
      batch = sharding.global_batch(next(iterator), mesh)
      state, metrics = train_step(state, batch, task.max_labels(batch))
      tokens += batch["inputs"].size
      finished = step == run.optimizer.total_steps
      interrupted = stop.agreed(step, run.log_every)
      pause = step - start == steps_this_run or interrupted is not None
      if step % run.log_every == 0 or finished or pause:
        postfix = {"loss": members_eval.show(metrics["loss"])}
        metrics = members_eval.scalars("train/", metrics)
        metrics["train/tokens_per_s"] = tokens / (time.perf_counter() - tick)
        postfix["tok_s"] = f"{metrics['train/tokens_per_s']:,.0f}"
        if peak:
          if flops_per_token is None:
            flops_per_token = flops.train_flops_per_token(model_config, batch["inputs"].shape[1])
          metrics["train/mfu"] = (metrics["train/tokens_per_s"] * flops_per_token *
                                  max(len(members), 1) / (peak * jax.device_count()))
          postfix["mfu"] = f"{metrics['train/mfu']:.1%}"
        postfix.update(members_eval.headline(results))
        tokens, tick = 0, time.perf_counter()
        if lead:
          writer.write(step, metrics)
        bar.set_postfix(postfix)
      if step % run.eval_every == 0 or finished:
        results = members_eval(state.params)
        progress = {"results": results, "results_step": step}
        if lead and results:
          writer.write(step, results)
          bar.write(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in results.items()))
        finished = finished or members_eval.done(results)
        tick = time.perf_counter()  # evaluation time is not training throughput
      if step % run.checkpoint_every == 0 or finished or pause:
        checkpointer.save(state, iterator, run_json, model_config,
                          {**progress, "finished": finished})
        if lead:
          writer.flush()
      bar.update(1)
      if finished or pause:
        break
  finally:
    bar.close()
    checkpointer.wait()
    checkpointer.close()
    if lead:
      writer.close()
  summary = {"step": int(state.step), **task.summary()}
  if interrupted is not None:
    return {**summary, "interrupted": interrupted}, state
  if progress.get("results_step") != int(state.step):  # paused between evaluations
    results = members_eval(state.params)
  if members:
    summary["members"] = [{"lr": lr, **members_eval.of_member(results, lr)} for lr in members]
  else:
    summary.update(results)
  if lead:
    tmp = os.path.join(workdir, RESULTS_FILE + ".tmp")
    with open(tmp, "w") as f:
      json.dump(summary, f, indent=1)
    os.replace(tmp, os.path.join(workdir, RESULTS_FILE))
  return summary, state
