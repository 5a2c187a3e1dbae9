"""Runs recall tasks: rows -> truncated token prompts -> one batched generation -> metric.

The runner does not know the model: it takes a `GenerateFn` (token prompts -> generated ids),
`model_generator` makes the one of a based-jax model, and tests plug in oracles. The prompts
of all tasks go through one generation call, so batches fill across tasks.

    generate = model_generator(config, params, tokenizer)
    report = run_recall({"swde": rows}, tokenizer, generate)   # report.scores["swde"]
"""

import functools
import time
from typing import Callable, NamedTuple, Optional, Sequence

from based_jax.config import ModelConfig
from based_jax.data.tokenizer import Tokenizer, check_fits
from based_jax.evaluation import generation, recall_tasks

# generate(prompts, progress) -> generated ids per prompt; progress(rows, prompt_tokens).
GenerateFn = Callable[[list[list[int]], Callable[[int, int], None]], list[list[int]]]


class Report(NamedTuple):
  scores: dict[str, float]  # task -> mean `contains` over its rows.
  counts: dict[str, int]  # task -> rows evaluated.
  predictions: list[dict]  # one per row, tasks in order: see `run_recall`.
  seconds: float  # wall time of tokenizing, generating and scoring.
  prompt_tokens: int  # prompt tokens after truncation, all tasks.
  generated_tokens: int  # tokens generated (the stop token included), all tasks.


def model_generator(config: ModelConfig, params, tokenizer: Tokenizer, *,
                    max_new_tokens: int = recall_tasks.MAX_NEW_TOKENS,
                    stops: Sequence[str] = (recall_tasks.STOP,),
                    token_budget: int = generation.DEFAULT_TOKEN_BUDGET,
                    max_rows: int = generation.DEFAULT_MAX_ROWS) -> GenerateFn:
  """The GenerateFn of a based-jax model: greedy, at most `max_new_tokens`, each row stopping
  at its first token holding one of `stops`."""
  check_fits(tokenizer, config.vocab_size)
  mask = generation.stop_token_mask(tokenizer, stops, config.vocab_size)
  run = functools.partial(generation.greedy_generate, config, params,
                          max_new_tokens=max_new_tokens, stop_mask=mask,
                          token_budget=token_budget, max_rows=max_rows)
  return lambda prompts, progress: run(prompts, progress=progress)


def run_recall(rows_by_task: dict[str, list[dict]], tokenizer: Tokenizer,
               generate: GenerateFn, *,
               max_prompt_tokens: int = recall_tasks.MAX_LENGTH - recall_tasks.MAX_NEW_TOKENS,
               progress: Optional[Callable[[int, int], None]] = None) -> Report:
  """Scores every task's rows with the harness's protocol (recall_tasks' module docstring).

  Each prediction is {"task", "doc_id", "prompt_tokens" (after truncation), "truncated"
  (tokens cut from the prompt's left), "generated_tokens", "target", "prediction" (the
  generation cut at the first stop), "contains"}.
  """
  start = time.perf_counter()
  entries = [(name, row) for name, rows in rows_by_task.items() for row in rows]
  for name in rows_by_task:
    recall_tasks.get_task(name)
  encoded = tokenizer.encode_batch([row["text"] for _, row in entries])
  prompts = [recall_tasks.truncate_prompt(tokens, max_prompt_tokens) for tokens in encoded]
  empty = [i for i, p in enumerate(prompts) if not p]
  if empty:
    name, row = entries[empty[0]]
    raise ValueError(f"task {name!r} row with doc_id {row.get('doc_id')!r} has an empty "
                     "prompt: `text` encodes to no tokens")
  generated = generate(prompts, progress or (lambda rows, tokens: None))
  predictions = []
  for (name, row), tokens, prompt, ids in zip(entries, encoded, prompts, generated):
    text = recall_tasks.cut_at_stop(tokenizer.decode(ids))
    predictions.append({
        "task": name, "doc_id": row["doc_id"], "prompt_tokens": len(prompt),
        "truncated": len(tokens) - len(prompt), "generated_tokens": len(ids),
        "target": row["value"], "prediction": text,
        "contains": recall_tasks.contains(text, row["value"])})
  scores, counts = {}, {}
  for name in rows_by_task:
    hits = [p["contains"] for p in predictions if p["task"] == name]
    scores[name], counts[name] = sum(hits) / len(hits) if hits else float("nan"), len(hits)
  return Report(scores, counts, predictions, time.perf_counter() - start,
                sum(len(p) for p in prompts), sum(len(g) for g in generated))


def markdown_table(report: Report, title: str = "model") -> str:
  """One row per task and their mean: contains-accuracy in %, rows."""
  lines = [f"| task ({recall_tasks.VERSION}) | {title}: contains % | rows |", "|---|---|---|"]
  for name, score in report.scores.items():
    lines.append(f"| {name} | {100 * score:.1f} | {report.counts[name]} |")
  if len(report.scores) > 1:
    mean = sum(report.scores.values()) / len(report.scores)
    lines.append(f"| mean | {100 * mean:.1f} | {sum(report.counts.values())} |")
  return "\n".join(lines) + "\n"
