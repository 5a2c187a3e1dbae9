"""The baseline mixers (Mamba, H3, Hyena, RWKV, GLA) and zoology's MQAR BaseConv (block_style
"zoology") compute one function whether run whole, in chunks with a cache or per token, forward
and backward; their recurrences match plain loops (Mamba's scan: tests/test_selective_scan.py);
padding stays out of their caches; their state counts match their caches; at the MQAR presets'
initialisation their long-range paths carry signal."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from mixer_runs import check_prefill_then_decode, rel, run_in_pieces

from based_jax import generate, init_params, state_size_bytes
from based_jax.cache import init_layer_cache
from based_jax.config import MixerKind, ModelConfig, get_config
from based_jax.mixers import linear_recurrence, long_conv
from based_jax.model import LanguageModel, make_mixer

KINDS = [MixerKind.MAMBA, MixerKind.H3, MixerKind.HYENA, MixerKind.RWKV, MixerKind.GLA]
# (kind, block_style) of the parity tests: every baseline, and zoology's BaseConv.
CASES = [(kind, "based") for kind in KINDS] + [(MixerKind.BASE_CONV, "zoology")]
# Small and lively: d 16, 2 heads of 8, N 4, a 12-lag Hyena filter (T 20 reaches past it and
# past a decay chunk of linear_recurrence).
BASE = dict(vocab_size=64, d_model=16, mlp_inner=0, la_heads=2, ssm_state=4, horizon=12,
            init_std=0.3)


@pytest.fixture(autouse=True)
def float32_products():
  with jax.default_matmul_precision("float32"):
    yield


def config_for(kind, n_layers=1, block_style="based"):
  return ModelConfig(n_layers=n_layers, layer_mixers=",".join([kind] * n_layers),
                     block_style=block_style, **BASE)


def setup(kind, t, b=2, seed=0, block_style="based"):
  config = config_for(kind, block_style=block_style)
  mixer = make_mixer(config, kind, "mixer")
  x = jax.random.normal(jax.random.key(seed), (b, t, config.d_model))
  positions = jnp.broadcast_to(jnp.arange(t), (b, t))
  params = jax.jit(mixer.init)(jax.random.key(seed + 1), x, positions, None, None)
  return config, mixer, params, x


@pytest.mark.parametrize("kind, style", CASES)
def test_whole_equals_chunked_equals_per_token(kind, style):
  t = 20
  config, mixer, params, x = setup(kind, t, block_style=style)
  apply = jax.jit(mixer.apply)
  positions = jnp.broadcast_to(jnp.arange(t), x.shape[:2])
  whole, _ = apply(params, x, positions, None, None)
  assert float(jnp.std(whole)) > 1e-2  # not vacuous: the outputs are of order one
  chunked, _ = run_in_pieces(config, kind, apply, params, x, piece=7)
  per_token, _ = run_in_pieces(config, kind, apply, params, x, piece=1)
  assert rel(chunked, whole) < 1e-5
  assert rel(per_token, whole) < 1e-5


@pytest.mark.parametrize("kind, style", CASES)
def test_gradients_whole_equal_per_token(kind, style):
  t = 6
  config, mixer, params, x = setup(kind, t, block_style=style)
  w = jax.random.normal(jax.random.key(9), x.shape)
  positions = jnp.broadcast_to(jnp.arange(t), x.shape[:2])
  g_whole = jax.jit(jax.grad(lambda p, x: jnp.sum(
      mixer.apply(p, x, positions, None, None)[0] * w), argnums=(0, 1)))(params, x)
  g_step = jax.jit(jax.grad(lambda p, x: jnp.sum(
      run_in_pieces(config, kind, mixer.apply, p, x, piece=1)[0] * w), argnums=(0, 1)))(
          params, x)
  for a, b in zip(jax.tree.leaves(g_step), jax.tree.leaves(g_whole)):
    assert rel(a, b) < 1e-4


@pytest.mark.parametrize("kind, style", CASES)
def test_ragged_prefill_leaves_padding_out_of_the_cache(kind, style):
  t, lengths = 12, jnp.array([12, 5])
  config, mixer, params, x = setup(kind, t, block_style=style)
  apply = jax.jit(mixer.apply)
  positions = jnp.broadcast_to(jnp.arange(t), x.shape[:2])
  garbage = x.at[1, 5:].set(100.0)
  _, ragged = apply(params, garbage, positions, lengths,
                    init_layer_cache(config, kind, 2, max_len=t))
  _, clean = apply(params, x[:, :5], positions[:, :5], None,
                   init_layer_cache(config, kind, 2, max_len=t))
  for a, b in zip(jax.tree.leaves(ragged), jax.tree.leaves(clean)):
    np.testing.assert_allclose(np.asarray(a[1]), np.asarray(b[1]), rtol=1e-5, atol=1e-6)
  # and decoding one padded row (length 0) leaves its cache alone
  _, stepped = apply(params, x[:, :1], positions[:, :1], jnp.array([1, 0]), ragged)
  for a, b in zip(jax.tree.leaves(stepped), jax.tree.leaves(ragged)):
    np.testing.assert_array_equal(np.asarray(a[1]), np.asarray(b[1]))


def test_a_model_of_every_baseline_prefills_ragged_then_decodes_as_the_full_forward():
  config = ModelConfig(n_layers=6, layer_mixers="mamba,h3,hyena,rwkv,gla,base_conv",
                       **{**BASE, "init_std": 0.1})
  params, model = jax.jit(lambda: init_params(config, seed=1))(), LanguageModel(config)
  total, lengths = 14, np.array([7, 3])
  tokens = np.random.default_rng(0).integers(0, config.vocab_size, (2, total))
  full, _ = jax.jit(model.apply)(params, jnp.asarray(tokens))
  prompts = check_prefill_then_decode(config, model, params, tokens, lengths, full)
  out = generate(config, params, prompts, lengths, max_new_tokens=3)  # the public API runs
  assert out.tokens.shape == (2, 3)


# ----------------------------------------------------------------------------- plain loops

@pytest.mark.parametrize("strict, decay, bonus", [(False, True, False), (True, True, True),
                                                  (False, False, False)])
def test_linear_recurrence_equals_a_plain_loop(strict, decay, bonus):
  rng = np.random.default_rng(1)
  b, t, h, j, u = 2, 37, 2, 3, 4
  q, k = rng.normal(size=(b, t, h, j)), rng.normal(size=(b, t, h, j))
  v = rng.normal(size=(b, t, h, u))
  g = -rng.uniform(0.0, 3.0, (b, t, h, j)) if decay else None  # strong decays too
  u_bonus = rng.normal(size=(h, j)) if bonus else None
  s0 = rng.normal(size=(b, h, j, u))
  s, want = s0.copy(), np.zeros((b, t, h, u))
  for i in range(t):
    new = (np.exp(g[:, i])[..., None] * s if decay else s) + k[:, i, ..., None] * v[:, i, :, None]
    want[:, i] = np.einsum("bhj,bhju->bhu", q[:, i], s if strict else new)
    if bonus:
      want[:, i] += np.sum(q[:, i] * u_bonus * k[:, i], -1)[..., None] * v[:, i]
    s = new
  f32 = lambda a: None if a is None else jnp.asarray(a, jnp.float32)
  o, final = linear_recurrence.chunked(f32(q), f32(k), f32(v), state=f32(s0), log_decay=f32(g),
                                       bonus=f32(u_bonus), strict=strict, chunk=8)
  np.testing.assert_allclose(o, want, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(final, s, rtol=1e-4, atol=1e-4)


def test_fft_causal_conv_equals_direct_convolution():
  rng = np.random.default_rng(2)
  x, h = rng.normal(size=(2, 19, 3)), rng.normal(size=(7, 3))  # a filter shorter than T
  want = np.zeros_like(x)
  for t in range(19):
    for lag in range(min(7, t + 1)):
      want[:, t] += h[lag] * x[:, t - lag]
  np.testing.assert_allclose(long_conv.fft_causal_conv(jnp.asarray(x), jnp.asarray(h)), want,
                             rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- initialisation

def gains_at_init(preset, kind, t=32, b=2, far=8):
  """At `preset`'s initialisation, for inputs of unit scale (a block's RMSNorm output): the
  mixer's gain |y| / |x| and the last output's sensitivity to tokens more than `far` back
  (past the short convolutions' reach) relative to its sensitivity to the current token."""
  config = get_config(preset)
  mixer = make_mixer(config, kind, "mixer")
  x = jax.random.normal(jax.random.key(0), (b, t, config.d_model))
  positions = jnp.broadcast_to(jnp.arange(t), (b, t))
  params = jax.jit(mixer.init)(jax.random.key(1), x, positions, None, None)
  y, vjp = jax.vjp(lambda x: mixer.apply(params, x, positions, None, None)[0], x)
  probe = jnp.zeros_like(y).at[:, -1].set(jax.random.normal(jax.random.key(2), y[:, -1].shape))
  (g,) = vjp(probe)
  gain = float(jnp.linalg.norm(y) / jnp.linalg.norm(x))
  return gain, float(jnp.linalg.norm(g[:, :-far]) / jnp.linalg.norm(g[:, -1]))


def test_mamba_ssm_reaches_past_its_conv_at_init():
  # Beyond the conv's 4 taps only the selective SSM (C . h, against the skip D x) carries a
  # token. Its drive dt x B and readout C are products of the conv's output: conv taps of
  # N(0, 0.02) left about 1e-7 of the current token's weight to those tokens (no learning on
  # MQAR); taps and bias of PyTorch's Conv1d scale give about 1e-4.
  gain, far = gains_at_init("mqar_mamba", MixerKind.MAMBA)
  assert far > 1e-5, far
  assert gain > 1e-3, gain


def test_hyena_gates_carry_signal_at_init():
  # y = x2 * (h * (x1 v) + skip x1 v) is cubic in the short conv's outputs: N(0, 0.02) taps
  # made the mixer's gain about 1e-7; taps and bias of PyTorch's Conv1d scale give about 1e-2.
  gain, far = gains_at_init("mqar_hyena", MixerKind.HYENA)
  assert gain > 1e-3, gain
  assert far > 1e-2, far


# ----------------------------------------------------------------------------- state sizes

def array_values(*arrays) -> int:
  """Real values per row (a complex entry holds two)."""
  return sum(a[0].size * (2 if jnp.iscomplexobj(a) else 1) for a in arrays)


def test_state_counts_match_the_decoding_caches():
  d, n, h, length = BASE["d_model"], BASE["ssm_state"], BASE["la_heads"], BASE["horizon"]
  counted = {kind: state_size_bytes(config_for(kind), length).total // 4 for kind in KINDS}
  cache = {kind: init_layer_cache(config_for(kind), kind, 1, length) for kind in KINDS}
  # What the paper counts is the decoding state itself ...
  assert counted[MixerKind.MAMBA] == array_values(cache[MixerKind.MAMBA].ssm) == 2 * d * n
  assert counted[MixerKind.RWKV] == array_values(cache[MixerKind.RWKV].state) == h * (d // h)**2
  assert counted[MixerKind.GLA] == array_values(cache[MixerKind.GLA].state) == (d // 2) * (d // h)
  # ... or the last inputs of a (shift / long) filter, the current one arriving with the step.
  assert counted[MixerKind.H3] == d * (cache[MixerKind.H3].shift.shape[1] + 1) == d * n
  assert counted[MixerKind.HYENA] == d * (cache[MixerKind.HYENA].long.shape[1] + 1) == d * length
  # Not counted, as in the paper: convolution inputs, token shift, H3's diagonal SSM.
  assert array_values(cache[MixerKind.H3].ssm) == d * 2 * n


@pytest.mark.parametrize("changes, message", [
    (dict(layer_mixers="h3", d_model=15), "H3 needs d_model divisible"),
    (dict(layer_mixers="h3", ssm_state=5), "even ssm_state"),
    (dict(layer_mixers="gla", la_heads=4, d_model=12), "GLA's key width"),
    (dict(layer_mixers="rwkv", la_heads=3), "la_heads=3 must divide"),
    (dict(layer_mixers="mamba", ssm_state=0), "ssm_state must be >= 1"),
    (dict(layer_mixers="hyena", horizon=0), "horizon must be >= 1"),
])
def test_bad_baseline_configs_say_why(changes, message):
  with pytest.raises(ValueError, match=message):
    ModelConfig(**{**BASE, "n_layers": 1, **changes})
