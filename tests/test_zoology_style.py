"""block_style "zoology": the paper's MQAR architecture (LayerNorms, the identity sublayer,
zoology's BaseConv, biased attention) against plain numpy, and every MQAR preset in that style
trains and decodes as its full forward."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from mixer_runs import check_prefill_then_decode, rel

from based_jax import init_params
from based_jax.cache import init_layer_cache
from based_jax.config import ModelConfig, get_config
from based_jax.data.batch import IGNORE
from based_jax.layers import AddRMSNorm
from based_jax.model import LanguageModel
from based_jax.pretrained import hf_config, keys
from based_jax.state_size import state_size_bytes
from based_jax.training.optimizer import OptimizerConfig, make_optimizer
from pallas_kernels.rms_norm import add_rms_norm, resolve, rms_norm

EPS = 1e-5
# Small versions of the MQAR presets: d 16, and lags, windows and states short enough that 14
# tokens reach past them.
SMALL = dict(vocab_size=64, d_model=16, la_feature_dim=4, window=4, ssm_state=4, horizon=12,
             init_std=0.2, block_style="zoology")
# The presets whose zoology form has code of its own (BaseConv and linear attention, the
# biased attention projections, Mamba's block) and one of the mixers that only enter the
# generic TransformerBlock (H3; Hyena, RWKV and GLA are wired the same way, and each one's
# own prefill and decoding are tested in test_baseline_mixers.py).
PRESETS = ["mqar_based", "mqar_sliding_window", "mqar_attention", "mqar_mamba", "mqar_h3"]


@pytest.fixture(autouse=True)
def float32_products():
  with jax.default_matmul_precision("float32"):
    yield


def np_layer_norm(x, scale, bias):
  x = np.asarray(x, np.float64)
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + EPS) * np.asarray(scale, np.float64) + np.asarray(
      bias, np.float64)


def np_rms_norm(x, scale):
  x = np.asarray(x, np.float64)
  return x / np.sqrt((x * x).mean(-1, keepdims=True) + EPS) * np.asarray(scale, np.float64)


def np_zoology_base_conv(u, p):
  """conv(u) * proj(u) + u: a causal depthwise conv with a bias, proj D -> D with a bias."""
  u = np.asarray(u, np.float64)
  p = jax.tree.map(lambda x: np.asarray(x, np.float64), p)
  taps = p["conv_kernel"].shape[0]
  padded = np.concatenate([np.zeros((u.shape[0], taps - 1, u.shape[2])), u], axis=1)
  conv = sum(padded[:, i:i + u.shape[1]] * p["conv_kernel"][i] for i in range(taps))
  conv = conv + p["conv_bias"]
  proj = u @ p["proj"]["kernel"] + p["proj"]["bias"]
  return conv * proj + u


def randomized(params, seed=0, std=0.3):
  """Every parameter replaced by N(0, std) (LayerNorm scales around 1): nothing at its init."""
  leaves, tree = jax.tree.flatten(params)
  keys_ = jax.random.split(jax.random.key(seed), len(leaves))
  new = [std * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys_, leaves)]
  params = jax.tree.unflatten(tree, new)
  return jax.tree_util.tree_map_with_path(
      lambda path, x: x + 1.0 if "scale" in jax.tree_util.keystr(path) else x, params)


# ----------------------------------------------------------------------------- the norm

def test_layer_norm_equals_numpy():
  rng = np.random.default_rng(0)
  residual = rng.normal(size=(2, 5, 24)).astype(np.float32) * 3 + 1
  delta = rng.normal(size=(2, 5, 24)).astype(np.float32)
  scale, bias = rng.normal(size=24).astype(np.float32), rng.normal(size=24).astype(np.float32)
  new, normed = add_rms_norm(jnp.asarray(residual), jnp.asarray(delta), jnp.asarray(scale),
                             eps=EPS, out_dtype=jnp.float32, center=True, bias=jnp.asarray(bias))
  np.testing.assert_allclose(new, residual + delta, rtol=1e-6)
  np.testing.assert_allclose(normed, np_layer_norm(residual + delta, scale, bias),
                             rtol=1e-5, atol=1e-5)
  alone = rms_norm(jnp.asarray(residual), jnp.asarray(scale), eps=EPS, out_dtype=jnp.float32,
                   center=True, bias=jnp.asarray(bias))
  np.testing.assert_allclose(alone, np_layer_norm(residual, scale, bias), rtol=1e-5, atol=1e-5)
  # the module: LayerNorm with scale ones and bias zeros at init, or plain RMSNorm
  cfg = get_config("mqar_based", block_style="zoology", d_model=24)
  for layer_norm, want in ((True, np_layer_norm(residual + delta, np.ones(24), np.zeros(24))),
                           (False, np_rms_norm(residual + delta, np.ones(24)))):
    module = AddRMSNorm(cfg, layer_norm=layer_norm)
    params = module.init(jax.random.key(0), jnp.asarray(residual), jnp.asarray(delta))
    assert sorted(params["params"]) == (["bias", "scale"] if layer_norm else ["scale"])
    _, got = module.apply(params, jnp.asarray(residual), jnp.asarray(delta))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_layer_norm_runs_on_xla_only():
  facts = dict(width=16, dtypes=(jnp.float32,) * 3, backend="cpu", layer_norm=True)
  assert resolve("auto", **facts) == resolve("xla", **facts) == "xla"
  with pytest.raises(ValueError, match="RMSNorm only"):
    resolve("pallas_interpret", **facts)
  x = jnp.ones((2, 16))
  with pytest.raises(ValueError, match="RMSNorm only"):
    add_rms_norm(x, x, x[0], eps=EPS, out_dtype=jnp.float32, center=True, bias=x[0],
                 impl="pallas_interpret")
  with pytest.raises(ValueError, match="bias must have shape"):
    rms_norm(x, x[0], eps=EPS, out_dtype=jnp.float32, center=True, bias=x[0, :3])


# ----------------------------------------------------------------------------- the layers

def test_zoology_base_conv_cache_is_what_the_paper_counts():
  cfg = ModelConfig(n_layers=1, layer_mixers="base_conv", mlp_inner=0, **SMALL)
  cache = init_layer_cache(cfg, "base_conv", 1, 9)
  assert cache.x.shape == (1, cfg.conv_kernel - 1, cfg.d_model)
  counted = state_size_bytes(cfg, 9).total // 4
  assert counted == cfg.d_model * (cache.x.shape[1] + 1) == cfg.d_model * cfg.conv_kernel


def test_a_one_layer_base_conv_model_equals_numpy():
  """zoology's BaseConv, conv(u) * proj(u) + u, in its TransformerBlock with the identity state
  mixer: x += mixer(LN1(x)); x += LN2(x); then ln_f and the tied head."""
  cfg = ModelConfig(n_layers=1, layer_mixers="base_conv", mlp_inner=0, **SMALL)
  tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 7))
  params = randomized(jax.jit(lambda: init_params(cfg))(), seed=3)
  got, _ = jax.jit(LanguageModel(cfg).apply)(params, jnp.asarray(tokens))
  p = params["params"]
  embedding = np.asarray(p["embed"]["embedding"], np.float64)
  layer = p["layers_0"]
  x = embedding[tokens]
  x = x + np_zoology_base_conv(np_layer_norm(x, **layer["norm1"]), layer["mixer"])
  x = x + np_layer_norm(x, **layer["norm2"])
  want = np_layer_norm(x, **p["final_norm"]) @ embedding.T
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def leaf_paths(config):
  shapes = jax.eval_shape(lambda: init_params(config))
  return sorted(jax.tree_util.keystr(path) for path, _ in
                jax.tree_util.tree_leaves_with_path(shapes["params"]))


def test_parameter_trees_of_both_styles():
  based = get_config("mqar_sliding_window")
  common = ["['embed']['embedding']", "['final_norm']['scale']",
            "['layers_0']['mixer']['conv_kernel']", "['layers_0']['norm1']['scale']",
            "['layers_1']['mixer']['Wqkv']['kernel']",
            "['layers_1']['mixer']['out_proj']['kernel']", "['layers_1']['norm1']['scale']"]
  assert leaf_paths(based) == sorted(common + [
      "['layers_0']['mixer']['in_proj']['bias']", "['layers_0']['mixer']['in_proj']['kernel']",
      "['layers_0']['mixer']['out_proj']['bias']", "['layers_0']['mixer']['out_proj']['kernel']"])
  norms = ["['final_norm']['bias']"] + [f"['layers_{i}']['norm1']['bias']" for i in (0, 1)] + [
      f"['layers_{i}']['norm2']['{w}']" for i in (0, 1) for w in ("bias", "scale")]
  assert leaf_paths(based.replace(block_style="zoology")) == sorted(common + norms + [
      "['layers_0']['mixer']['conv_bias']", "['layers_0']['mixer']['proj']['bias']",
      "['layers_0']['mixer']['proj']['kernel']", "['layers_1']['mixer']['Wqkv']['bias']",
      "['layers_1']['mixer']['out_proj']['bias']"])


# ----------------------------------------------------------------------------- every preset

def small_preset(name):
  base = get_config(name)
  extra = {"la_heads": min(base.la_heads, 4)} if base.layer_mixers else {}
  return get_config(name, **SMALL, **extra)


def check_block_wiring(config, p, tokens, seen, logits):
  """The model's residual stream, recomputed in numpy around the mixers' captured outputs:
  zoology's TransformerBlock x += mixer(LN1(x)); x += LN2(x) for every kind but Mamba, its
  MambaBlock x += mixer(RMSNorm(x)); logits = LN_f(x) @ embedding^T."""
  embedding = np.asarray(p["embed"]["embedding"], np.float64)
  x = embedding[tokens]
  for i, kind in enumerate(config.layer_kinds):
    params, out = p[f"layers_{i}"], seen[f"layers_{i}"]
    transformer = kind != "mamba"
    assert sorted(params) == (["mixer", "norm1", "norm2"] if transformer else ["mixer", "norm1"])
    want = (np_layer_norm(x, **params["norm1"]) if transformer else
            np_rms_norm(x, params["norm1"]["scale"]))
    assert rel(out["norm1"]["__call__"][0][1], want) < 1e-5, (i, kind)
    y = np.asarray(out["mixer"]["__call__"][0][0], np.float64)
    assert np.std(y) > 1e-4, (i, kind)  # the mixer writes into the stream
    x = x + y
    if transformer:
      second = np_layer_norm(x, **params["norm2"])
      assert rel(out["norm2"]["__call__"][0][1], second) < 1e-5, (i, kind)
      x = x + second
  assert rel(logits, np_layer_norm(x, **p["final_norm"]) @ embedding.T) < 1e-5


@pytest.mark.parametrize("name", PRESETS)
def test_every_mqar_preset_trains_and_decodes_as_its_full_forward(name):
  config = small_preset(name)
  model = LanguageModel(config)
  rng = np.random.default_rng(0)
  total, lengths = 14, np.array([7, 3])
  tokens = rng.integers(0, config.vocab_size, (2, total))
  labels = np.full_like(tokens, IGNORE)
  labels[:, -4:] = rng.integers(0, config.vocab_size, (2, 4))
  optimizer = make_optimizer(OptimizerConfig(learning_rate=1e-2, warmup_steps=0, total_steps=2))

  @jax.jit
  def train_step(inputs):
    """A fresh init and one AdamW step on the labelled positions: (params before, after, the
    loss, its gradients, the full forward's logits), in one compiled program."""
    params = init_params(config, seed=1)
    def loss_fn(params):
      (logits, _), seen = model.apply(params, inputs, capture_intermediates=True,
                                      mutable=["intermediates"])
      valid = labels != IGNORE
      losses = optax.softmax_cross_entropy_with_integer_labels(logits, np.where(valid, labels, 0))
      return jnp.sum(jnp.where(valid, losses, 0.0)) / valid.sum(), (logits, seen)
    (loss, (logits, seen)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, _ = optimizer.update(grads, optimizer.init(params), params)
    return params, optax.apply_updates(params, updates), loss, grads, seen, logits

  params, trained, loss, grads, seen, full = train_step(jnp.asarray(tokens))
  check_block_wiring(config, params["params"], tokens, seen["intermediates"], full)
  # the step: a finite loss and gradients, one on every norm parameter, the parameters move
  assert np.isfinite(float(loss))
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    assert np.all(np.isfinite(g)), jax.tree_util.keystr(path)
    if "norm" in jax.tree_util.keystr(path):
      assert float(jnp.abs(g).max()) > 0, jax.tree_util.keystr(path)
  moved = trained["params"]["final_norm"]["bias"] - params["params"]["final_norm"]["bias"]
  assert float(jnp.abs(moved).max()) > 0
  # not vacuous: the last token's logits depend on a token 4 before it (within every window)
  *_, changed = train_step(jnp.asarray(tokens).at[:, -5].add(1))
  assert rel(changed[:, -1], full[:, -1]) > 1e-4

  # ragged prefill, then decoding, against the full forward
  check_prefill_then_decode(config, model, params, tokens, lengths, full)


# ----------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("changes, message", [
    (dict(block_style="foo"), "block_style must be one of"),
    (dict(block_style="zoology", norm_impl="pallas"), "norm_impl='pallas'"),
    (dict(block_style="zoology", norm_impl="pallas_interpret"), "norm_impl='pallas_interpret'"),
])
def test_bad_block_style_settings_say_why(changes, message):
  with pytest.raises(ValueError, match=message):
    get_config("mqar_based", **changes)


def test_released_checkpoint_layout_refuses_the_zoology_style():
  config = get_config("based_tiny", block_style="zoology")
  with pytest.raises(ValueError, match="block_style='zoology'"):
    hf_config.to_hf_config(config)
  with pytest.raises(ValueError, match="block_style='zoology'"):
    keys.entries(config)
