"""The MQAR sweep's grids, its resumable loop and its Pareto plots (`mqar_sweep.py` is the
script): accuracy against state size for every mixer (the BASED paper's Figure 2) and every
linear-attention feature map (its Figure 3).

A grid is its points (label, curve, model preset and field overrides) with the run preset and
learning rates they train with. `sweep` trains every point at every learning rate and keeps the
best, as the paper does; it rewrites <out>.json (state bytes, per-slice accuracy and best lr per
point, every run's accuracy and seconds, the Pareto frontier, command, device and versions)
and <out>.png (accuracy against log state bytes, frontier drawn) after every point, and a rerun
of the same settings skips the points <out>.json holds.
"""

import collections
import dataclasses
import json
import math
import multiprocessing
import os
import signal
import threading
import time
from concurrent import futures
from typing import Callable, Optional

from based_jax.config import ModelConfig, get_config
from based_jax.implementations import implementations
from based_jax.training.run_config import RunConfig, get_run_config, parse_assignments
from experiments.benchmarking import run_metadata
from experiments.child_process import die_with_parent

PAPER_LRS = (1e-3, 3.2e-3, 1e-2, 3.2e-2)  # the paper's sweep, np.logspace(-3, -1.5, 4) rounded
ABLATION_MAPS = {"pos_elu": "PosELU", "relu": "ReLU", "identity": "Identity",
                 "square": "Square", "cosformer": "CosFormer", "performer": "Performer",
                 "all_poly": "All-poly"}


@dataclasses.dataclass(frozen=True)
class Point:
  label: str  # a point of the plot, e.g. "Mamba d=128 N=16".
  family: str  # its curve, e.g. "Mamba".
  preset: str  # model preset (based_jax.config.PRESETS).
  fields: dict  # model field overrides.


@dataclasses.dataclass(frozen=True)
class Grid:
  points: tuple[Point, ...]  # what to train.
  run: str  # run preset (based_jax.training.run_config.RUN_PRESETS).
  lrs: tuple[float, ...]  # learning rates tried per point; the best is kept.
  steps: Optional[int] = None  # total_steps override; None: the run preset's schedule.
  # Model field overrides (field=value) for every point, before the user's --model_set.
  model_set: tuple[str, ...] = ()


def _figure2(widths, mamba_widths, windows, based_widths, feature_dims, attention_widths,
             mamba_states=(8, 16, 24), hyena_horizon=1024, dropout=0.0) -> list[Point]:
  """Every mixer of the paper's Figure 2 (and RWKV, GLA), over widths and state sizes;
  `dropout` is the embedding dropout of every point but Mamba's (zoology's TransformerBlock
  has it, its MambaBlock none)."""
  drop = dict(embed_dropout=dropout) if dropout else {}
  points = [Point(f"attention d={d}", "attention", "mqar_attention", dict(d_model=d, **drop))
            for d in attention_widths]
  points += [Point(f"BASED d={d} d'={f}", "BASED", "mqar_based",
                   dict(d_model=d, la_feature_dim=f, **drop))
             for d in based_widths for f in feature_dims]
  points += [Point(f"sliding window w={w}", "sliding window", "mqar_sliding_window",
                   dict(d_model=128, window=w, **drop)) for w in windows]
  points += [Point(f"Mamba d={d} N={n}", "Mamba", "mqar_mamba", dict(d_model=d, ssm_state=n))
             for d in mamba_widths for n in mamba_states]
  points += [Point(f"H3 d={d}", "H3", "mqar_h3", dict(d_model=d, ssm_state=d // 4, **drop))
             for d in widths]
  points += [Point(f"Hyena d={d}", "Hyena", "mqar_hyena",
                   dict(d_model=d, horizon=hyena_horizon, **drop)) for d in widths]
  points += [Point(f"RWKV d={d}", "RWKV", "mqar_rwkv",
                   dict(d_model=d, la_heads=max(1, d // 64), **drop)) for d in widths]
  points += [Point(f"GLA d={d}", "GLA", "mqar_gla", dict(d_model=d, **drop)) for d in widths]
  return points


def _figure3(widths, taylor_dims, dropout=0.0) -> list[Point]:
  """BASED's linear attention with each feature map (the paper's Figure 3), over widths: the
  Taylor map at d' 16 and 24, every other map on queries and keys of width d_model;
  `dropout`: the embedding dropout of every point."""
  drop = dict(embed_dropout=dropout) if dropout else {}
  points = [Point(f"Taylor d'={f} d={d}", f"Taylor d'={f}", "mqar_based",
                  dict(d_model=d, la_feature_dim=f, **drop)) for f in taylor_dims for d in widths]
  points += [Point(f"{title} d={d}", title, "mqar_based",
                   dict(d_model=d, la_feature_dim=d, la_feature_map=name, **drop))
             for name, title in ABLATION_MAPS.items() for d in widths]
  return points


GRIDS: dict[str, Grid] = {
    # The paper's Figure 2 as its code (zoology arxiv24_based_figure2) trained it: its
    # trainer and data order (mqar_zoology_epochs: 32 epochs of the slices in turn, batch
    # 256), its blocks (block_style zoology) and embedding dropout 0.1, four lrs. Widths as its configs: BASED d 48 / 64 / 128 (and 256),
    # H3 and Hyena d 64 .. 256.
    "paper_figure2": Grid(tuple(_figure2(
        widths=(64, 128, 256), mamba_widths=(64, 128, 256),
        windows=(8, 16, 32, 64, 128, 256, 512, 1024), based_widths=(48, 64, 128, 256),
        feature_dims=(8, 16, 24), attention_widths=(64, 128), dropout=0.1)),
        run="mqar_zoology_epochs", lrs=PAPER_LRS, model_set=("block_style=zoology",)),
    # The paper's Figure 3: every feature map at d_model 64 .. 512, trained as Figure 2.
    "paper_figure3": Grid(tuple(_figure3(widths=tuple(range(64, 513, 64)), taylor_dims=(16, 24),
                                         dropout=0.1)),
                          run="mqar_zoology_epochs", lrs=PAPER_LRS,
                          model_set=("block_style=zoology",)),
    # CPU-sized variants: one small width per mixer or map on the CPU default's mix and
    # schedule (mqar_small: 128-token training sequences, test up to 256), two lrs.
    "cpu_figure2": Grid(tuple(_figure2(
        widths=(64,), mamba_widths=(64,), windows=(16, 64), based_widths=(64,),
        feature_dims=(16,), attention_widths=(64,), mamba_states=(16,), hyena_horizon=256)),
        run="mqar_small",
        lrs=(1e-3, 3.2e-3), steps=400),
    "cpu_figure3": Grid(tuple(_figure3(widths=(64,), taylor_dims=(16, 24))), run="mqar_small",
                        lrs=(1e-3, 3.2e-3), steps=400),
    # The H100 reproduction of docs/results.md: BASED, sliding window, attention at d 128.
    "paper_gpu": Grid((
        Point("BASED d=64 d'=16", "BASED", "mqar_based", dict(d_model=64, la_feature_dim=16)),
        Point("BASED d=128 d'=16", "BASED", "mqar_based", dict(d_model=128, la_feature_dim=16)),
        Point("sliding window w=64", "sliding window", "mqar_sliding_window",
              dict(d_model=128, window=64)),
        Point("sliding window w=256", "sliding window", "mqar_sliding_window",
              dict(d_model=128, window=256)),
        Point("attention", "attention", "mqar_attention", dict(d_model=128)),
    ), run="mqar_paper", lrs=(1e-3, 3.2e-3)),
    # A smoke test of the sweep machinery (seconds on a CPU with --run_set for tiny mixes).
    "tiny": Grid((
        Point("BASED d=32 d'=4", "BASED", "mqar_based", dict(d_model=32, la_feature_dim=4)),
        Point("sliding window w=8", "sliding window", "mqar_sliding_window",
              dict(d_model=32, window=8)),
    ), run="mqar_small", lrs=(1e-3,), steps=20),
}


def in_distribution(point: dict, max_len: int = 256) -> float:
  """Mean accuracy over the test slices no longer than the training sequences."""
  accs = [v for k, v in point["per_slice"].items()
          if k != "mean" and int(k.split("x")[0]) <= max_len]
  return sum(accs) / len(accs)


def pareto_frontier(points: list[dict]) -> list[dict]:
  """The points no other point beats: none with at most their state bytes has a higher
  accuracy. In increasing state size (and accuracy)."""
  frontier, best = [], -1.0
  for p in sorted(points, key=lambda p: (p["state_bytes"], -p["accuracy"])):
    if p["accuracy"] > best:
      frontier.append(p)
      best = p["accuracy"]
  return frontier


def family_of(point: dict) -> str:
  """A point's curve (files written before points had one: their label's first word)."""
  return point.get("family") or point["label"].split(" d=")[0].split(" w=")[0]


def plot(points: list[dict], path: str, title: str = "") -> None:
  """Accuracy against log state bytes, one curve per family, the Pareto frontier dashed."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for family in sorted({family_of(p) for p in points}):
    pts = sorted((p for p in points if family_of(p) == family), key=lambda p: p["state_bytes"])
    ax.plot([p["state_bytes"] for p in pts], [p["accuracy"] for p in pts], "o-", ms=4,
            label=family)
  frontier = pareto_frontier(points)
  xs = [p["state_bytes"] for p in frontier]
  ax.step(xs + [max(p["state_bytes"] for p in points)], [p["accuracy"] for p in frontier]
          + [frontier[-1]["accuracy"]], "k--", where="post", lw=1, alpha=0.7,
          label="Pareto frontier")
  ax.set_xscale("log")
  ax.set_xlabel("recurrent state size (bytes)")
  ax.set_ylabel("MQAR accuracy (mean over test slices)")
  ax.set_ylim(0, 1.02)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=6, ncol=2)
  if title:
    ax.set_title(title, fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=150)
  plt.close(fig)


def write(out: str, points: list[dict], meta: dict, settings: Optional[dict] = None) -> None:
  """<out>.json (atomically) and <out>.png."""
  os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
  result = {"meta": meta, "settings": settings, "points": points,
            "frontier": [p["label"] for p in pareto_frontier(points)] if points else []}
  with open(out + ".json.tmp", "w") as f:
    json.dump(result, f, indent=1)
  os.replace(out + ".json.tmp", out + ".json")
  if points:
    plot(points, out + ".png", title=f"MQAR: {(settings or {}).get('grid', 'merged')}")


def merge(paths: list[str], out: str) -> None:
  parts = []
  for path in paths:
    with open(path) as f:
      parts.append(json.load(f))
  write(out, [p for part in parts for p in part["points"]],
        {"merged_from": paths, "parts": [part["meta"] for part in parts], **run_metadata()})


def previous_points(out: str, settings: dict) -> list[dict]:
  """The finished points of an earlier run of these settings in <out>.json (none if absent).
  Other settings there are a ValueError: their points would not be comparable."""
  if not os.path.exists(out + ".json"):
    return []
  with open(out + ".json") as f:
    previous = json.load(f)
  if previous.get("settings") != settings:
    raise ValueError(f"{out}.json holds a sweep of other settings ({previous.get('settings')}; "
                     f"now {settings}): use another --out")
  return previous["points"]


def run_name(settings: dict, point: Point, lrs: tuple[float, ...]) -> str:
  """The workdir of one run (of one lr, or of the lr members `lrs`): every setting that
  changes what it trains."""
  fields = "_".join(f"{k}{v}" for k, v in point.fields.items())
  steps = "" if settings["steps"] is None else f"_steps{settings['steps']}"
  extra = "".join(f"_{a.replace('=', '')}"
                  for a in settings["run_set"] + settings.get("model_set", []))
  rates = ("_lrs" + "-".join(f"{lr:g}" for lr in lrs) if settings.get("members")
           else f"_lr{lrs[0]:g}")
  return f"{settings['run']}_{point.preset}_{fields}{steps}{extra}{rates}"


def _score(run: dict) -> float:
  """A run's mean accuracy; a diverged run (NaN) loses to every other."""
  return run["test/mean"] if math.isfinite(run["test/mean"]) else -math.inf


def train_summary(run: RunConfig, model: ModelConfig, workdir: str) -> dict:
  """`based_jax.training.trainer.train`'s summary: the `train` of a sweep run by the script."""
  from based_jax.training.trainer import train  # pylint: disable=g-import-not-at-top
  return train(run, model, workdir)[0]


def _timed(train: Callable, log: Optional[str], *args) -> tuple[dict, float]:
  """(train(*args), its seconds); with `log`, this process's output goes to that file."""
  if log:
    with open(log, "a") as f:
      os.dup2(f.fileno(), 1)
      os.dup2(f.fileno(), 2)
  tick = time.monotonic()
  summary = train(*args)
  return summary, round(time.monotonic() - tick, 1)


class _InProcess:
  """An executor that runs each job at submit, in this process (`parallel` 1)."""

  def submit(self, fn, *args) -> futures.Future:
    future = futures.Future()
    try:
      future.set_result(fn(*args))
    except BaseException as e:  # noqa: BLE001 - re-raised by future.result()
      future.set_exception(e)
    return future

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    pass


def _share_devices() -> None:
  """Device memory allocated on demand (XLA_PYTHON_CLIENT_PREALLOCATE=false) in this process
  and the workers it starts, unless the user chose a memory setting: by default each JAX
  process would take 75% of a GPU's memory. Before this process first uses a device."""
  if not {"XLA_PYTHON_CLIENT_PREALLOCATE", "XLA_PYTHON_CLIENT_MEM_FRACTION"} & set(os.environ):
    os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"


class _Processes(futures.ProcessPoolExecutor):
  """`parallel` worker processes sharing the devices; a stop signal to this process is passed
  on to them once, so each running run checkpoints and reports "interrupted".

  Workers have their own process group (a terminal's Ctrl-C reaches only this process, which
  forwards one SIGTERM: a second signal would end a worker before its checkpoint) and die
  with this process.
  """

  def __init__(self, parallel: int):
    super().__init__(parallel, mp_context=multiprocessing.get_context("spawn"),
                     initializer=_worker_init)
    self.signal: Optional[str] = None
    self._previous = {}

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():  # only it can take signals
      self._previous = {sig: signal.signal(sig, self._forward)
                        for sig in (signal.SIGTERM, signal.SIGINT)}
    return super().__enter__()

  def _forward(self, signum, frame) -> None:
    del frame
    self.signal = signal.Signals(signum).name
    self._restore()  # a second signal acts as usual
    self.stop_workers()

  def stop_workers(self) -> None:
    for child in multiprocessing.active_children():
      try:
        os.kill(child.pid, signal.SIGTERM)
      except ProcessLookupError:  # it ended (a worker that died) since it was listed
        pass

  def _restore(self) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous = {}

  def __exit__(self, *exc):
    try:
      if exc[0] is not None:  # a run failed: the others stop at a checkpoint
        self.stop_workers()
      return super().__exit__(*exc)
    finally:
      self._restore()


def _worker_init() -> None:
  """A worker's start: its own process group, death with the sweep, and SIGTERM ignored
  between runs (a worker that died idle would break the pool and end its siblings' runs
  without a checkpoint); the trainer handles it during a run."""
  os.setpgrp()
  die_with_parent()
  signal.signal(signal.SIGTERM, signal.SIG_IGN)


def select_points(points: list[Point], specs: list[str]) -> list[Point]:
  """The points that `specs` name, in grid order: each spec an index into `points` or a
  family ("BASED", "sliding window"; case-insensitive). An unknown spec is a ValueError that
  lists what there is."""
  families = {p.family.lower() for p in points}
  chosen = set()
  for spec in specs:
    spec = spec.strip()
    if spec.isdigit() and int(spec) < len(points):
      chosen.add(int(spec))
    elif spec.lower() in families:
      chosen.update(i for i, p in enumerate(points) if p.family.lower() == spec.lower())
    else:
      raise ValueError(f"no grid point {spec!r}: give indices 0 .. {len(points) - 1} or "
                       f"families {sorted({p.family for p in points})}")
  return [p for i, p in enumerate(points) if i in chosen]


def sweep(points: list[Point], settings: dict, out: str, workdir: str, train: Callable,
          deadline_s: float = 0.0, parallel: int = 1) -> bool:
  """Trains every point not already in <out>.json at every lr; True when all are done.

  `train(run, model_config, workdir) -> summary` (`train_summary` for real runs); settings:
  {"grid", "run", "lrs", "steps", "run_set"} and optionally "model_set", model field
  overrides for every point after its own fields (e.g. ["dtype=bfloat16"]). `parallel` > 1
  trains that many runs at once, each in a worker process on the same devices (a small MQAR
  model keeps a GPU busy only in part), their output in <workdir>/<run>.log; `train` must be
  a module-level function then. A point is recorded when its last run ends. False when the
  deadline or a stop signal ended the sweep early (the runs then in flight checkpoint)."""
  base = get_run_config(settings["run"])
  if settings["steps"] is not None:
    base = base.replace(optimizer=dataclasses.replace(
        base.optimizer, total_steps=settings["steps"],
        warmup_steps=min(base.optimizer.warmup_steps, settings["steps"] // 10)))
  base = base.replace(**parse_assignments(RunConfig, settings["run_set"]))
  if parallel > 1:
    _share_devices()  # before run_metadata first touches a device
  meta = {**run_metadata("optax", "numpy"), "run_config": dataclasses.asdict(base)}
  done = previous_points(out, settings)
  finished = {p["label"] for p in done}
  for point in points:
    if point.label in finished:
      print(f"=== {point.label}: done in {out}.json")
  lrs = tuple(float(lr) for lr in settings["lrs"])
  members = bool(settings.get("members"))
  todo = [(point, group) for point in points if point.label not in finished
          for group in ([lrs] if members else [(lr,) for lr in lrs])]
  jobs, ended = iter(todo), 0  # runs to train, and how many of them have ended
  model_set = parse_assignments(ModelConfig, settings.get("model_set", []))
  for point in points:  # a point whose model cannot run ends the sweep before any run starts
    if point.label not in finished:
      try:
        implementations(get_config(point.preset, **{**point.fields, **model_set}))
      except ValueError as e:
        raise ValueError(f"grid point {point.label!r}: {e}") from e
  runs = collections.defaultdict(list)  # label -> the summaries of its finished runs, by lr
  seconds_of = collections.Counter()  # label -> the seconds of its finished runs
  pending = {}  # future -> (point, the run's lrs)
  start, stopped = time.monotonic(), False
  with _InProcess() if parallel == 1 else _Processes(parallel) as executor:
    while True:
      while len(pending) < parallel and not stopped:
        job = next(jobs, None)
        if job is None:
          break
        if deadline_s and time.monotonic() - start > deadline_s:
          print(f"deadline of {deadline_s:.0f} s reached: rerun the same command to continue")
          stopped = True
          break
        point, group = job
        run = (base.replace(model=point.preset, lr_members=group) if members else
               base.replace(model=point.preset, optimizer=dataclasses.replace(
                   base.optimizer, learning_rate=group[0])))
        model = get_config(point.preset, **{**point.fields, **model_set})
        name = os.path.join(workdir, run_name(settings, point, group))
        log = name + ".log" if parallel > 1 else None
        print(f"=== {point.label}, {_rates(group)}" + (f" (output: {log})" if log else ""))
        if log:
          os.makedirs(workdir, exist_ok=True)
        pending[executor.submit(_timed, train, log, run, model, name)] = job
      if not pending:
        break
      for future in futures.wait(pending, return_when=futures.FIRST_COMPLETED)[0]:
        point, group = pending.pop(future)
        try:
          summary, seconds = future.result()
        except futures.process.BrokenProcessPool as e:
          flight = "; ".join(f"{p.label}, {_rates(g)}" for p, g in [(point, group),
                                                                   *pending.values()])
          raise RuntimeError(
              f"a worker process died during a run (killed by a signal, or out of memory: "
              f"see the runs' logs in {workdir}). Runs in flight: {flight}. Finished points "
              f"are in {out}.json and every run resumes from its last checkpoint: rerun the "
              "same command to continue") from e
        if "interrupted" in summary:
          print(f"{point.label}, {_rates(group)}: stopped by {summary['interrupted']}; rerun "
                "the same command to continue")
          stopped = True
          continue
        shared = {k: v for k, v in summary.items() if k != "members"}
        finished_runs = ([{"lr": group[0], **summary}] if not members else
                         [{**shared, **m} for m in summary["members"]])
        runs[point.label] += [{**r, "seconds": seconds} for r in finished_runs]
        seconds_of[point.label] += seconds
        means = ", ".join(f"{r['test/mean']:.3f}" for r in finished_runs)
        ended += 1
        print(f"    {point.label}, {_rates(group)}: mean {means} in {seconds:.0f} s "
              f"{_progress(ended, len(todo), time.monotonic() - start)}")
        if len(runs[point.label]) == len(lrs):
          done.append(_point_result(point, runs.pop(point.label), seconds_of[point.label]))
          write(out, done, meta, settings)  # after every point: a killed sweep keeps it
          print(f"{point.label:28s} state {done[-1]['state_bytes']:>10,d} B  acc "
                f"{done[-1]['accuracy']:.3f} (length <= 256: {in_distribution(done[-1]):.3f})"
                f"  lr {done[-1]['best_lr']:g}")
  return not stopped and getattr(executor, "signal", None) is None


def _progress(ended: int, total: int, elapsed: float) -> str:
  """'[k/n runs, m min so far, about r min left]': the time left at the mean wall time per
  ended run so far (which counts the parallel runs)."""
  left = elapsed / ended * (total - ended)
  return (f"[{ended}/{total} runs, {elapsed / 60:.1f} min so far, about {left / 60:.1f} min "
          "left]")


def _rates(lrs: tuple[float, ...]) -> str:
  return f"lr {lrs[0]:g}" if len(lrs) == 1 else "lrs " + ", ".join(f"{lr:g}" for lr in lrs)


def _point_result(point: Point, runs: list[dict], seconds: float) -> dict:
  """A point of <out>.json: its best run (`_score`) and every run, in lr order; `seconds`
  its runs took (with lr members: one run's)."""
  runs = sorted(runs, key=lambda r: r["lr"])
  best = max(runs, key=_score)
  return {"label": point.label, "family": point.family, "preset": point.preset,
          "fields": point.fields, "state_bytes": best["state_bytes"],
          "accuracy": best["test/mean"], "best_lr": best["lr"],
          "per_slice": {k[5:]: v for k, v in best.items() if k.startswith("test/")},
          "seconds": round(seconds, 1), "all_runs": runs}
