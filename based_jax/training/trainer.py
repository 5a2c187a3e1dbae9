"""The MQAR training loop shared by `train.py` and `mqar_sweep.py` (no flags here).

Generates the train and test mixes, builds the mesh, state and jitted steps, resumes from the
latest checkpoint when there is one, and trains with a progress bar, periodic per-slice
evaluation, metrics (JSONL, TensorBoard), checkpoints and early stopping.
"""

import json
import os
import time
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from absl import logging

from based_jax.config import ModelConfig
from based_jax.model import LanguageModel
from based_jax.state_size import state_size_bytes
from based_jax.training import sharding, step as step_lib
from based_jax.training.checkpointing import Checkpointer, abstract_like
from based_jax.training.metrics import MetricWriter
from based_jax.training.optimizer import make_optimizer
from based_jax.training.run_config import RunConfig
from based_jax.data import mqar, pipeline


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


def reached_target(workdir: str, step: int, target: float) -> bool:
  """Whether the run in `workdir` stopped at `step` because its test mean reached `target`
  (its results.json says so); a missing or unreadable file means no."""
  try:
    with open(os.path.join(workdir, "results.json")) as f:
      summary = json.load(f)
    return summary["step"] == step and summary["test/mean"] >= target
  except (OSError, ValueError, KeyError, TypeError):
    return False


def train(run: RunConfig, model_config: ModelConfig, workdir: str,
          steps_this_run: Optional[int] = None) -> tuple[dict[str, float], step_lib.TrainState]:
  """Trains (or resumes) and returns the final test metrics and train state.

  `steps_this_run` stops (with a checkpoint) after that many steps; rerun to continue.
  """
  config_json = run.to_json(model_config)
  checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"), run.keep_checkpoints)
  checkpointer.check_compatible(config_json)

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
  if checkpointer.latest_step() is not None:
    state = checkpointer.restore(abstract_like(shapes, shardings), iterator)
    print(f"resumed from step {int(state.step)} in {workdir}")
  else:
    state = jax.jit(lambda: step_lib.init_state(model, optimizer, run.seed, example),
                    out_shardings=shardings)()
  train_step = step_lib.make_train_step(model, optimizer, mesh, shardings)
  eval_step = step_lib.make_eval_step(model, mesh, shardings.params)

  writer = MetricWriter(workdir)
  state_bytes = state_size_bytes(model_config, max(s.seq_len for s in test_slices)).total
  print(f"model {run.model}: d_model {model_config.d_model}, state {state_bytes:,} bytes; "
        f"{sum(len(d.inputs) for d in train_data):,} training sequences; "
        f"devices: {jax.device_count()}")
  start = int(state.step)
  last = run.optimizer.total_steps
  if reached_target(workdir, start, run.target_accuracy):
    print(f"step {start} already reached the target accuracy {run.target_accuracy} "
          f"({os.path.join(workdir, 'results.json')}): nothing to train")
    last = start
  results: dict[str, float] = {}
  bar = tqdm.tqdm(total=run.optimizer.total_steps, initial=start, unit="step", dynamic_ncols=True)
  tokens, tick = 0, time.perf_counter()
  for step in range(start + 1, last + 1):
    batch = jax.device_put(next(iterator), sharding.batch_sharding(mesh))
    state, metrics = train_step(state, batch, max_labels[batch["inputs"].shape[1]])
    tokens += batch["inputs"].size
    done = step == run.optimizer.total_steps or step - start == steps_this_run
    if step % run.log_every == 0 or done:
      metrics = {f"train/{k}": float(v) for k, v in metrics.items()}
      metrics["train/tokens_per_s"] = tokens / (time.perf_counter() - tick)
      tokens, tick = 0, time.perf_counter()
      writer.write(step, metrics)
      bar.set_postfix(loss=f"{metrics['train/loss']:.3f}", acc=f"{metrics['train/accuracy']:.3f}",
                      tok_s=f"{metrics['train/tokens_per_s']:,.0f}",
                      test=f"{results.get('test/mean', float('nan')):.3f}")
    if step % run.eval_every == 0 or done:
      results = evaluate(eval_step, state.params, test_slices, test_sets, run.batch_size, mesh)
      writer.write(step, results)
      bar.write(f"step {step}: " + ", ".join(f"{k[5:]} {v:.4f}" for k, v in results.items()))
      done = done or results["test/mean"] >= run.target_accuracy
    if step % run.checkpoint_every == 0 or done:
      checkpointer.save(state, iterator, config_json)
    bar.update(1)
    if done:
      break
  bar.close()
  checkpointer.wait()
  checkpointer.close()
  writer.close()
  if not results:  # resumed a finished run (all steps done, or the target reached)
    results = evaluate(eval_step, state.params, test_slices, test_sets, run.batch_size, mesh)
  summary = {"step": int(state.step), "state_bytes": state_bytes, **results}
  with open(os.path.join(workdir, "results.json"), "w") as f:
    json.dump(summary, f, indent=1)
  return summary, state
