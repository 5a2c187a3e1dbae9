"""Prefill and a jitted decode loop: the whole generation runs on device, no per-token host trip.

    config = get_config("based_tiny"); params = init_params(config, seed=0)
    out = generate(config, params, prompts, max_new_tokens=32)      # out.tokens [B, 32]
"""

import functools
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from based_jax import config as config_lib
from based_jax.cache import ModelCache, as_carry, attention_capacity, check_cache, init_cache
from based_jax.checks import (check_capacity, check_index_array, check_positive_int,
                              check_token_ids)
from based_jax.config import ModelConfig
from based_jax.model import LanguageModel
from based_jax.sampling import SamplingConfig, sample_tokens


class GenerateOutput(NamedTuple):
  tokens: jnp.ndarray  # [B, N] generated ids; after an EOS the row is filled with eos_id.
  lengths: jnp.ndarray  # [B] tokens generated per row, the EOS included.


def check_prompts(config: ModelConfig, prompts, prompt_lengths, max_len: int) -> None:
  """Prompts [B, P] of ids in [0, V) with lengths [B] in [1, P], and P <= max_len."""
  check_token_ids("prompts", prompts, config.vocab_size)
  check_positive_int("max_len", max_len)
  b, p = prompts.shape
  check_index_array("prompt_lengths", prompt_lengths, (b,), 1, p, "prompt tokens per row")
  if p > max_len:
    raise ValueError(f"prompts of {p} tokens do not fit max_len={max_len}")


def prefill(config: ModelConfig, params, prompts, prompt_lengths, max_len: int,
            chunk_size: int = 256,
            row_block: Optional[int] = None) -> tuple[jnp.ndarray, ModelCache]:
  """Runs right-padded prompts [B, P] into a fresh cache; returns last-token logits [B, V].

  The prompt goes through the model `chunk_size` tokens at a time, so activation memory is
  bounded by the chunk, not by P: the same cached call that decoding uses, with per-row lengths
  so padding enters no state. The first chunk meets an empty cache, so its attention layers run
  causal (flash) attention within the chunk; later chunks (a `lax.scan` carrying the cache,
  updated in place) attend over the cache. `chunk_size >= P` is a single call.

  `row_block` (a divisor of B; None or >= B: all rows at once) prefills that many sequences
  at a time (a `lax.map` writing into the one output cache), so the temporaries scale with the
  block rather than B: large decode batches then fit when prefilling them all at once would not.

  Arguments are checked (ValueError) before the jitted work; `prefill.lower(...)` compiles
  ahead of time with the same arguments.
  """
  prompts, prompt_lengths = jnp.asarray(prompts), jnp.asarray(prompt_lengths)
  check_prompts(config, prompts, prompt_lengths, max_len)
  check_positive_int("chunk_size", chunk_size)
  b = prompts.shape[0]
  if row_block is not None and not (isinstance(row_block, int) and (
      row_block >= b or 1 <= row_block and b % row_block == 0)):
    raise ValueError(f"row_block must be a positive divisor of the batch {b}, got {row_block}")
  return _prefill(config, params, prompts, prompt_lengths, max_len, chunk_size, row_block)


@functools.partial(jax.jit, static_argnames=("config", "max_len", "chunk_size", "row_block"))
def _prefill(config: ModelConfig, params, prompts: jnp.ndarray, prompt_lengths: jnp.ndarray,
             max_len: int, chunk_size: int = 256,
             row_block: Optional[int] = None) -> tuple[jnp.ndarray, ModelCache]:
  """`prefill` after its checks."""
  b = prompts.shape[0]
  if row_block is None or row_block >= b:
    return _prefill_rows(config, params, prompts, prompt_lengths, max_len, chunk_size)
  blocks = (prompts.reshape(b // row_block, row_block, -1),
            prompt_lengths.reshape(b // row_block, row_block))
  out = jax.lax.map(
      lambda xs: _prefill_rows(config, params, *xs, max_len, chunk_size), blocks)
  return jax.tree.map(lambda x: x.reshape(b, *x.shape[2:]), out)  # every leaf is [B, ...]


def _prefill_rows(config: ModelConfig, params, prompts: jnp.ndarray,
                  prompt_lengths: jnp.ndarray, max_len: int,
                  chunk_size: int) -> tuple[jnp.ndarray, ModelCache]:
  """`prefill` of all rows at once."""
  b, p = prompts.shape
  c = min(chunk_size, p)
  n = -(-p // c)
  chunks = jnp.pad(prompts, ((0, 0), (0, n * c - p))).reshape(b, n, c).swapaxes(0, 1)
  model = LanguageModel(config)
  last = prompt_lengths - 1

  def step(carry, xs):
    cache, last_logits = carry
    tokens, start = xs
    logits, cache = model.apply(
        params, tokens, cache=cache, lengths=jnp.clip(prompt_lengths - start, 0, c),
        logits_at=jnp.clip(last - start, 0, c - 1)[:, None])
    here = (last >= start) & (last < start + c)
    return (cache, jnp.where(here[:, None], logits[:, 0], last_logits)), None

  init = (init_cache(config, b, max_len), jnp.zeros((b, config.vocab_size), jnp.float32))
  carry, _ = step(init, (chunks[0], jnp.int32(0)))
  if n > 1:
    carry, _ = jax.lax.scan(step, carry, (chunks[1:], jnp.arange(1, n) * c))
  cache, logits = carry
  return logits, cache


def decode(config: ModelConfig, params, logits: jnp.ndarray, cache: ModelCache, rng: jax.Array,
           max_new_tokens: int, sampling: SamplingConfig = SamplingConfig(),
           eos_id: Optional[int] = None,
           stop_mask: Optional[jnp.ndarray] = None) -> tuple[GenerateOutput, ModelCache]:
  """Samples up to N = `max_new_tokens` tokens per row in a `lax.while_loop` on device (stops
  early once every row has emitted `eos_id`), starting from the logits [B, V] of the last
  prompt token and the cache after it (donated).

  `stop_mask` ([V] bool, optional) marks more stop tokens: a row also stops after emitting any
  id it marks (say every token whose text holds a newline). A row stopped this way keeps the
  stop token and is then filled like one after `eos_id`.

  Arguments are checked (ValueError) before the jitted work, including that a full-attention
  cache has room for N more tokens; `decode.lower(...)` compiles ahead of time.
  """
  check_positive_int("max_new_tokens", max_new_tokens)
  if logits.ndim != 2 or logits.shape[1] != config.vocab_size:
    raise ValueError(f"logits must be [batch, vocab_size={config.vocab_size}], got "
                     f"{tuple(logits.shape)}")
  check_cache(config, cache, logits.shape[0])
  check_capacity("max_new_tokens", cache.length + max_new_tokens,
                 attention_capacity(config, cache))
  if eos_id is not None and not 0 <= eos_id < config.vocab_size:
    raise ValueError(f"eos_id must lie in [0, vocab_size={config.vocab_size}), got {eos_id}")
  if stop_mask is not None and (stop_mask.shape != (config.vocab_size,)
                                or stop_mask.dtype != jnp.bool_):
    raise ValueError(f"stop_mask must be a bool array [vocab_size={config.vocab_size}], got "
                     f"shape {tuple(stop_mask.shape)} dtype {stop_mask.dtype}")
  return _decode(config, params, logits, cache, rng, max_new_tokens, sampling, eos_id, stop_mask)


@functools.partial(jax.jit, static_argnames=("config", "max_new_tokens", "sampling", "eos_id"),
                   donate_argnames=("cache",))
def _decode(config: ModelConfig, params, logits: jnp.ndarray, cache: ModelCache, rng: jax.Array,
            max_new_tokens: int, sampling: SamplingConfig = SamplingConfig(),
            eos_id: Optional[int] = None,
            stop_mask: Optional[jnp.ndarray] = None) -> tuple[GenerateOutput, ModelCache]:
  """`decode` after its checks."""
  model = LanguageModel(config)
  b = logits.shape[0]
  fill = 0 if eos_id is None else eos_id
  cache = as_carry(cache)

  def cond(carry):
    step, *_, done = carry
    return (step < max_new_tokens) & ~jnp.all(done)

  def body(carry):
    step, out, lengths, logits, cache, rng, done = carry
    rng, key = jax.random.split(rng)
    token = jnp.where(done, fill, sample_tokens(logits, key, sampling))
    out = out.at[:, step].set(token)
    lengths = lengths + (~done).astype(jnp.int32)
    if eos_id is not None:
      done = done | (token == eos_id)
    if stop_mask is not None:
      done = done | stop_mask[token]
    logits, cache = model.apply(params, token[:, None], cache=cache)
    return step + 1, out, lengths, logits[:, 0], cache, rng, done

  carry = (jnp.int32(0), jnp.full((b, max_new_tokens), fill, jnp.int32),
           jnp.zeros((b,), jnp.int32), logits, cache, rng, jnp.zeros((b,), bool))
  _, out, lengths, _, cache, _, _ = jax.lax.while_loop(cond, body, carry)
  return GenerateOutput(out, lengths), cache


def generate(config: ModelConfig, params, prompts, prompt_lengths=None, *,
             max_new_tokens: int, sampling: SamplingConfig = SamplingConfig(), seed: int = 0,
             eos_id: Optional[int] = None, max_len: Optional[int] = None,
             prefill_row_block: Optional[int] = None) -> GenerateOutput:
  """Generates continuations of a batch of prompts.

  Args:
    config, params: the model.
    prompts: [B, P] int token ids, right-padded to a common length P.
    prompt_lengths: [B] true prompt lengths (all P if None).
    max_new_tokens: N, tokens to generate per row.
    sampling: greedy by default.
    seed: PRNG seed for sampling.
    eos_id: stop a row after this token (and the loop once all rows stopped).
    max_len: cache length for full-attention layers; at least P + N (the default).
    prefill_row_block: prefill this many rows at a time (a divisor of B), for batches whose
      one-shot prefill does not fit in memory (see `prefill`); None: all rows at once.
  """
  prompts = np.asarray(prompts)
  check_token_ids("prompts", prompts, config.vocab_size)
  check_positive_int("max_new_tokens", max_new_tokens)
  b, p = prompts.shape
  if prompt_lengths is None:
    prompt_lengths = np.full((b,), p, np.int32)
  max_len = p + max_new_tokens if max_len is None else max_len
  check_positive_int("max_len", max_len)
  has_attention = config_lib.ATTENTION in config.layer_kinds
  check_capacity("max_len", np.full((b,), p + max_new_tokens), max_len if has_attention else None)
  logits, cache = prefill(config, params, jnp.asarray(prompts, jnp.int32),
                          jnp.asarray(prompt_lengths), max_len, row_block=prefill_row_block)
  out, _ = decode(config, params, logits, cache, jax.random.key(seed), max_new_tokens,
                  sampling, eos_id)
  return out


prefill.lower = _prefill.lower  # ahead-of-time compilation (benchmarks), prefill's arguments
decode.lower = _decode.lower
