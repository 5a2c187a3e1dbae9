"""BASED against Transformer++ on the same text: validation perplexity curves, one plot.

  python -m experiments.text_comparison --data=bible --out=experiments/results/text_cpu
  python -m experiments.text_comparison --models=based_125m,transformer_pp_125m \\
      --run_set=seq_len=1024 --run_set=batch_size=32 --data=corpus.bin --out=...

Every model trains with the same run (the --run preset with --run_set overrides: the same
tokens in the same order, `data_seed`, the same schedule) in its own workdir under --workdir,
so a rerun resumes. Writes <out>.json (per model: parameters, validation curve, final
perplexity, training tokens/s; device, versions, command) and <out>.png (validation
perplexity against training tokens).
"""

import dataclasses
import json
import os

import jax
from absl import app, flags, logging

from based_jax.config import ModelConfig, get_config
from based_jax.model import count_params
from based_jax.training.run_config import (RunConfig, TextConfig, get_run_config,
                                           parse_assignments)
from based_jax.training.trainer import train
from experiments.benchmarking import run_metadata

_MODELS = flags.DEFINE_list("models", ["based_text_cpu", "transformer_pp_text_cpu"],
                            "Model presets, trained one after the other.")
_RUN = flags.DEFINE_string("run", "text_small", "Run preset shared by every model.")
_DATA = flags.DEFINE_string("data", None, "Text source spec; default: the preset's.")
_RUN_SET = flags.DEFINE_multi_string(
    "run_set", [], "Run, text or optimizer field override field=value (repeatable), e.g. "
    "seq_len=1024, batch_size=32, total_steps=600, learning_rate=1e-3.")
_MODEL_SET = flags.DEFINE_multi_string("model_set", [], "Model field override for every model.")
_WORKDIR = flags.DEFINE_string("workdir", "runs/text_comparison", "One workdir per model below.")
_OUT = flags.DEFINE_string("out", None, "Write <out>.json and <out>.png.")


def comparison_run() -> RunConfig:
  """The --run preset with --data and --run_set applied (fields found in RunConfig, then
  TextConfig, then OptimizerConfig)."""
  run = get_run_config(_RUN.value)
  sections = {"": RunConfig, "text": TextConfig, "optimizer": type(run.optimizer)}
  changes = {name: {} for name in sections}
  for item in _RUN_SET.value:
    name = item.partition("=")[0]
    section = next((s for s, cls in sections.items()
                    if name in {f.name for f in dataclasses.fields(cls)}), None)
    if section is None:
      raise ValueError(f"--run_set {item!r}: no run, text or optimizer field {name!r}")
    changes[section].update(parse_assignments(sections[section], [item]))
  text = dataclasses.replace(run.text, **changes["text"],
                             **({"data": _DATA.value} if _DATA.value else {}))
  return run.replace(text=text, optimizer=dataclasses.replace(run.optimizer,
                                                              **changes["optimizer"]),
                     **changes[""])


def _curve(workdir: str) -> tuple[list[dict], float]:
  """Validation points and the mean training tokens/s of a run, from its metrics.jsonl."""
  points, speeds = [], []
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      record = json.loads(line)
      if "val/perplexity" in record:
        points.append({k: record[k] for k in ("step", "val/loss", "val/perplexity",
                                              "val/accuracy")})
      if "train/tokens_per_s" in record and record["step"] > 10:  # after compilation
        speeds.append(record["train/tokens_per_s"])
  return points, sum(speeds) / max(len(speeds), 1)


def _plot(results: dict, tokens_per_step: int, path: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(6.5, 4.2))
  for name, r in results.items():
    steps = [p["step"] * tokens_per_step / 1e6 for p in r["curve"]]
    ax.plot(steps, [p["val/perplexity"] for p in r["curve"]], marker="o", markersize=3,
            label=f"{name} ({r['params'] / 1e6:.0f}M): {r['final_perplexity']:.1f}")
  ax.set_xlabel("training tokens (millions)")
  ax.set_ylabel("validation perplexity")
  ax.set_yscale("log")
  ax.grid(True, which="both", alpha=0.3)
  ax.legend()
  ax.set_title(f"same tokens, same order ({jax.devices()[0].device_kind})", fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:  # keep Orbax's per-save INFO lines out of the bar
    logging.set_verbosity(logging.WARNING)
  try:
    run = comparison_run()
    overrides = parse_assignments(ModelConfig, _MODEL_SET.value)
    configs = {name: get_config(name, **overrides) for name in _MODELS.value}
  except ValueError as e:
    raise app.UsageError(str(e)) from e
  results = {}
  for name, config in configs.items():
    workdir = os.path.join(_WORKDIR.value, name)
    summary, _ = train(run.replace(model=name), config, workdir)
    curve, tokens_per_s = _curve(workdir)
    results[name] = {"params": count_params(config), "curve": curve,
                     "final_perplexity": summary.get("val/perplexity"),
                     "final_loss": summary.get("val/loss"), "tokens_per_s": tokens_per_s}
    print(f"{name}: validation perplexity {summary.get('val/perplexity'):.2f}")
  if _OUT.value:
    os.makedirs(os.path.dirname(_OUT.value) or ".", exist_ok=True)
    tokens_per_step = run.batch_size * run.text.seq_len
    with open(_OUT.value + ".json", "w") as f:
      json.dump({**run_metadata("optax", "grain"), "run": dataclasses.asdict(run),
                 "tokens_per_step": tokens_per_step, "models": results}, f, indent=1)
    _plot(results, tokens_per_step, _OUT.value + ".png")


if __name__ == "__main__":
  app.run(main)
