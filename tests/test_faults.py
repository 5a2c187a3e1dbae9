"""Nothing lost, nothing silent: training under kill -9 (at a step and mid-save), SIGTERM, a
corrupt newest checkpoint, a crash before results.json and a second run on the same workdir.
Every resumed run ends bit-identical to an uninterrupted one, and no earlier file is lost.

The subprocess cases use `experiments/fault_harness.py`, the harness of the committed 20-trial
benchmark `experiments/fault_injection.py`; the others call the training loop in this process.
"""

import dataclasses
import json
import os
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from based_jax import load_checkpoint
from based_jax.config import get_config
from based_jax.training.optimizer import OptimizerConfig
from based_jax.training.run_config import RunConfig
from based_jax.training.trainer import RESULTS_FILE, train
from based_jax.training.workdir import LOCK_NAME, WorkdirBusy, WorkdirLock
from experiments import fault_harness as fi

RUN = RunConfig(train_mix="tiny_train", test_mix="tiny_test", batch_size=16, eval_every=5,
                log_every=5, checkpoint_every=3, keep_checkpoints=10,
                optimizer=OptimizerConfig(learning_rate=3e-3, warmup_steps=3, total_steps=14))
MODEL = get_config("mqar_based", d_model=32, la_feature_dim=4)


def params_equal(a, b) -> bool:
  return all(np.array_equal(np.asarray(x), np.asarray(y))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  """The in-process reference run: its summary and final params."""
  summary, state = train(RUN, MODEL, str(tmp_path_factory.mktemp("whole")))
  return summary, state.params


@pytest.fixture(scope="module")
def cli_reference(tmp_path_factory):
  """The reference of the subprocess cases: the fault-injection run, uninterrupted."""
  workdir = str(tmp_path_factory.mktemp("cli_whole"))
  fi.run_to_end(workdir)
  return fi.final_state(workdir)


def test_corrupt_newest_checkpoints_fall_back_to_the_newest_readable_one(tmp_path, uninterrupted):
  train(RUN, MODEL, str(tmp_path), steps_this_run=10)  # checkpoints 3, 6, 9, 10
  checkpoints = tmp_path / "checkpoints"
  (checkpoints / "10" / "config" / "metadata").write_text("")  # JSON: "Expecting value"
  for root, _, files in os.walk(checkpoints / "9" / "state"):  # arrays: truncated files
    for name in files:
      open(os.path.join(root, name), "w").close()
  with pytest.warns(UserWarning) as warned:
    summary, state = train(RUN, MODEL, str(tmp_path))
  messages = " ".join(str(w.message) for w in warned)
  for step in (10, 9):
    assert f"checkpoint step {step} at {checkpoints / str(step)} cannot be read" in messages
    assert (checkpoints / f"{step}.unreadable").is_dir()  # set aside, not deleted
  assert summary == uninterrupted[0] and params_equal(state.params, uninterrupted[1])


def test_a_finished_run_stays_finished_after_a_crash_before_its_results_file(tmp_path):
  run = RUN.replace(target_accuracy=0.0)  # stops at the first evaluation, step 5
  first, first_state = train(run, MODEL, str(tmp_path))
  os.remove(tmp_path / RESULTS_FILE)  # the crash: checkpointed, results.json never written
  again, again_state = train(run, MODEL, str(tmp_path))
  assert again == first and again["step"] == 5
  assert json.loads((tmp_path / RESULTS_FILE).read_text()) == first
  assert params_equal(first_state.params, again_state.params)
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["3", "5"]


def test_one_run_per_workdir(tmp_path, capsys):
  with WorkdirLock(str(tmp_path)):
    with pytest.raises(WorkdirBusy, match=rf"in use by pid {os.getpid()} on host"):
      train(RUN, MODEL, str(tmp_path))
  assert not (tmp_path / "checkpoints").exists() or not os.listdir(tmp_path / "checkpoints")
  # A lock left by a dead process (its flock is gone) is taken over with a message.
  (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": 999999, "host": "gone",
                                                "started": "2026-01-01T00:00:00"}))
  summary, _ = train(RUN, MODEL, str(tmp_path), steps_this_run=2)
  assert summary["step"] == 2
  assert "taking over the stale lock of pid 999999 on host gone" in capsys.readouterr().err


def test_evaluate_mqar_from_a_workdir_reproduces_the_runs_results(tmp_path):
  run = RUN.replace(optimizer=dataclasses.replace(RUN.optimizer, learning_rate=2e-2))
  summary, _ = train(run, MODEL, str(tmp_path / "run"))
  out = tmp_path / "eval.json"
  result = subprocess.run([sys.executable, "-m", "experiments.evaluate_mqar",
                           f"--workdir={tmp_path / 'run'}", f"--out={out}"], cwd=fi.ROOT,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  evaluated = json.loads(out.read_text())
  assert {k: v for k, v in evaluated.items() if k.startswith("test/")} == {
      k: v for k, v in summary.items() if k.startswith("test/")}


def test_load_checkpoint_restores_the_runs_exact_config_and_params(tmp_path):
  model = MODEL.replace(la_state_dtype="bfloat16", linear_attention_impl="xla")
  _, state = train(RUN, model, str(tmp_path), steps_this_run=4)
  config, params = load_checkpoint(str(tmp_path))
  assert config == model and params_equal(params, state.params)
  config, params = load_checkpoint(str(tmp_path / "checkpoints"), step=3)
  assert config == model and not params_equal(params, state.params)
  with pytest.raises(ValueError, match="no checkpoint of step 7"):
    load_checkpoint(str(tmp_path), step=7)
  with pytest.raises(ValueError, match="no checkpoints in"):
    load_checkpoint(str(tmp_path / "elsewhere"))


@pytest.mark.parametrize("kind", fi.KINDS)
def test_kill_9_then_resume_is_bit_identical(tmp_path, cli_reference, kind):
  result = fi.trial(str(tmp_path), fi.Kill(kind, target=7), cli_reference)
  assert result["params_bit_identical"] and result["results_equal"], result
  assert result["metrics_kept"], result


def test_sigterm_checkpoints_at_the_next_step_and_exits_cleanly(tmp_path, cli_reference):
  kill = fi.run_and_kill(str(tmp_path), fi.Kill("step", target=10), sig=signal.SIGTERM)
  steps = fi.logged_steps(str(tmp_path))
  saved = sorted(int(s) for s in os.listdir(tmp_path / "checkpoints") if s.isdigit())
  assert saved[-1] == steps[-1] >= kill.killed_after_step  # saved where it stopped
  assert saved[-1] < fi.TOTAL_STEPS and not (tmp_path / RESULTS_FILE).exists()
  assert kill.exit_code == 128 + signal.SIGTERM
  fi.run_to_end(str(tmp_path))
  assert fi.same_run(str(tmp_path), cli_reference) == {"params_bit_identical": True,
                                                       "results_equal": True}
