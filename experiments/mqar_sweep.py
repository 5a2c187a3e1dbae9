"""Sweeps MQAR over mixers, widths and sizes; plots accuracy against state size with its Pareto
frontier (the BASED paper's Figures 2 and 3). Grids and the sweep itself: `recall_sweep.py`.

  python -m experiments.mqar_sweep --grid=paper_figure2 --out=experiments/results/figure2
  python -m experiments.mqar_sweep --grid=paper_figure3 --out=experiments/results/figure3
  python -m experiments.mqar_sweep --grid=cpu_figure2 --out=/tmp/figure2_cpu   # no GPU
  python -m experiments.mqar_sweep --grid=paper_figure2 --list   # the points, by index

Writes <out>.json and <out>.png after every point. Resumable point by point: a rerun of the same
command skips the points <out>.json holds, and a point cut short resumes its runs from their
checkpoints (one workdir per run under --workdir). --deadline_s starts no new run after that many
seconds (a GPU session's time limit) and a run stopped by SIGTERM ends the sweep: both exit 3;
rerun to continue (exit 0 once every point is done). --parallel=4 trains four runs at once on
the same GPU, a point's four lrs in about the time of one for small models.
"""

import sys

from absl import app, flags, logging

from experiments.recall_sweep import GRIDS, merge, select_points, sweep, train_summary

_GRID = flags.DEFINE_enum("grid", "paper_gpu", sorted(GRIDS), "Which grid to run.")
_RUN = flags.DEFINE_string("run", None, "Run preset for every point (default: the grid's).")
_LRS = flags.DEFINE_list("lrs", None, "Learning rates tried per point (default: the grid's).")
_STEPS = flags.DEFINE_integer("steps", None, "Override total_steps (default: the grid's, else "
                              "the run preset's); warm-up is capped at a tenth of it.")
_RUN_SET = flags.DEFINE_multi_string("run_set", [], "Run field override, field=value.")
_MODEL_SET = flags.DEFINE_multi_string("model_set", [], "Model field override for every point, "
                                       "field=value (e.g. dtype=bfloat16).")
_WORKDIR = flags.DEFINE_string("workdir", "runs/sweep", "Parent of the per-run workdirs.")
_OUT = flags.DEFINE_string("out", "experiments/results/mqar_sweep", "Output path prefix.")
_POINTS = flags.DEFINE_list("points", None, "Grid points to run, by index or family (e.g. "
                            "'9,17' or 'BASED,Mamba'; default all; --list shows them).")
_LIST = flags.DEFINE_bool("list", False, "Print the grid's points (index, family, label, "
                          "fields) and exit.")
_DEADLINE = flags.DEFINE_integer("deadline_s", 0, "Start no new run after this many seconds "
                                 "(0: none); rerun the same command to continue.")
_PARALLEL = flags.DEFINE_integer("parallel", 1, "Runs trained at once, each in its own process "
                                 "on the same devices (their output in <workdir>/<run>.log); "
                                 "about 4 keep an H200 busy with d_model 128 models.")
_MEMBERS = flags.DEFINE_bool("members", False, "Train a point's lrs side by side in one "
                              "program (RunConfig.lr_members): one run, one compile, the GPU "
                              "shared inside one process; combines with --parallel.")
_MERGE = flags.DEFINE_list("merge", None, "Instead of training, merge these sweep JSON files "
                           "(e.g. parts run on separate machines) into --out.json/.png.")


def main(argv):
  del argv
  if not flags.FLAGS["verbosity"].present:  # keep Orbax's per-save INFO lines out of the log
    logging.set_verbosity(logging.WARNING)
  if _MERGE.value:
    merge(_MERGE.value, _OUT.value)
    return
  if _PARALLEL.value < 1:
    raise app.UsageError(f"--parallel must be >= 1, got {_PARALLEL.value}")
  grid = GRIDS[_GRID.value]
  points = list(grid.points)
  if _LIST.value:
    for i, p in enumerate(points):
      print(f"{i:3d}  {p.family:15s} {p.label:28s} {p.preset} {p.fields}")
    return
  if _POINTS.value:
    try:
      points = select_points(points, _POINTS.value)
    except ValueError as e:
      raise app.UsageError(str(e)) from e
  settings = {"grid": _GRID.value, "run": _RUN.value or grid.run,
              "lrs": [float(lr) for lr in (_LRS.value or grid.lrs)],
              "steps": _STEPS.value if _STEPS.value is not None else grid.steps,
              "run_set": list(_RUN_SET.value)}
  if _MEMBERS.value:  # only when set: sweeps written before the flag keep their settings
    settings["members"] = True
  model_set = list(grid.model_set) + list(_MODEL_SET.value)
  if model_set:  # only when some: sweeps written before grids had one keep their settings
    settings["model_set"] = model_set
  complete = sweep(points, settings, _OUT.value, _WORKDIR.value, train_summary, _DEADLINE.value,
                   _PARALLEL.value)
  sys.exit(0 if complete else 3)


if __name__ == "__main__":
  app.run(main)
