"""Sweeps MQAR over (mixer, width, feature dim / window, lr); plots accuracy vs state size.

  python -m experiments.mqar_sweep --grid=paper_gpu --out=experiments/results/mqar_sweep

For every (mixer, width, size) point all learning rates are trained and the best kept, as in
the paper. Results: <out>.json with state bytes, per-slice accuracy and best
lr per point, and <out>.png, accuracy against state size on a log axis (the paper's Figure 2).
Each run has its own workdir under --workdir, so an interrupted sweep resumes.
"""

import dataclasses
import json
import os
import platform

import jax
from absl import app, flags

from based_jax.config import get_config
from based_jax.training.run_config import RunConfig, get_run_config, parse_assignments
from based_jax.training.trainer import train

# (label, model preset, {model field: value}) for each point.
GRIDS = {
    "paper_gpu": [
        ("BASED d=64 d'=16", "mqar_based", dict(d_model=64, la_feature_dim=16)),
        ("BASED d=128 d'=16", "mqar_based", dict(d_model=128, la_feature_dim=16)),
        ("sliding window w=64", "mqar_sliding_window", dict(d_model=128, window=64)),
        ("sliding window w=256", "mqar_sliding_window", dict(d_model=128, window=256)),
        ("attention", "mqar_attention", dict(d_model=128)),
    ],
    "tiny": [  # a smoke test of the sweep machinery
        ("BASED d=32 d'=4", "mqar_based", dict(d_model=32, la_feature_dim=4)),
        ("sliding window w=8", "mqar_sliding_window", dict(d_model=32, window=8)),
    ],
}

_GRID = flags.DEFINE_enum("grid", "paper_gpu", sorted(GRIDS), "Which grid to run.")
_RUN = flags.DEFINE_string("run", "mqar_paper", "Run preset for every point.")
_LRS = flags.DEFINE_list("lrs", ["1e-3", "3.2e-3"], "Learning rates tried per point.")
_STEPS = flags.DEFINE_integer("steps", None, "Override the preset's total_steps (warm-up is "
                              "capped at a tenth of it).")
_RUN_SET = flags.DEFINE_multi_string("run_set", [], "Run field override, field=value.")
_WORKDIR = flags.DEFINE_string("workdir", "runs/sweep", "Parent of the per-run workdirs.")
_OUT = flags.DEFINE_string("out", "experiments/results/mqar_sweep", "Output path prefix.")
_POINTS = flags.DEFINE_list("points", None, "Indices of the grid points to run (default all).")
_MERGE = flags.DEFINE_list("merge", None, "Instead of training, merge these sweep JSON files "
                           "(e.g. parts run on separate machines) into --out.json/.png.")


def in_distribution(point: dict, max_len: int = 256) -> float:
  """Mean accuracy over the test slices no longer than the training sequences."""
  accs = [v for k, v in point["per_slice"].items() if k != "mean" and int(k.split("x")[0]) <= max_len]
  return sum(accs) / len(accs)


def plot(points: list[dict], path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6, 4))
  families = sorted({p["label"].split(" d=")[0].split(" w=")[0] for p in points})
  for family in families:
    pts = sorted((p for p in points if p["label"].startswith(family)),
                 key=lambda p: p["state_bytes"])
    line, = ax.plot([p["state_bytes"] for p in pts], [p["accuracy"] for p in pts], "o-",
                    label=f"{family} (all test slices)")
    ax.plot([p["state_bytes"] for p in pts], [in_distribution(p) for p in pts], "s--",
            color=line.get_color(), alpha=0.6, label=f"{family} (test length <= 256)")
    for p in pts:
      ax.annotate(p["label"].replace(family, "").strip(), (p["state_bytes"], p["accuracy"]),
                  fontsize=7, xytext=(3, 3), textcoords="offset points")
  ax.set_xscale("log")
  ax.set_xlabel("recurrent state size (bytes)")
  ax.set_ylabel("MQAR accuracy (mean over test slices)")
  ax.set_ylim(0, 1.02)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=6)
  fig.tight_layout()
  fig.savefig(path, dpi=150)


def write(points: list[dict], meta: dict) -> None:
  os.makedirs(os.path.dirname(_OUT.value) or ".", exist_ok=True)
  with open(_OUT.value + ".json", "w") as f:
    json.dump({"meta": meta, "points": points}, f, indent=1)
  plot(points, _OUT.value + ".png")
  for p in points:
    print(f"{p['label']:24s} state {p['state_bytes']:>10,d} B  acc {p['accuracy']:.3f} "
          f"(length <= 256: {in_distribution(p):.3f})  lr {p['best_lr']}")


def merge(paths: list[str]) -> None:
  parts = []
  for path in paths:
    with open(path) as f:
      parts.append(json.load(f))
  write([p for part in parts for p in part["points"]],
        {"merged_from": paths, "parts": [part["meta"] for part in parts]})


def main(argv):
  del argv
  if _MERGE.value:
    merge(_MERGE.value)
    return
  grid = GRIDS[_GRID.value]
  if _POINTS.value:
    grid = [grid[int(i)] for i in _POINTS.value]
  base = get_run_config(_RUN.value)
  opt_changes = {} if _STEPS.value is None else {
      "total_steps": _STEPS.value,
      "warmup_steps": min(base.optimizer.warmup_steps, _STEPS.value // 10)}
  base = base.replace(optimizer=dataclasses.replace(base.optimizer, **opt_changes),
                      **parse_assignments(RunConfig, _RUN_SET.value))
  meta = {"device": str(jax.devices()[0].device_kind), "backend": jax.default_backend(),
          "jax": jax.__version__, "python": platform.python_version(), "grid": _GRID.value,
          "run": dataclasses.asdict(base)}
  points = []
  for label, preset, fields in grid:
    runs = []
    for lr in _LRS.value:
      run = base.replace(model=preset, optimizer=dataclasses.replace(
          base.optimizer, learning_rate=float(lr)))
      model_config = get_config(preset, **fields)
      name = f"{preset}_" + "_".join(f"{k}{v}" for k, v in fields.items()) + f"_lr{lr}"
      print(f"=== {label}, lr {lr}")
      summary, _ = train(run, model_config, os.path.join(_WORKDIR.value, name))
      runs.append({"lr": float(lr), **summary})
    best = max(runs, key=lambda r: r["test/mean"])
    points.append({"label": label, "preset": preset, "fields": fields,
                   "state_bytes": best["state_bytes"], "accuracy": best["test/mean"],
                   "best_lr": best["lr"],
                   "per_slice": {k[5:]: v for k, v in best.items() if k.startswith("test/")},
                   "all_runs": runs})
    write(points, meta)  # after every point, so an interrupted sweep keeps what it finished


if __name__ == "__main__":
  app.run(main)
