"""Attention without positions (`ModelConfig.rotary` False, the paper's MQAR models): plain
causal (windowed) softmax attention, blind to the order of the tokens it sees; every path
(prefill, chunked prefill, decoding, cuDNN decoding) agrees; presets and export."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from implementation_spies import spy_implementations

from based_jax import LanguageModel, get_config, init_cache, init_params
from based_jax import config as config_lib
from based_jax.cache import init_layer_cache
from based_jax.model import make_mixer
from based_jax.pretrained import hf_config

KINDS = [config_lib.SLIDING_WINDOW, config_lib.ATTENTION]
CONFIG = get_config("based_tiny", init_std=0.2, rotary=False)  # 4 heads of 16, window 8


@pytest.fixture(autouse=True)
def float32_products():
  """Full float32 matrix products (XLA's GPU default is TF32; a no-op on the CPU)."""
  with jax.default_matmul_precision("float32"):
    yield


def setup(kind, t, config=CONFIG, b=2, seed=0):
  mixer = make_mixer(config, kind, "mixer")
  x = jax.random.normal(jax.random.key(seed), (b, t, config.d_model))
  positions = jnp.broadcast_to(jnp.arange(t), (b, t))
  params = mixer.init(jax.random.key(seed + 1), x, positions, None, None)
  return mixer, params, x, positions


def rel(a, b):
  return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def plain_attention(params, x, heads, window):
  """out_proj(softmax(q k^T / sqrt(K) + causal, window mask) v) in float64 NumPy, no positions."""
  w_qkv, w_out = (np.asarray(params["params"][name]["kernel"], np.float64)
                  for name in ("Wqkv", "out_proj"))
  x = np.asarray(x, np.float64)
  b, t, d = x.shape
  q, k, v = (x @ w_qkv).reshape(b, t, 3, heads, d // heads).transpose(2, 0, 3, 1, 4)
  scores = q @ k.swapaxes(-1, -2) / np.sqrt(d // heads)  # [B, H, T, T]
  query, key = np.arange(t)[:, None], np.arange(t)[None, :]
  seen = (key <= query) & (True if window is None else key >= query - window)
  scores = np.where(seen, scores, -np.inf)
  weights = np.exp(scores - scores.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  return (weights @ v).transpose(0, 2, 1, 3).reshape(b, t, d) @ w_out


@pytest.mark.parametrize("kind", KINDS)
def test_attention_without_rotary_is_plain_softmax_attention(kind):
  t = 21  # beyond the window of 8
  mixer, params, x, positions = setup(kind, t)
  window = CONFIG.window if kind == config_lib.SLIDING_WINDOW else None
  want = plain_attention(params, x, CONFIG.attn_heads, window)
  got, _ = mixer.apply(params, x, positions, None, None)
  assert rel(got, want) < 1e-5
  rotary = make_mixer(CONFIG.replace(rotary=True), kind, "mixer")  # same parameters
  assert rel(rotary.apply(params, x, positions, None, None)[0], want) > 1e-2  # not vacuous


@pytest.mark.parametrize("kind", KINDS)
def test_the_last_output_ignores_the_order_of_the_tokens_it_sees(kind):
  # A query without positions weighs the keys it sees as a set: permuting the tokens before
  # it (within its window) leaves its output unchanged; with rotary it changes.
  t = 17
  mixer, params, x, positions = setup(kind, t)
  first = t - 1 - CONFIG.window if kind == config_lib.SLIDING_WINDOW else 0
  order = np.arange(t)
  order[first:t - 1] = np.random.default_rng(0).permutation(np.arange(first, t - 1))
  assert np.any(order != np.arange(t))
  for rotary, same in ((False, True), (True, False)):
    model = make_mixer(CONFIG.replace(rotary=rotary), kind, "mixer")
    base, _ = model.apply(params, x, positions, None, None)
    permuted, _ = model.apply(params, x[:, order], positions, None, None)
    assert (rel(permuted[:, -1], base[:, -1]) < 1e-5) == same


@pytest.mark.parametrize("decode_impl", ["xla", "cudnn", "pallas_interpret"])
@pytest.mark.parametrize("kind", KINDS)
def test_prefill_chunks_and_decoding_equal_the_full_forward(kind, decode_impl, monkeypatch):
  # cuDNN decoding runs its CPU stand-in (implementation_spies), the kernel the interpreter;
  # the window's ring wraps twice.
  config = CONFIG.replace(attention_decode_impl=decode_impl)
  t = 2 * (config.window + 1) + 5
  mixer, params, x, positions = setup(kind, t, config)
  whole, _ = mixer.apply(params, x, positions, None, None)
  calls = spy_implementations(monkeypatch)
  for piece in (7, 1):  # prefill then chunked prefills; prefill then one token at a time
    cache, outs = init_layer_cache(config, kind, x.shape[0], max_len=t), []
    calls.clear()
    for start in range(0, t, piece):
      y, cache = mixer.apply(params, x[:, start:start + piece],
                             positions[:, start:start + piece], None, cache)
      outs.append(y)
    assert rel(jnp.concatenate(outs, axis=1), whole) < 1e-5
  assert calls == [("attention", "xla")] + [("attention", decode_impl)] * (t - 1)


@pytest.mark.parametrize("preset", ["mqar_attention", "mqar_sliding_window"])
def test_mqar_model_ragged_prefill_then_decode_equals_full_forward(preset):
  config = get_config(preset, vocab_size=64, d_model=32, window=4, init_std=0.1)
  assert not config.rotary
  params, model = init_params(config, seed=1), LanguageModel(config)
  total, lengths = 16, np.array([9, 2])
  tokens = np.random.default_rng(0).integers(0, config.vocab_size, (2, total))
  prompts = np.where(np.arange(9) < lengths[:, None], tokens[:, :9], 3)  # padding = token 3
  step = jax.jit(lambda t, c, n=None: model.apply(params, t, cache=c, lengths=n))
  prefill, cache = step(jnp.asarray(prompts), init_cache(config, 2, max_len=total),
                        jnp.asarray(lengths))
  decoded = []
  for s in range(total - lengths.max()):
    logits, cache = step(jnp.asarray(tokens[np.arange(2), lengths + s][:, None]), cache)
    decoded.append(logits[:, 0])
  for i in range(2):
    full, _ = model.apply(params, jnp.asarray(tokens[i:i + 1, :lengths[i] + len(decoded)]))
    assert rel(prefill[i, :lengths[i]], full[0, :lengths[i]]) < 1e-5
    assert rel(jnp.stack([d[i] for d in decoded]), full[0, lengths[i]:]) < 1e-5


def test_the_switch_is_checked():
  with pytest.raises(ValueError, match="rotary must be a bool"):
    get_config("mqar_attention", rotary="false")
  with pytest.raises(ValueError, match="rotary_dims=8 with rotary=False"):
    get_config("transformer_pp_tiny", rotary=False, rotary_dims=8)
  with pytest.raises(ValueError, match=r"must be even for rotary embeddings \(or rotary=False\)"):
    get_config("transformer_pp_tiny", d_model=12, attn_heads=4)
  odd = get_config("transformer_pp_tiny", d_model=12, attn_heads=4, rotary=False)  # head dim 3
  logits, _ = LanguageModel(odd).apply(init_params(odd), jnp.zeros((1, 5), jnp.int32))
  assert logits.shape == (1, 5, odd.vocab_size) and np.all(np.isfinite(logits))


def test_only_the_mqar_attention_presets_drop_rotary():
  for name, config in config_lib.PRESETS.items():
    has_attention = {config_lib.SLIDING_WINDOW, config_lib.ATTENTION} & set(config.layer_kinds)
    if has_attention:
      assert config.rotary == (not name.startswith("mqar_")), name
  # The released checkpoints' configs keep rotary; a model without it cannot be exported.
  released = hf_config.to_hf_config(get_config("based_tiny", mlp_inner=256))
  assert hf_config.from_hf_config(released).rotary
  with pytest.raises(ValueError, match="rotary=False"):
    hf_config.to_hf_config(get_config("based_tiny", mlp_inner=256, rotary=False))
