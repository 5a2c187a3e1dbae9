"""The lm-evaluation-harness model `based_jax` and the recall task configs: the lm-eval path
gives the runner's per-row predictions, prompts and metric; log-likelihoods match a plain
forward pass."""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml

lm_eval = pytest.importorskip("lm_eval")
import lm_eval.tasks  # noqa: E402  pylint: disable=g-import-not-at-top
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.api.registry import get_model  # noqa: E402

from based_jax import LanguageModel, get_config, init_params as _init_params  # noqa: E402
from based_jax.data.tokenizer import load_tokenizer  # noqa: E402
from based_jax.evaluation import recall_tasks, runner  # noqa: E402
from based_jax.evaluation.lm_eval_model import TASKS_DIR, BasedJaxLM  # noqa: E402

# Jitted: the eager init of a 50k-word embedding and the mixers takes seconds.
init_params = jax.jit(_init_params, static_argnums=0)
FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "recall")
CONFIG = get_config("based_tiny", vocab_size=50264, init_std=0.3)
MAX_LENGTH = 144  # prompts cut to 96 tokens: small, and the long fixture row is truncated
BATCH = dict(token_budget=256, max_rows=4)


@pytest.fixture(scope="module")
def lm():
  return BasedJaxLM(config=CONFIG, params=init_params(CONFIG, seed=3), max_length=MAX_LENGTH,
                    **BATCH)


def _request(kind, args):
  return Instance(request_type=kind, doc={}, arguments=args, idx=0)


def test_registered_as_based_jax():
  assert get_model("based_jax") is BasedJaxLM


def test_task_configs_state_the_protocol():
  for name in recall_tasks.TASKS:
    with open(os.path.join(TASKS_DIR, f"{name}_v0.yaml")) as f:
      config = yaml.load(f, Loader=yaml.BaseLoader)  # `!function` tags read as plain text
    assert config["task"] == f"{name}_v0"
    assert config["generation_kwargs"] == {
        "until": [recall_tasks.STOP], "max_gen_toks": str(recall_tasks.MAX_NEW_TOKENS)}
    assert (config["doc_to_text"], config["doc_to_target"]) == ("text", "value")


def test_lm_eval_and_the_runner_give_the_same_predictions(lm):
  manager = lm_eval.tasks.TaskManager(include_path=TASKS_DIR, include_defaults=False,
                                      metadata={"data_dir": FIXTURES})
  out = lm_eval.simple_evaluate(model=lm, tasks=[f"{n}_v0" for n in recall_tasks.TASKS],
                                task_manager=manager, log_samples=True, bootstrap_iters=0)
  rows = {n: recall_tasks.load_rows(recall_tasks.get_task(n), FIXTURES)
          for n in recall_tasks.TASKS}
  generate = runner.model_generator(lm.config, lm.params, lm.tokenizer, **BATCH)
  report = runner.run_recall(rows, lm.tokenizer, generate,
                             max_prompt_tokens=MAX_LENGTH - recall_tasks.MAX_NEW_TOKENS)
  for name in recall_tasks.TASKS:
    samples = sorted(out["samples"][f"{name}_v0"], key=lambda s: s["doc_id"])
    ours = [p for p in report.predictions if p["task"] == name]
    assert len(samples) == len(ours) == len(rows[name])
    for sample, row, mine in zip(samples, rows[name], ours):
      assert sample["arguments"][0][0] == row["text"]  # the prompt is the unstripped text
      assert sample["filtered_resps"][0] == mine["prediction"]
      assert sample["contains"] == int(mine["contains"])
    assert out["results"][f"{name}_v0"]["contains,none"] == report.scores[name]
  assert len({p["prediction"] for p in report.predictions}) > 1  # the prompts matter


@functools.partial(jax.jit, static_argnames=("config",))
def _log_softmax(params, tokens, config):
  return jax.nn.log_softmax(LanguageModel(config).apply(params, tokens)[0], axis=-1)


def _reference(lm, tokens, first):
  """Sum of log p(tokens[t] | tokens[:t]) for t >= first, and whether all are greedy."""
  logp = np.asarray(_log_softmax(lm.params, jnp.asarray([tokens[:-1]]), lm.config))[0]
  targets = np.asarray(tokens[1:])
  picked = logp[np.arange(len(targets)), targets][first - 1:]
  return picked.sum(), bool((logp.argmax(-1) == targets)[first - 1:].all())


def test_loglikelihood_matches_a_forward_pass(lm):
  pairs = [("The capital of France is", " Paris"), ("Hello", " world, and more"),
           ("", "Just a continuation")]
  results = lm.loglikelihood([_request("loglikelihood", p) for p in pairs])
  for (context, continuation), (logprob, greedy) in zip(pairs, results):
    if context:  # lm-eval's split: the pair encoded whole, the context's tokens first
      whole, first = lm.tok_encode(context + continuation), len(lm.tok_encode(context))
    else:  # an empty context is the EOS token
      whole, first = [lm.eot_token_id] + lm.tok_encode(continuation), 1
    want, want_greedy = _reference(lm, whole, first)
    np.testing.assert_allclose(logprob, want, rtol=1e-5)
    assert greedy == want_greedy


def test_loglikelihood_rolling_scores_every_token_after_eos(lm):
  text = " ".join(f"word{i}" for i in range(100))  # more tokens than MAX_LENGTH
  tokens = [lm.eot_token_id] + lm.tok_encode(text)
  assert len(tokens) > MAX_LENGTH + 1
  (total,) = lm.loglikelihood_rolling([_request("loglikelihood_rolling", (text,))])
  # windows of MAX_LENGTH inputs: [0, M) then the rest with a full context
  first, _ = _reference(lm, tokens[:MAX_LENGTH + 1], 1)
  start = len(tokens) - 1 - MAX_LENGTH
  rest, _ = _reference(lm, tokens[start:], MAX_LENGTH + 1 - start)
  np.testing.assert_allclose(total, first + rest, rtol=1e-5)


def test_generate_until_cuts_at_until_and_refuses_sampling(lm):
  (text,) = lm.generate_until([_request("generate_until", ("Once upon a time",
                                                           {"until": ["e"], "max_gen_toks": 8}))])
  assert "e" not in text
  with pytest.raises(ValueError, match="greedily only"):
    lm.generate_until([_request("generate_until", ("x", {"do_sample": True, "temperature": 1.0}))])


def test_bad_constructions_are_refused(tmp_path):
  with pytest.raises(ValueError, match="either checkpoint"):
    BasedJaxLM()
  with pytest.raises(ValueError, match="no checkpoints in"):
    BasedJaxLM(checkpoint=str(tmp_path))
  with pytest.raises(ValueError, match="do not match the model config"):
    BasedJaxLM(config=CONFIG.replace(n_layers=3), params=init_params(CONFIG))
  assert load_tokenizer().vocab_size <= CONFIG.vocab_size
