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

import dataclasses
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from typing import Optional

import numpy as np
from absl import app, flags, logging

_TRIALS = flags.DEFINE_integer("trials", 20, "Kill points (half at random steps, half mid-save).")
_SEED = flags.DEFINE_integer("seed", 0, "Seeds the kill points.")
_WORKDIR = flags.DEFINE_string("workdir", "runs/fault_injection",
                               "Parent of the trial workdirs (emptied first).")
_OUT = flags.DEFINE_string("out", "experiments/results/fault_injection_cpu", "Output path prefix.")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOTAL_STEPS = 30
# A tiny MQAR run: 30 steps, a checkpoint every 3, an evaluation every 5, one log line per step.
TRAIN_ARGS = ("--model=mqar_based", "--model_set=d_model=32", "--model_set=la_feature_dim=4",
              "--train_mix=tiny_train", "--test_mix=tiny_test", "--batch_size=16",
              "--eval_every=5", "--log_every=1", "--checkpoint_every=3", "--keep_checkpoints=3",
              "--learning_rate=3e-3", "--warmup_steps=3", f"--total_steps={TOTAL_STEPS}",
              "--target_accuracy=1.1")
KINDS = ("step", "mid_save")


def train_command(workdir: str, *extra: str) -> list[str]:
  return [sys.executable, "-m", "experiments.train", *TRAIN_ARGS, f"--workdir={workdir}", *extra]


def run_to_end(workdir: str, timeout_s: int = 300) -> subprocess.CompletedProcess:
  result = subprocess.run(train_command(workdir), cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout_s)
  if result.returncode:
    raise RuntimeError(f"training in {workdir} failed ({result.returncode}):\n{result.stderr}")
  return result


def logged_steps(workdir: str) -> list[int]:
  """Steps of the metrics.jsonl records written so far (complete lines only)."""
  try:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
      return [json.loads(line)["step"] for line in f if line.endswith("\n")]
  except FileNotFoundError:
    return []


def saving(workdir: str) -> bool:
  """Whether Orbax is writing a checkpoint now (its temporary directory exists)."""
  try:
    return any(".orbax-checkpoint-tmp" in name
               for name in os.listdir(os.path.join(workdir, "checkpoints")))
  except FileNotFoundError:
    return False


@dataclasses.dataclass
class Kill:
  """Where a run was killed."""
  kind: str  # "step": after `target` was logged; "mid_save": while a checkpoint was written.
  target: int  # the step to wait for ("step"), or the first step to watch saves from.
  killed_after_step: Optional[int] = None  # last logged step when the signal went out.
  during_save: bool = False  # a temporary checkpoint directory existed at the kill.
  exit_code: Optional[int] = None  # of the killed process (-9 for SIGKILL).


def run_and_kill(workdir: str, kill: Kill, sig: int = signal.SIGKILL,
                 timeout_s: float = 300) -> Kill:
  """Starts the run and sends `sig` at the kill point; returns the kill as it happened."""
  process = subprocess.Popen(train_command(workdir), cwd=ROOT, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
  deadline = time.monotonic() + timeout_s
  try:
    while process.poll() is None and time.monotonic() < deadline:
      steps = logged_steps(workdir)
      last = steps[-1] if steps else 0
      if (kill.kind == "step" and last >= kill.target) or (
          kill.kind == "mid_save" and last >= kill.target and saving(workdir)):
        kill.during_save = saving(workdir)
        process.send_signal(sig)
        kill.killed_after_step = last
        break
      time.sleep(0.0005)
    kill.exit_code = process.wait(timeout=60)
  finally:
    if process.poll() is None:
      process.kill()
  if kill.killed_after_step is None:
    raise RuntimeError(f"the run ended before the kill point {kill}")
  return kill


def final_state(workdir: str) -> tuple[list[np.ndarray], dict]:
  """The final parameters (flattened) and results.json of a finished run."""
  import jax  # pylint: disable=g-import-not-at-top - only the comparison needs jax here
  from based_jax import load_checkpoint  # pylint: disable=g-import-not-at-top
  _, params = load_checkpoint(workdir)
  with open(os.path.join(workdir, "results.json")) as f:
    return [np.asarray(x) for x in jax.tree.leaves(params)], json.load(f)


def same_run(workdir: str, reference: tuple[list[np.ndarray], dict]) -> dict:
  """Compares a finished run with the reference: bit-identical params and equal metrics."""
  params, results = final_state(workdir)
  return {"params_bit_identical": len(params) == len(reference[0]) and all(
              a.dtype == b.dtype and np.array_equal(a, b) for a, b in zip(params, reference[0])),
          "results_equal": results == reference[1]}


def trial(workdir: str, kill: Kill, reference) -> dict:
  """One kill, the resume, and the comparison."""
  kill = run_and_kill(workdir, kill)
  before = logged_steps(workdir)
  run_to_end(workdir)
  after = logged_steps(workdir)
  return {**dataclasses.asdict(kill), **same_run(workdir, reference),
          "metrics_kept": after[:len(before)] == before}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:  # Orbax's INFO lines would bury the trials
    logging.set_verbosity(logging.WARNING)
  from experiments.benchmarking import run_metadata  # pylint: disable=g-import-not-at-top
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
