"""Taylor linear attention mixer: BASED's global mixer, as the paper defines it.

q, k: D -> H * F (no bias); v: D -> D split into H heads of K = D / H; out: D -> D (no bias).
The attention itself (feature map, causal sums, normaliser, state) lives in
`pallas_kernels.taylor_attention`, whose `causal_taylor_attention` picks a Pallas kernel or
the chunked XLA fallback. Its cache is the `TaylorState` (sums of phi(k) v^T and phi(k)).
"""

from typing import Optional

import flax.linen as nn
import jax.numpy as jnp

from based_jax.config import ModelConfig
from based_jax.layers import dense
from pallas_kernels.taylor_attention import TaylorState, causal_taylor_attention, zero_state


def init_linear_attention_cache(config: ModelConfig, batch: int) -> TaylorState:
  """Zero state: [B, H, E, K] in config.la_state_dtype and [B, H, E] float32."""
  return zero_state(batch, config.la_heads, config.la_feature_dim,
                    config.d_model // config.la_heads, kv_dtype=config.la_state_dtype)


class TaylorLinearAttention(nn.Module):
  """Causal linear attention with the second-order Taylor feature map."""
  config: ModelConfig

  @nn.compact
  def __call__(self, x: jnp.ndarray, positions: jnp.ndarray, lengths: Optional[jnp.ndarray],
               cache: Optional[TaylorState]) -> tuple[jnp.ndarray, Optional[TaylorState]]:
    """x: [B, T, D]; positions: [B, T] (unused: no position encoding); lengths: [B] or None."""
    del positions
    cfg = self.config
    b, t, d = x.shape
    h, f = cfg.la_heads, cfg.la_feature_dim
    q = dense(cfg, h * f, use_bias=False, name="proj_q")(x).reshape(b, t, h, f)
    k = dense(cfg, h * f, use_bias=False, name="proj_k")(x).reshape(b, t, h, f)
    v = dense(cfg, d, use_bias=False, name="proj_v")(x).reshape(b, t, h, d // h)
    y, state = causal_taylor_attention(q, k, v, state=cache, lengths=lengths, eps=cfg.la_eps,
                                       impl=cfg.linear_attention_impl)
    y = dense(cfg, d, use_bias=False, output=True, name="out_proj")(y.reshape(b, t, d))
    return y, (state if cache is not None else None)
