"""The fused residual add + RMSNorm kernels against float64, forward and gradients, and the
model with `norm_impl="pallas_interpret"` against `norm_impl="xla"`.

On CPU the kernels run in the Pallas interpreter, which pads every block past the array's
edge with NaN and fills every output with NaN before the kernel runs: a load the kernel
forgets to mask or an element it forgets to write fails the comparison. On GPU the same cases
run compiled, after filling the device allocator with NaN (fresh outputs start poisoned too).
Tolerances: float32 outputs and gradients within 2e-6 relative of float64 (float32 rounding of
a D-long sum and of rsqrt); bfloat16 ones within half a bf16 ulp (2^-8 relative) more.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gpu_lowering import triton_kernels

from based_jax.cache import init_cache
from based_jax.config import ModelConfig, get_config
from based_jax.model import LanguageModel, init_params
from pallas_kernels.rms_norm import add_rms_norm, api, pallas_fused, rms_norm

ON_GPU = jax.default_backend() == "gpu"
gpu = pytest.mark.skipif(not ON_GPU, reason="needs a GPU")
IMPLS = ["pallas_interpret", pytest.param("pallas", marks=[pytest.mark.gpu, gpu])]
EPS = 1e-5
# Small tiles: blocks of 2 rows (D <= 128), backward programs walking several blocks of rows
# with a partial last one (the default tilings take one or two blocks of these row counts).
SMALL = dict(forward=pallas_fused.Tiling(block_elements=256),
             backward=pallas_fused.Tiling(block_elements=256, max_programs=4))
TINY = dict(d_model=48, n_layers=2, sliding_window_layers=())  # BaseConv, linear attention


def poison_device_memory():
  """On GPU: fill and free a large block so fresh buffers start as NaN (no-op on CPU)."""
  if ON_GPU:
    jnp.full((256 << 20,), jnp.nan, jnp.float32).block_until_ready().delete()


def tolerance(dtype) -> dict:
  return dict(rtol=2e-6 + (2.0**-8 if dtype == jnp.bfloat16 else 0.0), atol=1e-6)


def random_rows(seed, r, d, delta_dtype, scale_dtype=jnp.float32):
  """residual [r, d] float32 (rows of varied scale), delta [r, d], scale [d]."""
  g = np.random.default_rng(seed)
  residual = g.normal(size=(r, d)) * g.uniform(0.1, 10.0, size=(r, 1))
  return (jnp.asarray(residual, jnp.float32), jnp.asarray(g.normal(size=(r, d)), delta_dtype),
          jnp.asarray(1.0 + 0.3 * g.normal(size=(d,)), scale_dtype))


def float64_add_rms_norm(residual, delta, scale):
  """The float64 truth (NumPy) of the values the kernel is given."""
  x = np.asarray(residual, np.float64) + np.asarray(delta, np.float64)
  normed = x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + EPS) * np.asarray(scale,
                                                                                  np.float64)
  return x, normed


def kernel(impl, tiling):
  """add_rms_norm and rms_norm of [R, D] rows by `impl` ('pallas' or 'pallas_interpret'),
  through the public API or, with a tiling, through pallas_fused with it."""
  if not tiling:
    return (lambda *a, **k: add_rms_norm(*a, **k, eps=EPS, impl=impl),
            lambda *a, **k: rms_norm(*a, **k, eps=EPS, impl=impl))
  options = dict(eps=EPS, interpret=impl == "pallas_interpret", **tiling)
  return (lambda *a, **k: pallas_fused.add_rms_norm(*a, **k, **options),
          lambda *a, **k: pallas_fused.rms_norm(*a, **k, **options))


def as64(x) -> np.ndarray:
  return np.asarray(jnp.asarray(x, jnp.float32), np.float64)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("r, d, delta_dtype, out_dtype, tiling", [
    (1, 96, jnp.bfloat16, jnp.bfloat16, {}),  # one row: a decoding step at batch 1
    (3, 96, jnp.float32, jnp.float32, SMALL),
    (37, 96, jnp.bfloat16, jnp.bfloat16, {}),  # not a multiple of the row blocks
    (37, 96, jnp.bfloat16, jnp.bfloat16, SMALL),
    (37, 128, jnp.float32, jnp.bfloat16, SMALL),
    (5, 1536, jnp.bfloat16, jnp.bfloat16, {}),  # BD 2048: blocks of 2 rows
])
def test_forward_matches_float64(impl, r, d, delta_dtype, out_dtype, tiling):
  residual, delta, scale = random_rows(r + d, r, d, delta_dtype)
  fused, plain = kernel(impl, tiling)
  poison_device_memory()
  new_residual, normed = jax.jit(lambda *a: fused(*a, out_dtype=out_dtype))(residual, delta,
                                                                          scale)
  want_sum, want_normed = float64_add_rms_norm(residual, delta, scale)
  assert new_residual.dtype == jnp.float32 and normed.dtype == out_dtype
  np.testing.assert_allclose(as64(new_residual), want_sum, **tolerance(jnp.float32))
  np.testing.assert_allclose(as64(normed), want_normed, **tolerance(out_dtype))
  # Without a delta: the norm of the residual itself, from a float32 or a bf16 input.
  for x in (residual, delta):
    got = jax.jit(lambda x, s: plain(x, s, out_dtype=out_dtype))(x, scale)
    np.testing.assert_allclose(as64(got), float64_add_rms_norm(x, np.zeros(x.shape), scale)[1],
                               **tolerance(out_dtype))


def float64_grads(fn, args, weights):
  """jax.grad in float64 of sum over outputs of output * weight, at float64 copies of args."""
  with jax.enable_x64(True):
    args = [jnp.asarray(as64(a)) for a in args]
    weights = [None if w is None else jnp.asarray(w, jnp.float64) for w in weights]
    loss = lambda *a: sum(jnp.sum(y * w) for y, w in zip(fn(*a), weights) if w is not None)
    return [np.asarray(g) for g in jax.grad(loss, argnums=tuple(range(len(args))))(*args)]


def float64_forward(residual, delta, scale):
  x = residual + delta
  return x, x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + EPS) * scale


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("r, d, delta_dtype, scale_dtype, sum_used, tiling", [
    (37, 96, jnp.bfloat16, jnp.float32, True, {}),
    (37, 96, jnp.bfloat16, jnp.float32, True, SMALL),  # 4 programs of 5 steps, 1 partial
    (37, 96, jnp.bfloat16, jnp.float32, False, SMALL),  # the final norm's: no sum cotangent
    (9, 96, jnp.float32, jnp.bfloat16, True, {}),
    (2, 1536, jnp.bfloat16, jnp.float32, True, {}),
])
def test_gradients_match_float64(impl, r, d, delta_dtype, scale_dtype, sum_used, tiling):
  """Gradients w.r.t. residual, delta and scale through both outputs (normed in the delta's
  dtype), and of the plain norm w.r.t. its input and scale."""
  residual, delta, scale = random_rows(r * d, r, d, delta_dtype, scale_dtype)
  g = np.random.default_rng(1)
  w_sum = g.normal(size=(r, d)) if sum_used else None
  w_normed = np.asarray(jnp.asarray(g.normal(size=(r, d)), delta_dtype), np.float64)
  fused, plain = kernel(impl, tiling)

  def loss(residual, delta, scale):
    new_residual, normed = fused(residual, delta, scale, out_dtype=delta_dtype)
    out = jnp.sum(normed.astype(jnp.float32) * w_normed.astype(np.float32))
    return out + (jnp.sum(new_residual * w_sum.astype(np.float32)) if sum_used else 0.0)

  poison_device_memory()
  grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(residual, delta, scale)
  want = float64_grads(float64_forward, (residual, delta, scale), (w_sum, w_normed))
  for name, got, want_i, dtype in zip(("residual", "delta", "scale"), grads, want,
                                      (jnp.float32, delta_dtype, scale_dtype)):
    assert got.dtype == dtype, name
    np.testing.assert_allclose(as64(got), want_i, **tolerance(dtype), err_msg=name)

  def plain_loss(x, scale):
    return jnp.sum(plain(x, scale, out_dtype=delta_dtype).astype(jnp.float32)
                   * w_normed.astype(np.float32))

  grads = jax.jit(jax.grad(plain_loss, argnums=(0, 1)))(delta, scale)
  want = float64_grads(lambda x, s: (float64_forward(jnp.zeros_like(x), x, s)[1],),
                       (delta, scale), (w_normed,))
  for name, got, want_i, dtype in zip(("x", "scale"), grads, want, (delta_dtype, scale_dtype)):
    assert got.dtype == dtype, name
    np.testing.assert_allclose(as64(got), want_i, **tolerance(dtype), err_msg=name)


@pytest.mark.parametrize("d", [96, 1536])
def test_kernels_lower_to_triton_on_any_backend(d):
  """Forward and backward of both entry points lower to Triton (what the interpreter does not
  check), at a non-power-of-two D and a row count that is not a multiple of the blocks."""
  residual = jax.ShapeDtypeStruct((37, d), jnp.float32)
  delta = jax.ShapeDtypeStruct((37, d), jnp.bfloat16)
  scale = jax.ShapeDtypeStruct((d,), jnp.float32)

  def loss(residual, delta, scale):
    new_residual, normed = pallas_fused.add_rms_norm(residual, delta, scale, eps=EPS,
                                                     out_dtype=jnp.bfloat16)
    plain = pallas_fused.rms_norm(residual, scale, eps=EPS, out_dtype=jnp.bfloat16)
    return jnp.sum(new_residual) + jnp.sum(normed.astype(jnp.float32) * plain)

  names = triton_kernels(jax.grad(loss, argnums=(0, 1, 2)), residual, delta, scale)
  assert sorted(names) == sorted(["add_rms_norm_fwd", "rms_norm_fwd", "rms_norm_bwd",
                                  "rms_norm_bwd"]), names


def test_layout_tiles_the_rows():
  """Row blocks are powers of two, at most R rounded up, and the backward's programs cover
  every row with at most max_programs of them."""
  for r, d in [(1, 1024), (3, 96), (16384, 1024), (16384, 1792), (5, 8192)]:
    m, bd, steps = pallas_fused.layout(r, d, pallas_fused.BACKWARD_TILING)
    assert bd >= d and bd & (bd - 1) == 0 and m & (m - 1) == 0
    assert m <= 1 << (r - 1).bit_length()
    programs = -(-r // (m * steps))
    assert programs <= pallas_fused.BACKWARD_TILING.max_programs
    assert programs * m * steps >= r > (programs - 1) * m * steps


def model_grads(config, tokens):
  params = init_params(config, seed=3)
  model = LanguageModel(config)

  def loss(p):
    logits = model.apply(p, tokens)[0]
    return jnp.mean(jax.nn.log_softmax(logits)[..., 0]), logits

  return jax.jit(jax.value_and_grad(loss, has_aux=True))(params)


@pytest.mark.parametrize("overrides", [
    dict(),  # float32 compute
    # bf16 compute, blocks without MLP (the mixer's output is the pending delta), remat
    dict(dtype="bfloat16", mlp_inner=0, remat="block"),
])
def test_model_with_the_kernels_matches_xla(overrides):
  """Logits and every parameter's gradient of norm_impl='pallas_interpret' and 'xla', at a
  D that is not a power of two."""
  config = get_config("based_tiny", **TINY, **overrides)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, config.vocab_size, (2, 12)))
  (_, want_logits), want = model_grads(config.replace(norm_impl="xla"), tokens)
  (_, logits), grads = model_grads(config.replace(norm_impl="pallas_interpret"), tokens)
  tol = 1e-2 if config.dtype == "bfloat16" else 1e-5
  rel = lambda a, b: float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))
  assert rel(logits, want_logits) < tol
  flat = jax.tree_util.tree_leaves_with_path(grads)
  for (path, g), w in zip(flat, jax.tree.leaves(want)):
    assert rel(g.astype(jnp.float32), w.astype(jnp.float32)) < tol, jax.tree_util.keystr(path)


def test_model_decodes_with_the_kernels():
  """A prefill then one-token steps (rows of B = 2) give the logits of norm_impl='xla'."""
  config = get_config("based_tiny", **TINY)
  params = init_params(config, seed=3)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, config.vocab_size, (2, 8)))
  outs = {}
  for impl in ("xla", "pallas_interpret"):
    model = LanguageModel(config.replace(norm_impl=impl))
    step = jax.jit(lambda p, t, c: model.apply(p, t, cache=c))
    logits, cache = step(params, tokens[:, :6], init_cache(config, 2, max_len=8))
    decoded = [logits]
    for t in (6, 7):
      logits, cache = step(params, tokens[:, t:t + 1], cache)
      decoded.append(logits)
    outs[impl] = jnp.concatenate(decoded, axis=1)
  np.testing.assert_allclose(outs["pallas_interpret"], outs["xla"], rtol=1e-5, atol=1e-5)


def test_auto_picks_the_kernels_on_a_gpu_only_where_they_apply():
  """The train step measured faster with the kernels on a GPU (docs/kernels.md): "auto" is
  "pallas" there for an RMSNorm they take, and "xla" off a GPU, for a LayerNorm, or for rows
  the kernels cannot take."""
  facts = dict(width=1024, dtypes=(jnp.float32, jnp.bfloat16, jnp.float32, jnp.bfloat16))
  assert api.resolve("auto", **facts, backend="gpu") == "pallas"
  assert api.resolve("auto", **facts, backend="cpu") == "xla"
  assert api.resolve("auto", **facts, backend="gpu", layer_norm=True) == "xla"
  assert api.resolve("auto", **{**facts, "width": api.KERNEL_MAX_WIDTH + 1},
                     backend="gpu") == "xla"
  assert api.resolve("auto", **{**facts, "dtypes": (jnp.float64,)}, backend="gpu") == "xla"
  assert api.resolve("xla", **facts, backend="gpu") == "xla"
  assert api.resolve("pallas", **facts, backend="gpu") == "pallas"


def test_bad_input_names_the_argument():
  residual, delta, scale = random_rows(0, 4, 96, jnp.bfloat16)
  call = lambda *a, **k: add_rms_norm(*a, **{"eps": EPS, "out_dtype": jnp.bfloat16, **k})
  cases = [
      ((residual.astype(jnp.bfloat16), delta, scale), {}, "residual must be float32"),
      ((residual, delta[:3], scale), {}, r"delta must have shape \(4, 96\)"),
      ((residual, delta.astype(jnp.int32), scale), {}, "delta must be floating point"),
      ((residual, delta, scale[:95]), {}, r"scale must have shape \(96,\)"),
      ((residual, delta, scale), {"eps": 0.0}, "eps must be a finite number > 0"),
      ((residual, delta, scale), {"eps": jnp.float32(1e-5)}, "eps must be"),
      ((residual, delta, scale), {"out_dtype": jnp.int8}, "out_dtype must be"),
      ((residual, delta, scale), {"impl": "cuda"}, "impl must be one of"),
      ((residual, delta, scale), {"impl": "pallas"}, "needs a GPU"),
  ]
  for args, kwargs, match in cases:
    with pytest.raises(ValueError, match=match):
      call(*args, **kwargs)
  with pytest.raises(ValueError, match="x must be rows"):
    rms_norm(jnp.zeros(()), scale, eps=EPS, out_dtype=jnp.float32)
  wide = jnp.zeros((2, api.KERNEL_MAX_WIDTH + 1), jnp.float32)
  with pytest.raises(ValueError, match="cannot run width D=8193"):
    rms_norm(wide, wide[0], eps=EPS, out_dtype=jnp.float32, impl="pallas_interpret")
  with pytest.raises(ValueError, match=r"cannot run dtypes \['float64'\]"):
    api.resolve("pallas_interpret", width=8, dtypes=(jnp.float32, jnp.float64), backend="cpu")
  with pytest.raises(ValueError, match="norm_impl"):
    ModelConfig(vocab_size=8, d_model=8, n_layers=1, mlp_inner=0, norm_impl="cuda")
