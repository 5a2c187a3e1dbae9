"""Perplexity of a checkpoint on a text source, as JSON.

  python -m experiments.perplexity --checkpoint=runs/text_small --data=bible --max_tokens=100000
  python -m experiments.perplexity --checkpoint=runs/x --data=test.jsonl --seq_len=2048 --stride=512

The source (any training data spec: files, directories, globs, hf:NAME, token files) is
tokenized (cached) into one stream of documents separated by EOS, and every token after the
first is scored once, in windows of at most --seq_len inputs
(`based_jax.evaluation.loglikelihood.rolling_windows`):
  --stride unset   non-overlapping windows (each token sees only the tokens of its window);
  --stride=S       sliding windows that advance by S tokens, each scored token seeing up to
                   seq_len - 1 earlier ones (lower, and closer to the model's real ability).
The tokenizer is the run's own when the checkpoint is a training workdir, else --tokenizer.
"""

import json
import math
import os
import time

import numpy as np
from absl import app, flags, logging

from based_jax.evaluation.loglikelihood import rolling_logprobs, rolling_windows
from based_jax.evaluation.model_loading import load_model
from based_jax.training.checkpointing import load_run_config
from based_jax.training.run_config import TextConfig
from based_jax.training.tasks import load_text_tokens
from experiments.benchmarking import run_metadata

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Training workdir or converted model.",
                                  required=True)
_DATA = flags.DEFINE_string("data", None, "Text source spec (as --data of train.py).",
                            required=True)
_TEXT_FIELD = flags.DEFINE_string("text_field", "text", "Field of a document in jsonl/parquet.")
_TOKENIZER = flags.DEFINE_string("tokenizer", None,
                                 "Tokenizer; default: the run's own, else gpt2.")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 2048, "Inputs per window.", lower_bound=1)
_STRIDE = flags.DEFINE_integer("stride", None, "Sliding-window stride; unset: non-overlapping.",
                               lower_bound=1)
_MAX_TOKENS = flags.DEFINE_integer("max_tokens", None, "Score only the first this many tokens.",
                                   lower_bound=2)
_DTYPE = flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"], "Compute dtype override.")
_CACHE = flags.DEFINE_string("token_cache_dir", "data/tokens", "Token file cache.")
_OUT = flags.DEFINE_string("out", None, "Write the result to this JSON file.")


def _run_tokenizer(checkpoint: str) -> str:
  try:
    run = load_run_config(checkpoint)
  except ValueError:  # a converted model: no run config
    return "gpt2"
  return run.get("text.tokenizer", "gpt2")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  try:
    config, params = load_model(_CHECKPOINT.value, dtype=_DTYPE.value)
    text = TextConfig(data=_DATA.value, text_field=_TEXT_FIELD.value,
                      tokenizer=_TOKENIZER.value or _run_tokenizer(_CHECKPOINT.value),
                      token_cache_dir=_CACHE.value)
    tokens, _ = load_text_tokens(text, config.vocab_size)
    stream = np.asarray(tokens[:_MAX_TOKENS.value], np.int64).tolist()
    windows = rolling_windows(len(stream), _SEQ_LEN.value, _STRIDE.value)
    if not windows:
      raise ValueError(f"{_DATA.value!r} has {len(stream)} tokens: nothing to score")
  except ValueError as e:
    raise SystemExit(f"error: {e}") from e
  start = time.perf_counter()
  (logprob,) = rolling_logprobs(config, params, [stream], _SEQ_LEN.value, _STRIDE.value)
  seconds = time.perf_counter() - start
  scored = len(stream) - 1
  result = {
      "checkpoint": _CHECKPOINT.value, "data": _DATA.value, "tokenizer": text.tokenizer,
      "seq_len": _SEQ_LEN.value, "stride": _STRIDE.value,
      "mode": "non-overlapping" if _STRIDE.value is None else "sliding",
      "tokens_scored": scored, "windows": len(windows), "nll": -logprob / scored,
      "perplexity": math.exp(-logprob / scored), "seconds": seconds,
      "tokens_per_s": scored / seconds, **run_metadata()}
  print(f"perplexity {result['perplexity']:.3f} (nll {result['nll']:.4f}) over {scored:,} "
        f"tokens in {len(windows):,} {result['mode']} windows of <= {_SEQ_LEN.value}")
  if _OUT.value:
    os.makedirs(os.path.dirname(_OUT.value) or ".", exist_ok=True)
    with open(_OUT.value, "w") as f:
      json.dump(result, f, indent=1)


if __name__ == "__main__":
  app.run(main)
