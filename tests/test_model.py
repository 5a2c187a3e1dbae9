"""The whole model: one function across training, ragged prefill and decoding; configs; errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from based_jax import (LanguageModel, SamplingConfig, count_params, generate, get_config,
                       init_cache, init_params, state_size_bytes)
from based_jax.cache import cache_bytes, cache_bytes_by_kind
from based_jax.config import ModelConfig
from based_jax.layers import SplitDense, matrix_dot_general, output_logits
from based_jax.sampling import sample_tokens
from pallas_kernels.taylor_attention import TaylorState

PRESETS = ["based_tiny", "transformer_pp_tiny"]


def rel(a, b):
  return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


@pytest.mark.parametrize("preset,overrides", [(p, {}) for p in PRESETS] + [
    ("transformer_pp_tiny", {"rotary_dims": 8})])  # half-rotary heads (the attn-360m layout)
def test_ragged_prefill_then_decode_equals_full_forward(preset, overrides):
  config = get_config(preset, init_std=0.1, **overrides)
  params, model = init_params(config, seed=1), LanguageModel(config)
  total, lengths = 30, np.array([11, 3, 19])
  tokens = np.random.default_rng(0).integers(0, config.vocab_size, (3, total))
  prompts = np.where(np.arange(19) < lengths[:, None], tokens[:, :19], 7)  # padding = token 7
  cache = init_cache(config, 3, max_len=total)
  step = jax.jit(lambda p, t, c, n=None: model.apply(p, t, cache=c, lengths=n))
  prefill_logits, cache = step(params, jnp.asarray(prompts), cache, jnp.asarray(lengths))
  # Decode each row's own continuation one token at a time, all rows in one batch.
  steps = total - lengths.max()
  decoded = []
  forward = jax.jit(model.apply)
  for s in range(steps):
    step_tokens = tokens[np.arange(3), lengths + s][:, None]
    logits, cache = step(params, jnp.asarray(step_tokens), cache)
    decoded.append(logits[:, 0])
  for i in range(3):
    full, _ = forward(params, jnp.asarray(tokens[i:i + 1, :lengths[i] + steps]))
    assert rel(prefill_logits[i, :lengths[i]], full[0, :lengths[i]]) < 1e-5
    assert rel(jnp.stack([d[i] for d in decoded]), full[0, lengths[i]:]) < 1e-5
  np.testing.assert_array_equal(cache.length, lengths + steps)


@pytest.mark.parametrize("preset", PRESETS)
def test_greedy_generate_equals_repeated_argmax(preset):
  config = get_config(preset, init_std=0.3)  # large weights: varied greedy continuations
  params, model = init_params(config, seed=2), LanguageModel(config)
  prompts = np.random.default_rng(1).integers(0, config.vocab_size, (2, 6))
  lengths = np.array([6, 2])
  out = generate(config, params, prompts, lengths, max_new_tokens=10)
  forward = jax.jit(lambda p, t: model.apply(p, t)[0])
  for i in range(2):
    seq = list(prompts[i, :lengths[i]])
    for _ in range(10):  # full causal forwards, padded to one length so jit compiles once
      padded = jnp.asarray([seq + [0] * (16 - len(seq))])
      logits = forward(params, padded)
      seq.append(int(jnp.argmax(logits[0, len(seq) - 1])))
    np.testing.assert_array_equal(out.tokens[i], seq[lengths[i]:])
  assert len(set(np.asarray(out.tokens).ravel().tolist())) > 2  # the check is not vacuous


def test_generate_stops_rows_at_eos():
  config = get_config("based_tiny", init_std=0.3)
  params = init_params(config, seed=2)
  prompts = np.random.default_rng(1).integers(0, config.vocab_size, (2, 6))
  free = generate(config, params, prompts, max_new_tokens=8)
  blocked = generate(config, params, prompts, max_new_tokens=8, prefill_row_block=1)
  np.testing.assert_array_equal(blocked.tokens, free.tokens)  # row blocks change no token
  eos = int(free.tokens[0, 2])
  out = generate(config, params, prompts, max_new_tokens=8, eos_id=eos)
  first = int(np.argmax(np.asarray(free.tokens[0]) == eos))
  assert int(out.lengths[0]) == first + 1
  np.testing.assert_array_equal(out.tokens[0, :first + 1], free.tokens[0, :first + 1])
  assert np.all(np.asarray(out.tokens[0, first + 1:]) == eos)


def test_sampling_is_seeded_and_respects_top_k():
  config = get_config("based_tiny", init_std=0.3)
  params = init_params(config)
  prompts = np.zeros((4, 3), np.int32)
  rule = SamplingConfig(temperature=1.0, top_k=5)
  a = generate(config, params, prompts, max_new_tokens=6, sampling=rule, seed=3)
  b = generate(config, params, prompts, max_new_tokens=6, sampling=rule, seed=3)
  c = generate(config, params, prompts, max_new_tokens=6, sampling=rule, seed=4)
  np.testing.assert_array_equal(a.tokens, b.tokens)
  assert not np.array_equal(a.tokens, c.tokens)


def test_top_k_and_top_p_filter_the_right_tokens():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]] * 4000))
  keys = jax.random.split(jax.random.key(0), 3)
  top2 = sample_tokens(logits, keys[0], SamplingConfig(temperature=1.0, top_k=2))
  assert set(np.unique(top2).tolist()) == {0, 1}
  nucleus = sample_tokens(logits, keys[1], SamplingConfig(temperature=1.0, top_p=0.8))
  assert set(np.unique(nucleus).tolist()) == {0, 1}  # 0.5 < 0.8 <= 0.5 + 0.3
  frac = np.mean(np.asarray(nucleus) == 0)
  assert abs(frac - 0.5 / 0.8) < 0.03
  full = sample_tokens(logits, keys[2], SamplingConfig(temperature=1.0))
  assert set(np.unique(full).tolist()) == {0, 1, 2, 3}


def test_bf16_taylor_state_decodes_close_to_the_full_forward():
  config = get_config("based_tiny", init_std=0.1, la_state_dtype="bfloat16")
  params, model = init_params(config, seed=2), LanguageModel(config)
  tokens = jnp.asarray(np.random.default_rng(3).integers(0, config.vocab_size, (2, 25)))
  cache = init_cache(config, 2, max_len=25)
  taylor = [c for c in cache.layers if isinstance(c, TaylorState)]
  assert taylor and all(c.kv.dtype == jnp.bfloat16 and c.k.dtype == jnp.float32 for c in taylor)
  step = jax.jit(lambda p, t, c: model.apply(p, t, cache=c))
  _, cache = step(params, tokens[:, :10], cache)
  decoded = []
  for t in range(10, 25):
    logits, cache = step(params, tokens[:, t:t + 1], cache)
    decoded.append(logits[:, 0])
  full, _ = jax.jit(model.apply)(params, tokens)
  err = rel(jnp.stack(decoded, 1), full[:, 10:])
  assert 0 < err < 1e-2  # bf16 rounding of the stored sums only (float32 state: < 1e-5)


def test_bfloat16_compute_runs_with_float32_residual():
  config = get_config("based_tiny", dtype="bfloat16")
  params = init_params(config)
  tokens = jnp.arange(24).reshape(2, 12)
  logits_bf16, _ = LanguageModel(config).apply(params, tokens)
  logits_f32, _ = LanguageModel(config.replace(dtype="float32")).apply(params, tokens)
  assert logits_bf16.dtype == jnp.float32
  assert rel(logits_bf16, logits_f32) < 3e-2


@pytest.mark.parametrize("preset, expected", [("based_360m", 363e6), ("based_1b", 1.35e9)])
def test_released_parameter_counts(preset, expected):
  assert abs(count_params(get_config(preset)) / expected - 1) < 0.01


def test_state_size_matches_the_paper_anchor():
  # The paper's MQAR plots: BASED d=128, d'=16 about 8.0e4 bytes; sliding window w=64 about 6.7e4.
  based = state_size_bytes(get_config("mqar_based"), 256)
  window = state_size_bytes(get_config("mqar_sliding_window"), 256)
  assert abs(based.total / 8.0e4 - 1) < 0.02 and abs(window.total / 6.7e4 - 1) < 0.02
  full = state_size_bytes(get_config("mqar_attention"), 1024)
  assert full.per_layer[1] == ("attention", 4 * 2 * 128 * 1024)
  unmerged = state_size_bytes(get_config("mqar_based"), 256, symmetric_features=False)
  assert unmerged.per_layer[1][1] == 4 * (128 * 273 + 273)


def test_taylor_decoding_state_holds_what_the_state_size_counts():
  config = get_config("based_tiny")
  one_layer = config.replace(n_layers=1, linear_attention_layers=(0,), sliding_window_layers=(),
                             attention_layers=())
  counted = state_size_bytes(one_layer, 1).total
  assert cache_bytes(one_layer, 1, 1) - 4 == counted  # less the [B] int32 length counter


def test_cache_bytes_by_kind_sum_to_the_cache():
  config = get_config("based_tiny")  # window 8, BaseConv taps 3 over 2D = 128 channels
  by_kind = cache_bytes_by_kind(config, 2, 20)
  assert set(by_kind) == {"base_conv", "linear_attention", "sliding_window", "length"}
  assert sum(by_kind.values()) == cache_bytes(config, 2, 20)
  assert by_kind["sliding_window"] == 2 * (2 * 4 * 9 * 16 * 4 + 9 * 4)  # K, V [B, H, 9, 16]
  assert by_kind["base_conv"] == 2 * 2 * 2 * 128 * 4  # 2 layers of [B, taps - 1, 2D] float32


BASE = dict(vocab_size=100, d_model=64, n_layers=4, mlp_inner=128)


@pytest.mark.parametrize("changes, field", [
    (dict(la_heads=5, linear_attention_layers=(1,)), "la_heads"),
    (dict(attn_heads=6, sliding_window_layers=(1,)), "attn_heads"),
    (dict(linear_attention_layers=(1,), sliding_window_layers=(1,)), "sliding_window_layers"),
    (dict(attention_layers=(4,)), "attention_layers"),
    (dict(linear_attention_layers=(-1,)), "linear_attention_layers"),
    (dict(window=0), "window"),
    (dict(la_feature_dim=0), "la_feature_dim"),
    (dict(la_state_dtype="float16"), "la_state_dtype"),
    (dict(d_model=0), "d_model"),
    (dict(dtype="float16"), "dtype"),
    (dict(attention_impl="flash"), "attention_impl"),
    (dict(attention_decode_impl="triton"), "attention_decode_impl"),
    (dict(attention_impl="pallas"), "attention_impl"),  # a kernel for decoding only
])
def test_bad_configs_name_the_field(changes, field):
  with pytest.raises(ValueError, match=field):
    ModelConfig(**{**BASE, **changes})


def test_unknown_preset():
  with pytest.raises(ValueError, match="unknown preset"):
    get_config("based_7b")


def test_bad_tokens_and_prompts():
  config = get_config("based_tiny")
  params, model = init_params(config), LanguageModel(config)
  with pytest.raises(ValueError, match="vocab_size"):
    model.apply(params, jnp.array([[1, config.vocab_size]]))
  with pytest.raises(ValueError, match=r"\[batch, time\]"):
    model.apply(params, jnp.array([1, 2, 3]))
  with pytest.raises(ValueError, match=r"\[batch, time\]"):
    generate(config, params, np.zeros((1, 3), np.float32), max_new_tokens=2)
  with pytest.raises(ValueError, match="vocab_size"):
    generate(config, params, np.array([[-1, 2]]), max_new_tokens=2)
  with pytest.raises(ValueError, match="prompt_lengths"):
    generate(config, params, np.zeros((2, 3), np.int32), np.array([0, 3]), max_new_tokens=2)
  with pytest.raises(ValueError, match="row_block must be a positive divisor of the batch 4"):
    generate(config, params, np.zeros((4, 3), np.int32), max_new_tokens=2, prefill_row_block=3)
  tpp = get_config("transformer_pp_tiny")
  with pytest.raises(ValueError, match="max_len"):
    generate(tpp, init_params(tpp), np.zeros((1, 8), np.int32), max_new_tokens=4, max_len=10)


@pytest.mark.parametrize("preset", PRESETS)
def test_chunked_prefill_equals_one_shot_forward(preset):
  """Time chunks and row blocks change only the schedule: same logits, same cache."""
  from based_jax.generate import prefill
  config = get_config(preset, init_std=0.1)
  params, model = init_params(config, seed=3), LanguageModel(config)
  prompts = jnp.asarray(np.random.default_rng(2).integers(0, config.vocab_size, (4, 23)))
  lengths = np.array([23, 1, 10, 23])  # 4 rows, 3 forward shapes
  outs = [prefill(config, params, prompts, jnp.asarray(lengths), 40, chunk_size=c, row_block=r)
          for c, r in ((5, None), (64, None), (5, 2))]
  forward = jax.jit(model.apply)
  for i, n in enumerate(lengths):
    full, _ = forward(params, prompts[i:i + 1, :n])
    for logits, _ in outs:
      assert rel(logits[i], full[0, -1]) < 1e-5
  for other in outs[1:]:
    for a, b in zip(jax.tree.leaves(outs[0][1]), jax.tree.leaves(other[1]), strict=True):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
  with pytest.raises(ValueError, match="row_block"):
    prefill(config, params, prompts, jnp.asarray(lengths), 40, row_block=3)


@pytest.mark.parametrize("shape", [(3, 5, 7), (1, 1, 7)])  # (1, 1): the padded single row
def test_matrix_dot_general_equals_dot_general(shape):
  x = jax.random.normal(jax.random.key(0), shape)
  w = jax.random.normal(jax.random.key(1), (7, 4))
  dims = (((2,), (0,)), ((), ()))
  want = np.einsum("btd,dn->btn", np.asarray(x, np.float64), np.asarray(w, np.float64))
  got = matrix_dot_general(x, w, dims)
  assert got.shape == want.shape
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="expected"):
    matrix_dot_general(x, w, (((1,), (0,)), ((), ())))


@pytest.mark.parametrize("use_bias", [False, True])
def test_split_dense_equals_one_dense_then_split(use_bias):
  """Same parameters as one Dense layer, same blocks and gradients (float64 reference)."""
  config = get_config("based_tiny", dtype="float32", param_dtype="float32")
  x = jax.random.normal(jax.random.key(0), (2, 5, 8))
  layer = SplitDense(config, (3, 6), use_bias=use_bias)
  params = layer.init(jax.random.key(1), x)
  shapes = {"kernel": (8, 9), **({"bias": (9,)} if use_bias else {})}
  assert jax.tree.map(jnp.shape, params["params"]) == shapes
  # Random biases too, so a bias block applied to the wrong columns shows.
  params = jax.tree.map(lambda p: jax.random.normal(jax.random.key(2), p.shape), params)

  def plain(params, x):  # float64 numpy-style: one product, then split
    p = params["params"]
    y = np.asarray(x, np.float64) @ np.asarray(p["kernel"], np.float64)
    y = y + (np.asarray(p["bias"], np.float64) if use_bias else 0)
    return y[..., :3], y[..., 3:]

  for got, want in zip(layer.apply(params, x), plain(params, x)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  weights = jax.random.normal(jax.random.key(3), (2, 5, 9))
  loss = lambda params, x: jnp.sum(jnp.concatenate(layer.apply(params, x), -1) * weights)
  kernel = params["params"]["kernel"]
  bias = params["params"].get("bias", jnp.zeros(9))
  ref = lambda k, b, x: jnp.sum((x @ k + b) * weights)
  got = jax.grad(loss, argnums=(0, 1))(params, x)
  want = jax.grad(ref, argnums=(0, 1, 2))(kernel, bias, x)
  np.testing.assert_allclose(got[0]["params"]["kernel"], want[0], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(got[1], want[2], rtol=1e-5, atol=1e-5)
  if use_bias:
    np.testing.assert_allclose(got[0]["params"]["bias"], want[1], rtol=1e-5, atol=1e-5)


def test_output_logits_gradients_match_the_plain_product():
  """float32: the plain product's gradients; bfloat16: close to the float64 ones, with the
  backward products taking a bfloat16 cotangent (dtype of the input gradients kept)."""
  x = jax.random.normal(jax.random.key(0), (2, 3, 16))
  w = jax.random.normal(jax.random.key(1), (16, 11))
  probe = jax.random.normal(jax.random.key(2), (2, 3, 11))
  for dtype, tol in ((jnp.float32, 1e-5), (jnp.bfloat16, 3e-2)):
    xs, ws = x.astype(dtype), w.astype(dtype)
    logits = output_logits(xs, ws)
    assert logits.dtype == jnp.float32
    dx, dw = jax.grad(lambda a, b: jnp.sum(output_logits(a, b) * probe), (0, 1))(xs, ws)
    assert (dx.dtype, dw.dtype) == (dtype, dtype)
    x64, w64, p64 = (np.asarray(a, np.float64) for a in (xs, ws, probe))
    np.testing.assert_allclose(logits, x64 @ w64, rtol=tol, atol=tol * 4)
    np.testing.assert_allclose(np.asarray(dx, np.float64), p64 @ w64.T, rtol=tol, atol=tol * 4)
    np.testing.assert_allclose(np.asarray(dw, np.float64),
                               np.einsum("btd,btv->dv", x64, p64), rtol=tol, atol=tol * 8)


def test_embed_dropout_acts_in_training_passes_only():
  config = get_config("based_tiny", embed_dropout=0.5)
  model, plain = LanguageModel(config), LanguageModel(config.replace(embed_dropout=0.0))
  tokens = jax.random.randint(jax.random.key(0), (2, 12), 0, config.vocab_size)
  params = model.init(jax.random.key(1), tokens)
  train = lambda key: model.apply(params, tokens, train=True, rngs={"dropout": key})[0]
  np.testing.assert_array_equal(model.apply(params, tokens)[0], plain.apply(params, tokens)[0])
  np.testing.assert_array_equal(train(jax.random.key(2)), train(jax.random.key(2)))
  assert not np.allclose(train(jax.random.key(2)), train(jax.random.key(3)))
  np.testing.assert_array_equal(  # rate 0: a training pass is the evaluation pass
      plain.apply(params, tokens, train=True, rngs={"dropout": jax.random.key(2)})[0],
      plain.apply(params, tokens)[0])
  with pytest.raises(ValueError, match=r"embed_dropout must be a rate in \[0, 1\)"):
    config.replace(embed_dropout=1.0)
