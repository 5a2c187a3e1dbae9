"""Mamba's selective scan (`pallas_kernels.selective_scan`): the XLA reference and the Pallas
kernels against a float64 loop over the tokens, outputs, final state and the gradients of
every input; the kernels' padding and tilings; the Mamba mixer under either implementation;
the dispatch switch and bad input.

On CPU the kernels run in the Pallas interpreter, which fills every output with NaN before the
kernel runs (checked here), so an element the kernel forgets to write fails the comparison. On
GPU the same cases run compiled; there the device allocator is first filled with NaN and
released, so fresh output buffers start poisoned too. Tolerance: relative L2 error 1e-5 for
outputs and states, 1e-4 for gradients (float32 arithmetic against float64).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gpu_lowering import triton_kernels
from jax.experimental import pallas as pl

from based_jax.cache import init_layer_cache
from based_jax.config import MixerKind, ModelConfig
from based_jax.implementations import implementations
from based_jax.model import make_mixer
from pallas_kernels.selective_scan import IMPLEMENTATIONS, api, pallas_triton, selective_scan

ON_GPU = jax.default_backend() == "gpu"
gpu = pytest.mark.skipif(not ON_GPU, reason="needs a GPU")
IMPLS = ["xla", "pallas_interpret", pytest.param("pallas", marks=[pytest.mark.gpu, gpu])]
NAMES = ("dt", "x", "b_in", "c_out", "a", "h0")


def rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


def poison_device_memory():
  """On GPU: fill and free a large block so fresh buffers start as NaN (no-op on CPU)."""
  if ON_GPU:
    jnp.full((256 << 20,), jnp.nan, jnp.float32).block_until_ready().delete()


def random_case(seed, b, t, i, n, padded_from=None):
  """Mamba-like inputs (dt > 0, a < 0) with a nonzero initial state, float32; the last row is
  padding (dt = 0) from token `padded_from` on."""
  r = np.random.default_rng(seed)
  dt = r.uniform(0.01, 0.5, (b, t, i))
  if padded_from is not None:
    dt[-1, padded_from:] = 0.0
  arrays = (dt, r.normal(size=(b, t, i)), r.normal(size=(b, t, n)), r.normal(size=(b, t, n)),
            -r.uniform(0.5, 2.0, (i, n)), r.normal(size=(b, i, n)))
  return tuple(jnp.asarray(v, jnp.float32) for v in arrays)


def cotangents(seed, b, t, i, n):
  r = np.random.default_rng(seed + 100)
  return (jnp.asarray(r.normal(size=(b, t, i)), jnp.float32),
          jnp.asarray(r.normal(size=(b, i, n)), jnp.float32))


def float64_loop(dt, x, b_in, c_out, a, h0):
  """The recurrence one token at a time (h_t = exp(dt_t a) h_{t-1} + dt_t x_t b_t, y_t =
  c_t . h_t): y [B, T, I] and the final state."""
  def step(h, xs):
    dt, x, b, c = xs  # [B, I], [B, I], [B, N], [B, N]
    h = jnp.exp(dt[..., None] * a) * h + (dt * x)[..., None] * b[:, None, :]
    return h, jnp.einsum("bin,bn->bi", h, c)

  final, ys = jax.lax.scan(step, h0, tuple(jnp.moveaxis(v, 1, 0) for v in (dt, x, b_in, c_out)))
  return jnp.moveaxis(ys, 0, 1), final


def outputs_and_grads(scan, args, cots):
  """(y, final) and the gradients of sum(y wy) + sum(final wf) w.r.t. every input."""
  out, vjp = jax.vjp(scan, *args)
  return out, vjp(cots)


def float64_truth(args, cots):
  with jax.enable_x64(True):
    up = lambda v: jnp.asarray(np.asarray(v, np.float64))
    out, grads = outputs_and_grads(float64_loop, [up(v) for v in args], tuple(map(up, cots)))
    return jax.tree.map(np.asarray, (out, grads))


def check_against_truth(scan, args, cots):
  poison_device_memory()
  (y, final), grads = jax.jit(lambda a, c: outputs_and_grads(scan, a, c))(args, cots)
  (want_y, want_final), want_grads = float64_truth(args, cots)
  assert y.dtype == final.dtype == jnp.float32
  assert rel(y, want_y) < 1e-5
  assert rel(final, want_final) < 1e-5
  for name, g, want in zip(NAMES, grads, want_grads):
    assert float(np.std(want)) > 1e-3, name  # not vacuous
    assert rel(g, want) < 1e-4, name


# B, T, I, N, padded_from: odd T with a padded row; one token, I and N not powers of two (the
# kernels pad both); T past the XLA scan's chunk of 64, I = 40 in two channel blocks of 32.
CASES = [(2, 9, 8, 4, 5), (1, 1, 5, 3, None), (2, 70, 40, 16, 33)]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "b{}_t{}_i{}_n{}_pad{}".format(*c))
def test_outputs_state_and_gradients_match_a_float64_loop(impl, case):
  *shape, padded_from = case
  args = random_case(0, *shape, padded_from=padded_from)
  check_against_truth(lambda *a: selective_scan(*a, impl=impl), args, cotangents(0, *shape))


@pytest.mark.parametrize("interpret", [True, pytest.param(False, marks=[pytest.mark.gpu, gpu])])
def test_other_tilings_match_a_float64_loop(interpret):
  """Channel blocks of 4 forward and 8 backward: six and three blocks over I = 20 (padded to
  24), so the db and dc shares of several blocks are summed."""
  shape = (2, 6, 20, 2)
  scan = lambda *a: pallas_triton.scan(*a, forward=pallas_triton.Tiling(block_i=4),
                                       backward=pallas_triton.Tiling(block_i=8),
                                       interpret=interpret)
  check_against_truth(scan, random_case(1, *shape, padded_from=2), cotangents(1, *shape))


def test_padding_is_exact_and_dt_zero_is_the_identity_step():
  """N = 3 and I = 5 run padded to 4 and 8: the same outputs as the inputs padded by hand
  with zeros; and a row whose tail has dt = 0 ends in the state of its valid prefix."""
  dt, x, b_in, c_out, a, h0 = random_case(2, 2, 7, 5, 3, padded_from=4)
  run = lambda *args: pallas_triton.scan(*args, interpret=True)
  y, final = run(dt, x, b_in, c_out, a, h0)
  pad = lambda v, *w: jnp.pad(v, [(0, 0)] * (v.ndim - len(w)) + [(0, k) for k in w])
  y_pad, final_pad = run(pad(dt, 3), pad(x, 3), pad(b_in, 1), pad(c_out, 1), pad(a, 3, 1),
                         pad(h0, 3, 1))
  np.testing.assert_allclose(y_pad[..., :5], y, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(final_pad[:, :5, :3], final, rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(y_pad[..., 5:], 0.0)
  np.testing.assert_array_equal(final_pad[:, 5:], 0.0)
  np.testing.assert_array_equal(final_pad[:, :, 3:], 0.0)
  _, prefix = run(dt[1:, :4], x[1:, :4], b_in[1:, :4], c_out[1:, :4], a, h0[1:])
  np.testing.assert_allclose(final[1:], prefix, rtol=1e-6, atol=1e-6)


def test_the_interpreter_poisons_unwritten_outputs():
  """What the comparisons above rely on to catch an element a kernel does not write."""
  def half(x_ref, o_ref):
    o_ref[pl.ds(0, 4)] = x_ref[pl.ds(0, 4)]

  out = pl.pallas_call(half, out_shape=jax.ShapeDtypeStruct((8,), jnp.float32),
                       interpret=True)(jnp.ones((8,), jnp.float32))
  np.testing.assert_array_equal(out[:4], 1.0)
  assert np.isnan(np.asarray(out[4:])).all()


def test_the_kernels_lower_to_triton_on_any_backend():
  """The Triton lowering runs without a GPU, so CPU CI catches an operation the lowering
  lacks: the forward alone, and the forward with residuals and the backward."""
  args = tuple(jnp.zeros(v.shape, v.dtype) for v in random_case(0, 2, 9, 40, 3))

  def loss(*args):
    y, final = pallas_triton.scan(*args)
    return jnp.sum(y) + jnp.sum(final)

  assert triton_kernels(pallas_triton.scan, *args) == ["selective_scan_fwd"]
  assert triton_kernels(jax.grad(loss, argnums=tuple(range(6))), *args) == [
      "selective_scan_fwd", "selective_scan_bwd"]


def test_no_tokens_is_the_initial_state():
  dt, x, b_in, c_out, a, h0 = random_case(3, 2, 0, 4, 2)
  y, final = selective_scan(dt, x, b_in, c_out, a, h0, impl="pallas_interpret")
  assert y.shape == (2, 0, 4)
  np.testing.assert_array_equal(final, h0)


# ----------------------------------------------------------------------------- the mixer

MAMBA = ModelConfig(vocab_size=64, d_model=16, n_layers=1, mlp_inner=0, layer_mixers="mamba",
                    ssm_state=4, init_std=0.3)


def test_the_mamba_mixer_is_the_same_function_under_either_implementation():
  b, t = 2, 11
  x = jax.random.normal(jax.random.key(0), (b, t, MAMBA.d_model))
  w = jax.random.normal(jax.random.key(1), x.shape)
  positions = jnp.broadcast_to(jnp.arange(t), (b, t))
  params = make_mixer(MAMBA, MixerKind.MAMBA, "mixer").init(jax.random.key(2), x, positions,
                                                              None, None)
  lengths = jnp.array([t, 6])
  results = {}
  for impl in ("xla", "pallas_interpret"):
    mixer = make_mixer(MAMBA.replace(ssm_impl=impl), MixerKind.MAMBA, "mixer")
    loss = lambda p, x: jnp.sum(mixer.apply(p, x, positions, None, None)[0] * w)
    jaxpr = str(jax.make_jaxpr(loss)(params, x))
    assert ("pallas_call" in jaxpr) == (impl == "pallas_interpret")  # the kernels ran
    cache = init_layer_cache(MAMBA, MixerKind.MAMBA, b, max_len=t)
    prefill = jax.jit(lambda p, x, c: mixer.apply(p, x, positions, lengths, c))
    results[impl] = (jax.jit(loss)(params, x),
                     jax.jit(jax.grad(loss, argnums=(0, 1)))(params, x),
                     prefill(params, x, cache))
  ref, got = results["xla"], results["pallas_interpret"]
  assert float(jnp.abs(ref[0])) > 1e-2
  for name, a, b in zip(("loss", "grads", "prefill"), got, ref):
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
      assert rel(u, v) < 1e-5, name


def test_the_switch_is_reported_and_checked():
  auto = "pallas" if jax.default_backend() == "gpu" else "xla"
  assert implementations(MAMBA)["mamba"] == {"scan": auto, "decode": "xla"}
  assert implementations(MAMBA.replace(ssm_impl="pallas_interpret"))["mamba"]["scan"] == (
      "pallas_interpret")
  assert api.resolve("auto", backend="gpu") == "pallas"
  assert api.resolve("pallas", backend="gpu") == "pallas"
  assert set(IMPLEMENTATIONS) == {"auto", "xla", "pallas", "pallas_interpret"}
  with pytest.raises(ValueError, match="ssm_impl must be one of"):
    MAMBA.replace(ssm_impl="cuda")
  with pytest.raises(ValueError, match="impl must be one of"):
    api.resolve("triton", backend="gpu")
  with pytest.raises(ValueError, match="impl='pallas' needs a GPU"):
    api.resolve("pallas", backend="cpu")


@pytest.mark.parametrize("index, bad, message", [
    (0, jnp.zeros((2, 5)), r"dt must have rank 3"),
    (0, jnp.zeros((2, 5, 4), jnp.int32), r"dt must be floating point"),
    (1, jnp.zeros((2, 5, 3)), r"x must have shape \(2, 5, 4\)"),
    (2, jnp.zeros((2, 4, 3)), r"b_in must be \[batch, time, state\] = \[2, 5, N\]"),
    (3, jnp.zeros((2, 5, 2)), r"c_out must have shape \(2, 5, 3\)"),
    (4, jnp.zeros((3, 4)), r"a must have shape \(4, 3\)"),
    (5, jnp.zeros((1, 4, 3)), r"h0 must have shape \(2, 4, 3\)"),
    (5, jnp.zeros((2, 4, 3), bool), r"h0 must be floating point"),
])
def test_bad_input_is_a_value_error_naming_the_argument(index, bad, message):
  args = list(random_case(4, 2, 5, 4, 3))
  args[index] = bad
  with pytest.raises(ValueError, match=message):
    selective_scan(*args, impl="pallas_interpret")
