"""The functions the recall task configs of this directory name (`!function utils.<name>`):
their rows through `recall_tasks.load_rows` and their metric, `recall_tasks.contains`."""

import functools

import datasets

from based_jax.evaluation import recall_tasks


def _dataset(name: str, data_dir=None, limit=None, **unused) -> datasets.DatasetDict:
  """The task's checked rows as lm-eval's dataset: `data_dir` and `limit` come from lm-eval's
  metadata (`--metadata='{"data_dir": ...}'` or `TaskManager(metadata=...)`); the task's own
  metadata (its version) is in `unused`."""
  task = recall_tasks.get_task(name)
  rows = recall_tasks.load_rows(task, data_dir, limit)
  return datasets.DatasetDict({task.split: datasets.Dataset.from_list(rows)})


swde_dataset = functools.partial(_dataset, "swde")
fda_dataset = functools.partial(_dataset, "fda")
squad_completion_dataset = functools.partial(_dataset, "squad_completion")


def process_results(doc: dict, results: list) -> dict:
  """The row's `contains` score (1 or 0) for the generation lm-eval cut at the stop."""
  return {"contains": int(recall_tasks.contains(results[0], doc["value"]))}
