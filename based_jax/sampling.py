"""Token sampling from logits: greedy, temperature, top-k and top-p (nucleus)."""

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """How the next token is drawn from the logits."""
  temperature: float = 0.0  # 0 means greedy (argmax); otherwise logits are divided by it.
  top_k: int = 0  # keep only the k most likely tokens; 0 keeps all.
  top_p: float = 1.0  # keep the smallest set of tokens whose probability reaches p; 1 keeps all.

  def __post_init__(self):
    if self.temperature < 0:
      raise ValueError(f"temperature must be >= 0, got {self.temperature}")
    if self.top_k < 0:
      raise ValueError(f"top_k must be >= 0, got {self.top_k}")
    if not 0.0 < self.top_p <= 1.0:
      raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


def sample_tokens(logits: jnp.ndarray, rng: jax.Array, config: SamplingConfig) -> jnp.ndarray:
  """Draws one token per row.

  Args:
    logits: [B, V] float32.
    rng: a PRNG key (unused when greedy).
    config: the sampling rule.

  Returns:
    [B] int32 token ids.
  """
  if config.temperature == 0.0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits.astype(jnp.float32) / config.temperature
  if config.top_k:
    kth = jax.lax.top_k(logits, min(config.top_k, logits.shape[-1]))[0][:, -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if config.top_p < 1.0:
    sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    # A token stays if the mass of the tokens strictly more likely than it is below p.
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    cutoff = jnp.min(jnp.where(mass_before < config.top_p, sorted_logits, jnp.inf), axis=-1,
                     keepdims=True)
    logits = jnp.where(logits < cutoff, -jnp.inf, logits)
  return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)
