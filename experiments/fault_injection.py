"""Kill -9 a short CPU training run at random points, resume it, and compare with an
uninterrupted run: final parameters and final metrics must be bit-identical.

  python -m experiments.fault_injection --trials=20 --out=experiments/results/fault_injection_cpu

Each trial starts `experiments.train` in a subprocess on its own workdir and kills it with
SIGKILL either once a random step has been logged (metrics.jsonl is flushed every step) or
while Orbax is writing a checkpoint (a temporary checkpoint directory exists), then reruns the
same command to the end. Parameters are compared through `based_jax.load_checkpoint`, metrics
through results.json; the metrics logged before the kill must still be in metrics.jsonl.
Writes <out>.json (device, versions, command, every trial).
"""

import json
import os
import random
import shutil
import sys

from absl import app, flags, logging

from experiments.benchmarking import run_metadata
from experiments.fault_harness import (KINDS, TOTAL_STEPS, TRAIN_ARGS, Kill, final_state,
                                       run_to_end, trial)

_TRIALS = flags.DEFINE_integer("trials", 20, "Kill points (half at random steps, half mid-save).")
_SEED = flags.DEFINE_integer("seed", 0, "Seeds the kill points.")
_WORKDIR = flags.DEFINE_string("workdir", "runs/fault_injection",
                               "Parent of the trial workdirs (emptied first).")
_OUT = flags.DEFINE_string("out", "experiments/results/fault_injection_cpu", "Output path prefix.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:  # Orbax's INFO lines would bury the trials
    logging.set_verbosity(logging.WARNING)
  rng = random.Random(_SEED.value)
  shutil.rmtree(_WORKDIR.value, ignore_errors=True)  # fresh trial workdirs every time
  reference_dir = os.path.join(_WORKDIR.value, "uninterrupted")
  run_to_end(reference_dir)
  reference = final_state(reference_dir)
  trials = []
  for i in range(_TRIALS.value):
    kill = Kill(KINDS[i % 2], rng.randint(1, TOTAL_STEPS - 1))
    result = trial(os.path.join(_WORKDIR.value, f"trial_{i}"), kill, reference)
    trials.append(result)
    print(f"trial {i}: {result}", flush=True)
  ok = sum(t["params_bit_identical"] and t["results_equal"] and t["metrics_kept"]
           for t in trials)
  summary = {"trials": len(trials), "bit_identical_resumes": ok,
             "killed_during_a_save": sum(t["during_save"] for t in trials)}
  print(summary)
  os.makedirs(os.path.dirname(_OUT.value) or ".", exist_ok=True)
  with open(_OUT.value + ".json", "w") as f:
    json.dump({"meta": {**run_metadata("orbax-checkpoint", "grain"), "train_args": TRAIN_ARGS},
               "summary": summary, "trials": trials}, f, indent=1)


if __name__ == "__main__":
  app.run(main)
