"""Sweeps MQAR over (mixer, width, feature dim / window, lr); plots accuracy vs state size.

  python -m experiments.mqar_sweep --grid=paper_gpu --out=experiments/results/mqar_sweep

For every (mixer, width, size) point all learning rates are trained and the best kept, as in
the paper (SPEC section 5). Results: <out>.json with state bytes, per-slice accuracy and best
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
from based_jax.training.run_config import get_run_config
from experiments.train import train

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
_STEPS = flags.DEFINE_integer("steps", None, "Override the preset's total_steps.")
_BATCH = flags.DEFINE_integer("batch_size", None, "Override the preset's batch size.")
_WORKDIR = flags.DEFINE_string("workdir", "runs/sweep", "Parent of the per-run workdirs.")
_OUT = flags.DEFINE_string("out", "experiments/results/mqar_sweep", "Output path prefix.")


def plot(points: list[dict], path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6, 4))
  families = sorted({p["label"].split(" d=")[0].split(" w=")[0] for p in points})
  for family in families:
    pts = sorted((p for p in points if p["label"].startswith(family)),
                 key=lambda p: p["state_bytes"])
    ax.plot([p["state_bytes"] for p in pts], [p["accuracy"] for p in pts], "o-", label=family)
    for p in pts:
      ax.annotate(p["label"].replace(family, "").strip(), (p["state_bytes"], p["accuracy"]),
                  fontsize=7, xytext=(3, 3), textcoords="offset points")
  ax.set_xscale("log")
  ax.set_xlabel("recurrent state size (bytes)")
  ax.set_ylabel("MQAR accuracy (mean over test slices)")
  ax.set_ylim(0, 1.02)
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=150)


def main(argv):
  del argv
  base = get_run_config(_RUN.value)
  opt_changes = {} if _STEPS.value is None else {"total_steps": _STEPS.value}
  base = base.replace(optimizer=dataclasses.replace(base.optimizer, **opt_changes),
                      **({} if _BATCH.value is None else {"batch_size": _BATCH.value}))
  points = []
  for label, preset, fields in GRIDS[_GRID.value]:
    runs = []
    for lr in _LRS.value:
      run = base.replace(model=preset, optimizer=dataclasses.replace(
          base.optimizer, learning_rate=float(lr)))
      model_config = get_config(preset, **fields)
      name = f"{preset}_" + "_".join(f"{k}{v}" for k, v in fields.items()) + f"_lr{lr}"
      print(f"=== {label}, lr {lr}")
      summary = train(run, model_config, os.path.join(_WORKDIR.value, name))
      runs.append({"lr": float(lr), **summary})
    best = max(runs, key=lambda r: r["test/mean"])
    points.append({"label": label, "preset": preset, "fields": fields,
                   "state_bytes": best["state_bytes"], "accuracy": best["test/mean"],
                   "best_lr": best["lr"],
                   "per_slice": {k[5:]: v for k, v in best.items() if k.startswith("test/")},
                   "all_runs": runs})
  os.makedirs(os.path.dirname(_OUT.value) or ".", exist_ok=True)
  meta = {"device": str(jax.devices()[0].device_kind), "backend": jax.default_backend(),
          "jax": jax.__version__, "python": platform.python_version(), "grid": _GRID.value,
          "run": dataclasses.asdict(base)}
  with open(_OUT.value + ".json", "w") as f:
    json.dump({"meta": meta, "points": points}, f, indent=1)
  plot(points, _OUT.value + ".png")
  for p in points:
    print(f"{p['label']:24s} state {p['state_bytes']:>10,d} B  acc {p['accuracy']:.3f}  "
          f"lr {p['best_lr']}")


if __name__ == "__main__":
  app.run(main)
