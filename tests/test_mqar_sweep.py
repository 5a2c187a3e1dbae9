"""The MQAR sweep: the paper's grids cover every mixer and feature map, a killed sweep resumes
without redoing finished points, parallel runs record what sequential ones do and stop on a
signal, and the Pareto frontier is the non-dominated points."""

import json
import os
import re
import signal
import threading
import time
import types

import pytest

from based_jax import get_config, state_size_bytes
from based_jax.config import FEATURE_MAPS, MixerKind
from experiments import recall_sweep


def test_paper_grids_cover_every_mixer_and_map_on_the_paper_schedule():
  fig2, fig3 = recall_sweep.GRIDS["paper_figure2"], recall_sweep.GRIDS["paper_figure3"]
  for grid in (fig2, fig3):  # zoology's trainer, blocks and dropout (Mamba: none)
    assert grid.run == "mqar_zoology_epochs" and grid.steps is None and len(grid.lrs) == 4
    assert grid.model_set == ("block_style=zoology",)
    for p in grid.points:
      assert p.fields.get("embed_dropout", 0.0) == (0.0 if p.family == "Mamba" else 0.1)
  kinds = {kind for p in fig2.points for kind in get_config(p.preset, **p.fields).layer_kinds}
  assert kinds == set(MixerKind)
  maps = {get_config(p.preset, **p.fields).la_feature_map for p in fig3.points}
  assert maps == set(FEATURE_MAPS)
  widths = {p.fields["d_model"] for p in fig3.points}
  assert min(widths) == 64 and max(widths) == 512
  assert {p.fields["la_feature_dim"] for p in fig3.points if p.family.startswith("Taylor")} == {
      16, 24}
  for grid in recall_sweep.GRIDS.values():  # labels name points uniquely; every config is valid
    assert len({p.label for p in grid.points}) == len(grid.points)
    for p in grid.points:
      get_config(p.preset, **p.fields)


def fake_summary(config, lr):
  """What `train` reports, made up from the config and lr (the best lr differs per point)."""
  accuracy = (config.d_model % 7 + lr * 100) / 10
  return {"step": 5, "state_bytes": state_size_bytes(config, 256).total,
          "test/64x4": accuracy, "test/512x128": accuracy / 2, "test/mean": accuracy * 0.75}


class Killed(Exception):
  """The process dying mid-run (what SIGKILL would do, without the process)."""


def test_a_killed_sweep_resumes_without_redoing_finished_points(tmp_path, capsys):
  points = list(recall_sweep.GRIDS["cpu_figure2"].points[:3])
  settings = {"grid": "cpu_figure2", "run": "mqar_small", "lrs": [1e-3, 3.2e-3], "steps": 5,
              "run_set": []}
  out, calls, kill_at = str(tmp_path / "sweep"), [], [4]

  def train(run, config, workdir):
    calls.append(os.path.basename(workdir))
    if len(calls) == kill_at[0]:  # killed during the second point's second run
      kill_at[0] = None
      raise Killed
    assert run.optimizer.total_steps == 5 and run.model in ("mqar_attention", "mqar_based",
                                                            "mqar_sliding_window")
    return fake_summary(config, run.optimizer.learning_rate)

  with pytest.raises(Killed):
    recall_sweep.sweep(points, settings, out, str(tmp_path), train)
  with open(out + ".json") as f:
    assert [p["label"] for p in json.load(f)["points"]] == [points[0].label]
  first = list(calls)
  calls.clear()
  capsys.readouterr()
  assert recall_sweep.sweep(points, settings, out, str(tmp_path), train)
  progress = re.findall(r"\[(\d)/(\d) runs, [\d.]+ min so far, about [\d.]+ min left\]",
                        capsys.readouterr().out)
  assert progress == [(str(k), "4") for k in range(1, 5)]  # the four runs left to train
  # Point 0 is not trained again; point 1 runs again (its runs resume from their workdirs).
  assert len(calls) == 4 and calls[:2] == first[2:] and not set(first[:2]) & set(calls)
  assert len(set(first[:2] + calls)) == 6  # one workdir per (point, lr)
  with open(out + ".json") as f:
    result = json.load(f)
  assert [p["label"] for p in result["points"]] == [p.label for p in points]
  for p in result["points"]:
    best = max(p["all_runs"], key=lambda r: r["test/mean"])
    assert p["accuracy"] == best["test/mean"] and p["best_lr"] == best["lr"]
    assert p["per_slice"] == {"64x4": best["test/64x4"], "512x128": best["test/512x128"],
                              "mean": best["test/mean"]}
  assert set(result["meta"]) >= {"argv", "device", "versions", "run_config"}
  assert os.path.getsize(out + ".png") > 0
  with pytest.raises(ValueError, match="other settings"):
    recall_sweep.sweep(points, {**settings, "steps": 6}, out, str(tmp_path), train)


def test_deadline_stops_before_a_new_run(tmp_path):
  points = list(recall_sweep.GRIDS["tiny"].points)
  settings = {"grid": "tiny", "run": "mqar_small", "lrs": [1e-3], "steps": 5, "run_set": []}
  ran = []
  train = lambda run, config, workdir: ran.append(1) or fake_summary(config, 1e-3)
  assert not recall_sweep.sweep(points, settings, str(tmp_path / "s"), str(tmp_path), train,
                              deadline_s=1e-9)
  assert not ran


def test_pareto_frontier_is_the_non_dominated_points():
  pts = [{"label": label, "state_bytes": s, "accuracy": a} for label, s, a in [
      ("a", 10, 0.2), ("b", 20, 0.1), ("c", 20, 0.5), ("d", 40, 0.5), ("e", 80, 0.9)]]
  assert [p["label"] for p in recall_sweep.pareto_frontier(pts)] == ["a", "c", "e"]


def test_model_set_changes_every_points_model(tmp_path):
  points = list(recall_sweep.GRIDS["tiny"].points)
  settings = {"grid": "tiny", "run": "mqar_small", "lrs": [1e-3], "steps": 5,
              "run_set": [], "model_set": ["dtype=bfloat16"]}
  seen = []

  def train(run, config, workdir):
    seen.append((config.dtype, config.d_model, os.path.basename(workdir)))
    return fake_summary(config, run.optimizer.learning_rate)

  assert recall_sweep.sweep(points, settings, str(tmp_path / "sweep"), str(tmp_path), train)
  assert [s[:2] for s in seen] == [("bfloat16", 32), ("bfloat16", 32)]  # the point's d kept
  assert all("dtypebfloat16" in s[2] for s in seen)  # its own workdirs


def timed_train(run, config, workdir):
  """A module-level `train` for worker processes: records when it ran, prints, sleeps."""
  os.makedirs(workdir)
  tick = time.time()
  print(f"training {os.path.basename(workdir)}")
  time.sleep(1.0)
  with open(os.path.join(workdir, "interval.json"), "w") as f:
    json.dump([tick, time.time()], f)
  return fake_summary(config, run.optimizer.learning_rate)


def stoppable_train(run, config, workdir):
  """A `train` that runs until a stop signal, as the trainer does, and says so."""
  from based_jax.training.trainer import StopRequest  # pylint: disable=g-import-not-at-top
  os.makedirs(workdir)
  with StopRequest() as stop:
    open(os.path.join(workdir, "started"), "w").close()
    deadline = time.time() + 60
    while stop.signal is None and time.time() < deadline:
      time.sleep(0.05)
  return {"step": 1, "interrupted": stop.signal}


def test_parallel_runs_overlap_and_record_what_one_at_a_time_does(tmp_path):
  points = list(recall_sweep.GRIDS["tiny"].points)
  settings = {"grid": "tiny", "run": "mqar_small", "lrs": [1e-3, 3.2e-3], "steps": 5,
              "run_set": []}
  results = {}
  for parallel in (1, 4):
    out, work = str(tmp_path / f"sweep{parallel}"), str(tmp_path / f"runs{parallel}")
    assert recall_sweep.sweep(points, settings, out, work, timed_train, parallel=parallel)
    with open(out + ".json") as f:
      results[parallel] = sorted(json.load(f)["points"], key=lambda p: p["label"])
    intervals = [json.load(open(os.path.join(work, d, "interval.json")))
                 for d in os.listdir(work) if os.path.isdir(os.path.join(work, d))]
    assert len(intervals) == 4
    overlap = max(a for a, _ in intervals) < min(b for _, b in intervals)
    assert overlap == (parallel == 4)
  logs = [f for f in os.listdir(tmp_path / "runs4") if f.endswith(".log")]
  assert len(logs) == 4
  for log in logs:
    with open(tmp_path / "runs4" / log) as f:
      assert f"training {log[:-4]}" in f.read()
  strip = lambda p: {**p, "seconds": None, "all_runs": [  # noqa: E731
      {**r, "seconds": None} for r in p["all_runs"]]}
  assert [strip(p) for p in results[4]] == [strip(p) for p in results[1]]


def dying_train(run, config, workdir):
  """A worker's run that dies at once, as one killed by the OS does."""
  del run, config, workdir
  os._exit(9)  # pylint: disable=protected-access


def test_a_worker_that_dies_ends_the_sweep_with_a_clear_error(tmp_path):
  points = list(recall_sweep.GRIDS["tiny"].points)[:1]
  settings = {"grid": "tiny", "run": "mqar_small", "lrs": [1e-3], "steps": 5, "run_set": []}
  with pytest.raises(RuntimeError, match=rf"a worker process died during a run .*"
                                         rf"{re.escape(points[0].label)}, lr 0.001.* rerun"):
    recall_sweep.sweep(points, settings, str(tmp_path / "s"), str(tmp_path / "runs"),
                       dying_train, parallel=2)
  assert not os.path.exists(tmp_path / "s.json")


def test_stopping_workers_passes_over_one_that_already_ended(monkeypatch):
  def kill(pid, signum):  # as os.kill answers for a worker that died since it was listed
    raise ProcessLookupError(3, "No such process")
  with recall_sweep._Processes(1) as executor:  # pylint: disable=protected-access
    monkeypatch.setattr(recall_sweep.multiprocessing, "active_children",
                        lambda: [types.SimpleNamespace(pid=-1)])
    monkeypatch.setattr(recall_sweep.os, "kill", kill)
    executor.stop_workers()
    monkeypatch.undo()
  assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the sweep's handler is gone


def test_a_stop_signal_reaches_every_parallel_run(tmp_path):
  points = list(recall_sweep.GRIDS["tiny"].points)
  settings = {"grid": "tiny", "run": "mqar_small", "lrs": [1e-3], "steps": 5, "run_set": []}
  work = tmp_path / "runs"

  def signal_when_started():
    deadline = time.time() + 60
    while time.time() < deadline and len(list(work.glob("*/started"))) < 2:
      time.sleep(0.05)
    os.kill(os.getpid(), signal.SIGTERM)

  threading.Thread(target=signal_when_started, daemon=True).start()
  tick = time.time()
  assert not recall_sweep.sweep(points, settings, str(tmp_path / "s"), str(work),
                                stoppable_train, parallel=2)
  assert time.time() - tick < 50  # stopped by the signal, not by the runs' own deadline
  assert len(list(work.glob("*/started"))) == 2
  assert not os.path.exists(tmp_path / "s.json")  # no point finished
  assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the sweep's handler is gone


def test_members_train_each_points_lrs_as_one_run(tmp_path):
  points = list(recall_sweep.GRIDS["tiny"].points)
  settings = {"grid": "tiny", "run": "mqar_small", "lrs": [1e-3, 3.2e-3], "steps": 5,
              "run_set": []}
  calls = []

  def train(run, config, workdir):
    calls.append((run.lr_members, os.path.basename(workdir)))
    if not run.lr_members:
      return fake_summary(config, run.optimizer.learning_rate)
    members = [fake_summary(config, lr) for lr in run.lr_members]
    return {"step": 5, "state_bytes": members[0]["state_bytes"], "members": [
        {"lr": lr, **{k: v for k, v in m.items() if k.startswith("test/")}}
        for lr, m in zip(run.lr_members, members)]}

  results = {}
  for members in (False, True):
    out = str(tmp_path / f"sweep{members}")
    assert recall_sweep.sweep(points, {**settings, **({"members": True} if members else {})},
                              out, str(tmp_path), train)
    with open(out + ".json") as f:
      results[members] = json.load(f)["points"]
  assert [c[0] for c in calls[4:]] == [(1e-3, 3.2e-3)] * 2  # one run per point
  assert all(c[1].endswith("_lrs0.001-0.0032") for c in calls[4:])
  strip = lambda p: {**p, "seconds": None, "all_runs": [  # noqa: E731
      {**r, "seconds": None} for r in p["all_runs"]]}
  assert [strip(p) for p in results[True]] == [strip(p) for p in results[False]]


def test_a_point_whose_kernels_cannot_run_ends_the_sweep_before_any_run(tmp_path):
  points = list(recall_sweep.GRIDS["tiny"].points)
  settings = {"grid": "tiny", "run": "mqar_small", "lrs": [1e-3], "steps": 5, "run_set": [],
              "model_set": ["linear_attention_impl=pallas", "la_feature_dim=24"]}
  trained = []
  with pytest.raises(ValueError, match=re.escape(f"grid point {points[0].label!r}: impl='pallas'")):
    recall_sweep.sweep(points, settings, str(tmp_path / "s"), str(tmp_path),
                       lambda run, config, workdir: trained.append(workdir))
  assert not trained and not os.listdir(tmp_path)


def test_points_are_chosen_by_index_or_family():
  points = list(recall_sweep.GRIDS["paper_figure2"].points)
  chosen = recall_sweep.select_points(points, ["mamba", "1", "0"])
  assert [p.label for p in chosen[:2]] == ["attention d=64", "attention d=128"]
  assert {p.family for p in chosen[2:]} == {"Mamba"} and len(chosen) == 11
  with pytest.raises(ValueError, match=r"no grid point '43': give indices 0 \.\. 42 or families"):
    recall_sweep.select_points(points, ["43"])
  with pytest.raises(ValueError, match="'Mamba'"):
    recall_sweep.select_points(points, ["mambo"])
