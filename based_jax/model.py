"""The BASED / Transformer++ language model: embedding, residual blocks, final norm, tied head.

The residual stream is float32 (each residual add is done by the norm after it: `Block`);
mixers and MLPs compute in `config.dtype`. A call takes an optional `ModelCache` (see
`cache.py`) and returns the updated one, so the same code runs training (no cache), prefill
(many tokens into a fresh cache) and decoding (one token).
"""

import functools
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from based_jax.cache import ModelCache, attention_capacity, check_cache
from based_jax.checks import check_capacity, check_index_array, check_token_ids
from based_jax.config import MixerKind, ModelConfig
from based_jax.layers import AddRMSNorm, SwiGLU, output_logits, weight_init
from based_jax.mixers import registry


def make_mixer(config: ModelConfig, kind: str, name: str) -> nn.Module:
  """The mixer module for a layer kind (`based_jax.mixers.registry`)."""
  return registry.spec(kind).module(config, name)


def zoology_transformer_block(config: ModelConfig, kind: str) -> bool:
  """Whether a layer is zoology's TransformerBlock (block_style "zoology", every kind but
  Mamba): LayerNorms, and without an MLP its identity state mixer. Zoology's MambaBlock is
  add + RMSNorm, mixer: the "based" block."""
  return config.block_style == "zoology" and kind != MixerKind.MAMBA


class Block(nn.Module):
  """Pre-norm residual block: x += mixer(norm1(x)); x += mlp(norm2(x)), each add done by the
  norm after it (`AddRMSNorm`: one pass over the stream with the Pallas kernels).

  The stream arrives and leaves as a pair: x [B, T, D] float32 and `pending` [B, T, D], the
  output of the layer before (compute dtype; None before the first block), not yet added to
  x. norm1 adds it and normalises, norm2 adds the mixer's output and normalises; the block's
  last output is the new pending delta, which the next block's norm1 or the model's final norm
  adds. Without an MLP that output is the mixer's; in zoology's TransformerBlock
  (`zoology_transformer_block`) it is norm2's (its identity state mixer: x += mixer(LN1(x));
  x += LN2(x)), and the norms are LayerNorms.
  """
  config: ModelConfig
  kind: str

  @nn.compact
  def __call__(self, x, pending, positions, lengths, cache):
    cfg = self.config
    zoology = zoology_transformer_block(cfg, self.kind)
    x, h = AddRMSNorm(cfg, layer_norm=zoology, name="norm1")(x, pending)
    y, cache = make_mixer(cfg, self.kind, "mixer")(h, positions, lengths, cache)
    if not cfg.mlp_inner and not zoology:
      return x, y, cache
    x, h = AddRMSNorm(cfg, layer_norm=zoology, name="norm2")(x, y)
    return x, (SwiGLU(cfg, name="mlp")(h) if cfg.mlp_inner else h), cache


class LanguageModel(nn.Module):
  """Decoder-only LM. Call with tokens [B, T] -> (logits, new cache)."""
  config: ModelConfig

  @nn.compact
  def __call__(self, tokens: jnp.ndarray, *, cache: Optional[ModelCache] = None,
               lengths: Optional[jnp.ndarray] = None,
               logits_at: Optional[jnp.ndarray] = None,
               train: bool = False) -> tuple[jnp.ndarray, Optional[ModelCache]]:
    """Runs the model.

    Args:
      tokens: [B, T] int token ids, right-padded when `lengths` is given.
      cache: state of the tokens seen before (decoding / prefill); None for training.
      lengths: [B] number of valid tokens of each row (the rest is padding that enters no
        state); all T if None.
      logits_at: [B, P] positions within this call whose logits are wanted (saves the
        [B, T, V] head when only a few are needed); all T if None.
      train: a training pass: the token embeddings get `config.embed_dropout`, whose mask
        comes from the 'dropout' PRNG stream (`apply(..., rngs={"dropout": key})`).

    Returns:
      logits [B, T or P, V] float32 and the updated cache (None if `cache` was None).

    Raises:
      ValueError naming the argument for bad shapes and dtypes, and, for concrete values,
      token ids outside [0, V), lengths outside [0, T], logits_at outside [0, T) or more tokens
      than a full-attention cache holds. Under `jax.jit` the values cannot raise: such a row
      gets NaN logits instead (never a silently wrong number).
    """
    cfg = self.config
    check_token_ids("tokens", tokens, cfg.vocab_size)
    b, t = tokens.shape
    if lengths is not None:
      check_index_array("lengths", lengths, (b,), 0, t, "valid tokens per row")
    if logits_at is not None:
      check_index_array("logits_at", logits_at, (b, None), 0, t - 1, "positions within the call")
    added = jnp.full((b,), t, jnp.int32) if lengths is None else lengths.astype(jnp.int32)
    total, capacity = None, None  # tokens per row after this call; full-attention slots
    if cache is not None:
      check_cache(cfg, cache, b)
      total, capacity = cache.length + added, attention_capacity(cfg, cache)
      check_capacity("tokens", total, capacity)
    start = jnp.zeros((b,), jnp.int32) if cache is None else cache.length
    positions = start[:, None] + jnp.arange(t, dtype=jnp.int32)

    embed = nn.Embed(cfg.vocab_size, cfg.d_model, embedding_init=weight_init(cfg),
                     param_dtype=jnp.dtype(cfg.param_dtype), name="embed")
    x, pending = embed(tokens).astype(jnp.float32), None  # the stream as Block passes it
    # zoology's dropout1 of its first block, on the embeddings
    x = nn.Dropout(cfg.embed_dropout, deterministic=not train, name="embed_dropout")(x)
    new_layers = []
    block = nn.remat(Block) if cfg.remat == "block" else Block  # same params either way
    for i, kind in enumerate(cfg.layer_kinds):
      x, pending, layer_cache = block(cfg, kind, name=f"layers_{i}")(
          x, pending, positions, lengths, None if cache is None else cache.layers[i])
      new_layers.append(layer_cache)
    # zoology's final norm is a LayerNorm after either of its blocks
    _, x = AddRMSNorm(cfg, layer_norm=cfg.block_style == "zoology", name="final_norm")(x, pending)
    if logits_at is not None:
      x = jnp.take_along_axis(x, logits_at[..., None], axis=1)
    # A NaN row of the head's input makes every logit of that row NaN (cheaper than [B, T, V]).
    bad = _invalid_rows(cfg, tokens, lengths, logits_at, total, capacity)
    x = jnp.where(bad[:, None, None], jnp.nan, x)
    logits = output_logits(x, embed.embedding.astype(x.dtype).T)
    if cache is None:
      return logits, None
    return logits, ModelCache(tuple(new_layers), total)


def _invalid_rows(config: ModelConfig, tokens, lengths, logits_at, total,
                  capacity) -> jnp.ndarray:
  """[B] bool: rows whose inputs break the contract in ways only known under `jax.jit` (values
  outside the checks' ranges, a full-attention cache overflowing). Their logits become NaN,
  the flag that replaces the ValueError a concrete call raises."""
  t = tokens.shape[1]
  bad = jnp.any((tokens < 0) | (tokens >= config.vocab_size), axis=1)
  if lengths is not None:
    bad |= (lengths < 0) | (lengths > t)
  if logits_at is not None:
    bad |= jnp.any((logits_at < 0) | (logits_at >= t), axis=1)
  if capacity is not None:
    bad |= total > capacity
  return bad


@functools.partial(jax.jit, static_argnums=0)
def init_params(config: ModelConfig, seed: int = 0):
  """Freshly initialised parameters (a pytree) for `config`, in one compiled program (op by op
  the initializers take seconds even for a tiny model)."""
  return LanguageModel(config).init(jax.random.key(seed), jnp.zeros((1, 1), jnp.int32))


def count_params(config: ModelConfig) -> int:
  """Number of parameters, from shapes only (nothing is allocated)."""
  shapes = jax.eval_shape(functools.partial(init_params, config))
  return sum(x.size for x in jax.tree.leaves(shapes))
