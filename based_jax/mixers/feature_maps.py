"""Feature maps phi for linear attention (the BASED paper's ablation of its Taylor map).

Shapes use the dimension letters of `based_jax/__init__.py`; E is a map's output width.
phi(q) . phi(k) is the attention weight of key k for query q, so weights are positive only where
the map makes them so (ReLU, PosELU, Square, CosFormer, Performer and Taylor do; Identity and
all-polynomial do not, as in the paper's ablation).

  taylor     [1, x / F^(1/4), x x^T / (sqrt(2) sqrt(F))]: phi(q).phi(k) = 1 + s + s^2 / 2 with
             s = q.k / sqrt(F); E = 1 + F + F(F+1)/2 (`pallas_kernels.taylor_attention`)
  pos_elu    elu(x) + 1 (Katharopoulos et al.); E = F
  relu       max(x, 1e-12); E = F
  identity   x; E = F
  square     x * x, elementwise; E = F
  cosformer  [relu(x) sin(pi p / 2M), relu(x) cos(pi p / 2M)] at position p, M = horizon:
             weights relu(q).relu(k) cos(pi (p_q - p_k) / 2M); E = 2F
  performer  exp(W x' - |x'|^2 / 2) / sqrt(F), x' = x / F^(1/4), W a fixed random orthogonal
             [F, F] matrix with unit rows (so no exponent exceeds 1/2); E = F
  all_poly   ((x P1)^2 + (x * x) P2) / sqrt(2) with learned P1, P2 [F, F]; E = F
"""

import functools
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from based_jax.config import FEATURE_MAPS, ModelConfig
from pallas_kernels.taylor_attention import feature_width as taylor_width
from pallas_kernels.taylor_attention import taylor_feature_map

PERFORMER_SEED = 0  # seed of the Performer's fixed random projection


def feature_width(name: str, feature_dim: int, packed: bool = True) -> int:
  """E of map `name` for F = feature_dim (Taylor: packed or the paper's full outer product)."""
  if name not in FEATURE_MAPS:
    raise ValueError(f"feature map must be one of {FEATURE_MAPS}, got {name!r}")
  if name == "taylor":
    return taylor_width(feature_dim, packed)
  return 2 * feature_dim if name == "cosformer" else feature_dim


@functools.lru_cache(maxsize=None)
def performer_projection(feature_dim: int) -> np.ndarray:
  """The Performer's [F, F] orthogonal projection (rows of unit norm), fixed by PERFORMER_SEED."""
  gaussian = np.random.default_rng(PERFORMER_SEED).standard_normal((feature_dim, feature_dim))
  q, _ = np.linalg.qr(gaussian)
  return q.T.astype(np.float32)


class FeatureMap(nn.Module):
  """phi of `config.la_feature_map`; call on q or k [B, T, H, F] with positions [B, T]."""
  config: ModelConfig

  @nn.compact
  def __call__(self, x: jnp.ndarray, positions: Optional[jnp.ndarray]) -> jnp.ndarray:
    """Returns [B, T, H, E] float32."""
    name = self.config.la_feature_map
    f = x.shape[-1]
    x = x.astype(jnp.float32)
    if name == "taylor":
      return taylor_feature_map(x)
    if name == "pos_elu":
      return jax.nn.elu(x) + 1.0
    if name == "relu":
      return jnp.maximum(x, 1e-12)
    if name == "identity":
      return x
    if name == "square":
      return x * x
    if name == "cosformer":
      angle = (jnp.pi / (2 * self.config.horizon)) * positions.astype(jnp.float32)
      angle = angle[:, :, None, None]
      relu = jax.nn.relu(x)
      return jnp.concatenate([relu * jnp.sin(angle), relu * jnp.cos(angle)], axis=-1)
    if name == "performer":
      scaled = x / f**0.25
      logits = scaled @ jnp.asarray(performer_projection(f)).T
      return jnp.exp(logits - 0.5 * jnp.sum(scaled * scaled, -1, keepdims=True)) / f**0.5
    if name == "all_poly":
      init = nn.initializers.he_normal()
      p1 = self.param("proj_1", init, (f, f), jnp.dtype(self.config.param_dtype))
      p2 = self.param("proj_2", init, (f, f), jnp.dtype(self.config.param_dtype))
      linear = x @ p1.astype(jnp.float32)
      return (linear * linear + (x * x) @ p2.astype(jnp.float32)) / 2**0.5
    raise ValueError(f"unknown feature map {name!r}; known: {FEATURE_MAPS}")
