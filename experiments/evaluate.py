"""Zero-shot recall evaluation of a model: the paper's SWDE, FDA and SQuAD completion.

  python -m experiments.evaluate --checkpoint=runs/my_run --data_dir=data/recall
  python -m experiments.evaluate --checkpoint=runs/my_run --tasks=swde --limit=100 \\
      --dtype=bfloat16 --output_dir=runs/my_run/recall

Loads the model with `based_jax.load_checkpoint` (a training workdir or a converted model
directory; parameters checked against the config), reads each task's rows from
`--data_dir/<task>.jsonl` (or .json / .parquet; without --data_dir from the Hugging Face Hub),
and runs the protocol of `based_jax.evaluation.recall_tasks` (task version v0, the paper's):
prompts left-truncated to 2000 tokens, batched by length, prefilled ragged, greedy decoding
that stops each row at its first newline, at most 48 tokens, the `contains` metric. Writes
`<output_dir>/results.json` (per-task accuracy, rows, timing), `predictions.jsonl` (one line per
row) and `results.md` (a table), with a progress bar in rows/s.
"""

import json
import os

import jax
from absl import app, flags, logging
from tqdm import tqdm

from based_jax.data.tokenizer import load_tokenizer
from based_jax.evaluation import generation, recall_tasks, runner
from based_jax.evaluation.model_loading import load_model

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "A training workdir or a converted model "
                                  "directory (what based_jax.load_checkpoint reads).",
                                  required=True)
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step; default the newest readable one.")
_TASKS = flags.DEFINE_string("tasks", ",".join(recall_tasks.TASKS),
                             f"Comma-separated tasks of {sorted(recall_tasks.TASKS)}.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "Directory of <task>.jsonl / .json / "
                                ".parquet rows in the HF datasets' schema; default: the Hub.")
_LIMIT = flags.DEFINE_integer("limit", None, "Evaluate only the first N rows of each task.",
                              lower_bound=1)
_TOKENIZER = flags.DEFINE_string("tokenizer", "gpt2", "based_jax.data.tokenizer spec.")
_DTYPE = flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"],
                           "Compute dtype override; default the checkpoint's.")
_TOKEN_BUDGET = flags.DEFINE_integer("token_budget", generation.DEFAULT_TOKEN_BUDGET,
                                     "Prompt tokens (rows x padded length) per prefill batch.",
                                     lower_bound=1)
_BATCH_SIZE = flags.DEFINE_integer("batch_size", generation.DEFAULT_MAX_ROWS,
                                   "Most rows per batch.", lower_bound=1)
_OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "Where to write results.json, "
                                  "predictions.jsonl and results.md; default <checkpoint>/recall.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:  # keep Orbax's INFO lines out of the output
    logging.set_verbosity(logging.WARNING)
  try:
    names = recall_tasks.parse_task_names(_TASKS.value)
    rows = {n: recall_tasks.load_rows(recall_tasks.get_task(n), _DATA_DIR.value, _LIMIT.value)
            for n in names}
    config, params = load_model(_CHECKPOINT.value, _STEP.value, _DTYPE.value)
    tokenizer = load_tokenizer(_TOKENIZER.value)
    generate = runner.model_generator(config, params, tokenizer,
                                      token_budget=_TOKEN_BUDGET.value,
                                      max_rows=_BATCH_SIZE.value)
  except ValueError as e:
    raise SystemExit(f"error: {e}") from e
  with tqdm(total=sum(len(r) for r in rows.values()), unit="row", desc="recall") as bar:
    report = runner.run_recall(rows, tokenizer, generate,
                               progress=lambda n, tokens: bar.update(n))
  write_outputs(report, _OUTPUT_DIR.value or os.path.join(_CHECKPOINT.value, "recall"))


def write_outputs(report: runner.Report, output_dir: str) -> None:
  """results.json, predictions.jsonl and results.md under output_dir; the table printed."""
  os.makedirs(output_dir, exist_ok=True)
  rows = sum(report.counts.values())
  results = {
      "checkpoint": _CHECKPOINT.value, "step": _STEP.value, "task_version": recall_tasks.VERSION,
      "data": _DATA_DIR.value or "huggingface hub", "limit": _LIMIT.value,
      "dtype": _DTYPE.value, "device": jax.devices()[0].device_kind,
      "tasks": {n: {"contains": report.scores[n], "rows": report.counts[n]}
                for n in report.scores},
      "seconds": report.seconds, "rows_per_s": rows / report.seconds,
      "prompt_tokens": report.prompt_tokens, "generated_tokens": report.generated_tokens}
  with open(os.path.join(output_dir, "results.json"), "w") as f:
    json.dump(results, f, indent=1)
  with open(os.path.join(output_dir, "predictions.jsonl"), "w") as f:
    for prediction in report.predictions:
      f.write(json.dumps(prediction) + "\n")
  table = runner.markdown_table(report, os.path.basename(os.path.normpath(_CHECKPOINT.value)))
  with open(os.path.join(output_dir, "results.md"), "w") as f:
    f.write(table)
  print(table + f"\n{rows} rows in {report.seconds:.1f} s ({rows / report.seconds:.1f} rows/s); "
        f"wrote {output_dir}")


if __name__ == "__main__":
  app.run(main)
