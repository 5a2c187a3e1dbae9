"""Evaluates a trained run's model on MQAR test slices, from its workdir.

  python -m experiments.evaluate_mqar --workdir=runs/mqar_small_mqar_based_cpu
  python -m experiments.evaluate_mqar --workdir=runs/paper --test_mix=paper_test --step=4000

Loads the model with `based_jax.load_checkpoint` (the newest readable checkpoint, or --step)
and the run's data settings (vocabulary, seed, batch) from the same checkpoint, generates the
test mix exactly as training did, and prints the per-query accuracy of every slice and their
mean; --out writes them as JSON.
"""

import json
import os

import jax
from absl import app, flags, logging

from based_jax import load_checkpoint
from based_jax.data import mqar
from based_jax.model import LanguageModel
from based_jax.training import sharding, step as step_lib
from based_jax.training.checkpointing import load_run_config
from based_jax.training.tasks import evaluate_mqar

_WORKDIR = flags.DEFINE_string("workdir", None, "The run's --workdir.", required=True)
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step; default the newest readable one.")
_MEMBER = flags.DEFINE_integer("member", None, "Of a run with lr_members: which model (its "
                               "index in lr_members).")
_TEST_MIX = flags.DEFINE_enum("test_mix", None, sorted(mqar.MIXES),
                              "MQAR test mix; default the run's own.")
_BATCH = flags.DEFINE_integer("batch_size", None, "Evaluation batch; default the run's.",
                              lower_bound=1)
_OUT = flags.DEFINE_string("out", None, "Also write the results to this JSON file.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:  # keep Orbax's INFO lines out of the output
    logging.set_verbosity(logging.WARNING)
  try:
    config, params = load_checkpoint(_WORKDIR.value, _STEP.value, _MEMBER.value)
    run = load_run_config(_WORKDIR.value, _STEP.value)
  except ValueError as e:
    raise SystemExit(f"error: {e}") from e
  test_mix = _TEST_MIX.value or run["test_mix"]
  slices = mqar.get_mix(test_mix)
  test_sets = mqar.generate_mix(slices, split="test", vocab_size=run["vocab_size"],
                                seed=run["seed"])
  mesh = sharding.make_mesh()
  batch_size = _BATCH.value or run["batch_size"]
  if batch_size % jax.device_count():
    raise app.UsageError(f"--batch_size={batch_size} must be divisible by the "
                         f"{jax.device_count()} devices")
  params = jax.device_put(params, sharding.tree_shardings(mesh, params))
  eval_step = step_lib.make_eval_step(LanguageModel(config), mesh,
                                      sharding.tree_shardings(mesh, params))
  results = evaluate_mqar(eval_step, params, slices, test_sets, batch_size, mesh)
  print(f"{_WORKDIR.value} on {test_mix}:")
  for key, value in results.items():
    print(f"  {key[5:]:>10s}  accuracy {value:.4f}")
  if _OUT.value:
    os.makedirs(os.path.dirname(_OUT.value) or ".", exist_ok=True)
    with open(_OUT.value, "w") as f:
      json.dump({"workdir": _WORKDIR.value, "step": _STEP.value, "test_mix": test_mix,
                 **results}, f, indent=1)


if __name__ == "__main__":
  app.run(main)
