"""The text side of the data: tokenizers, sources, token files, windows and the grain iterator."""

import gzip
import json
import os

import numpy as np
import pytest

from based_jax.data import text_pipeline, text_sources, token_files, tokenizer

DOCS = ["In the beginning God created the heaven and the earth.",
        "Ünïcödé, emoji 😀 and\nnew lines.",
        "",
        "x" * 300]


@pytest.fixture(scope="module")
def gpt2():
  return tokenizer.load_tokenizer("gpt2")


def _write_jsonl(path, docs, field="text", opener=open):
  with opener(path, "wt") as f:
    for d in docs:
      f.write(json.dumps({field: d, "other": 1}) + "\n")
  return str(path)


# --- tokenizer ---

def test_gpt2_known_ids_and_round_trip(gpt2):
  assert gpt2.vocab_size == tokenizer.GPT2_VOCAB_SIZE == 50257
  assert gpt2.eos_id == 50256
  assert gpt2.encode("Hello world") == [15496, 995]
  assert gpt2.encode(" Hello") == [18435]
  for doc in DOCS:
    assert gpt2.decode(gpt2.encode(doc)) == doc
  assert gpt2.encode_batch(DOCS) == [gpt2.encode(d) for d in DOCS]
  # A literal end-of-text string inside a document is text, not the separator.
  assert gpt2.eos_id not in gpt2.encode("a <|endoftext|> b")


def test_tokenizer_json_path_gives_the_same_ids(gpt2, tmp_path):
  path = str(tmp_path / "tokenizer.json")
  gpt2.backend.save(path)
  loaded = tokenizer.load_tokenizer(path)
  assert loaded.eos_id == gpt2.eos_id
  assert loaded.encode_batch(DOCS) == gpt2.encode_batch(DOCS)


def test_tokenizer_errors(gpt2, tmp_path):
  with pytest.raises(ValueError, match="does not exist"):
    tokenizer.load_tokenizer(str(tmp_path / "missing.json"))
  (tmp_path / "bad.json").write_text("{not json")
  with pytest.raises(ValueError, match="not a tokenizers JSON"):
    tokenizer.load_tokenizer(str(tmp_path / "bad.json"))
  with pytest.raises(ValueError, match="50,257 ids but the model's vocab_size is 512"):
    tokenizer.check_fits(gpt2, 512)
  tokenizer.check_fits(gpt2, 50264)


# --- sources ---

def test_every_file_kind_reads_its_documents(tmp_path):
  import pyarrow as pa
  import pyarrow.parquet as pq
  (tmp_path / "a.txt").write_text(DOCS[0])
  _write_jsonl(tmp_path / "b.jsonl", DOCS[1:3])
  _write_jsonl(tmp_path / "c.jsonl.gz", DOCS[3:], opener=gzip.open)
  pq.write_table(pa.table({"text": DOCS, "n": list(range(4))}), str(tmp_path / "d.parquet"))
  spec = text_sources.parse_spec(str(tmp_path))  # a directory: sorted files
  assert [s.kind for s in spec.text] == ["txt", "jsonl", "jsonl", "parquet"]
  assert [d for s in spec.text for d in s.documents()] == DOCS + DOCS
  glob_spec = text_sources.parse_spec(str(tmp_path / "*.jsonl*"))
  assert [d for s in glob_spec.text for d in s.documents()] == DOCS[1:]


def test_bible_is_embedded():
  (source,) = text_sources.parse_spec("bible").text
  documents = list(source.documents())
  assert len(documents) == 1189  # chapters of the King James Bible
  assert documents[0].startswith("In the beginning God created the heaven and the earth.")


def test_hf_datasets_source_reads_a_local_dataset(tmp_path):
  pytest.importorskip("datasets", reason="the `datasets` package is optional")
  folder = tmp_path / "ds"
  folder.mkdir()
  _write_jsonl(folder / "train.jsonl", DOCS)
  (source,) = text_sources.parse_spec(f"hf:{folder}@train").text
  assert list(source.documents()) == DOCS


def test_source_errors(tmp_path):
  with pytest.raises(ValueError, match="does not exist"):
    text_sources.parse_spec(str(tmp_path / "missing.jsonl"))
  with pytest.raises(ValueError, match="no data source given"):
    text_sources.parse_spec(" , ")
  (tmp_path / "x.csv").write_text("a,b")
  with pytest.raises(ValueError, match="unknown file type"):
    text_sources.parse_spec(str(tmp_path / "x.csv"))
  bad = _write_jsonl(tmp_path / "bad.jsonl", DOCS, field="body")
  (source,) = text_sources.parse_spec(bad).text
  with pytest.raises(ValueError, match=r"bad.jsonl:1: no field 'text' \(has \['body', 'other'\]"):
    list(source.documents())
  (tmp_path / "tokens.bin").write_bytes(b"\0\0")
  with pytest.raises(ValueError, match="only data source"):
    text_sources.parse_spec(f"{tmp_path / 'tokens.bin'},bible")


# --- token files ---

def _stream(tok, docs):
  return [t for d in docs for t in (*tok.encode(d), tok.eos_id)]


def test_token_file_is_documents_then_eos(gpt2, tmp_path):
  data = _write_jsonl(tmp_path / "c.jsonl", DOCS)
  path = token_files.build_token_file(text_sources.parse_spec(data), gpt2, str(tmp_path / "c"),
                                      show_progress=False)
  tokens = token_files.open_tokens(path)
  assert tokens.dtype == np.uint16
  assert tokens.tolist() == _stream(gpt2, DOCS)
  assert json.load(open(path[:-4] + ".json"))["complete"]


def test_interrupted_build_resumes_to_the_same_file(gpt2, tmp_path, monkeypatch):
  docs = [f"document {i} " * (i % 7 + 1) for i in range(23)]
  data = _write_jsonl(tmp_path / "c.jsonl", docs)
  spec = text_sources.parse_spec(data)
  monkeypatch.setattr(token_files, "_BATCH_DOCUMENTS", 4)
  original = text_sources._READERS["jsonl"]

  def dies_after_ten(source):
    for i, d in enumerate(original(source)):
      if i == 10:
        raise KeyboardInterrupt
      yield d
  monkeypatch.setitem(text_sources._READERS, "jsonl", dies_after_ten)
  with pytest.raises(KeyboardInterrupt):
    token_files.build_token_file(spec, gpt2, str(tmp_path / "c"), show_progress=False)
  meta = json.load(open(next(str(p) for p in (tmp_path / "c").glob("*.json"))))
  assert meta["documents"] == 8 and not meta["complete"]  # two batches of 4 were written
  monkeypatch.setitem(text_sources._READERS, "jsonl", original)
  path = token_files.build_token_file(spec, gpt2, str(tmp_path / "c"), show_progress=False)
  assert token_files.open_tokens(path).tolist() == _stream(gpt2, docs)


def test_empty_corpus_and_pretokenized_files(gpt2, tmp_path):
  (tmp_path / "empty.jsonl").write_text("\n")
  with pytest.raises(ValueError, match="no documents"):
    token_files.build_token_file(text_sources.parse_spec(str(tmp_path / "empty.jsonl")), gpt2,
                                 str(tmp_path / "c"), show_progress=False)
  ids = np.array([5, 70000, 3], np.uint32)
  ids.tofile(tmp_path / "big.bin")
  (tmp_path / "big.bin.json").write_text('{"dtype": "uint32"}')
  np.save(tmp_path / "t.npy", ids)
  assert token_files.open_tokens(str(tmp_path / "big.bin")).tolist() == ids.tolist()
  assert token_files.open_tokens(str(tmp_path / "t.npy")).tolist() == ids.tolist()
  (tmp_path / "odd.bin").write_bytes(b"\0\0\0")
  with pytest.raises(ValueError, match="not a whole number of uint16"):
    token_files.open_tokens(str(tmp_path / "odd.bin"))


# --- windows and the grain iterator ---

def test_windows_cover_the_stream_once_and_split_deterministically():
  tokens = np.arange(1000) % 251
  split = text_pipeline.split_windows(len(tokens), 9, 0.1)
  windows = np.sort(np.concatenate([split.train, split.val]))
  assert windows.tolist() == list(range(100))  # 1000 // (9 + 1) windows, each once
  assert split.val.tolist() == list(range(9, 100, 10))
  source = text_pipeline._Windows(tokens, windows, 9)
  rows = [source[i] for i in range(len(source))]
  inputs = np.concatenate([np.concatenate([r["inputs"], r["labels"][-1:]]) for r in rows])
  assert inputs.tolist() == tokens[:1000].tolist()  # no token lost or duplicated
  for r in rows:
    np.testing.assert_array_equal(r["inputs"][1:], r["labels"][:-1])
  again = text_pipeline.split_windows(len(tokens), 9, 0.1)
  np.testing.assert_array_equal(again.val, split.val)
  with pytest.raises(ValueError, match="fewer than the 2 window"):
    text_pipeline.split_windows(15, 9, 0.1)


def test_train_iterator_shards_resumes_and_is_seeded():
  tokens = np.arange(4000) % 1000
  split = text_pipeline.split_windows(len(tokens), 7, 0.05)
  full = text_pipeline.make_train_iterator(tokens, split, batch_size=4, data_seed=3,
                                           process_index=0, process_count=1)
  parts = [text_pipeline.make_train_iterator(tokens, split, batch_size=2, data_seed=3,
                                             process_index=i, process_count=2)
           for i in range(2)]
  for _ in range(5):
    whole = next(full)["inputs"]
    a, b = (next(p)["inputs"] for p in parts)
    # The processes take alternate rows of the same shuffled order: together one global batch.
    np.testing.assert_array_equal(np.stack([a, b], 1).reshape(4, -1), whole)
  state = full.get_state()
  expected = [next(full)["inputs"] for _ in range(3)]
  resumed = text_pipeline.make_train_iterator(tokens, split, batch_size=4, data_seed=3,
                                              process_index=0, process_count=1)
  resumed.set_state(state)
  for e in expected:
    np.testing.assert_array_equal(next(resumed)["inputs"], e)
  other = text_pipeline.make_train_iterator(tokens, split, batch_size=4, data_seed=4,
                                            process_index=0, process_count=1)
  assert not np.array_equal(next(other)["inputs"], next(text_pipeline.make_train_iterator(
      tokens, split, batch_size=4, data_seed=3, process_index=0, process_count=1))["inputs"])
  with pytest.raises(ValueError, match="fewer than one global batch"):
    text_pipeline.make_train_iterator(tokens, split, batch_size=10_000, data_seed=0)


def test_epochs_reshuffle_and_visit_every_training_window():
  tokens = np.arange(200)
  split = text_pipeline.split_windows(len(tokens), 9, 0.0)  # 20 windows
  it = text_pipeline.make_train_iterator(tokens, split, batch_size=5, data_seed=0,
                                         process_index=0, process_count=1)
  epochs = [[int(row[0]) // 10 for _ in range(4) for row in next(it)["inputs"]]
            for _ in range(2)]
  assert sorted(epochs[0]) == sorted(epochs[1]) == list(range(20))
  assert epochs[0] != epochs[1]
