"""The Pallas (and jax-triton) kernels against the float64 truth, forward, state and gradients.

On CPU the kernels run in the Pallas interpreter, which fills every output with NaN before the
kernel runs, so an element the kernel forgets to write fails the comparison. On GPU the same
cases run compiled; there the device allocator is first filled with NaN and released, so fresh
output buffers start poisoned too. Tolerances (relative L2 error): float32 inputs 1e-4 (IEEE
float32 products, rounding only); bfloat16 inputs 1e-2 (bf16 operands of the tensor-core
products, float32 accumulation; the float64 reference sees the same bf16-rounded inputs).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.taylor_attention import (api, causal_taylor_attention, feature_width,
                                             pallas_chunked, pallas_decode, reference,
                                             taylor_feature_map, triton_decode)
from pallas_kernels.taylor_attention.state import TaylorState
from gpu_lowering import mosaic_kernels, triton_kernels
from taylor_oracle import numpy_taylor_attention, rel

ON_GPU = jax.default_backend() == "gpu"
gpu = pytest.mark.skipif(not ON_GPU, reason="needs a GPU")
CHUNK_IMPLS = ["pallas_interpret", pytest.param("pallas", marks=[pytest.mark.gpu, gpu])]
jax_triton = pytest.mark.skipif(not triton_decode.available(),
                                reason='needs jax-triton: pip install -e ".[triton]"')
DECODE_IMPLS = CHUNK_IMPLS + [pytest.param("triton", marks=[pytest.mark.gpu, gpu, jax_triton])]
TOL = {jnp.float32: 1e-4, jnp.bfloat16: 1e-2}
F = 16
E = feature_width(F)  # 153, the packed basis


def poison_device_memory():
  """On GPU: fill and free a large block so fresh buffers start as NaN (no-op on CPU)."""
  if ON_GPU:
    jnp.full((256 << 20,), jnp.nan, jnp.float32).block_until_ready().delete()


def random_case(seed, b, t, h, d, dtype, with_state):
  r = np.random.default_rng(seed)
  q, k = (jnp.asarray(r.normal(size=(b, t, h, F)), dtype) for _ in range(2))
  v = jnp.asarray(r.normal(size=(b, t, h, d)), dtype)
  state = None
  if with_state:  # a state as if 50 earlier tokens had been seen
    _, state = reference.quadratic(*(jnp.asarray(r.normal(size=x.shape[:1] + (50,) + x.shape[2:]),
                                                 jnp.float32) for x in (q, k, v)))
  return q, k, v, state


def float64_truth(q, k, v, state, lengths, cot=None):
  """Outputs, final state and (given output cotangents `cot`) gradients in float64 (jax under
  x64 on the upcast inputs)."""
  with jax.enable_x64(True):
    up = lambda x: jnp.asarray(np.asarray(x, np.float64))
    q, k, v = up(q), up(k), up(v)
    s = None if state is None else TaylorState(up(state.kv), up(state.k))
    mask = jnp.arange(q.shape[1])[None, :] < up(lengths).astype(jnp.int64)[:, None]

    def loss(q, k, v, kv, ks):
      y, fin = reference.quadratic(q, k, v, state=TaylorState(kv, ks), key_mask=mask)
      return sum(jnp.sum(a * up(c)) for a, c in zip((y, fin.kv, fin.k), cot)), (y, fin)

    s = s or TaylorState(jnp.zeros((q.shape[0], q.shape[2], E, v.shape[-1])),
                         jnp.zeros((q.shape[0], q.shape[2], E)))
    if cot is None:
      y, fin = reference.quadratic(q, k, v, state=s, key_mask=mask)
      return jax.tree.map(np.asarray, (y, fin, None))
    grads, (y, fin) = jax.grad(loss, argnums=(0, 1, 2, 3, 4), has_aux=True)(q, k, v, s.kv, s.k)
    return jax.tree.map(np.asarray, (y, fin, grads))


# Explicit tilings with several time segments (the default splits time only for small B H)
# and, in seg64, two column blocks in every backward kernel.
SEGMENTED = {
    "seg64": dict(forward=pallas_chunked.Tiling(32, 32, 4, 1),
                  backward=pallas_chunked.Tiling(16, block_d=32), segment=64),
    "seg128": dict(forward=pallas_chunked.Tiling(64, 64, 4, 1),
                   backward=pallas_chunked.Tiling(32), segment=128),
}


def attend(q, k, v, state, lengths, impl, tiling):
  """causal_taylor_attention, or the kernels directly with an explicit tiling."""
  if tiling is None:
    return causal_taylor_attention(q, k, v, state=state, lengths=lengths, impl=impl)
  return pallas_chunked.chunked(
      q, k, v, state, lengths, eps=1e-6, interpret=impl.endswith("_interpret"),
      forward_kernel="mosaic" if impl.startswith("mosaic") else "triton", **SEGMENTED[tiling])


CHUNKED_CASES = [  # (t, d, with_state, ragged, tiling)
    (1, 64, True, False, None), (17, 64, False, False, None), (64, 112, False, True, None),
    (300, 64, True, True, None), (300, 64, True, True, "seg64"), (300, 112, False, True, "seg128")]
# The Mosaic forward in the GPU interpreter (about 10 s a case on 2 cores): padding in T,
# segments with an initial state and ragged lengths, padding in K.
MOSAIC_CPU_CASES = [CHUNKED_CASES[1], CHUNKED_CASES[4], CHUNKED_CASES[5]]


@pytest.mark.parametrize("impl", CHUNK_IMPLS)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("t, d, with_state, ragged, tiling", CHUNKED_CASES)
def test_chunked_kernel_matches_float64(impl, dtype, t, d, with_state, ragged, tiling):
  check_chunked_against_float64(impl, dtype, t, d, with_state, ragged, tiling)


@pytest.mark.parametrize("impl, t, d, with_state, ragged, tiling", [
    *(("mosaic_interpret", *case) for case in MOSAIC_CPU_CASES),
    *(pytest.param("mosaic", *case, marks=[pytest.mark.gpu, gpu]) for case in CHUNKED_CASES)])
def test_mosaic_forward_matches_float64(impl, t, d, with_state, ragged, tiling):
  """The Mosaic forward (bf16: its products are 16-bit wgmma operands), with the Triton
  backward behind it."""
  check_chunked_against_float64(impl, jnp.bfloat16, t, d, with_state, ragged, tiling)


def check_chunked_against_float64(impl, dtype, t, d, with_state, ragged, tiling):
  """Outputs, final state and every gradient of a chunked call against float64."""
  b, h = 2, 2
  q, k, v, state = random_case(t * 7 + d, b, t, h, d, dtype, with_state)
  lengths = jnp.array([t, max(t // 2, 1)] if ragged else [t, t], jnp.int32)
  r = np.random.default_rng(t)
  cot = (r.normal(size=v.shape), r.normal(size=(b, h, E, d)) * 0.01,
         r.normal(size=(b, h, E)) * 0.01)

  def loss(q, k, v, kv, ks):
    st = None if not with_state else TaylorState(kv, ks)
    y, fin = attend(q, k, v, st, lengths, impl, tiling)
    out = (y, fin.kv, fin.k)
    return sum(jnp.sum(a.astype(jnp.float32) * c) for a, c in zip(out, cot)), out

  zero = TaylorState(jnp.zeros((b, h, E, d)), jnp.zeros((b, h, E)))
  s = state or zero
  poison_device_memory()
  grads, (y, kv, ks) = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4), has_aux=True))(
      q, k, v, s.kv, s.k)
  y_ref, fin_ref, grads_ref = float64_truth(q, k, v, state, lengths, cot)
  tol = TOL[dtype]
  valid = np.arange(t)[None, :] < np.asarray(lengths)[:, None]  # outputs past a length: unused
  assert y.dtype == dtype and kv.dtype == jnp.float32
  assert rel(np.asarray(y)[valid], y_ref[valid]) < tol
  assert rel(kv, fin_ref.kv) < tol and rel(ks, fin_ref.k) < tol
  names = ("dq", "dk", "dv", "dkv0", "dk0") if with_state else ("dq", "dk", "dv")
  for name, g, g_ref in zip(names, grads, grads_ref):
    assert np.all(np.isfinite(np.asarray(g, np.float32))), name
    assert rel(g, g_ref) < tol, name


@pytest.mark.parametrize("impl", CHUNK_IMPLS)
@pytest.mark.parametrize("with_state, tiling, use_k_state", [
    (False, None, False), (True, None, False), (False, "seg64", False), (True, "seg64", False),
    (True, "seg64", True)])
def test_chunked_kernel_gradients_when_the_final_state_is_unused(impl, with_state, tiling,
                                                                 use_k_state):
  """Training uses y alone: the final state's cotangent is then a symbolic zero (one or both
  halves of it), and without an initial state the forward starts from zero unread."""
  b, t, h, d = 2, 200, 2, 64
  q, k, v, state = random_case(5, b, t, h, d, jnp.float32, with_state)
  lengths = jnp.array([t, 150], jnp.int32)
  r = np.random.default_rng(1)
  cot = (r.normal(size=v.shape), 0.0, r.normal(size=(b, h, E)) * 0.01 if use_k_state else 0.0)
  zero = TaylorState(jnp.zeros((b, h, E, d)), jnp.zeros((b, h, E)))

  def loss(q, k, v, kv, ks):
    y, fin = attend(q, k, v, TaylorState(kv, ks) if with_state else None, lengths, impl, tiling)
    return jnp.sum(y * cot[0]) + jnp.sum(fin.k * cot[2])

  poison_device_memory()
  grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))(q, k, v, *(state or zero))
  _, _, grads_ref = float64_truth(q, k, v, state, lengths, cot)
  for name, g, g_ref in zip(("dq", "dk", "dv", "dkv0", "dk0")[:5 if with_state else 3],
                            grads, grads_ref):
    assert rel(g, g_ref) < TOL[jnp.float32], name


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_kernels_lower_to_triton_on_any_backend(dtype):
  """The Triton lowering runs without a GPU, so CPU CI catches a kernel that uses an operation
  the lowering lacks: all five chunked kernels (two segments) and the decode step."""
  q = jnp.zeros((2, 256, 2, F), dtype)
  v = jnp.zeros((2, 256, 2, 112), dtype)

  def loss(q, k, v):
    y, fin = pallas_chunked.chunked(q, k, v, None,
                                    jnp.array([256, 200], jnp.int32), eps=1e-6, segment=128)
    return jnp.sum(y.astype(jnp.float32)) + jnp.sum(fin.kv)

  def step(q, k, v):
    state = reference.initial_state(None, q, v)
    return pallas_decode.step(taylor_feature_map(q[:, 0]), taylor_feature_map(k[:, 0]), v[:, 0],
                              state, jnp.ones((2,), bool), eps=1e-6)

  assert len(triton_kernels(jax.grad(loss, argnums=(0, 1, 2)), q, q, v)) == 5
  assert triton_kernels(step, q, q, v) == ["taylor_attention_decode"]


@pytest.mark.parametrize("b, t, h, d", [(2, 256, 2, 112), (8, 8192, 16, 64)])
def test_mosaic_kernels_lower_on_any_backend(b, t, h, d):
  """The Mosaic GPU lowering (layouts, swizzles, wgmma shapes, shared-memory transforms) runs
  without a GPU: the key sums and the walk (two segments at the small shape, one at the
  benchmark's), with the Triton backward. PTX compilation and the run need a Hopper GPU."""
  q = jnp.zeros((b, t, h, F), jnp.bfloat16)
  v = jnp.zeros((b, t, h, d), jnp.bfloat16)

  def loss(q, k, v):
    y, fin = pallas_chunked.chunked(q, k, v, None, jnp.full((b,), t, jnp.int32), eps=1e-6,
                                    forward_kernel="mosaic", segment=128 if t == 256 else None)
    return jnp.sum(y.astype(jnp.float32)) + jnp.sum(fin.kv)

  two_segments = t == 256
  assert mosaic_kernels(jax.grad(loss, argnums=(0, 1, 2)), q, q, v) == 1 + two_segments
  assert len(triton_kernels(jax.grad(loss, argnums=(0, 1, 2)), q, q, v)) == 2 + two_segments


def decode_step(impl, tiling):
  """The API's decode step, or with a tiling pallas_decode.step's explicit column / row
  blocks, on [B, 1, H, *] inputs."""
  if tiling is None:
    return jax.jit(lambda *a: causal_taylor_attention(*a[:3], state=a[3], lengths=a[4],
                                                      impl=impl))

  def step(q, k, v, state, lengths):
    y, new = pallas_decode.step(taylor_feature_map(q[:, 0]), taylor_feature_map(k[:, 0]),
                                v[:, 0], state, lengths > 0, eps=1e-6,
                                interpret=impl == "pallas_interpret", **tiling)
    return y[:, None], new
  return jax.jit(step)


@pytest.mark.parametrize("impl", DECODE_IMPLS)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("d", [64, 112])
@pytest.mark.parametrize("tiling", [None, dict(max_block_d=32, block_e=16),
                                    dict(max_block_d=64, block_e=256)])
def test_decode_step_matches_float64(impl, dtype, d, tiling):
  if tiling is not None and impl == "triton":
    pytest.skip("explicit tilings are the Pallas kernel's")
  b, h = 3, 2
  q, k, v, state = random_case(d, b, 1, h, d, dtype, with_state=True)
  lengths = jnp.array([1, 0, 1], jnp.int32)  # row 1 is padding: its state must not move
  poison_device_memory()
  y, new = decode_step(impl, tiling)(q, k, v, state, lengths)
  y_ref, kv_ref, k_ref = numpy_taylor_attention(
      *(np.asarray(x, np.float32) for x in (q, k, v)), state.kv, state.k)
  tol = TOL[dtype]
  live = np.asarray(lengths) > 0
  assert rel(np.asarray(y)[live], y_ref[live]) < tol
  np.testing.assert_array_equal(np.asarray(new.kv)[~live], np.asarray(state.kv)[~live])
  assert rel(np.asarray(new.kv)[live], kv_ref[live]) < 1e-5
  assert rel(np.asarray(new.k)[live], k_ref[live]) < 1e-5
  assert np.array_equal(np.asarray(new.k)[~live], np.asarray(state.k)[~live])


def assert_bf16_close(got, want):
  """bf16 arrays at most one rounding apart (float32 sums in another order may round across)."""
  assert got.dtype == want.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                             rtol=2**-7, atol=1e-6)


@pytest.mark.parametrize("impl", DECODE_IMPLS)
@pytest.mark.parametrize("d", [64, 112])
def test_decode_step_with_bf16_kv_state_matches_the_reference(impl, d):
  q, k, v, state = random_case(d + 1, 3, 1, 2, d, jnp.float32, with_state=True)
  state = state._replace(kv=state.kv.astype(jnp.bfloat16))
  lengths = jnp.array([1, 0, 1], jnp.int32)
  poison_device_memory()
  y, new = decode_step(impl, None)(q, k, v, state, lengths)
  y_ref, new_ref = causal_taylor_attention(q, k, v, state=state, lengths=lengths, impl="xla")
  live = np.asarray(lengths) > 0
  assert rel(np.asarray(y)[live], np.asarray(y_ref)[live]) < 1e-5
  assert_bf16_close(new.kv, new_ref.kv)
  np.testing.assert_array_equal(np.asarray(new.kv)[~live], np.asarray(state.kv)[~live])
  assert rel(new.k, new_ref.k) < 1e-6


@pytest.mark.parametrize("impl", CHUNK_IMPLS)
def test_chunked_kernel_takes_and_returns_a_bf16_kv_state(impl):
  """A bf16 kv enters exactly and leaves rounded once; the rest is float32 math, so the
  float32 tolerance holds against float64 (on GPU, XLA's own dots may use TF32: no peer)."""
  q, k, v, state = random_case(5, 2, 70, 2, 64, jnp.float32, with_state=True)
  state = state._replace(kv=state.kv.astype(jnp.bfloat16))
  y, new = causal_taylor_attention(q, k, v, state=state, impl=impl)
  lengths = jnp.full((2,), 70, jnp.int32)
  y_ref, fin_ref, _ = float64_truth(q, k, v, state, lengths)
  assert rel(y, y_ref) < TOL[jnp.float32]
  assert new.kv.dtype == jnp.bfloat16 and new.k.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(new.kv, np.float64), fin_ref.kv, rtol=2**-7,
                             atol=1e-4 * np.abs(fin_ref.kv).max())
  assert rel(new.k, fin_ref.k) < TOL[jnp.float32]


@pytest.mark.parametrize("impl", CHUNK_IMPLS)
def test_prefill_then_decode_continues_the_sequence(impl):
  q, k, v, _ = random_case(3, 2, 40, 2, 64, jnp.float32, with_state=False)
  _, state = causal_taylor_attention(q[:, :39], k[:, :39], v[:, :39], impl=impl)
  y, final = causal_taylor_attention(q[:, 39:], k[:, 39:], v[:, 39:], state=state, impl=impl)
  y_ref, kv_ref, _ = numpy_taylor_attention(q, k, v)
  assert rel(y[:, 0], y_ref[:, 39]) < 1e-4 and rel(final.kv, kv_ref) < 1e-4


def test_kernel_limits_give_clear_errors_or_fall_back():
  q = jnp.zeros((1, 8, 1, 8))
  v = jnp.zeros((1, 8, 1, 16))
  with pytest.raises(ValueError, match="feature dim F=8"):
    causal_taylor_attention(q, q, v, impl="pallas_interpret")
  q16 = jnp.zeros((1, 8, 1, 16))
  with pytest.raises(ValueError, match="K <= 128"):
    causal_taylor_attention(q16, q16, jnp.zeros((1, 8, 1, 256)), impl="pallas_interpret")
  with pytest.raises(ValueError, match="one dtype"):
    causal_taylor_attention(q16, q16.astype(jnp.bfloat16), v, impl="pallas_interpret")
  if not ON_GPU:
    with pytest.raises(ValueError, match="needs a GPU"):
      causal_taylor_attention(q16, q16, v, impl="pallas")
  assert api._resolve("auto", q, q, v, None) == "xla"  # unsupported F: the fallback


@pytest.mark.parametrize("t, d, with_state, dtype, hopper, want", [
    (8, 64, False, jnp.float32, True, "pallas"), (1, 64, True, jnp.float32, True, "xla"),
    (1, 112, True, jnp.float32, True, "pallas"), (8, 64, True, jnp.float32, True, "pallas"),
    (8, 64, True, jnp.bfloat16, True, "mosaic"), (8, 112, False, jnp.float16, True, "mosaic"),
    (1, 112, True, jnp.bfloat16, True, "pallas"), (8, 64, True, jnp.bfloat16, False, "pallas")])
def test_auto_on_gpu_picks_the_measured_faster_path(monkeypatch, t, d, with_state, dtype,
                                                     hopper, want):
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  monkeypatch.setattr(api, "on_hopper", lambda: hopper)
  q, k, v, state = random_case(0, 1, t, 1, d, dtype, with_state)
  assert api._resolve("auto", q, k, v, state) == want


def test_mosaic_on_a_gpu_that_is_not_hopper_names_the_problem(monkeypatch):
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  monkeypatch.setattr(api, "on_hopper", lambda: False)
  q = jnp.zeros((1, 8, 1, 16), jnp.bfloat16)
  with pytest.raises(ValueError, match="impl='mosaic' needs a Hopper GPU.*use 'pallas'"):
    causal_taylor_attention(q, q, q, impl="mosaic")


def test_decode_row_blocks_tile_the_state_rows():
  assert pallas_decode.row_blocks(153, 64) == (64, [(0, 0), (64, 64), (89, 128)])
  assert pallas_decode.row_blocks(153, 256) == (128, [(0, 0), (25, 128)])  # at most E rows
  assert pallas_decode.row_blocks(128, 32) == (32, [(0, 0), (32, 32), (64, 64), (96, 96)])
  q, k, v, state = random_case(0, 1, 1, 1, 64, jnp.float32, with_state=True)
  phi = taylor_feature_map(q[:, 0])
  with pytest.raises(ValueError, match="block_e must be a power of two, got 24"):
    pallas_decode.step(phi, phi, v[:, 0], state, jnp.ones((1,), bool), eps=1e-6,
                       block_e=24, interpret=True)
