"""What a run trains on: synthetic MQAR or language modelling on text.

A task owns its data and its evaluation; the train loop (`trainer.py`) is the same for both.

  MqarTask  the train mix (one sequence length per batch, only the queried positions scored)
            and per-slice test accuracy ("test/<slice>", "test/mean"); done at the target
            accuracy.
  TextTask  a token stream (tokenized once and cached, `based_jax.data.token_files`) cut into
            windows (`text_pipeline`), every position scored; validation loss, perplexity and
            next-token accuracy ("val/loss", "val/perplexity", "val/accuracy").

Each lists the programs its steps will run, `programs`: {"train": [...], "eval": [...]} of
(T, max_labels) per batch shape (global batch [RunConfig.batch_size, T], int32), so the
trainer can compile them all before the first step (`trainer.compile_ahead`).

Both read and check all their data when built, before the train loop touches the workdir.
"""

import math
from typing import Optional

import jax
import numpy as np
from jax.sharding import Mesh

from based_jax.config import ModelConfig
from based_jax.data import mqar, pipeline, text_pipeline, text_sources, token_files, tokenizer
from based_jax.state_size import state_size_bytes
from based_jax.training import multihost, sharding
from based_jax.training.run_config import RunConfig, TextConfig


def _per_process_batch(batch_size: int) -> int:
  if batch_size % jax.device_count():
    raise ValueError(f"batch_size={batch_size} must be divisible by the {jax.device_count()} "
                     "devices")
  return batch_size // jax.process_count()


def evaluate_mqar(eval_step, params, test_slices, test_sets, batch_size: int,
                  mesh: Mesh) -> dict[str, float]:
  """Per-query accuracy of every test slice, and their mean."""
  results = {}
  for spec, data in zip(test_slices, test_sets):
    correct = count = 0
    for batch in pipeline.make_eval_batches(data.inputs, data.labels, batch_size=batch_size):
      _, c, n = eval_step(params, sharding.global_batch(batch, mesh), spec.num_kv_pairs)
      correct, count = correct + int(c), count + int(n)
    results[f"test/{spec.name}"] = correct / max(count, 1)
  results["test/mean"] = float(np.mean(list(results.values())))
  return results


class MqarTask:
  """Multi-query associative recall (based_jax.data.mqar)."""
  headline = "test/mean"
  # Each process shuffles its own shard: the iterator's position means nothing to another
  # process count (checkpointing.Checkpointer.restore).
  global_data_state = False

  def __init__(self, run: RunConfig, model_config: ModelConfig, mesh: Mesh):
    if model_config.vocab_size < run.vocab_size:
      raise ValueError(f"model vocab_size={model_config.vocab_size} is smaller than the MQAR "
                       f"vocab_size={run.vocab_size}")
    self._run, self._mesh = run, mesh
    train_slices = mqar.get_mix(run.train_mix)
    self._test_slices = mqar.get_mix(run.test_mix)
    train_data = mqar.generate_mix(train_slices, split="train", vocab_size=run.vocab_size,
                                   seed=run.seed)
    self._test_sets = mqar.generate_mix(self._test_slices, split="test",
                                        vocab_size=run.vocab_size, seed=run.seed)
    self._max_labels = {}  # labelled positions per row, by sequence length
    for s in train_slices:
      self._max_labels[s.seq_len] = max(self._max_labels.get(s.seq_len, 0), s.num_kv_pairs)
    self.train_iterator = pipeline.make_train_iterator(
        train_data, batch_size=_per_process_batch(run.batch_size), seed=run.seed,
        order=run.data_order)
    self.programs = {"train": sorted(self._max_labels.items()),
                     "eval": sorted({(s.seq_len, s.num_kv_pairs) for s in self._test_slices})}
    self.state_bytes = state_size_bytes(
        model_config, max(s.seq_len for s in self._test_slices)).total
    self.description = (f"MQAR {run.train_mix}: {sum(len(d.inputs) for d in train_data):,} "
                        f"training sequences; state {self.state_bytes:,} bytes")

  def max_labels(self, batch) -> Optional[int]:
    return self._max_labels[batch["inputs"].shape[1]]

  def evaluate(self, eval_step, params) -> dict[str, float]:
    return evaluate_mqar(eval_step, params, self._test_slices, self._test_sets,
                         self._run.batch_size // jax.process_count(), self._mesh)

  def done(self, results: dict[str, float]) -> bool:
    return bool(results) and results["test/mean"] >= self._run.target_accuracy

  def summary(self) -> dict:
    return {"state_bytes": self.state_bytes}


def load_text_tokens(text: TextConfig, vocab_size: int, show_progress: bool = True
                     ) -> tuple[np.ndarray, Optional[tokenizer.Tokenizer]]:
  """The token stream of a text config (tokenizing and caching it if needed), checked against
  the model's vocabulary, and the tokenizer (None for a pre-tokenized file)."""
  spec = text_sources.parse_spec(text.data, text.text_field)
  if spec.token_file is not None:
    tok, path = None, spec.token_file
  else:
    tok = tokenizer.load_tokenizer(text.tokenizer)
    tokenizer.check_fits(tok, vocab_size)
    # Process 0 tokenizes; the others then find the cache complete (a shared token_cache_dir)
    # or build their own copy (a local one).
    path = multihost.lead_first(lambda: token_files.build_token_file(
        spec, tok, text.token_cache_dir, show_progress and multihost.is_lead()),
        "tokenizing the text")
  tokens = token_files.open_tokens(path)
  if not len(tokens):
    raise ValueError(f"{path} holds no tokens")
  if tok is None:  # ids the tokenizer wrote are below its vocab_size, checked above
    largest = int(tokens.max())
    if largest >= vocab_size:
      raise ValueError(f"{path} holds token id {largest}, beyond the model's vocab_size "
                       f"{vocab_size}")
  return tokens, tok


class TextTask:
  """Next-token prediction on a token stream."""
  headline = "val/perplexity"
  # The iterator's state is the number of global batches read, the same position for any
  # process count at the same batch_size (text_pipeline.make_train_iterator).
  global_data_state = True

  def __init__(self, run: RunConfig, model_config: ModelConfig, mesh: Mesh):
    text = run.text
    self._mesh = mesh
    self._tokens, _ = load_text_tokens(text, model_config.vocab_size)
    self._split = text_pipeline.split_windows(len(self._tokens), text.seq_len,
                                              text.val_fraction)
    self._batch = _per_process_batch(run.batch_size)
    self._eval_batches = text.eval_batches
    self.train_iterator = text_pipeline.make_train_iterator(
        self._tokens, self._split, batch_size=self._batch, data_seed=text.data_seed)
    if len(self._split.val):  # fails now, not at the first evaluation, if it is too small
      next(self._eval_iterator())
    self.programs = {"train": [(text.seq_len, None)],
                     "eval": [(text.seq_len, None)] if len(self._split.val) else []}
    per_epoch = len(self._split.train) * text.seq_len
    self.tokens_per_step = run.batch_size * text.seq_len
    self.description = (f"text {text.data!r}: {len(self._tokens):,} tokens, "
                        f"{len(self._split.train):,} training windows of {text.seq_len} "
                        f"(an epoch is {per_epoch / self.tokens_per_step:,.1f} steps), "
                        f"{len(self._split.val):,} validation windows")

  def _eval_iterator(self):
    return text_pipeline.make_eval_batches(
        self._tokens, self._split, batch_size=self._batch, max_batches=self._eval_batches,
        process_index=jax.process_index(), process_count=jax.process_count())

  def max_labels(self, batch) -> Optional[int]:
    del batch
    return None

  def evaluate(self, eval_step, params) -> dict[str, float]:
    if not len(self._split.val):
      return {}
    loss = correct = count = 0
    for batch in self._eval_iterator():
      l, c, n = eval_step(params, sharding.global_batch(batch, self._mesh), None)
      loss, correct, count = loss + float(l), correct + int(c), count + int(n)
    mean = loss / count
    return {"val/loss": mean, "val/perplexity": math.exp(min(mean, 700.0)),
            "val/accuracy": correct / count}

  def done(self, results: dict[str, float]) -> bool:
    del results
    return False

  def summary(self) -> dict:
    return {"tokens": len(self._tokens), "train_windows": len(self._split.train),
            "val_windows": len(self._split.val)}


TASK_CLASSES = {"mqar": MqarTask, "text": TextTask}  # by RunConfig.task (run_config.TASKS)


def make_task(run: RunConfig, model_config: ModelConfig, mesh: Mesh):
  """The task of `run`, its data read and checked."""
  return TASK_CLASSES[run.task](run, model_config, mesh)

