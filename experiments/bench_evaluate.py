"""Wall time of the whole recall suite (SWDE + FDA + SQuAD completion) on random-weight models.

  python -m experiments.bench_evaluate --models=based_360m,transformer_pp_360m \\
      --out=experiments/results/evaluate_h200.json
  python -m experiments.bench_evaluate --models=based_tiny+vocab_size=50264 --scale=0.01  # CPU

The rows are synthetic, in the datasets' schema, as many as the released splits hold (times
--scale) with assumed prompt-length distributions (`LENGTHS`: SWDE and FDA pages of hundreds to
thousands of tokens, many cut to 2000; SQuAD paragraphs of a few hundred): random GPT-2 words,
the key and a colon at the end. Each model first runs one row of every batch shape the suite
will use (compilation), then the whole suite through `runner.run_recall`, the code path of
experiments/evaluate.py, timed from tokenization to the last score. Random weights rarely emit
a newline, so nearly every row decodes all 48 tokens: the slow case of the early stop.
"""

import json
import os
import time

import jax
import numpy as np
from absl import app, flags

from based_jax.data.tokenizer import load_tokenizer
from based_jax.evaluation import batching, generation, recall_tasks, runner
from based_jax.implementations import implementations
from based_jax.model import init_params
from experiments import benchmarking

# task -> (median tokens, log-normal sigma, min, max) of the synthetic prompts (assumed).
LENGTHS = {"swde": (1200, 0.6, 300, 4000), "fda": (2600, 0.5, 800, 6000),
           "squad_completion": (190, 0.4, 60, 600)}

_MODELS = flags.DEFINE_list("models", ["based_360m", "transformer_pp_360m"],
                            "Model specs ('preset+field=value').")
_DTYPE = flags.DEFINE_enum("dtype", "bfloat16", ["float32", "bfloat16"], "Params and compute.")
_SCALE = flags.DEFINE_float("scale", 1.0, "Fraction of each split's row count.", lower_bound=0)
_TOKEN_BUDGET = flags.DEFINE_integer("token_budget", 1 << 17, "Prompt tokens per batch.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 256, "Most rows per batch.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the rows and the weights.")
_OUT = flags.DEFINE_string("out", None, "Write the results to this JSON file.")


def synthetic_rows(tokenizer, seed: int, scale: float) -> dict[str, list[dict]]:
  """Rows of every task in its schema, with the LENGTHS distributions of prompt tokens."""
  rng = np.random.default_rng(seed)
  texts = tokenizer.backend.decode_batch([[i] for i in range(tokenizer.vocab_size)])
  words = [t for t in texts if len(t) > 3 and t[0] == " " and t[1:].isalpha() and t.isascii()]
  rows = {}
  for name, (median, sigma, lo, hi) in LENGTHS.items():
    task = recall_tasks.get_task(name)
    n = max(1, round(task.rows * scale))
    lengths = np.clip(rng.lognormal(np.log(median), sigma, n), lo, hi).astype(int)
    rows[name] = []
    for i, length in enumerate(lengths):
      body = "".join(rng.choice(words, length))
      value = words[rng.integers(len(words))].strip()
      row = {"doc_id": i, "value": value, "text": f"{body}\nkey{i % 7}:"}
      row.update({f: f"synthetic {f}" for f in task.fields if f not in row})
      rows[name].append(row)
  return rows


def warmup_rows(rows: dict[str, list[dict]], tokenizer) -> dict[str, list[dict]]:
  """One row of each padded prompt length the suite's batches have (so each compiled shape)."""
  seen, picked = set(), {name: [] for name in rows}
  for name, task_rows in rows.items():
    for row, tokens in zip(task_rows, tokenizer.encode_batch([r["text"] for r in task_rows])):
      length = batching.bucket_length(min(len(tokens), recall_tasks.MAX_LENGTH -
                                          recall_tasks.MAX_NEW_TOKENS),
                                          generation.DEFAULT_MIN_LENGTH)
      if length not in seen:
        seen.add(length)
        picked[name].append(row)
  return {name: r for name, r in picked.items() if r}


def bench_model(spec: str, rows, tokenizer) -> dict:
  """Compilation pass, then the timed suite, of one model."""
  config = benchmarking.model_config(spec, _DTYPE.value)
  params = jax.jit(init_params, static_argnums=0)(config, _SEED.value)
  generate = runner.model_generator(config, params, tokenizer, token_budget=_TOKEN_BUDGET.value,
                                    max_rows=_BATCH_SIZE.value)
  start = time.perf_counter()
  runner.run_recall(warmup_rows(rows, tokenizer), tokenizer, generate)
  compile_s = time.perf_counter() - start
  report = runner.run_recall(rows, tokenizer, generate)
  n = sum(report.counts.values())
  result = {
      "model": spec, "implementations": implementations(config), "rows": n,
      "compile_and_warmup_s": round(compile_s, 2), "suite_s": round(report.seconds, 2),
      "rows_per_s": round(n / report.seconds, 1),
      "prompt_tokens": report.prompt_tokens,
      "prompt_tokens_per_s": round(report.prompt_tokens / report.seconds),
      "generated_tokens": report.generated_tokens,
      "generated_tokens_per_s": round(report.generated_tokens / report.seconds),
      "contains_random_weights": report.scores}
  print(json.dumps(result), flush=True)
  return result


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  tokenizer = load_tokenizer("gpt2")
  rows = synthetic_rows(tokenizer, _SEED.value, _SCALE.value)
  results = {"meta": {**benchmarking.run_metadata("tokenizers"),
                      "rows": "synthetic (random GPT-2 words), the splits' row counts x scale, "
                              f"assumed prompt lengths {LENGTHS}",
                      "scale": _SCALE.value, "task_version": recall_tasks.VERSION,
                      "token_budget": _TOKEN_BUDGET.value, "batch_size": _BATCH_SIZE.value,
                      "dtype": _DTYPE.value,
                      "max_new_tokens": recall_tasks.MAX_NEW_TOKENS},
             "models": []}
  for spec in _MODELS.value:
    results["models"].append(bench_model(spec, rows, tokenizer))
    if _OUT.value:  # after each model, so a run cut short keeps what it measured
      os.makedirs(os.path.dirname(_OUT.value) or ".", exist_ok=True)
      with open(_OUT.value, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
  app.run(main)
