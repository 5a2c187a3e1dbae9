"""The paper's zero-shot recall tasks (SWDE, FDA, SQuAD completion): rows, prompt and metric.

Each task is defined as in the paper's harness (a fork of lm-evaluation-harness 0.4.1, task
version 0): the prompt is the row's `text` exactly as stored, the target its `value` exactly as
stored (no whitespace stripping: upstream lm-eval's later "version 1" of these tasks strips
both and is not comparable), zero-shot, greedy generation until "\\n" with at most
`MAX_NEW_TOKENS` new tokens, the prompt's tokens left-truncated to `MAX_LENGTH -
MAX_NEW_TOKENS` so prompt and generation fit the model's 2048-token context, and the metric
`contains`: the target, as a literal string, occurs in the generation, ignoring case; a
task's score is its mean over rows.

Rows come from local files in the Hugging Face datasets' schema (`<data_dir>/<task>.jsonl`,
`.json` or `.parquet`) or, with network, from the Hub through `datasets.load_dataset`.
"""

import dataclasses
import json
import os
import re
from typing import Optional, Sequence

MAX_LENGTH = 2048  # tokens of context the paper's models were evaluated with.
MAX_NEW_TOKENS = 48  # the harness's max_gen_toks.
STOP = "\n"  # the harness's `until`: the generation is cut at its first newline.
VERSION = "v0"  # the paper's harness (unstripped text and target), not upstream lm-eval's v1.
FILE_SUFFIXES = (".jsonl", ".json", ".parquet")


@dataclasses.dataclass(frozen=True)
class RecallTask:
  """One recall task: where its rows live and which fields a row must have."""
  name: str  # the task's name in the paper's harness.
  hub_id: str  # Hugging Face Hub dataset id.
  split: str  # the split the harness evaluates.
  fields: tuple[str, ...]  # fields every row must have (the dataset's columns).
  rows: int  # rows in the released split.


_SWDE_FIELDS = ("doc_id", "file_name", "key", "value", "text")
TASKS: dict[str, RecallTask] = {
    "swde": RecallTask("swde", "hazyresearch/based-swde-v2", "validation", _SWDE_FIELDS, 1111),
    "fda": RecallTask("fda", "hazyresearch/based-fda", "validation", _SWDE_FIELDS, 1102),
    "squad_completion": RecallTask(
        "squad_completion", "hazyresearch/based-squad", "validation",
        ("doc_id", "text", "value", "title", "context", "question"), 2984),
}


def get_task(name: str) -> RecallTask:
  """The task called `name`; ValueError naming the known ones otherwise."""
  if name not in TASKS:
    raise ValueError(f"unknown recall task {name!r}; known tasks: {sorted(TASKS)}")
  return TASKS[name]


def parse_task_names(spec: str) -> list[str]:
  """Comma-separated task names (each checked), in order, without repeats."""
  names = [n.strip() for n in spec.split(",") if n.strip()]
  if not names:
    raise ValueError(f"no task named in {spec!r}; known tasks: {sorted(TASKS)}")
  for name in names:
    get_task(name)
  return list(dict.fromkeys(names))


def contains(generation: str, target: str) -> bool:
  """The harness's metric: `target` occurs in `generation` as a literal string, ignoring case
  (regex characters in the target are escaped; an empty generation contains no non-empty
  target)."""
  return re.search(re.escape(target), generation, re.IGNORECASE) is not None


def truncate_prompt(tokens: Sequence[int], max_tokens: int = MAX_LENGTH - MAX_NEW_TOKENS
                    ) -> list[int]:
  """The last `max_tokens` tokens of a prompt (the harness truncates contexts on the left)."""
  if max_tokens < 1:
    raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
  return list(tokens[-max_tokens:])


def cut_at_stop(text: str, stops: Sequence[str] = (STOP,)) -> str:
  """`text` up to the first occurrence of each stop string in turn (empty stops ignored): the
  harness's post-hoc cut of a generation."""
  for stop in stops:
    if stop:
      text = text.split(stop)[0]
  return text


def find_data_file(task: RecallTask, data_dir: str) -> str:
  """`<data_dir>/<task>.<suffix>` for the first suffix of FILE_SUFFIXES that exists."""
  if not os.path.isdir(data_dir):
    raise ValueError(f"data_dir {data_dir!r} is not a directory")
  for suffix in FILE_SUFFIXES:
    path = os.path.join(data_dir, task.name + suffix)
    if os.path.isfile(path):
      return path
  raise ValueError(f"no data file for task {task.name!r} in {data_dir!r}: expected one of "
                   f"{[task.name + s for s in FILE_SUFFIXES]} (rows of {task.hub_id}, split "
                   f"{task.split!r}, fields {list(task.fields)})")


def read_rows_file(path: str) -> list[dict]:
  """Rows of a JSON Lines, JSON (a list of objects) or Parquet file."""
  if not os.path.isfile(path):
    raise ValueError(f"data file {path!r} does not exist")
  if path.endswith(".parquet"):
    try:
      import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
    except ImportError as e:
      raise ValueError(f"reading {path!r} needs pyarrow (pip install 'based-jax[eval]')") from e
    return pq.read_table(path).to_pylist()
  with open(path, encoding="utf-8") as f:
    if path.endswith(".json"):
      try:
        rows = json.load(f)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path!r} is not valid JSON: {e}") from e
      if not isinstance(rows, list):
        raise ValueError(f"{path!r} must hold a JSON list of rows, got {type(rows).__name__}")
      return rows
    rows = []
    for number, line in enumerate(f, 1):
      if line.strip():
        try:
          rows.append(json.loads(line))
        except json.JSONDecodeError as e:
          raise ValueError(f"{path!r} line {number} is not valid JSON: {e}") from e
    return rows


def load_hub_rows(task: RecallTask) -> list[dict]:
  """The task's split from the Hugging Face Hub (needs `datasets` and network)."""
  try:
    import datasets  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ValueError(f"loading {task.hub_id} from the Hub needs `datasets` (pip install "
                     f"'based-jax[eval]'); or pass data_dir with {task.name}.jsonl") from e
  try:
    return list(datasets.load_dataset(task.hub_id, split=task.split))
  except Exception as e:  # no network, unknown id, a changed schema: all end the same way
    raise ValueError(f"cannot load {task.hub_id} (split {task.split!r}) from the Hugging Face "
                     f"Hub: {type(e).__name__}: {e}; without network pass data_dir holding "
                     f"{task.name}.jsonl") from e


def check_rows(task: RecallTask, rows: Sequence, source: str) -> None:
  """Every row is an object with the task's fields, `text` and `value` strings; ValueError
  naming the source, the first bad row and what it lacks."""
  if not rows:
    raise ValueError(f"{source} has no rows for task {task.name!r}")
  for i, row in enumerate(rows):
    if not isinstance(row, dict):
      raise ValueError(f"{source} row {i} is a {type(row).__name__}, not an object with "
                       f"fields {list(task.fields)}")
    missing = [f for f in task.fields if f not in row]
    if missing:
      raise ValueError(f"{source} row {i} lacks the field(s) {missing} that task "
                       f"{task.name!r} needs (fields {list(task.fields)})")
    for field in ("text", "value"):
      if not isinstance(row[field], str):
        raise ValueError(f"{source} row {i}: {field!r} must be a string, got "
                         f"{type(row[field]).__name__}")


def load_rows(task: RecallTask, data_dir: Optional[str] = None,
              limit: Optional[int] = None) -> list[dict]:
  """The task's rows, checked: from `data_dir` (see `find_data_file`) or, when it is None,
  from the Hub; the first `limit` rows if given."""
  if limit is not None and limit < 1:
    raise ValueError(f"limit must be >= 1, got {limit}")
  if data_dir is None:
    rows, source = load_hub_rows(task), task.hub_id
  else:
    source = find_data_file(task, data_dir)
    rows = read_rows_file(source)
  check_rows(task, rows, source)
  return rows[:limit] if limit is not None else rows
