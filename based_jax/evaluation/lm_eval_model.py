"""An lm-evaluation-harness model (`based_jax`): any lm-eval task on a based-jax model.

    import lm_eval
    from based_jax.evaluation.lm_eval_model import BasedJaxLM, TASKS_DIR
    lm = BasedJaxLM(checkpoint="runs/my_run")            # or BasedJaxLM(config=..., params=...)
    out = lm_eval.simple_evaluate(model=lm, tasks=["swde_v0"],
                                  task_manager=lm_eval.tasks.TaskManager(include_path=TASKS_DIR))

From the shell: `python -m based_jax.evaluation run --model based_jax --model_args
checkpoint=runs/my_run --tasks swde_v0,fda_v0,squad_completion_v0` (lm-eval's own command line,
with this model registered and TASKS_DIR included).

The three requests are built on the project's own batched code, the same that
`experiments/evaluate.py` runs: `generate_until` on `generation.greedy_generate` (contexts
left-truncated to max_length - max_gen_toks tokens, greedy only, each row stopping at its first
token holding an `until` string, the text then cut at the first `until`), `loglikelihood` on
`loglikelihood.score_spans` (lm-eval's `TemplateLM` splits and encodes the pairs) and
`loglikelihood_rolling` on `loglikelihood.rolling_logprobs` (the text after the EOS token, in
disjoint windows of max_length tokens). Like the paper's harness (lm-eval 0.4.1 with until
["\\n"]), generation does not stop at EOS unless `stop_at_eos=True`.

One process, on JAX's default device. Several devices would shard each batch's rows over a
`jax.sharding.Mesh` (the batch sizes are multiples of the device count, the parameters
replicated or FSDP-sharded as in training); several hosts would split the requests by
`rank` / `world_size` and gather the results.
"""

import copy
import os
from typing import Optional

from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from tqdm import tqdm

from based_jax.data.tokenizer import check_fits, load_tokenizer
from based_jax.evaluation import generation, loglikelihood, recall_tasks
from based_jax.evaluation.model_loading import check_params, load_model

TASKS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tasks")
DEFAULT_MAX_GEN_TOKS = 256  # when a request names no max_gen_toks (lm-eval's HF default).


@register_model("based_jax")
class BasedJaxLM(TemplateLM):
  """lm-eval's LM interface over a based-jax model (see the module docstring)."""

  def __init__(self, checkpoint: Optional[str] = None, *, config=None, params=None,
               tokenizer: str = "gpt2", max_length: int = recall_tasks.MAX_LENGTH,
               dtype: Optional[str] = None, step: Optional[int] = None,
               token_budget: int = generation.DEFAULT_TOKEN_BUDGET,
               max_rows: int = generation.DEFAULT_MAX_ROWS,
               score_token_budget: int = loglikelihood.DEFAULT_TOKEN_BUDGET,
               stop_at_eos: bool = False, **ignored):
    """Either `checkpoint` (a directory `based_jax.load_checkpoint` reads) or `config` and
    `params`. Batches are shaped by `token_budget` (prompt tokens per generation batch),
    `score_token_budget` (tokens per scoring batch) and `max_rows`; lm-eval's own
    `batch_size` (1 unless given), `max_batch_size` and `device` are ignored (JAX places the
    work)."""
    super().__init__()
    if (checkpoint is None) == (config is None or params is None):
      raise ValueError("give either checkpoint=<dir> or both config= and params=")
    if checkpoint is not None:
      config, params = load_model(str(checkpoint), step, dtype)
    else:
      check_params(config, params)
      if dtype is not None:
        config = config.replace(dtype=dtype)
    self.config, self.params = config, params
    self.tokenizer = load_tokenizer(tokenizer)
    check_fits(self.tokenizer, config.vocab_size)
    self.max_length = int(max_length)
    self._generate_kwargs = dict(token_budget=int(token_budget), max_rows=int(max_rows))
    self._score_kwargs = dict(token_budget=int(score_token_budget), max_rows=int(max_rows))
    self.stop_at_eos = bool(stop_at_eos)

  @property
  def eot_token_id(self) -> int:
    return self.tokenizer.eos_id

  def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None,
                 **kwargs) -> list[int]:
    return self.tokenizer.encode(string)

  def tok_decode(self, tokens) -> str:
    return self.tokenizer.decode(tokens)

  def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs
                            ) -> list[tuple[float, bool]]:
    spans = [loglikelihood.continuation_span(context, continuation, self.max_length)
             for _, context, continuation in requests]
    with tqdm(total=len(spans), desc="loglikelihood", disable=disable_tqdm) as bar:
      results = loglikelihood.score_spans(self.config, self.params, spans,
                                          progress=bar.update, **self._score_kwargs)
    for (key, _, _), result in zip(requests, results):
      self.cache_hook.add_partial("loglikelihood", key, result)
    return results

  def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
    sequences = [[self.prefix_token_id] + self.tok_encode(text) for (text,) in
                 (r.args for r in requests)]
    totals = loglikelihood.rolling_logprobs(self.config, self.params, sequences,
                                            self.max_length, **self._score_kwargs)
    results = [float(t) for t in totals]
    for request, result in zip(requests, results):
      self.cache_hook.add_partial("loglikelihood_rolling", request.args, result)
    return results

  def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
    groups: dict[str, list[int]] = {}
    for i, request in enumerate(requests):
      groups.setdefault(repr(sorted(request.args[1].items())), []).append(i)
    results: list[Optional[str]] = [None] * len(requests)
    with tqdm(total=len(requests), desc="generate_until", disable=disable_tqdm) as bar:
      for indices in groups.values():
        contexts = [requests[i].args[0] for i in indices]
        texts = self._generate(contexts, requests[indices[0]].args[1],
                               lambda rows, tokens: bar.update(rows))
        for i, text in zip(indices, texts):
          results[i] = text
          self.cache_hook.add_partial("generate_until", requests[i].args, text)
    return results

  def _generate(self, contexts: list[str], gen_kwargs: dict, progress) -> list[str]:
    """Greedy continuations of `contexts` under one request's generation kwargs."""
    kwargs = copy.deepcopy(gen_kwargs)
    until = kwargs.pop("until", None) or []
    until = [until] if isinstance(until, str) else list(until)
    max_new = int(kwargs.pop("max_gen_toks", DEFAULT_MAX_GEN_TOKS))
    if kwargs.pop("do_sample", False) or float(kwargs.pop("temperature", 0.0)) > 0:
      raise ValueError(f"the based_jax model generates greedily only, got {gen_kwargs}")
    if self.stop_at_eos or not until:
      until.append(self.tok_decode([self.eot_token_id]))
    if max_new >= self.max_length:
      raise ValueError(f"max_gen_toks={max_new} leaves no room for a context in "
                       f"max_length={self.max_length}")
    prompts = [recall_tasks.truncate_prompt(self.tok_encode(c) or [self.prefix_token_id],
                                            self.max_length - max_new) for c in contexts]
    mask = generation.stop_token_mask(self.tokenizer, until, self.config.vocab_size)
    generated = generation.greedy_generate(self.config, self.params, prompts, max_new,
                                           stop_mask=mask, progress=progress,
                                           **self._generate_kwargs)
    return [recall_tasks.cut_at_stop(self.tok_decode(ids), until) for ids in generated]
