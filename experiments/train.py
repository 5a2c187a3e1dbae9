"""Trains a model: on MQAR (synthetic recall, per-slice accuracy) or on text (perplexity).

  python -m experiments.train                       # small BASED, dense MQAR mix, ~2.5 min on 2 cores
  python -m experiments.train --run=text_small      # small BASED on the embedded Bible, CPU minutes
  python -m experiments.train --run=text_small --data=my_corpus/ --workdir=runs/mine
  python -m experiments.train --run=lm_based_360m --data='pile/*.jsonl.gz'   # the paper's recipe
  python -m experiments.train --model=mqar_sliding_window --model_set=window=64

Rerunning the same command resumes from the newest readable checkpoint in --workdir (a run
that reached its --target_accuracy or its --total_steps is complete and trains nothing more).
SIGTERM or Ctrl-C saves a checkpoint at the next step and exits; one run per workdir at a time.
Every run field has a flag (--batch_size, --learning_rate, --seq_len, ...) that overrides the
--run preset; model fields are changed with --model_set field=value (repeatable). Multi-host:
--distributed on every process. The trained model:
`config, params = based_jax.load_checkpoint(workdir)`.
"""

import dataclasses
import os
import signal
import sys
import time

import jax
from absl import app, flags, logging

from based_jax.config import ModelConfig, get_config, preset_names
from based_jax.data import mqar
from based_jax.training import run_config
from based_jax.training.optimizer import OptimizerConfig
from based_jax.training.run_config import (RUN_PRESETS, TASKS, RunConfig, TextConfig,
                                           define_flags, get_run_config, overrides_from_flags,
                                           parse_assignments)
from based_jax.training.trainer import RESULTS_FILE, train

_RUN = flags.DEFINE_enum("run", "mqar_small", sorted(RUN_PRESETS), "Run preset.")
_WORKDIR = flags.DEFINE_string("workdir", None,
                               "Checkpoints and metrics; default runs/<run>_<model>.")
_STEPS_THIS_RUN = flags.DEFINE_integer(
    "steps_this_run", None, "Stop after this many steps (checkpointed); rerun to continue.")
_MODEL_SET = flags.DEFINE_multi_string(
    "model_set", [], "Model field override field=value (repeatable; tuples as 1,2,3), after "
    "the --run preset's own; field one of: "
    f"{', '.join(f.name for f in dataclasses.fields(ModelConfig))}.")
_LR_MEMBERS = flags.DEFINE_list(
    "lr_members", None, "Learning rates trained side by side in one program, one model each "
    "(a learning-rate sweep as one run; the trained models: based_jax.load_checkpoint(workdir, "
    "member=i)). Unset: the --run preset's (one model at --learning_rate).")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Multi-host: call jax.distributed.initialize() first, from "
    "--coordinator_address / --num_processes / --process_id, or where those are unset from "
    "the cluster's environment (SLURM, Open MPI, Kubernetes).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "host:port of process 0 (with --distributed).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes (with --distributed).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process (with --distributed).")
define_flags(RunConfig, RUN_PRESETS, choices={
    "model": preset_names(), "train_mix": sorted(mqar.MIXES), "test_mix": sorted(mqar.MIXES),
    "task": TASKS})
define_flags(TextConfig, {name: run.text for name, run in RUN_PRESETS.items()})
define_flags(OptimizerConfig, {name: run.optimizer for name, run in RUN_PRESETS.items()})
flags.adopt_module_key_flags(run_config)


def resolve_config() -> tuple[RunConfig, ModelConfig]:
  run = get_run_config(_RUN.value)
  optimizer = dataclasses.replace(run.optimizer, **overrides_from_flags(OptimizerConfig))
  text = dataclasses.replace(run.text, **overrides_from_flags(TextConfig))
  run = run.replace(optimizer=optimizer, text=text, **overrides_from_flags(RunConfig))
  run = run.replace(model_set=run.model_set + tuple(_MODEL_SET.value))
  if _LR_MEMBERS.value is not None:
    try:
      rates = tuple(float(lr) for lr in _LR_MEMBERS.value)
    except ValueError as e:
      raise ValueError(f"--lr_members must be learning rates, got {_LR_MEMBERS.value}") from e
    if flags.FLAGS["learning_rate"].present:
      raise ValueError("--learning_rate has no effect with --lr_members (each member trains "
                       "at its own rate): give one of them")
    run = run.replace(lr_members=rates)
  model = get_config(run.model, **parse_assignments(ModelConfig, list(run.model_set)))
  return run, model


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:  # keep Orbax's per-save INFO lines out of the bar
    logging.set_verbosity(logging.WARNING)
  if _DISTRIBUTED.value:
    jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  try:
    run, model_config = resolve_config()
  except ValueError as e:
    raise app.UsageError(str(e)) from e
  workdir = _WORKDIR.value or os.path.join("runs", f"{_RUN.value}_{run.model}")
  start = time.time()
  try:
    summary, _ = train(run, model_config, workdir, _STEPS_THIS_RUN.value)
  except ValueError as e:  # bad data arguments, a busy workdir, incompatible checkpoints
    raise SystemExit(f"error: {e}") from e
  if "interrupted" in summary:
    print(f"\n{summary['interrupted']}: stopped at step {summary['step']} with a checkpoint; "
          "rerun the same command to continue", file=sys.stderr)
    sys.exit(128 + signal.Signals[summary["interrupted"]].value)
  if jax.process_index():
    return
  print(f"\nfinished in {time.time() - start:.0f}s at step {summary['step']}:")
  for results in summary.get("members", [summary]):
    if "lr" in results:  # a member of --lr_members
      print(f"  lr {results['lr']:g} (member {summary['members'].index(results)}):")
    for key, value in results.items():
      if key.startswith(("test/", "val/")):
        print(f"  {key:>16s}  {value:.4f}")
  print(f"results: {os.path.join(workdir, RESULTS_FILE)}")

if __name__ == "__main__":
  app.run(main)
