"""Language-model training on text: resume, micro-batching, fine-tuning, bad input, learning."""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import tokenizers

from based_jax.config import get_config
from based_jax.data import text_pipeline, text_sources, token_files, tokenizer
from based_jax.model import LanguageModel
from based_jax.training import sharding, step as step_lib
from based_jax.training.checkpointing import load_checkpoint
from based_jax.training.optimizer import OptimizerConfig
from based_jax.training.run_config import RUN_PRESETS, RunConfig, TextConfig
from based_jax.training.trainer import train

MODEL = get_config("based_tiny", vocab_size=304)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  """A few Bible chapters as JSONL and a 300-id byte-level BPE trained on them."""
  folder = tmp_path_factory.mktemp("corpus")
  (source,) = text_sources.parse_spec("bible").text
  chapters = [c for _, c in zip(range(60), source.documents())]
  with open(folder / "chapters.jsonl", "w") as f:
    for c in chapters:
      f.write(json.dumps({"text": c}) + "\n")
  bpe = tokenizers.ByteLevelBPETokenizer()
  bpe.train_from_iterator(chapters, vocab_size=300, special_tokens=["<|endoftext|>"],
                          show_progress=False)
  bpe.save(str(folder / "tokenizer.json"))
  return folder


def _run(corpus, **changes) -> RunConfig:
  text = TextConfig(data=str(corpus / "chapters.jsonl"), tokenizer=str(corpus / "tokenizer.json"),
                    seq_len=32, val_fraction=0.05, eval_batches=2,
                    token_cache_dir=str(corpus / "cache"))
  run = RunConfig(model="based_tiny", task="text", text=text, batch_size=4, eval_every=4,
                  log_every=2, checkpoint_every=3,
                  optimizer=OptimizerConfig(learning_rate=3e-3, warmup_steps=1, total_steps=6))
  return dataclasses.replace(run, **changes)


def test_gradient_accumulation_is_one_big_batch():
  model = LanguageModel(MODEL)
  opt = optax.sgd(0.1)
  rng = np.random.default_rng(0)
  batch = {"inputs": rng.integers(0, 304, (4, 16), dtype=np.int32),
           "labels": rng.integers(0, 304, (4, 16), dtype=np.int32)}
  batch["labels"][0, :5] = -100  # micro-batches with different label counts
  mesh = sharding.make_mesh()
  init = lambda: step_lib.init_state(model, opt, 0, jnp.zeros((1, 8), jnp.int32))
  shardings = step_lib.state_shardings(mesh, jax.eval_shape(init))
  finals = []
  for accum in (1, 2, 4):
    step = step_lib.make_train_step(model, opt, mesh, shardings, grad_accum_steps=accum)
    state, metrics = step(jax.jit(init, out_shardings=shardings)(), batch, None)
    finals.append((state, metrics))
  for state, metrics in finals[1:]:
    np.testing.assert_allclose(float(metrics["loss"]), float(finals[0][1]["loss"]), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(finals[0][0].params)):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)


def test_init_from_starts_at_the_saved_parameters(corpus, tmp_path):
  _, trained = train(_run(corpus), MODEL, str(tmp_path / "base"))
  # One step at a vanishing learning rate: the fine-tuned run's parameters stay the saved ones.
  run = _run(corpus, init_from=str(tmp_path / "base"),
             optimizer=OptimizerConfig(learning_rate=1e-20, warmup_steps=0, total_steps=1,
                                       weight_decay=0.0))
  _, tuned = train(run, MODEL, str(tmp_path / "tuned"))
  for a, b in zip(jax.tree.leaves(trained.params), jax.tree.leaves(tuned.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-12)
  with pytest.raises(ValueError, match="holds a different model: d_model 64 .run: 32"):
    train(run, MODEL.replace(d_model=32), str(tmp_path / "other"))


def _listing(folder):
  return sorted((root, tuple(sorted(files))) for root, _, files in os.walk(folder))


@pytest.mark.parametrize("case", ["missing", "empty", "short", "id_beyond_vocab",
                                  "tokenizer_too_big"])
def test_bad_text_input_is_named_and_touches_no_workdir(corpus, tmp_path, case):
  workdir = tmp_path / "existing"
  workdir.mkdir()
  (workdir / "notes.txt").write_text("keep me")
  before = _listing(workdir)
  text, model = {}, MODEL
  if case == "missing":
    text, match = {"data": str(tmp_path / "nope.jsonl")}, "does not exist"
  elif case == "empty":
    (tmp_path / "e.jsonl").write_text("")
    text, match = {"data": str(tmp_path / "e.jsonl")}, "no documents"
  elif case == "short":
    (tmp_path / "s.txt").write_text("too short")
    text, match = {"data": str(tmp_path / "s.txt")}, "fewer than the 2 window"
  elif case == "id_beyond_vocab":
    np.save(tmp_path / "ids.npy", np.array([1, 2, 999] * 100, np.int32))
    text, match = {"data": str(tmp_path / "ids.npy")}, "token id 999, beyond the model's"
  else:
    text, match = {"tokenizer": "gpt2"}, "50,257 ids but the model's vocab_size is 304"
  run = _run(corpus)
  run = run.replace(text=dataclasses.replace(run.text, **text))
  with pytest.raises(ValueError, match=match):
    train(run, model, str(workdir))
  assert _listing(workdir) == before


def test_readme_text_run_beats_the_unigram_model(tmp_path):
  """The README's `--run=text_small` on the embedded Bible, on a short schedule: after 60 steps
  of 8 x 128 tokens its validation perplexity must be below 0.75x that of the best unigram
  model of the training windows (add-1/2 smoothed, ~440): token frequencies alone cannot get
  there, so the model has learnt to use its context."""
  preset = RUN_PRESETS["text_small"]
  text = dataclasses.replace(preset.text, seq_len=128, eval_batches=4,
                             token_cache_dir=str(tmp_path / "cache"))
  run = preset.replace(text=text, eval_every=60, checkpoint_every=60,
                       optimizer=dataclasses.replace(preset.optimizer, total_steps=60))
  summary, _ = train(run, get_config(preset.model), str(tmp_path / "run"))

  gpt2 = tokenizer.load_tokenizer("gpt2")
  tokens = token_files.open_tokens(token_files.build_token_file(
      text_sources.parse_spec("bible"), gpt2, text.token_cache_dir, show_progress=False))
  split = text_pipeline.split_windows(len(tokens), 128, text.val_fraction)
  width = 129
  train_ids = np.concatenate([tokens[i * width:(i + 1) * width] for i in split.train])
  counts = np.bincount(train_ids, minlength=50264) + 0.5
  val_batches = split.val[:len(split.val) // 8 * 8][:4 * 8]
  val_ids = np.concatenate([tokens[i * width + 1:(i + 1) * width] for i in val_batches])
  unigram = float(np.exp(-np.mean(np.log(counts[val_ids] / counts.sum()))))
  assert 300 < unigram < 600
  assert summary["val/perplexity"] < 0.75 * unigram, (summary, unigram)


def test_validation_loss_equals_the_perplexity_tool_on_the_same_windows(corpus, tmp_path):
  """The trainer's val/loss and `rolling_logprobs` (experiments/perplexity.py, lm-eval's
  loglikelihood_rolling) score the same tokens the same way."""
  from based_jax.evaluation.loglikelihood import rolling_logprobs
  from based_jax.training.tasks import load_text_tokens
  run = _run(corpus)
  summary, _ = train(run, MODEL, str(tmp_path / "run"))
  config, params = load_checkpoint(str(tmp_path / "run"))
  tokens, _ = load_text_tokens(run.text, config.vocab_size, show_progress=False)
  split = text_pipeline.split_windows(len(tokens), run.text.seq_len, run.text.val_fraction)
  width = run.text.seq_len + 1
  windows = [tokens[i * width:(i + 1) * width].tolist()
             for i in split.val[:run.text.eval_batches * run.batch_size]]
  logprob = rolling_logprobs(config, params, windows, run.text.seq_len).sum()
  np.testing.assert_allclose(-logprob / (len(windows) * run.text.seq_len), summary["val/loss"],
                             rtol=2e-5)


def test_text_run_killed_after_a_checkpoint_resumes_bit_identically(corpus, tmp_path):
  """kill -9 of `experiments.train --run=text_small ...` after step 7 (checkpoints every 3),
  then the same command again: the same parameters and results as a run never killed (the
  data iterator's position is part of each checkpoint)."""
  from experiments import fault_harness as fi  # pylint: disable=g-import-not-at-top
  args = ("--run=text_small", "--model=based_tiny", "--model_set=vocab_size=304",
          f"--data={corpus / 'chapters.jsonl'}", f"--tokenizer={corpus / 'tokenizer.json'}",
          f"--token_cache_dir={corpus / 'cache'}", "--seq_len=32", "--batch_size=4",
          "--eval_every=5", "--log_every=1", "--checkpoint_every=3", "--eval_batches=2",
          "--warmup_steps=2", "--total_steps=16")
  fi.run_to_end(str(tmp_path / "whole"), args=args)
  result = fi.trial(str(tmp_path / "killed"), fi.Kill("step", target=7),
                    fi.final_state(str(tmp_path / "whole")), args=args)
  assert result["exit_code"] == -9 and result["killed_after_step"] >= 7, result
  assert result["params_bit_identical"] and result["results_equal"], result
  assert result["metrics_kept"], result
