"""Token files: text tokenized once into a flat array on disk, memory-mapped for training.

`build_token_file` tokenizes the documents of a `DataSpec` into `<cache_dir>/<key>.bin`
(uint16 when every id fits, else uint32) with `<key>.json` beside it recording the tokenizer,
the sources, the dtype and how far it got. Each document is followed by the tokenizer's EOS,
so the stream is `doc1 EOS doc2 EOS ...`. Documents are encoded in batches by the `tokenizers`
library, which spreads a batch over all cores. After every batch the tokens are flushed and
the progress record replaced atomically, so an interrupted build resumes where it stopped (the
file is truncated to the recorded length and the recorded documents are skipped); a complete
file is reused as it is.
"""

import json
import os
from typing import Optional

import numpy as np
import tqdm

from based_jax.data.text_sources import DataSpec
from based_jax.data.tokenizer import Tokenizer

_BATCH_DOCUMENTS = 512  # documents per encode_batch call and per progress record.


def token_dtype(vocab_size: int) -> np.dtype:
  return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


def _write_json(path: str, record: dict) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(record, f, indent=1)
  os.replace(tmp, path)


def build_token_file(spec: DataSpec, tokenizer: Tokenizer, cache_dir: str,
                     show_progress: bool = True) -> str:
  """The path of the complete token file of `spec`'s documents, building what is missing."""
  os.makedirs(cache_dir, exist_ok=True)
  base = os.path.join(cache_dir, spec.cache_key(tokenizer.spec))
  path, meta_path = base + ".bin", base + ".json"
  dtype = token_dtype(tokenizer.vocab_size)
  meta = {"tokenizer": tokenizer.spec, "eos_id": tokenizer.eos_id, "dtype": dtype.name,
          "sources": [s.identity() for s in spec.text], "documents": 0, "tokens": 0,
          "complete": False}
  if os.path.exists(meta_path) and os.path.exists(path):
    with open(meta_path) as f:
      saved = json.load(f)
    if saved.get("complete"):
      return path
    meta.update(documents=saved["documents"], tokens=saved["tokens"])
  total_bytes = sum(s.num_bytes() or 0 for s in spec.text) or None
  bar = tqdm.tqdm(total=total_bytes, unit="B", unit_scale=True, disable=not show_progress,
                  desc=f"tokenizing into {os.path.basename(path)}", dynamic_ncols=True)
  with open(path, "ab") as out:
    out.truncate(meta["tokens"] * dtype.itemsize)
    out.seek(0, os.SEEK_END)
    number, batch = 0, []

    def flush():
      ids = tokenizer.encode_batch(batch)
      stream = np.fromiter((t for doc in ids for t in (*doc, tokenizer.eos_id)), dtype=np.int64)
      out.write(stream.astype(dtype).tobytes())
      out.flush()
      os.fsync(out.fileno())
      meta["documents"] += len(batch)
      meta["tokens"] += len(stream)
      _write_json(meta_path, meta)
      bar.update(sum(len(d.encode("utf-8")) for d in batch))
      bar.set_postfix(tokens=f"{meta['tokens']:,}")
      batch.clear()

    for source in spec.text:
      done = bar.n
      for document in source.documents():
        number += 1
        if number <= meta["documents"]:  # written by an interrupted build
          bar.update(len(document.encode("utf-8")))
          continue
        batch.append(document)
        if len(batch) == _BATCH_DOCUMENTS:
          flush()
      if batch:
        flush()
      if source.num_bytes():  # the file's markup (JSON, parquet) counts as read too
        bar.update(max(0, done + source.num_bytes() - bar.n))
  bar.close()
  if meta["tokens"] == 0:
    raise ValueError(f"the data sources have no documents: {[s.location for s in spec.text]}")
  meta["complete"] = True
  _write_json(meta_path, meta)
  return path


def open_tokens(path: str) -> np.ndarray:
  """A read-only memory map of a token file: .npy, or .bin (uint16 unless its .json sidecar
  names another dtype)."""
  if path.endswith(".npy"):
    tokens = np.load(path, mmap_mode="r")
  else:
    dtype: Optional[str] = "uint16"
    for sidecar in (path + ".json", os.path.splitext(path)[0] + ".json"):
      if os.path.exists(sidecar):
        with open(sidecar) as f:
          dtype = json.load(f).get("dtype", dtype)
        break
    if os.path.getsize(path) % np.dtype(dtype).itemsize:
      raise ValueError(f"{path}: size {os.path.getsize(path)} is not a whole number of "
                       f"{dtype} tokens")
    tokens = np.memmap(path, dtype=dtype, mode="r") if os.path.getsize(path) else \
        np.zeros((0,), dtype)
  if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
    raise ValueError(f"{path}: expected a 1-D integer token array, got {tokens.dtype} "
                     f"{tokens.shape}")
  return tokens
