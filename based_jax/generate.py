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
from based_jax.cache import ModelCache, as_carry, init_cache
from based_jax.checks import check_token_ids
from based_jax.config import ModelConfig
from based_jax.model import LanguageModel
from based_jax.sampling import SamplingConfig, sample_tokens


class GenerateOutput(NamedTuple):
  tokens: jnp.ndarray  # [B, N] generated ids; after an EOS the row is filled with eos_id.
  lengths: jnp.ndarray  # [B] tokens generated per row, the EOS included.


def check_prompts(config: ModelConfig, prompts, prompt_lengths, max_len: int) -> None:
  """Host-side validation, so bad input fails here rather than inside XLA."""
  prompts = np.asarray(prompts)
  check_token_ids("prompts", prompts, config.vocab_size)
  lengths = np.asarray(prompt_lengths)
  if lengths.shape != (prompts.shape[0],) or not np.issubdtype(lengths.dtype, np.integer):
    raise ValueError(f"prompt_lengths must be integers of shape ({prompts.shape[0]},), got "
                     f"{lengths.shape} {lengths.dtype}")
  if lengths.min() < 1 or lengths.max() > prompts.shape[1]:
    raise ValueError(f"prompt_lengths must lie in [1, {prompts.shape[1]}], got "
                     f"[{lengths.min()}, {lengths.max()}]")
  if prompts.shape[1] > max_len:
    raise ValueError(f"prompts of {prompts.shape[1]} tokens do not fit max_len={max_len}")


@functools.partial(jax.jit, static_argnames=("config", "max_len", "chunk_size", "row_block"))
def prefill(config: ModelConfig, params, prompts: jnp.ndarray, prompt_lengths: jnp.ndarray,
            max_len: int, chunk_size: int = 256,
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
  """
  b = prompts.shape[0]
  if row_block is None or row_block >= b:
    return _prefill_rows(config, params, prompts, prompt_lengths, max_len, chunk_size)
  if row_block < 1 or b % row_block:
    raise ValueError(f"row_block must be a positive divisor of the batch {b}, got {row_block}")
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


@functools.partial(jax.jit, static_argnames=("config", "max_new_tokens", "sampling", "eos_id"),
                   donate_argnames=("cache",))
def decode(config: ModelConfig, params, logits: jnp.ndarray, cache: ModelCache, rng: jax.Array,
           max_new_tokens: int, sampling: SamplingConfig = SamplingConfig(),
           eos_id: Optional[int] = None) -> tuple[GenerateOutput, ModelCache]:
  """Samples up to `max_new_tokens` tokens in a `lax.while_loop` (stops early once every row
  has emitted `eos_id`), starting from the logits of the last prompt token."""
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
  if prompt_lengths is None:
    prompt_lengths = np.full((prompts.shape[0],), prompts.shape[1], np.int32)
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
  needed = prompts.shape[1] + max_new_tokens
  max_len = needed if max_len is None else max_len
  if config_lib.ATTENTION in config.layer_kinds and max_len < needed:
    raise ValueError(f"max_len={max_len} is shorter than prompt + new tokens = {needed}; "
                     "full-attention caches cannot hold them")
  check_prompts(config, prompts, prompt_lengths, max_len)
  logits, cache = prefill(config, params, jnp.asarray(prompts, jnp.int32),
                          jnp.asarray(prompt_lengths, jnp.int32), max_len,
                          row_block=prefill_row_block)
  out, _ = decode(config, params, logits, cache, jax.random.key(seed), max_new_tokens,
                  sampling, eos_id)
  return out
