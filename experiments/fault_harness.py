"""The fault-injection harness of `experiments/fault_injection.py` and the fault tests: a tiny
training run in a subprocess (MQAR by default, `args` for another run such as text), killed at
a step or mid-save, resumed, and compared with an uninterrupted run (bit-identical parameters,
equal results)."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from typing import Optional, Sequence

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOTAL_STEPS = 30
# A tiny MQAR run: 30 steps, a checkpoint every 3, an evaluation every 5, one log line per step.
TRAIN_ARGS = ("--model=mqar_based", "--model_set=d_model=32", "--model_set=la_feature_dim=4",
              "--train_mix=tiny_train", "--test_mix=tiny_test", "--batch_size=16",
              "--eval_every=5", "--log_every=1", "--checkpoint_every=3", "--keep_checkpoints=3",
              "--learning_rate=3e-3", "--warmup_steps=3", f"--total_steps={TOTAL_STEPS}",
              "--target_accuracy=1.1")
KINDS = ("step", "mid_save")


def train_command(workdir: str, args: Sequence[str] = TRAIN_ARGS) -> list[str]:
  return [sys.executable, "-m", "experiments.train", *args, f"--workdir={workdir}"]


def run_to_end(workdir: str, timeout_s: int = 300,
               args: Sequence[str] = TRAIN_ARGS) -> subprocess.CompletedProcess:
  result = subprocess.run(train_command(workdir, args), cwd=ROOT, capture_output=True, text=True,
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
                 timeout_s: float = 300, args: Sequence[str] = TRAIN_ARGS) -> Kill:
  """Starts the run and sends `sig` at the kill point; returns the kill as it happened."""
  process = subprocess.Popen(train_command(workdir, args), cwd=ROOT, stdout=subprocess.DEVNULL,
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


def trial(workdir: str, kill: Kill, reference, args: Sequence[str] = TRAIN_ARGS) -> dict:
  """One kill, the resume, and the comparison."""
  kill = run_and_kill(workdir, kill, args=args)
  before = logged_steps(workdir)
  run_to_end(workdir, args=args)
  after = logged_steps(workdir)
  return {**dataclasses.asdict(kill), **same_run(workdir, reference),
          "metrics_kept": after[:len(before)] == before}
