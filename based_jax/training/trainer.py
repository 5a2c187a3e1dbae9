"""The MQAR training loop of `experiments/train.py`, `mqar_sweep.py` and `state_precision.py`.

Generates the train and test mixes, builds the mesh, state and jitted steps, resumes from the
newest readable checkpoint when there is one, and trains with a progress bar, periodic
per-slice evaluation, metrics (JSONL, TensorBoard), checkpoints and early stopping.

Faults: one run per workdir at a time (`workdir.WorkdirLock`); whether the run finished is
part of every checkpoint, so a rerun of a finished run trains nothing even if it crashed before
writing `results.json`; SIGTERM and SIGINT (a preempted job, Ctrl-C) stop the run at the next
step boundary with a checkpoint, and a second signal acts as usual.
"""

import functools
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
from absl import logging

from based_jax.config import ModelConfig
from based_jax.data import mqar, pipeline
from based_jax.model import LanguageModel
from based_jax.state_size import state_size_bytes
from based_jax.training import sharding, step as step_lib
from based_jax.training.checkpointing import Checkpointer, abstract_like, checkpoint_dir
from based_jax.training.metrics import MetricWriter
from based_jax.training.optimizer import make_optimizer
from based_jax.training.run_config import RunConfig
from based_jax.training.workdir import WorkdirLock

RESULTS_FILE = "results.json"


def evaluate(eval_step, params, test_slices, test_sets, batch_size: int,
             mesh) -> dict[str, float]:
  """Per-query accuracy of every test slice, and their mean."""
  results = {}
  for spec, data in zip(test_slices, test_sets):
    correct = count = 0
    for batch in pipeline.make_eval_batches(data.inputs, data.labels, batch_size=batch_size):
      c, n = eval_step(params, jax.device_put(batch, sharding.batch_sharding(mesh)),
                       spec.num_kv_pairs)
      correct, count = correct + int(c), count + int(n)
    results[f"test/{spec.name}"] = correct / max(count, 1)
  results["test/mean"] = float(np.mean(list(results.values())))
  return results


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


def train(run: RunConfig, model_config: ModelConfig, workdir: str,
          steps_this_run: Optional[int] = None) -> tuple[dict, step_lib.TrainState]:
  """Trains (or resumes) and returns a summary and the final train state.

  The summary holds "step", "state_bytes" and the test metrics of the final step; a run
  stopped by a signal has "interrupted" (the signal's name) instead of test metrics.
  `steps_this_run` stops (with a checkpoint) after that many steps; rerun to continue.
  """
  with WorkdirLock(workdir), StopRequest() as stop:
    return _train(run, model_config, workdir, steps_this_run, stop)


def _train(run: RunConfig, model_config: ModelConfig, workdir: str,
           steps_this_run: Optional[int], stop: StopRequest) -> tuple[dict, step_lib.TrainState]:
  run_json = run.to_json(model_config)
  checkpointer = Checkpointer(checkpoint_dir(workdir), run.keep_checkpoints)
  checkpointer.check_compatible(run_json)

  train_slices, test_slices = mqar.get_mix(run.train_mix), mqar.get_mix(run.test_mix)
  logging.info("generating MQAR data: %s", run.train_mix)
  train_data = mqar.generate_mix(train_slices, split="train", vocab_size=run.vocab_size,
                                 seed=run.seed)
  test_sets = mqar.generate_mix(test_slices, split="test", vocab_size=run.vocab_size,
                                seed=run.seed)
  # Labelled positions per row, by sequence length (each training batch has one length).
  max_labels = {}
  for s in train_slices:
    max_labels[s.seq_len] = max(max_labels.get(s.seq_len, 0), s.num_kv_pairs)

  mesh = sharding.make_mesh()
  model, optimizer = LanguageModel(model_config), make_optimizer(run.optimizer)
  example = jnp.zeros((1, 8), jnp.int32)
  shapes = jax.eval_shape(lambda: step_lib.init_state(model, optimizer, run.seed, example))
  shardings = step_lib.state_shardings(mesh, shapes)
  iterator = pipeline.make_train_iterator(train_data, batch_size=run.batch_size, seed=run.seed)
  restored = checkpointer.restore(abstract_like(shapes, shardings), iterator)
  if restored is not None:
    state, progress = restored
    print(f"resumed from step {int(state.step)} in {workdir}")
  else:
    state = jax.jit(lambda: step_lib.init_state(model, optimizer, run.seed, example),
                    out_shardings=shardings)()
    progress = {}
  train_step = step_lib.make_train_step(model, optimizer, mesh, shardings)
  eval_step = step_lib.make_eval_step(model, mesh, shardings.params)
  evaluate_now = functools.partial(evaluate, eval_step, test_slices=test_slices,
                                   test_sets=test_sets, batch_size=run.batch_size, mesh=mesh)

  state_bytes = state_size_bytes(model_config, max(s.seq_len for s in test_slices)).total
  print(f"model {run.model}: d_model {model_config.d_model}, state {state_bytes:,} bytes; "
        f"{sum(len(d.inputs) for d in train_data):,} training sequences; "
        f"devices: {jax.device_count()}")
  start = int(state.step)
  last = run.optimizer.total_steps
  # The evaluation of the checkpointed step, if it had one.
  results = (progress.get("results") or {}) if progress.get("results_step") == start else {}
  if results and results["test/mean"] >= run.target_accuracy:
    print(f"step {start} already reached the target accuracy {run.target_accuracy}: "
          "nothing to train")
    last = start
  writer = MetricWriter(workdir)
  bar = tqdm.tqdm(total=run.optimizer.total_steps, initial=start, unit="step", dynamic_ncols=True)
  try:
    tokens, tick = 0, time.perf_counter()
    for step in range(start + 1, last + 1):
      batch = jax.device_put(next(iterator), sharding.batch_sharding(mesh))
      state, metrics = train_step(state, batch, max_labels[batch["inputs"].shape[1]])
      tokens += batch["inputs"].size
      finished = step == run.optimizer.total_steps
      pause = step - start == steps_this_run or stop.signal is not None
      if step % run.log_every == 0 or finished or pause:
        metrics = {f"train/{k}": float(v) for k, v in metrics.items()}
        metrics["train/tokens_per_s"] = tokens / (time.perf_counter() - tick)
        tokens, tick = 0, time.perf_counter()
        writer.write(step, metrics)
        bar.set_postfix(loss=f"{metrics['train/loss']:.3f}",
                        acc=f"{metrics['train/accuracy']:.3f}",
                        tok_s=f"{metrics['train/tokens_per_s']:,.0f}",
                        test=f"{results.get('test/mean', float('nan')):.3f}")
      if step % run.eval_every == 0 or finished:
        results = evaluate_now(state.params)
        progress = {"results": results, "results_step": step}
        writer.write(step, results)
        bar.write(f"step {step}: " + ", ".join(f"{k[5:]} {v:.4f}" for k, v in results.items()))
        finished = finished or results["test/mean"] >= run.target_accuracy
      if step % run.checkpoint_every == 0 or finished or pause:
        checkpointer.save(state, iterator, run_json, model_config,
                          {**progress, "finished": finished})
        writer.flush()
      bar.update(1)
      if finished or pause:
        break
  finally:
    bar.close()
    checkpointer.wait()
    checkpointer.close()
    writer.close()
  summary = {"step": int(state.step), "state_bytes": state_bytes}
  if stop.signal is not None:
    return {**summary, "interrupted": stop.signal}, state
  if progress.get("results_step") != int(state.step):  # paused between evaluations
    results = evaluate_now(state.params)
  summary.update(results)
  tmp = os.path.join(workdir, RESULTS_FILE + ".tmp")
  with open(tmp, "w") as f:
    json.dump(summary, f, indent=1)
  os.replace(tmp, os.path.join(workdir, RESULTS_FILE))
  return summary, state
