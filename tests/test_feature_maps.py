"""Linear attention with every feature map: each map computes its kernel, the pure-JAX path
computes linear attention whole, in chunks and per token, the Taylor map through it equals the
Taylor kernels' path, and state counts match the caches."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from mixer_runs import rel, run_in_pieces

from based_jax import cache_bytes, state_size_bytes
from based_jax.config import FEATURE_MAPS, LINEAR_ATTENTION, ModelConfig
from based_jax.mixers import feature_maps, linear_attention
from based_jax.model import make_mixer
from pallas_kernels.taylor_attention import causal_taylor_attention

ABLATIONS = [name for name in FEATURE_MAPS if name != "taylor"]
F = 6
CONFIG = ModelConfig(vocab_size=64, d_model=16, n_layers=1, mlp_inner=0,
                     linear_attention_layers=(0,), la_heads=2, la_feature_dim=F, horizon=40,
                     init_std=0.3)


@pytest.fixture(autouse=True)
def float32_products():
  with jax.default_matmul_precision("float32"):
    yield


def kernel(name, q, k, pq, pk, params):
  """phi(q) . phi(k) written out per map: q, k [F] numpy, positions pq, pk."""
  if name == "taylor":
    s = q @ k / F**0.5
    return 1 + s + s * s / 2
  if name == "pos_elu":
    elu = lambda x: np.where(x > 0, x, np.expm1(x)) + 1
    return elu(q) @ elu(k)
  if name == "relu":
    return np.maximum(q, 1e-12) @ np.maximum(k, 1e-12)
  if name == "identity":
    return q @ k
  if name == "square":
    return (q * q) @ (k * k)
  if name == "cosformer":
    return np.maximum(q, 0) @ np.maximum(k, 0) * np.cos(np.pi * (pq - pk) / (2 * CONFIG.horizon))
  if name == "performer":
    w = feature_maps.performer_projection(F).astype(np.float64)
    qs, ks = q / F**0.25, k / F**0.25
    return np.sum(np.exp(w @ (qs + ks) - (qs @ qs + ks @ ks) / 2)) / F
  if name == "all_poly":
    p1, p2 = (np.asarray(params["params"][n], np.float64) for n in ("proj_1", "proj_2"))
    phi = lambda x: ((x @ p1)**2 + (x * x) @ p2) / 2**0.5
    return phi(q) @ phi(k)
  raise AssertionError(name)


@pytest.mark.parametrize("name", FEATURE_MAPS)
def test_each_map_computes_its_kernel(name):
  config = CONFIG.replace(la_feature_map=name)
  fmap = feature_maps.FeatureMap(config)
  x = jax.random.normal(jax.random.key(0), (1, 2, 1, F))
  positions = jnp.array([[3, 17]])
  params = fmap.init(jax.random.key(1), x, positions)
  phi = np.asarray(fmap.apply(params, x, positions), np.float64)
  assert phi.shape[-1] == feature_maps.feature_width(name, F)
  q, k = np.asarray(x[0, 1, 0], np.float64), np.asarray(x[0, 0, 0], np.float64)
  want = kernel(name, q, k, 17, 3, params)
  np.testing.assert_allclose(phi[0, 1, 0] @ phi[0, 0, 0], want, rtol=1e-5, atol=1e-6)


def test_performer_projection_is_orthogonal_and_fixed():
  w = feature_maps.performer_projection(F)
  np.testing.assert_allclose(w @ w.T, np.eye(F), atol=1e-5)
  np.testing.assert_array_equal(w, feature_maps.performer_projection.__wrapped__(F))


def setup(name, t, b=2):
  config = CONFIG.replace(la_feature_map=name)
  mixer = make_mixer(config, LINEAR_ATTENTION, "mixer")
  x = jax.random.normal(jax.random.key(0), (b, t, config.d_model))
  positions = jnp.broadcast_to(jnp.arange(t), (b, t))
  params = jax.jit(mixer.init)(jax.random.key(1), x, positions, None, None)
  return config, mixer, params, x, positions


def pieces(config, apply, params, x, piece):
  return run_in_pieces(config, LINEAR_ATTENTION, apply, params, x, piece)[0]


@pytest.mark.parametrize("name", ABLATIONS)
def test_whole_equals_chunked_equals_per_token_equals_the_quadratic_form(name):
  t = 70  # past one 64-token chunk of the recurrence
  config, mixer, params, x, positions = setup(name, t)
  apply = jax.jit(mixer.apply)
  whole, _ = apply(params, x, positions, None, None)
  # (relative norms: Identity's and all-poly's normalisers can come near zero)
  assert rel(pieces(config, apply, params, x, 9), whole) < 1e-4
  assert rel(pieces(config, apply, params, x, 1), whole) < 1e-4
  # the quadratic form, from the module's own projections and map
  inner = params["params"]
  h, k_dim = config.la_heads, config.d_model // config.la_heads
  q = (x @ inner["proj_q"]["kernel"]).reshape(2, t, h, F)
  k = (x @ inner["proj_k"]["kernel"]).reshape(2, t, h, F)
  v = (x @ inner["proj_v"]["kernel"]).reshape(2, t, h, k_dim)
  fmap = feature_maps.FeatureMap(config)
  fparams = {"params": inner.get("feature_map", {})}
  phi_q, phi_k = (fmap.apply(fparams, a, positions) for a in (q, k))
  weights = jnp.einsum("bthe,bshe->bhts", phi_q, phi_k) * jnp.tril(jnp.ones((t, t)))
  y = jnp.einsum("bhts,bshk->bthk", weights, v) / (jnp.sum(weights, -1).transpose(0, 2, 1)[
      ..., None] + config.la_eps)
  want = y.reshape(2, t, -1) @ inner["out_proj"]["kernel"]
  assert rel(whole, want) < 1e-4


@pytest.mark.parametrize("name", ["cosformer", "all_poly"])
def test_gradients_whole_equal_per_token(name):
  t = 7
  config, mixer, params, x, positions = setup(name, t)
  w = jax.random.normal(jax.random.key(9), x.shape)
  g_whole = jax.jit(jax.grad(lambda p, x: jnp.sum(
      mixer.apply(p, x, positions, None, None)[0] * w), argnums=(0, 1)))(params, x)
  g_step = jax.jit(jax.grad(lambda p, x: jnp.sum(
      pieces(config, mixer.apply, p, x, 1) * w), argnums=(0, 1)))(params, x)
  for a, b in zip(jax.tree.leaves(g_step), jax.tree.leaves(g_whole)):
    assert rel(a, b) < 1e-4


def test_taylor_map_through_the_generic_path_equals_the_taylor_kernels_path():
  b, t, h, k_dim = 2, 21, 2, 5
  q, k = (jax.random.normal(jax.random.key(i), (b, t, h, F)) for i in (0, 1))
  v = jax.random.normal(jax.random.key(2), (b, t, h, k_dim))
  lengths = jnp.array([21, 13])
  config = CONFIG.replace(la_feature_map="taylor")
  state = linear_attention.init_linear_attention_cache(config.replace(d_model=h * k_dim), b)
  fmap = feature_maps.FeatureMap(config)
  phi_q, phi_k = fmap.apply({}, q, None), fmap.apply({}, k, None)
  y, new = linear_attention._feature_map_attention(phi_q, phi_k, v, state, lengths, 1e-6)
  y_ref, new_ref = causal_taylor_attention(q, k, v, state=state, lengths=lengths, impl="xla")
  mask = (jnp.arange(t) < lengths[:, None])[..., None, None]
  np.testing.assert_allclose(jnp.where(mask, y, 0), jnp.where(mask, y_ref, 0), rtol=1e-4,
                             atol=1e-5)
  for a, b_ in zip(new, new_ref):
    np.testing.assert_allclose(a, b_, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name, width", [("taylor", 1 + F + F * (F + 1) // 2),
                                         ("cosformer", 2 * F), ("performer", F), ("relu", F)])
def test_state_count_matches_the_cache(name, width):
  config = CONFIG.replace(la_feature_map=name)
  h, k_dim = config.la_heads, config.d_model // config.la_heads
  counted = state_size_bytes(config, 1024).total
  assert counted == 4 * (h * k_dim * width + h * width)
  assert cache_bytes(config, 1, 1) - 4 == counted  # less the [B] int32 length counter


@pytest.mark.parametrize("impl", ["pallas", "pallas_interpret", "triton"])
def test_kernels_take_only_the_taylor_map(impl):
  with pytest.raises(ValueError, match="runs the Taylor kernels only"):
    CONFIG.replace(la_feature_map="relu", linear_attention_impl=impl)
  CONFIG.replace(la_feature_map="relu", linear_attention_impl="xla")  # the pure-JAX path
  with pytest.raises(ValueError, match="la_feature_map must be one of"):
    CONFIG.replace(la_feature_map="softmax")
