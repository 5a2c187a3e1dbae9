"""One process of the multi-process and resharding tests (tests/test_multihost.py).

  python tests/multihost_worker.py REQUEST.json

The request (JSON) names the text (a .jsonl file), its tokenizer, the workdir, the token
cache, `steps_this_run` and, for a process of a multi-process run, `coordinator`,
`num_processes` and `process_id`; the device count comes from the environment
(XLA_FLAGS=--xla_force_host_platform_device_count=N). Every process trains the
same tiny text run through `based_jax.training.trainer.train` (`run_config`); process 0 then
writes `<out>.npz` (every leaf of the final params and optimizer state, gathered from all
processes, keyed by its tree path) and `<out>.json` (the summary, the process and device
counts).
"""

import json
import sys

import numpy as np

MODEL_PRESET = "based_tiny"
VOCAB = 264  # the model's vocabulary: the test's byte-level tokenizer has 257 ids
TOTAL_STEPS = 6


def run_config(data: str, tokenizer: str, cache_dir: str):
  """The tiny text run: 8 windows of 32 tokens per step, an evaluation every 2 steps and a
  checkpoint every 2 steps (both exercise global arrays in every process)."""
  from based_jax.training.optimizer import OptimizerConfig
  from based_jax.training.run_config import RunConfig, TextConfig
  text = TextConfig(data=data, tokenizer=tokenizer, seq_len=32, val_fraction=0.1, eval_batches=2,
                    token_cache_dir=cache_dir)
  return RunConfig(model=MODEL_PRESET, task="text", text=text, batch_size=8, eval_every=2,
                   log_every=1, checkpoint_every=2, keep_checkpoints=5,
                   optimizer=OptimizerConfig(learning_rate=3e-3, warmup_steps=1,
                                             total_steps=TOTAL_STEPS))


def main(path: str) -> None:
  with open(path) as f:
    request = json.load(f)
  import jax
  if request.get("num_processes", 1) > 1:
    jax.distributed.initialize(request["coordinator"], request["num_processes"],
                               request["process_id"], initialization_timeout=60)
  from based_jax.config import get_config
  from based_jax.training.sharding import make_mesh, replicated
  from based_jax.training.trainer import train

  run = run_config(request["data"], request["tokenizer"], request["cache_dir"])
  summary, state = train(run, get_config(MODEL_PRESET, vocab_size=VOCAB), request["workdir"],
                         request.get("steps_this_run"))
  tree = {"params": state.params, "opt_state": state.opt_state}
  # One all-gather of the whole tree: every process then holds every leaf.
  whole = jax.jit(lambda t: t, out_shardings=replicated(make_mesh()))(tree)
  leaves = jax.tree_util.tree_flatten_with_path(whole)[0]
  if jax.process_index() == 0:
    np.savez(request["out"] + ".npz", **{jax.tree_util.keystr(key): np.asarray(
        leaf.addressable_data(0)) for key, leaf in leaves})
    with open(request["out"] + ".json", "w") as f:
      json.dump({"summary": summary, "process_count": jax.process_count(),
                 "device_count": jax.device_count()}, f)


if __name__ == "__main__":
  main(sys.argv[1])
