"""Zero-shot recall evaluation: the harness's protocol (metric, truncation, stop), batched
generation against one prompt at a time, log-likelihoods against a plain forward pass, an
oracle through the runner, bad input, and experiments/evaluate.py end to end."""

import functools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from based_jax import LanguageModel, get_config, init_params as _init_params
from based_jax.data.tokenizer import load_tokenizer
from based_jax.evaluation import (batching, generation, loglikelihood, model_loading,
                                  recall_tasks, runner)

# Jitted: the eager init of a 50k-word embedding and the mixers takes seconds.
init_params = jax.jit(_init_params, static_argnums=0)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures", "recall")
VOCAB = 50264  # GPT-2's padded vocabulary, as the released models
# Random weights with a large init give varied, prompt-dependent greedy tokens (at 0.02 a tiny
# model repeats one token whatever the prompt, which would let a batching bug pass).
MODELS = {"based": get_config("based_tiny", vocab_size=VOCAB, init_std=0.3),
          "tpp": get_config("transformer_pp_tiny", vocab_size=VOCAB, init_std=0.3)}


@pytest.fixture(scope="module")
def tokenizer():
  return load_tokenizer("gpt2")


@pytest.fixture(scope="module")
def params():
  return {name: init_params(config, seed=1) for name, config in MODELS.items()}


@pytest.fixture(scope="module")
def fixture_rows():
  return {name: recall_tasks.load_rows(recall_tasks.get_task(name), FIXTURES)
          for name in recall_tasks.TASKS}


# ----------------------------------------------------------------------------- the protocol

@pytest.mark.parametrize("generation_text, target, expected", [
    (" gladiator (2000)", "Gladiator", True),  # case-insensitive
    ("GLADIATOR", "gladiator", True),
    (" C++ Primer (5th Edition) by", "C++ Primer (5th Edition)", True),  # regex characters
    (" C Primer 5th Edition", "C++ Primer (5th Edition)", False),  # not read as a regex
    (" 21 CFR 866x3328", "21 CFR 866.3328", False),  # '.' is literal
    (" (617) 253-1000", "(617) 253-1000", True),
    ("", "France", False),  # empty generation
    ("  ", "France", False),
    (" Fran", "France", False),
    (" in France.", "France", True),  # anywhere in the generation
])
def test_contains_matches_the_harness_metric(generation_text, target, expected):
  assert recall_tasks.contains(generation_text, target) is expected


def test_truncation_keeps_the_last_2000_tokens():
  assert recall_tasks.MAX_LENGTH - recall_tasks.MAX_NEW_TOKENS == 2000
  tokens = list(range(3000))
  assert recall_tasks.truncate_prompt(tokens) == list(range(1000, 3000))
  assert recall_tasks.truncate_prompt(tokens[:5]) == tokens[:5]
  assert recall_tasks.truncate_prompt(tokens, 7) == list(range(2993, 3000))


def test_runner_truncates_long_prompts_on_the_left(tokenizer, fixture_rows):
  seen = []

  def record(prompts, progress):
    seen.extend(prompts)
    return [[] for _ in prompts]
  report = runner.run_recall({"swde": fixture_rows["swde"]}, tokenizer, record)
  full = tokenizer.encode_batch([r["text"] for r in fixture_rows["swde"]])
  longest = int(np.argmax([len(t) for t in full]))
  assert len(full[longest]) > 2000  # the fixture has one long page
  assert seen[longest] == full[longest][-2000:]
  assert report.predictions[longest]["truncated"] == len(full[longest]) - 2000
  assert all(seen[i] == full[i] for i in range(len(full)) if i != longest)


def test_stop_tokens_are_the_ids_whose_text_holds_a_newline(tokenizer):
  mask = generation.stop_token_mask(tokenizer, ["\n"], VOCAB)
  assert mask.shape == (VOCAB,) and mask[tokenizer.encode("\n")[0]]
  texts = [tokenizer.decode([i]) for i in range(tokenizer.vocab_size)]
  assert [i for i, t in enumerate(texts) if "\n" in t] == list(np.flatnonzero(mask))
  assert not mask[tokenizer.vocab_size:].any()  # padded ids never stop
  assert not generation.stop_token_mask(tokenizer, ["\u00e9"], VOCAB).any()  # non-ASCII: none


def test_prediction_is_cut_at_the_first_newline(tokenizer, fixture_rows):
  rows = {"squad_completion": fixture_rows["squad_completion"]}
  targets = [r["value"] for r in rows["squad_completion"]]

  def answer_then_more(prompts, progress):
    return [tokenizer.encode(f" {t}\nnot {t}\n{t}") for t in targets]

  def newline_first(prompts, progress):
    return [tokenizer.encode(f"\n{t}") for t in targets]
  report = runner.run_recall(rows, tokenizer, answer_then_more)
  assert [p["prediction"] for p in report.predictions] == [f" {t}" for t in targets]
  report = runner.run_recall(rows, tokenizer, newline_first)
  assert [p["prediction"] for p in report.predictions] == [""] * len(targets)
  assert report.scores["squad_completion"] == 0.0


@pytest.mark.parametrize("name", sorted(MODELS))
def test_generation_stops_at_the_first_stop_token(name, params):
  config = MODELS[name]
  rng = np.random.default_rng(0)
  prompts = [rng.integers(0, 50257, n).tolist() for n in (5, 17, 9, 30)]
  free = generation.greedy_generate(config, params[name], prompts, 12, token_budget=64,
                                    max_rows=4)
  assert all(len(g) == 12 for g in free)
  stop = free[0][3]
  mask = np.zeros((VOCAB,), bool)
  mask[stop] = True
  stopped = generation.greedy_generate(config, params[name], prompts, 12, stop_mask=mask,
                                       token_budget=64, max_rows=4)
  for g, s in zip(free, stopped):
    assert s == (g[:g.index(stop) + 1] if stop in g else g)
  assert len(stopped[0]) <= 4


# ----------------------------------------------------------------------------- batching

def test_batches_cover_every_row_once_within_the_budget():
  lengths = [3, 70, 64, 65, 1, 200, 129, 64, 9]
  plan = batching.plan_batches(lengths, token_budget=256, max_rows=3, min_length=16)
  assert sorted(i for b in plan for i in b.rows) == list(range(len(lengths)))
  for b in plan:
    assert len(b.rows) <= b.size <= 3 and b.size * b.length <= max(256, b.length)
    assert all(b.length == max(16, 2 ** int(np.ceil(np.log2(lengths[i])))) for i in b.rows)
  tokens, lens = batching.pad_batch([[7] * n for n in lengths], plan[0])
  assert tokens.shape == (plan[0].size, plan[0].length)
  assert lens[:len(plan[0].rows)].tolist() == [lengths[i] for i in plan[0].rows]


@pytest.mark.parametrize("name", sorted(MODELS))
def test_batched_evaluation_equals_one_prompt_at_a_time(name, params, tokenizer,
                                                        fixture_rows):
  config = MODELS[name]
  prompts = [recall_tasks.truncate_prompt(tokenizer.encode(r["text"]), 96)
             for rows in fixture_rows.values() for r in rows]
  mask = generation.stop_token_mask(tokenizer, ["\n"], VOCAB)
  batched = generation.greedy_generate(config, params[name], prompts, 16, stop_mask=mask,
                                       token_budget=256, max_rows=3, min_length=64)
  alone = [generation.greedy_generate(config, params[name], [p], 16, stop_mask=mask,
                                      token_budget=128, max_rows=1, min_length=128)[0]
           for p in prompts]
  assert batched == alone
  assert len({tuple(g) for g in batched}) > len(prompts) // 2  # the prompts matter


# ----------------------------------------------------------------------------- the runner

def _oracle(tokenizer, rows_by_task, answer):
  """A GenerateFn emitting answer(row) for each prompt (prompts identify their rows)."""
  by_prompt = {}
  for rows in rows_by_task.values():
    for row in rows:
      key = tuple(recall_tasks.truncate_prompt(tokenizer.encode(row["text"])))
      by_prompt[key] = answer(row)
  return lambda prompts, progress: [tokenizer.encode(by_prompt[tuple(p)]) for p in prompts]


def test_oracle_scores_one_and_silence_scores_zero(tokenizer, fixture_rows):
  oracle = _oracle(tokenizer, fixture_rows, lambda row: row["value"] + "\nmore")
  report = runner.run_recall(fixture_rows, tokenizer, oracle)
  assert report.scores == {name: 1.0 for name in recall_tasks.TASKS}
  assert report.counts == {name: len(rows) for name, rows in fixture_rows.items()}
  silent = _oracle(tokenizer, fixture_rows, lambda row: "")
  assert runner.run_recall(fixture_rows, tokenizer, silent).scores == {
      name: 0.0 for name in recall_tasks.TASKS}
  after_newline = _oracle(tokenizer, fixture_rows, lambda row: "\n" + row["value"])
  assert set(runner.run_recall(fixture_rows, tokenizer, after_newline).scores.values()) == {0.0}
  half = _oracle(tokenizer, fixture_rows,
                 lambda row: row["value"] if int(row["doc_id"]) % 2 == 0 else "no")
  scores = runner.run_recall(fixture_rows, tokenizer, half).scores
  assert scores == {name: np.mean([int(r["doc_id"]) % 2 == 0 for r in rows])
                    for name, rows in fixture_rows.items()}
  assert "| swde | 50.0 | 4 |" in runner.markdown_table(
      runner.run_recall(fixture_rows, tokenizer, half))


# ----------------------------------------------------------------------------- log-likelihoods

@functools.partial(jax.jit, static_argnames=("config",))
def _forward(params, inputs, config):
  return LanguageModel(config).apply(params, inputs)[0]


def _reference_logprobs(config, params, inputs, targets):
  """log_softmax of a plain forward pass's logits at the targets, and the argmax."""
  logits = _forward(params, jnp.asarray(inputs), config)
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return np.take_along_axis(np.asarray(logp), np.asarray(targets)[..., None], -1)[..., 0], \
      np.asarray(jnp.argmax(logits, -1))


@pytest.mark.parametrize("name", sorted(MODELS))
def test_token_logprobs_equal_a_full_forward_pass(name, params):
  config = MODELS[name]
  rng = np.random.default_rng(2)
  seqs = rng.integers(0, VOCAB, (3, 25))
  inputs, targets = seqs[:, :-1], seqs[:, 1:]
  lengths = np.array([24, 7, 15])
  scores = loglikelihood.score_tokens(config, params[name], inputs, targets, lengths)
  ref, argmax = _reference_logprobs(config, params[name], inputs, targets)
  valid = np.arange(24)[None] < lengths[:, None]
  np.testing.assert_allclose(np.asarray(scores.logprobs), np.where(valid, ref, 0), rtol=1e-5,
                             atol=1e-5)
  assert (np.asarray(scores.greedy) == (valid & (argmax == targets))).all()
  # spans: summed over the last k targets, batched by length
  spans = [loglikelihood.continuation_span(seqs[i, :n + 1 - k].tolist(),
                                           seqs[i, n + 1 - k:n + 1].tolist(), 64)
           for i, (n, k) in enumerate(zip(lengths, (5, 1, 15)))]
  got = loglikelihood.score_spans(config, params[name], spans, token_budget=32, max_rows=2)
  for i, (n, k) in enumerate(zip(lengths, (5, 1, 15))):
    np.testing.assert_allclose(got[i][0], ref[i, n - k:n].sum(), rtol=1e-5)
    assert got[i][1] == bool((argmax[i, n - k:n] == targets[i, n - k:n]).all())


def test_rolling_windows_score_every_token_once_with_full_context():
  # lm-eval's documented example: 10 tokens after a prefix, max length 4
  assert loglikelihood.rolling_windows(11, 4) == [(0, 4, 1), (4, 8, 5), (6, 10, 9)]
  for n, max_len, stride in [(1, 4, None), (2, 4, None), (50, 8, None), (50, 8, 3), (9, 16, 2),
                             (33, 8, 8)]:
    windows = loglikelihood.rolling_windows(n, max_len, stride)
    scored = [j for start, stop, first in windows for j in range(first, stop + 1)]
    assert scored == list(range(1, n))
    for start, stop, first in windows:
      assert 0 <= start < first <= stop + 1 and stop - start <= max_len
      assert stop - start == min(max_len, stop)  # as much context as fits
  with pytest.raises(ValueError, match="stride"):
    loglikelihood.rolling_windows(10, 4, 5)


def test_rolling_logprobs_equal_the_windows_scored_by_hand(params):
  config, p = MODELS["based"], params["based"]
  rng = np.random.default_rng(3)
  seqs = [rng.integers(0, VOCAB, n).tolist() for n in (30, 6, 1)]
  got = loglikelihood.rolling_logprobs(config, p, seqs, 8, stride=5, token_budget=64,
                                       max_rows=4)
  for s, total in zip(seqs, got):
    want = 0.0
    for start, stop, first in loglikelihood.rolling_windows(len(s), 8, 5):
      ref, _ = _reference_logprobs(config, p, [s[start:stop]], [s[start + 1:stop + 1]])
      want += ref[0, first - start - 1:].sum()
    np.testing.assert_allclose(total, want, rtol=1e-5)
  # one window covering all: the plain sum over the sequence
  ref, _ = _reference_logprobs(config, p, [seqs[1][:-1]], [seqs[1][1:]])
  np.testing.assert_allclose(loglikelihood.rolling_logprobs(config, p, [seqs[1]], 64)[0],
                             ref.sum(), rtol=1e-5)


# ----------------------------------------------------------------------------- bad input

def test_unknown_task_is_refused():
  with pytest.raises(ValueError, match=r"unknown recall task 'swdee'; known tasks"):
    recall_tasks.parse_task_names("swde,swdee")
  with pytest.raises(ValueError, match="no task named"):
    recall_tasks.parse_task_names(" , ")


def test_missing_data_is_named(tmp_path):
  task = recall_tasks.get_task("fda")
  with pytest.raises(ValueError, match=r"no data file for task 'fda' in .*fda\.jsonl"):
    recall_tasks.load_rows(task, str(tmp_path))
  with pytest.raises(ValueError, match="is not a directory"):
    recall_tasks.load_rows(task, str(tmp_path / "absent"))
  with pytest.raises(ValueError, match="does not exist"):
    recall_tasks.read_rows_file(str(tmp_path / "absent.jsonl"))


@pytest.mark.parametrize("content, message", [
    ('{"doc_id": 0, "file_name": "a", "key": "k", "text": "t k:"}\n',
     r"row 0 lacks the field\(s\) \['value'\]"),
    ('{"doc_id": 0, "file_name": "a", "key": "k", "value": 5, "text": "t"}\n',
     r"row 0: 'value' must be a string"),
    ('{"doc_id": 0, "file_name": "a", "key": "k", "value": "v", "text": "t"}\n[1, 2]\n',
     "row 1 is a list"),
    ('{"doc_id": 0, "file_name": "a"\n', "line 1 is not valid JSON"),
    ("\n", "has no rows"),
])
def test_bad_rows_are_named(tmp_path, content, message):
  (tmp_path / "swde.jsonl").write_text(content)
  with pytest.raises(ValueError, match=message):
    recall_tasks.load_rows(recall_tasks.get_task("swde"), str(tmp_path))


def test_parquet_and_json_rows_load(tmp_path, fixture_rows):
  pq = pytest.importorskip("pyarrow.parquet")
  import pyarrow  # pylint: disable=import-outside-toplevel
  rows = fixture_rows["squad_completion"]
  pq.write_table(pyarrow.Table.from_pylist(rows), tmp_path / "squad_completion.parquet")
  (tmp_path / "fda.json").write_text(json.dumps(fixture_rows["fda"]))
  assert recall_tasks.load_rows(recall_tasks.get_task("squad_completion"), str(tmp_path)) == rows
  assert recall_tasks.load_rows(recall_tasks.get_task("fda"), str(tmp_path), limit=2) == \
      fixture_rows["fda"][:2]


def _write_checkpoint(directory, config, params):
  """A checkpoint as `load_checkpoint` reads it: the model config and the params."""
  import dataclasses  # pylint: disable=import-outside-toplevel
  with ocp.CheckpointManager(os.path.join(directory, "checkpoints")) as manager:
    manager.save(0, args=ocp.args.Composite(
        state=ocp.args.StandardSave({"params": params}),
        model=ocp.args.JsonSave(dataclasses.asdict(config))))
    manager.wait_until_finished()


def test_params_that_do_not_match_the_config_are_refused(tmp_path, params):
  other = MODELS["based"].replace(d_model=32, la_heads=2, attn_heads=2)
  with pytest.raises(ValueError, match=r"do not match the model config .*shape \(50264, 64\), "
                     r"the config needs \(50264, 32\)"):
    model_loading.check_params(other, params["based"])
  with pytest.raises(ValueError, match="missing"):
    model_loading.check_params(MODELS["based"], params["tpp"])
  _write_checkpoint(str(tmp_path), other, params["based"])
  with pytest.raises(ValueError, match="the parameters of .* do not match the model config"):
    model_loading.load_model(str(tmp_path))


def test_model_vocabulary_must_hold_the_tokenizer(tokenizer, params):
  small = get_config("based_tiny")
  with pytest.raises(ValueError, match="50,257 ids but the model's vocab_size is 512"):
    runner.model_generator(small, init_params(small), tokenizer)


# ----------------------------------------------------------------------------- the script

def test_evaluate_script_end_to_end(tmp_path, params):
  _write_checkpoint(str(tmp_path / "run"), MODELS["based"], params["based"])
  out = tmp_path / "out"
  cmd = [sys.executable, "-m", "experiments.evaluate", f"--checkpoint={tmp_path / 'run'}",
         f"--data_dir={FIXTURES}", "--tasks=fda,squad_completion", "--limit=2",
         "--token_budget=256", f"--output_dir={out}"]
  done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
  assert done.returncode == 0, done.stderr[-3000:]
  results = json.loads((out / "results.json").read_text())
  assert results["task_version"] == "v0" and set(results["tasks"]) == {"fda", "squad_completion"}
  predictions = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
  assert [p["task"] for p in predictions] == ["fda"] * 2 + ["squad_completion"] * 2
  assert results["tasks"]["fda"]["contains"] == np.mean([p["contains"] for p in predictions[:2]])
  assert "| fda |" in (out / "results.md").read_text()
  bad = subprocess.run(cmd[:4] + ["--tasks=swde,nope"], cwd=ROOT, capture_output=True,
                       text=True, timeout=120, check=False)
  assert bad.returncode != 0 and "unknown recall task 'nope'" in bad.stderr
