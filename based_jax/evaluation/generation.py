"""Batched greedy generation of prompts of different lengths, with per-row stop tokens.

Prompts are grouped by length (`batching.plan_batches`), each batch is prefilled right-padded
with per-row lengths in one call (`based_jax.prefill`: padding enters no state, so a row's
generation does not depend on its batch), then decoded greedily on device
(`based_jax.decode`) until every row has emitted a stop token (`stop_token_mask`) or
`max_new_tokens` are out. The next batch is dispatched before the previous one's tokens are
read back, so the host's work overlaps the device's.

    mask = stop_token_mask(tokenizer, ["\\n"], config.vocab_size)
    new = greedy_generate(config, params, prompts, 48, stop_mask=mask)   # list of id lists
"""

from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from based_jax.checks import check_positive_int
from based_jax.config import ModelConfig
from based_jax.evaluation import batching
from based_jax.generate import decode, prefill

DEFAULT_TOKEN_BUDGET = 1 << 16  # prompt tokens (B x T) per prefill call.
DEFAULT_MAX_ROWS = 256  # rows per batch, whatever the prompt length.
DEFAULT_MIN_LENGTH = 64  # the shortest padded prompt length.


def stop_token_mask(tokenizer, stops: Sequence[str], vocab_size: int) -> np.ndarray:
  """[V] bool: ids whose text, decoded alone, holds one of the ASCII strings `stops`.

  Once a row has emitted such a token its text holds the stop string whatever follows, so
  stopping the row there changes nothing after the text is cut at the stop (byte-level
  tokens: an ASCII character decodes as itself next to any other bytes). Non-ASCII stops
  give no stop token (generation runs to its limit; the cut is still exact). Ids the
  tokenizer lacks (a padded vocabulary) never stop.
  """
  mask = np.zeros((vocab_size,), bool)
  stops = [s for s in stops if s and s.isascii()]
  if not stops:
    return mask
  n = min(vocab_size, tokenizer.vocab_size)
  texts = tokenizer.backend.decode_batch([[i] for i in range(n)], skip_special_tokens=False)
  mask[:n] = [any(s in t for s in stops) for t in texts]
  return mask


def greedy_generate(config: ModelConfig, params, prompts: Sequence[Sequence[int]],
                    max_new_tokens: int, *, stop_mask: Optional[np.ndarray] = None,
                    token_budget: int = DEFAULT_TOKEN_BUDGET, max_rows: int = DEFAULT_MAX_ROWS,
                    min_length: int = DEFAULT_MIN_LENGTH,
                    progress: Optional[Callable[[int, int], None]] = None) -> list[list[int]]:
  """Greedy continuations of token prompts.

  Args:
    config, params: the model.
    prompts: token-id lists, each non-empty (truncate them first: a full-attention cache is
      made for each batch's padded length + max_new_tokens).
    max_new_tokens: N, the most tokens generated per prompt.
    stop_mask: [V] bool; a row stops after the first id it marks (kept in its output).
    token_budget, max_rows, min_length: batch shapes (`batching.plan_batches`).
    progress: called as progress(rows_done, prompt_tokens_done) after each batch.

  Returns:
    For each prompt in order, its generated ids (at most N; ending at the first stop id).
  """
  check_positive_int("max_new_tokens", max_new_tokens)
  prompts = [list(p) for p in prompts]
  plan = batching.plan_batches([len(p) for p in prompts], token_budget, max_rows, min_length)
  mask = None if stop_mask is None else jnp.asarray(stop_mask, bool)
  rng = jax.random.key(0)  # greedy: unused
  results: list[Optional[list[int]]] = [None] * len(prompts)
  pending = None
  for batch in plan + [None]:
    launched = None
    if batch is not None:
      tokens, lengths = batching.pad_batch(prompts, batch)
      logits, cache = prefill(config, params, jnp.asarray(tokens), jnp.asarray(lengths),
                              max_len=batch.length + max_new_tokens, chunk_size=batch.length)
      out, _ = decode(config, params, logits, cache, rng, max_new_tokens, stop_mask=mask)
      launched = (batch, out, int(lengths[:len(batch.rows)].sum()))
    if pending is not None:  # read the previous batch while this one runs
      done, out, n_tokens = pending
      ids, counts = jax.device_get((out.tokens, out.lengths))
      for slot, index in enumerate(done.rows):
        results[index] = ids[slot, :counts[slot]].tolist()
      if progress is not None:
        progress(len(done.rows), n_tokens)
    pending = launched
  return results
