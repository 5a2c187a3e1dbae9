"""Every mixer computes one function whether run whole, in chunks with a cache, or per token."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from implementation_spies import spy_implementations

from based_jax import config as config_lib
from based_jax.cache import init_layer_cache
from based_jax.config import get_config
from based_jax.mixers import attention
from based_jax.model import make_mixer

KINDS = [config_lib.LINEAR_ATTENTION, config_lib.SLIDING_WINDOW, config_lib.ATTENTION,
         config_lib.BASE_CONV]
CONFIG = get_config("based_tiny", init_std=0.2)  # window 8, chunk-crossing at T > 9


@pytest.fixture(autouse=True)
def float32_products():
  """Full float32 matrix products: XLA's GPU default is TF32 (10-bit mantissa), which would
  blur the paths compared here far beyond float32 rounding (a no-op on the CPU). These
  tests run no kernel (F = 8 takes the XLA path everywhere)."""
  with jax.default_matmul_precision("float32"):
    yield


def setup(kind, t, b=2, seed=0):
  mixer = make_mixer(CONFIG, kind, "mixer")
  x = jax.random.normal(jax.random.key(seed), (b, t, CONFIG.d_model))
  positions = jnp.broadcast_to(jnp.arange(t), (b, t))
  params = mixer.init(jax.random.key(seed + 1), x, positions, None, None)
  return mixer, params, x


def run_in_pieces(kind, mixer, params, x, piece, max_len=None):
  """Feeds x [B, T, D] through the cache `piece` tokens at a time; returns the outputs."""
  b, t, _ = x.shape
  cache = init_layer_cache(CONFIG, kind, b, max_len=max_len or t)
  outs = []
  for start in range(0, t, piece):
    chunk = x[:, start:start + piece]
    positions = start + jnp.broadcast_to(jnp.arange(chunk.shape[1]), chunk.shape[:2])
    y, cache = mixer.apply(params, chunk, positions, None, cache)
    outs.append(y)
  return jnp.concatenate(outs, axis=1), cache


def rel(a, b):
  return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


@pytest.mark.parametrize("t", [3, 9, 21, 40])
@pytest.mark.parametrize("kind", KINDS)
def test_whole_equals_chunked_equals_per_token(kind, t):
  mixer, params, x = setup(kind, t)
  positions = jnp.broadcast_to(jnp.arange(t), x.shape[:2])
  whole, _ = mixer.apply(params, x, positions, None, None)
  chunked, _ = run_in_pieces(kind, mixer, params, x, piece=7)
  per_token, _ = run_in_pieces(kind, mixer, params, x, piece=1)
  assert rel(chunked, whole) < 1e-5
  assert rel(per_token, whole) < 1e-5


@pytest.mark.parametrize("kind", KINDS)
def test_gradients_whole_equal_per_token(kind):
  t = 13
  mixer, params, x = setup(kind, t)
  w = jax.random.normal(jax.random.key(9), x.shape)
  positions = jnp.broadcast_to(jnp.arange(t), x.shape[:2])
  g_whole = jax.grad(lambda p, x: jnp.sum(mixer.apply(p, x, positions, None, None)[0] * w),
                     argnums=(0, 1))(params, x)
  g_step = jax.grad(lambda p, x: jnp.sum(run_in_pieces(kind, mixer, p, x, piece=1)[0] * w),
                    argnums=(0, 1))(params, x)
  for a, b in zip(jax.tree.leaves(g_step), jax.tree.leaves(g_whole)):
    assert rel(a, b) < 1e-4


@pytest.mark.parametrize("kind", KINDS)
def test_ragged_prefill_leaves_padding_out_of_the_cache(kind):
  t, lengths = 12, jnp.array([12, 5])
  mixer, params, x = setup(kind, t)
  positions = jnp.broadcast_to(jnp.arange(t), x.shape[:2])
  # Row 1 is padded after 5 tokens with garbage; its cache must equal that of the 5 tokens.
  garbage = x.at[1, 5:].set(100.0)
  cache0 = init_layer_cache(CONFIG, kind, 2, max_len=t)
  _, ragged = mixer.apply(params, garbage, positions, lengths, cache0)
  _, clean = run_in_pieces(kind, mixer, params, x[:, :5], piece=5, max_len=t)
  for a, b in zip(jax.tree.leaves(ragged), jax.tree.leaves(clean)):
    a, b = np.asarray(a[1]), np.asarray(b[1])
    if a.dtype == np.int32:  # attention slot positions
      np.testing.assert_array_equal(a, b)
    else:
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_sliding_window_decodes_far_beyond_the_window():
  t = 10 * (CONFIG.window + 1) + 3
  mixer, params, x = setup(config_lib.SLIDING_WINDOW, t, b=1)
  positions = jnp.arange(t)[None]
  whole, _ = mixer.apply(params, x, positions, None, None)
  per_token, cache = run_in_pieces(config_lib.SLIDING_WINDOW, mixer, params, x, piece=1)
  assert rel(per_token, whole) < 1e-5
  assert cache.k.shape[2] == CONFIG.window + 1
  np.testing.assert_array_equal(np.sort(np.asarray(cache.pos[0])),
                                np.arange(t - CONFIG.window - 1, t))


def test_sliding_window_sees_exactly_window_previous_tokens():
  t = 20
  mixer, params, x = setup(config_lib.SLIDING_WINDOW, t, b=1)
  positions = jnp.arange(t)[None]
  base, _ = mixer.apply(params, x, positions, None, None)
  w = CONFIG.window
  changed, _ = mixer.apply(params, x.at[0, 5].add(1.0), positions, None, None)
  moved = np.abs(np.asarray(changed - base))[0].max(-1) > 1e-6
  np.testing.assert_array_equal(np.nonzero(moved)[0], np.arange(5, 5 + w + 1))


@pytest.mark.parametrize("kind", [config_lib.SLIDING_WINDOW, config_lib.ATTENTION])
def test_attention_paths_agree_with_padded_cache_and_query_blocks(kind, monkeypatch):
  # Head dim padded in the cache (as for cuDNN decoding) and the general cached path split in
  # query blocks (a tiny score budget) change nothing; every path runs what the resolver says.
  monkeypatch.setattr(attention, "cache_head_dim", lambda config: 24)  # head dim 16 -> 24
  monkeypatch.setattr(attention, "_SCORE_BUDGET", 504)  # blocks of 3 queries: 7 = 3 + 3 + 1
  t = 21
  mixer, params, x = setup(kind, t)
  positions = jnp.broadcast_to(jnp.arange(t), x.shape[:2])
  whole, _ = mixer.apply(params, x, positions, None, None)
  calls = spy_implementations(monkeypatch)
  chunked, cache = run_in_pieces(kind, mixer, params, x, piece=7)  # prefill, chunked_prefill
  assert cache.k.shape[-1] == 24 and not np.any(np.asarray(cache.k[..., 16:]))
  assert calls == [("attention", attention.resolve_implementation(CONFIG, "prefill")),
                   *[("attention", attention.resolve_implementation(CONFIG, "chunked_prefill"))]
                   * 2]
  assert calls == [("attention", "xla")] * 3
  calls.clear()
  per_token, _ = run_in_pieces(kind, mixer, params, x, piece=1)  # prefill, then t - 1 decodes
  assert attention.resolve_implementation(CONFIG, "decode") == "xla"
  assert calls == [("attention", "xla")] * t  # the prefill, then t - 1 decodes
  assert rel(chunked, whole) < 1e-5
  assert rel(per_token, whole) < 1e-5


def test_first_call_on_a_new_cache_attends_within_itself_and_returns_a_plain_cache():
  mixer, params, x = setup(config_lib.ATTENTION, 6)
  cache = init_layer_cache(CONFIG, config_lib.ATTENTION, 2, max_len=10)
  assert isinstance(cache, attention.EmptyAttentionCache)
  _, cache = mixer.apply(params, x, jnp.broadcast_to(jnp.arange(6), (2, 6)), None, cache)
  assert type(cache) is attention.AttentionCache
  np.testing.assert_array_equal(cache.pos[0], [0, 1, 2, 3, 4, 5, -1, -1, -1, -1])


@pytest.mark.parametrize("kind", [config_lib.SLIDING_WINDOW, config_lib.ATTENTION])
def test_cudnn_decode_path_hands_cudnn_the_right_keys(kind, monkeypatch):
  # cuDNN is absent on CPU: its kernel's stand-in (implementation_spies) is plain math with the
  # same contract (BNTH layout, keys beyond kv_seqlen ignored); check the decode path built on
  # it (per-row key lengths, also once the sliding window's ring buffer has wrapped) and that
  # each decode step calls it, as the resolver says.
  config = CONFIG.replace(attention_decode_impl="cudnn")
  t, b = 2 * (CONFIG.window + 1) + 5, 2
  mixer = make_mixer(config, kind, "mixer")
  x = jax.random.normal(jax.random.key(0), (b, t, config.d_model))
  positions = jnp.broadcast_to(jnp.arange(t), (b, t))
  params = mixer.init(jax.random.key(1), x, positions, None, None)
  whole, _ = mixer.apply(params, x, positions, None, None)
  cache, outs = init_layer_cache(config, kind, b, max_len=t), []
  calls = spy_implementations(monkeypatch)
  for i in range(t):  # the first call meets an empty cache: a prefill
    y, cache = mixer.apply(params, x[:, i:i + 1], positions[:, i:i + 1], None, cache)
    outs.append(y)
  assert calls == [("attention", attention.resolve_implementation(config, "prefill")),
                   *[("attention", attention.resolve_implementation(config, "decode"))]
                   * (t - 1)]
  assert calls[1:] == [("attention", "cudnn")] * (t - 1)
  assert rel(jnp.concatenate(outs, axis=1), whole) < 1e-5
