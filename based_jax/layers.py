"""Building blocks shared by the mixers: initialisers, add + norm, SwiGLU, rotary embeddings.

Shapes use the dimension letters of `based_jax/__init__.py`.
"""

import functools
import itertools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from based_jax.config import ModelConfig
from pallas_kernels.gemv import api as gemv_api
from pallas_kernels.rms_norm import add_rms_norm, rms_norm


def weight_init(config: ModelConfig) -> nn.initializers.Initializer:
  """N(0, init_std) for linear and embedding weights."""
  return nn.initializers.normal(config.init_std)


def output_init(config: ModelConfig) -> nn.initializers.Initializer:
  """N(0, init_std / sqrt(2 n_layers)) for projections that write into the residual stream."""
  return nn.initializers.normal(config.init_std / math.sqrt(2 * config.n_layers))


def matrix_dot_general(lhs, rhs, dimension_numbers, precision=None,
                        preferred_element_type=None, *, gemv_impl: str = "xla"):
  """x [..., D] @ W [D, N] as one matrix product over the flattened leading axes.

  Same result as `lax.dot_general`, but XLA's CPU backend computes the weight gradient of a
  matrix product about 2.5x faster than that of the rank-3 contraction. A product of a few
  rows (decoding) runs as `gemv_impl` resolves it (`pallas_kernels.gemv`: a kernel that
  streams W); on XLA a single row is padded to two, since XLA:GPU rewrites a vector-matrix
  product as a reduction that reads bf16 weights about 2x slower than its matrix kernels.
  """
  if dimension_numbers != (((lhs.ndim - 1,), (0,)), ((), ())) or rhs.ndim != 2:
    raise ValueError(f"expected x[..., D] @ W[D, N], got {dimension_numbers}")
  rows = lhs.reshape(-1, lhs.shape[-1])
  m = rows.shape[0]
  out_dtype = preferred_element_type or jnp.result_type(lhs, rhs)
  if precision is None and gemv_api.resolve(
      gemv_impl, rows=m, k=rows.shape[1], n=rhs.shape[1], dtypes=(rows.dtype, rhs.dtype),
      backend=jax.default_backend()) != "xla":
    y = gemv_api.matmul(rows, rhs, out_dtype=out_dtype, impl=gemv_impl)
  else:
    padded = jnp.pad(rows, ((0, 1), (0, 0))) if m == 1 else rows
    y = jax.lax.dot_general(padded, rhs, (((1,), (0,)), ((), ())), precision=precision,
                            preferred_element_type=preferred_element_type)[:m]
  return y.reshape(*lhs.shape[:-1], rhs.shape[-1])


def dense(config: ModelConfig, features: int, *, use_bias: bool, output: bool = False,
          name: str | None = None) -> nn.Dense:
  """A Dense layer with the config's dtypes and the paper's initialisation."""
  return nn.Dense(
      features, use_bias=use_bias, name=name,
      dtype=jnp.dtype(config.dtype), param_dtype=jnp.dtype(config.param_dtype),
      kernel_init=output_init(config) if output else weight_init(config),
      bias_init=nn.initializers.zeros,
      dot_general=functools.partial(matrix_dot_general, gemv_impl=config.gemv_impl))


def _rows_matmul(x: jnp.ndarray, w: jnp.ndarray, **kwargs) -> jnp.ndarray:
  return matrix_dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())), **kwargs)


def _weight_grad(x: jnp.ndarray, g: jnp.ndarray) -> jnp.ndarray:
  """x [..., D], g [..., N] (same dtype) -> x^T g [D, N] float32, over all leading axes."""
  return jax.lax.dot_general(x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1]),
                             (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def split_matmul(x: jnp.ndarray, kernel: jnp.ndarray, widths: tuple[int, ...],
                 gemv_impl: str = "xla") -> tuple[jnp.ndarray, ...]:
  """The column blocks of x [..., D] @ kernel [D, sum(widths)], of widths `widths`.

  Forward: one matrix product (`matrix_dot_general` with `gemv_impl`), then slices (one weight
  read and one kernel launch: decoding at small batches is bound by both). Backward: one
  product per block, summed in float32, instead of concatenating the blocks' output gradients
  into one [..., sum(widths)] array first (a full extra pass over the layer's widest
  activation in training).
  """
  y = _rows_matmul(x, kernel, gemv_impl=gemv_impl)
  return tuple(jnp.split(y, list(itertools.accumulate(widths))[:-1], axis=-1))


def _split_matmul_fwd(x, kernel, widths, gemv_impl):
  return split_matmul(x, kernel, widths, gemv_impl), (x, kernel)


def _split_matmul_bwd(widths, gemv_impl, residuals, grads):
  del gemv_impl
  x, kernel = residuals
  starts = [0, *itertools.accumulate(widths)]
  dx = sum(_rows_matmul(g.astype(x.dtype), kernel[:, a:b].T, preferred_element_type=jnp.float32)
           for g, a, b in zip(grads, starts, starts[1:]))
  dw = jnp.concatenate([_weight_grad(x, g.astype(x.dtype)) for g in grads], axis=1)
  return dx.astype(x.dtype), dw.astype(kernel.dtype)


split_matmul.defvjp(_split_matmul_fwd, _split_matmul_bwd)


class SplitDense(nn.Module):
  """`dense` whose output is returned as column blocks of `widths` (`split_matmul`).

  The parameters are those of one `dense` layer (names, shapes, initialisation), as checkpoints
  store them.
  """
  config: ModelConfig
  widths: tuple[int, ...]
  use_bias: bool

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> tuple[jnp.ndarray, ...]:
    cfg = self.config
    dtype, n = jnp.dtype(cfg.dtype), sum(self.widths)
    kernel = self.param("kernel", weight_init(cfg), (x.shape[-1], n),
                        jnp.dtype(cfg.param_dtype))
    blocks = split_matmul(x.astype(dtype), kernel.astype(dtype), tuple(self.widths),
                          cfg.gemv_impl)
    if not self.use_bias:
      return blocks
    bias = self.param("bias", nn.initializers.zeros, (n,), jnp.dtype(cfg.param_dtype))
    starts = [0, *itertools.accumulate(self.widths)]
    return tuple(y + bias[a:b].astype(dtype) for y, a, b in zip(blocks, starts, starts[1:]))


@jax.custom_vjp
def output_logits(x: jnp.ndarray, embedding_t: jnp.ndarray) -> jnp.ndarray:
  """Logits [..., V] float32 = x [..., D] @ embedding_t [D, V], accumulated in float32.

  The gradients are computed from the logits' cotangent cast to x's dtype: with bfloat16
  compute the two backward products of the widest matrix of the model run on bf16 tensor
  cores (as mixed-precision training does), not as float32 products of a float32 cotangent.
  """
  return _rows_matmul(x, embedding_t, preferred_element_type=jnp.float32)


def _output_logits_fwd(x, embedding_t):
  return output_logits(x, embedding_t), (x, embedding_t)


def _output_logits_bwd(residuals, g):
  x, embedding_t = residuals
  g = g.astype(x.dtype)
  dx = _rows_matmul(g, embedding_t.T, preferred_element_type=jnp.float32)
  return dx.astype(x.dtype), _weight_grad(x, g).astype(embedding_t.dtype)


output_logits.defvjp(_output_logits_fwd, _output_logits_bwd)


class AddRMSNorm(nn.Module):
  """The residual stream's add and norm in one call: (x, delta) -> (x + delta, its norm).

  x [B, T, D] float32 is the residual stream and delta [B, T, D] (any float dtype, added in
  float32) the output of the layer before, or None (nothing to add: x passes through). The
  norm is x / rms(x) * scale, or with `layer_norm` a LayerNorm (x - mean(x)) / std(x) * scale +
  bias (block_style zoology; torch.nn.LayerNorm's biased variance), computed in float32 (eps
  `norm_eps`), in the config's compute dtype. `pallas_kernels.rms_norm` computes both
  (`norm_impl`): with the Pallas kernels (RMSNorm only) the add and the norm are one pass over
  the stream, forward and backward.
  """
  config: ModelConfig
  layer_norm: bool = False  # LayerNorm with a bias (zeros at init) instead of RMSNorm.

  @nn.compact
  def __call__(self, x: jnp.ndarray,
               delta: jnp.ndarray | None = None) -> tuple[jnp.ndarray, jnp.ndarray]:
    cfg = self.config
    pdtype = jnp.dtype(cfg.param_dtype)
    scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), pdtype)
    bias = (self.param("bias", nn.initializers.zeros, (x.shape[-1],), pdtype)
            if self.layer_norm else None)
    options = dict(eps=cfg.norm_eps, out_dtype=jnp.dtype(cfg.dtype), impl=cfg.norm_impl,
                   center=self.layer_norm, bias=bias)
    if delta is None:
      return x, rms_norm(x, scale, **options)
    return add_rms_norm(x, delta, scale, **options)


class SwiGLU(nn.Module):
  """fc2(silu(gate) * y) with [y, gate] = fc1(x): D -> 2 * inner -> D, no biases."""
  config: ModelConfig

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    cfg = self.config
    y, gate = SplitDense(cfg, (cfg.mlp_inner, cfg.mlp_inner), use_bias=False, name="fc1")(x)
    return dense(cfg, cfg.d_model, use_bias=False, output=True, name="fc2")(nn.silu(gate) * y)


def apply_rotary(x: jnp.ndarray, positions: jnp.ndarray, base: float,
                 dims: int = 0) -> jnp.ndarray:
  """Rotary position embedding, rotate-half layout, over the first `dims` head dims.

  Args:
    x: [B, T, H, K] queries or keys.
    positions: [B, T] absolute token positions.
    base: frequency base (10000 in BASED).
    dims: how many leading dims of each head rotate (even; 0 = all K, K even): pairs (i,
      i + dims / 2) turn by positions * base^(-2i / dims), the rest pass through.

  Returns:
    [B, T, H, K] rotated, in x's dtype (angles are computed in float32).
  """
  dims = dims or x.shape[-1]
  half = dims // 2
  inv_freq = base ** (-jnp.arange(half, dtype=jnp.float32) / half)
  angles = positions.astype(jnp.float32)[..., None, None] * inv_freq  # [B, T, 1, dims/2]
  cos, sin = jnp.cos(angles), jnp.sin(angles)
  x1, x2 = jnp.split(x[..., :dims].astype(jnp.float32), 2, axis=-1)
  rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return jnp.concatenate([rotated.astype(x.dtype), x[..., dims:]], axis=-1)
