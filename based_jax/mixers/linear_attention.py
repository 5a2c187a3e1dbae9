"""Linear attention mixer: BASED's global mixer with its Taylor feature map, or an ablation map.

q, k: D -> H * F (no bias); v: D -> D split into H heads of K = D / H; out: D -> D (no bias;
initialised N(0, init_std / sqrt(2 n_layers)), or with block_style "zoology" N(0, init_std),
as zoology's `Based`, whose `proj_o` its init's out_proj rescale does not reach).
    y_t = sum_{j<=t} phi(q_t).phi(k_j) v_j / (phi(q_t) . sum_{j<=t} phi(k_j) + eps)
With the Taylor map (`config.la_feature_map == "taylor"`) the attention itself (feature map,
causal sums, normaliser, state) lives in `pallas_kernels.taylor_attention`, whose
`causal_taylor_attention` picks a Pallas kernel or the chunked XLA fallback. Any other map
(`feature_maps.py`) runs the pure-JAX recurrence of `linear_recurrence.py` on phi(q), phi(k)
and [v, 1] (the last column is the normaliser): for training up to 512 tokens its quadratic
form (as the Taylor XLA path), else chunks carrying the state, and one step when decoding.
Either way the cache is a `TaylorState`: the sums of phi(k) v^T [B, H, E, K] (in
config.la_state_dtype) and of phi(k) [B, H, E] (float32). A new cache is an `EmptyTaylorState`,
known at trace time to be zero: the first call on it (a prefill) starts the Taylor attention
from no state, so nothing reads or converts the zeros (the Pallas kernels' change of the
state's basis is a gather that XLA would otherwise constant-fold on them while compiling each
batch shape), and returns a plain `TaylorState`.
"""

from typing import Optional

import flax.linen as nn
import jax.numpy as jnp

from based_jax.config import ModelConfig
from based_jax.layers import dense
from based_jax.mixers import linear_recurrence
from based_jax.mixers.feature_maps import FeatureMap, feature_width
from pallas_kernels.taylor_attention import TaylorState, causal_taylor_attention
from pallas_kernels.taylor_attention.state import stored_like


class EmptyTaylorState(TaylorState):
  """A `TaylorState` known, at trace time, to be zero (a new cache): the first call on it runs
  the Taylor attention from no state (an ablation map's recurrence reads the zeros) and returns
  a plain `TaylorState`. Loop carries must use the plain type (`cache.as_carry`)."""


def plain_state(state: TaylorState) -> TaylorState:
  """The same arrays as a plain `TaylorState` (drops the trace-time 'empty' marker)."""
  return TaylorState(*state)


def init_linear_attention_cache(config: ModelConfig, batch: int,
                                max_len: int = 0) -> EmptyTaylorState:
  """Zero state: [B, H, E, K] in config.la_state_dtype and [B, H, E] float32."""
  del max_len  # a fixed-size state
  h, k = config.la_heads, config.d_model // config.la_heads
  e = feature_width(config.la_feature_map, config.la_feature_dim)
  return EmptyTaylorState(kv=jnp.zeros((batch, h, e, k), config.la_state_dtype),
                          k=jnp.zeros((batch, h, e), jnp.float32))


def state_values(config: ModelConfig, seq_len: int, symmetric: bool = True) -> int:
  """H K E + H E: the kv and normaliser sums (Taylor's E packed when `symmetric`)."""
  del seq_len
  e = feature_width(config.la_feature_map, config.la_feature_dim, packed=symmetric)
  return config.la_heads * (config.d_model // config.la_heads) * e + config.la_heads * e


def mixing_flops(config: ModelConfig, seq_len: int) -> float:
  """Forward FLOPs per token of the recurrence: update and read out the [E, K] sums, 4 E D."""
  del seq_len
  return 4 * feature_width(config.la_feature_map, config.la_feature_dim) * config.d_model


def _feature_map_attention(phi_q, phi_k, v, state: Optional[TaylorState], lengths, eps):
  """Causal linear attention on features phi [B, T, H, E] and v [B, T, H, K], float32 sums."""
  ones = jnp.ones(v.shape[:-1] + (1,), jnp.float32)
  start = None if state is None else jnp.concatenate(
      [state.kv.astype(jnp.float32), state.k[..., None]], axis=-1)
  values = jnp.concatenate([v.astype(jnp.float32), ones], axis=-1)
  o, final = linear_recurrence.causal(phi_q, phi_k, values, state=start, lengths=lengths)
  y = o[..., :-1] / (o[..., -1:] + eps)
  new = None if state is None else TaylorState(kv=final[..., :-1].astype(state.kv.dtype),
                                               k=final[..., -1])
  return y.astype(v.dtype), new


class TaylorLinearAttention(nn.Module):
  """Causal linear attention with the second-order Taylor feature map (or an ablation map)."""
  config: ModelConfig

  @nn.compact
  def __call__(self, x: jnp.ndarray, positions: jnp.ndarray, lengths: Optional[jnp.ndarray],
               cache: Optional[TaylorState]) -> tuple[jnp.ndarray, Optional[TaylorState]]:
    """x: [B, T, D]; positions: [B, T] (only CosFormer's map reads them); lengths: [B] or None."""
    cfg = self.config
    b, t, d = x.shape
    h, f = cfg.la_heads, cfg.la_feature_dim
    q = dense(cfg, h * f, use_bias=False, name="proj_q")(x).reshape(b, t, h, f)
    k = dense(cfg, h * f, use_bias=False, name="proj_k")(x).reshape(b, t, h, f)
    v = dense(cfg, d, use_bias=False, name="proj_v")(x).reshape(b, t, h, d // h)
    if cfg.la_feature_map == "taylor":
      start = None if isinstance(cache, EmptyTaylorState) else cache  # zero: nothing to read
      y, state = causal_taylor_attention(q, k, v, state=start, lengths=lengths, eps=cfg.la_eps,
                                         impl=cfg.linear_attention_impl)
    else:
      phi = FeatureMap(cfg, name="feature_map")
      y, state = _feature_map_attention(phi(q, positions), phi(k, positions), v, cache,
                                        lengths, cfg.la_eps)
    y = dense(cfg, d, use_bias=False, output=cfg.block_style != "zoology",
              name="out_proj")(y.reshape(b, t, d))
    return y, (None if cache is None else stored_like(state, cache))
