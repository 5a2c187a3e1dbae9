"""Log-likelihoods of token sequences: per-token scores, scored spans, rolling windows.

`score_tokens` is one jitted forward pass: for inputs and targets [B, T] (targets are the
inputs shifted by one) it returns log p(targets[b, t] | inputs[b, :t + 1]) and whether each
target is the greedy (argmax) token. On top of it:

  * `score_spans`: the summed log-probability of the last `n` targets of many rows of
    different lengths, batched by length (`batching.plan_batches`); what lm-eval's
    `loglikelihood` (a continuation after a context) needs.
  * `rolling_windows` / `rolling_logprobs`: the log-probability of every token of sequences
    longer than the model's context, in windows of at most `max_len` inputs that score each
    token once (perplexity; lm-eval's `loglikelihood_rolling`).
"""

import functools
from typing import Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from based_jax.checks import check_index_array, check_positive_int, check_token_ids
from based_jax.config import ModelConfig
from based_jax.evaluation import batching
from based_jax.model import LanguageModel

DEFAULT_TOKEN_BUDGET = 1 << 14  # tokens (B x T) per forward pass: the [B, T, V] logits are float32.
DEFAULT_MAX_ROWS = 64


class TokenScores(NamedTuple):
  logprobs: jnp.ndarray  # [B, T] float32 log p(targets[b, t] | inputs[b, :t+1]); 0 past lengths.
  greedy: jnp.ndarray  # [B, T] bool: targets[b, t] is the argmax there; False past lengths.


class Span(NamedTuple):
  inputs: list[int]  # model inputs, T tokens.
  targets: list[int]  # the inputs shifted by one: targets[t] follows inputs[: t + 1].
  scored: int  # the last `scored` targets count (1 <= scored <= T).


def score_tokens(config: ModelConfig, params, inputs, targets, lengths) -> TokenScores:
  """Per-token log-probabilities and greedy flags of `targets` [B, T] after `inputs` [B, T]
  (right-padded; `lengths` [B] valid tokens per row). ValueError for bad shapes or ids."""
  inputs, targets, lengths = jnp.asarray(inputs), jnp.asarray(targets), jnp.asarray(lengths)
  check_token_ids("inputs", inputs, config.vocab_size)
  check_token_ids("targets", targets, config.vocab_size)
  if targets.shape != inputs.shape:
    raise ValueError(f"targets {tuple(targets.shape)} must have the shape of inputs "
                     f"{tuple(inputs.shape)}")
  check_index_array("lengths", lengths, (inputs.shape[0],), 0, inputs.shape[1],
                    "valid tokens per row")
  return _score_tokens(config, params, inputs, targets, lengths)


def token_logprobs(config: ModelConfig, params, inputs, targets, lengths) -> jnp.ndarray:
  """[B, T] float32: `score_tokens(...).logprobs`."""
  return score_tokens(config, params, inputs, targets, lengths).logprobs


@functools.partial(jax.jit, static_argnames=("config",))
def _score_tokens(config: ModelConfig, params, inputs, targets, lengths) -> TokenScores:
  logits, _ = LanguageModel(config).apply(params, inputs, lengths=lengths)
  logz = jax.nn.logsumexp(logits, axis=-1)
  picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  valid = jnp.arange(inputs.shape[1])[None, :] < lengths[:, None]
  greedy = jnp.argmax(logits, axis=-1) == targets
  return TokenScores(jnp.where(valid, picked - logz, 0.0), greedy & valid)


def score_spans(config: ModelConfig, params, spans: Sequence[Span], *,
                token_budget: int = DEFAULT_TOKEN_BUDGET, max_rows: int = DEFAULT_MAX_ROWS,
                min_length: int = 16, progress: Optional[Callable[[int], None]] = None
                ) -> list[tuple[float, bool]]:
  """For each span, (sum of the log-probabilities of its scored targets (float64 sum of
  float32 terms), whether every scored target is greedy), in order. `progress(n)` after each
  batch of n spans."""
  for i, span in enumerate(spans):
    if len(span.targets) != len(span.inputs) or not 1 <= span.scored <= len(span.inputs):
      raise ValueError(f"span {i}: inputs ({len(span.inputs)}) and targets "
                       f"({len(span.targets)}) must have one length T >= 1 and 1 <= scored "
                       f"({span.scored}) <= T")
  plan = batching.plan_batches([len(s.inputs) for s in spans], token_budget, max_rows,
                               min_length)
  results: list = [None] * len(spans)
  for batch in plan:
    inputs, lengths = batching.pad_batch([s.inputs for s in spans], batch)
    targets, _ = batching.pad_batch([s.targets for s in spans], batch)
    scores = jax.device_get(score_tokens(config, params, inputs, targets, lengths))
    for slot, index in enumerate(batch.rows):
      n, k = lengths[slot], spans[index].scored
      logprobs = scores.logprobs[slot, n - k:n].astype(np.float64)
      results[index] = (float(logprobs.sum()), bool(scores.greedy[slot, n - k:n].all()))
    if progress is not None:
      progress(len(batch.rows))
  return results


def continuation_span(context: Sequence[int], continuation: Sequence[int], max_len: int) -> Span:
  """The span scoring `continuation` after `context` with at most `max_len` inputs (the context
  is cut on the left; ValueError if the continuation alone does not fit)."""
  check_positive_int("max_len", max_len)
  if not context or not continuation:
    raise ValueError(f"context ({len(context)} tokens) and continuation ({len(continuation)} "
                     "tokens) must both be non-empty")
  if len(continuation) > max_len:
    raise ValueError(f"a continuation of {len(continuation)} tokens does not fit max_len="
                     f"{max_len}")
  whole = list(context) + list(continuation)
  return Span(whole[:-1][-max_len:], whole[1:][-max_len:], len(continuation))


def rolling_windows(n_tokens: int, max_len: int, stride: Optional[int] = None
                    ) -> list[tuple[int, int, int]]:
  """Windows over a sequence s of n_tokens tokens that score each of s[1:] once.

  A window (start, stop, first) feeds inputs s[start:stop] (at most max_len), whose targets are
  s[start + 1:stop + 1], and scores the targets from s[first] on. The first window starts at
  0; each next one scores the next `stride` tokens (default max_len: disjoint windows, one
  token of context each, as lm-eval does) with as much context as max_len allows, and the last
  one ends at the sequence's end with a full context.
  """
  check_positive_int("max_len", max_len)
  stride = max_len if stride is None else stride
  if not isinstance(stride, int) or not 1 <= stride <= max_len:
    raise ValueError(f"stride must be an int in [1, max_len={max_len}], got {stride!r}")
  if n_tokens < 2:
    return []
  stop = min(n_tokens - 1, max_len)
  windows = [(0, stop, 1)]
  while stop < n_tokens - 1:
    new_stop = min(stop + stride, n_tokens - 1)
    windows.append((max(0, new_stop - max_len), new_stop, stop + 1))
    stop = new_stop
  return windows


def rolling_logprobs(config: ModelConfig, params, sequences: Sequence[Sequence[int]],
                     max_len: int, stride: Optional[int] = None, **batch_kwargs) -> np.ndarray:
  """[len(sequences)] float64: log p(s[1:] | s[0]) of each sequence s, summed over
  `rolling_windows(len(s), max_len, stride)` (prepend a BOS / EOS token to score s[0] too);
  `batch_kwargs` go to `score_spans`. A sequence of fewer than 2 tokens scores 0."""
  spans, owners = [], []
  for i, s in enumerate(sequences):
    s = list(s)
    for start, stop, first in rolling_windows(len(s), max_len, stride):
      spans.append(Span(s[start:stop], s[start + 1:stop + 1], stop + 1 - first))
      owners.append(i)
  totals = np.zeros((len(sequences),), np.float64)
  for owner, (logprob, _) in zip(owners, score_spans(config, params, spans, **batch_kwargs)):
    totals[owner] += logprob
  return totals
