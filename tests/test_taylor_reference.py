"""Taylor linear attention: quadratic == chunked == recurrent == an independent float64 NumPy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.taylor_attention import api, causal_taylor_attention, feature_width, reference, xla
from pallas_kernels.taylor_attention import cyclic_basis
from pallas_kernels.taylor_attention.feature_map import taylor_feature_map
from pallas_kernels.taylor_attention.state import TaylorState
from taylor_oracle import numpy_taylor_attention, rel

EPS = 1e-6


def inputs(seed, b, t, h, f, d, dtype=jnp.float32):
  r = np.random.default_rng(seed)
  return tuple(jnp.asarray(r.normal(size=s), dtype) for s in
               ((b, t, h, f), (b, t, h, f), (b, t, h, d)))


def full_quadratic(x):
  """The paper's quadratic block: vec(x x^T) / (sqrt(2) sqrt(F)), F^2 terms."""
  f = x.shape[-1]
  return np.einsum("...i,...j->...ij", x, x).reshape(*x.shape[:-1], f * f) / np.sqrt(2 * f)


def test_feature_map_inner_product_is_taylor_polynomial():
  r = np.random.default_rng(0)
  q, k = r.normal(size=(2, 50, 16))
  s = np.sum(q * k, -1) / 4.0
  got = np.sum(np.asarray(taylor_feature_map(q)) * np.asarray(taylor_feature_map(k)), -1)
  np.testing.assert_allclose(got, 1 + s + s * s / 2, rtol=1e-5)
  full = 1 + s + np.sum(full_quadratic(q) * full_quadratic(k), -1)  # the paper's 273 features
  np.testing.assert_allclose(got, full, rtol=1e-5)
  assert feature_width(16) == 153


@pytest.mark.parametrize("f", [2, 4, 16])
def test_cyclic_basis_holds_the_packed_terms_in_kernel_order(f):
  """The kernels' quadratic blocks give the same inner products as the packed features, and
  their states convert exactly (to_kernel is an isometry, from_kernel its adjoint)."""
  r = np.random.default_rng(f)
  with jax.enable_x64(True):
    q, k = r.normal(size=(2, 7, f))
    s = np.sum(q * k, -1) / np.sqrt(f)
    blocks = lambda x: np.concatenate([np.asarray(b) for b in cyclic_basis.features(x)], -1)
    assert blocks(q).shape[-1] == f + f * f // 2
    np.testing.assert_allclose(np.sum(blocks(q) * blocks(k), -1), s * s / 2, rtol=1e-12)
    # a state [2, rows, 5] summed from the features of 7 keys, rows on axis 1
    values = r.normal(size=(7, 5))
    packed_state = np.einsum("tp,td->pd", np.asarray(taylor_feature_map(k))[:, 1 + f:],
                             values)[None].repeat(2, 0)
    kernel_state = np.einsum("tp,td->pd", blocks(k), values)[None].repeat(2, 0)
    np.testing.assert_allclose(cyclic_basis.to_kernel(packed_state, f, axis=1), kernel_state,
                               rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(cyclic_basis.from_kernel(kernel_state, f, axis=1), packed_state,
                               rtol=1e-12, atol=1e-12)
    any_packed = r.normal(size=(2, f * (f + 1) // 2, 5))  # from(to(x)) = x for any x
    np.testing.assert_allclose(
        cyclic_basis.from_kernel(cyclic_basis.to_kernel(any_packed, f, 1), f, 1),
        any_packed, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("t", [1, 5, 64, 100])
@pytest.mark.parametrize("form", ["quadratic", "chunked", "recurrent"])
def test_forms_match_float64_numpy(form, t):
  q, k, v = inputs(t, 2, t, 3, 8, 5)
  fn = {"quadratic": reference.quadratic, "recurrent": reference.recurrent,
        "chunked": lambda *a: xla.chunked(*a, chunk_size=16)}[form]
  y, state = fn(q, k, v)
  y_ref, kv_ref, k_ref = numpy_taylor_attention(q, k, v)
  assert rel(y, y_ref) < 1e-5
  assert rel(state.kv, kv_ref) < 1e-5 and rel(state.k, k_ref) < 1e-5


@pytest.mark.parametrize("form", ["quadratic", "chunked", "recurrent"])
def test_initial_state_continues_the_sequence(form):
  q, k, v = inputs(7, 2, 40, 2, 4, 3)
  fn = {"quadratic": reference.quadratic, "recurrent": reference.recurrent,
        "chunked": lambda *a, **kw: xla.chunked(*a, chunk_size=8, **kw)}[form]
  _, first = fn(q[:, :23], k[:, :23], v[:, :23])
  y2, final = fn(q[:, 23:], k[:, 23:], v[:, 23:], state=first)
  y_ref, kv_ref, _ = numpy_taylor_attention(q, k, v)
  assert rel(y2, y_ref[:, 23:]) < 1e-5
  assert rel(final.kv, kv_ref) < 1e-5


def test_gradients_agree_across_forms():
  q, k, v = inputs(3, 2, 37, 2, 4, 6)
  w = jax.random.normal(jax.random.key(0), v.shape)

  def loss(fn):
    return lambda q, k, v: jnp.sum(fn(q, k, v)[0] * w)

  g_quad = jax.grad(loss(reference.quadratic), argnums=(0, 1, 2))(q, k, v)
  g_chunk = jax.grad(loss(lambda *a: xla.chunked(*a, chunk_size=16)), argnums=(0, 1, 2))(q, k, v)
  g_rec = jax.grad(loss(reference.recurrent), argnums=(0, 1, 2))(q, k, v)
  for a, b, c in zip(g_quad, g_chunk, g_rec):
    assert rel(b, a) < 1e-4 and rel(c, a) < 1e-4


@pytest.mark.parametrize("argnum", [0, 1, 2])
def test_gradients_match_finite_differences_of_the_numpy_reference(argnum):
  args = inputs(5, 1, 9, 2, 3, 2)
  w = np.random.default_rng(1).normal(size=args[2].shape)
  direction = np.random.default_rng(2).normal(size=args[argnum].shape)
  g = jax.grad(lambda *a: jnp.sum(xla.chunked(*a, chunk_size=4)[0] * w), argnums=argnum)(*args)

  def loss64(step):  # float64 central difference along `direction`
    a = [np.asarray(x, np.float64) for x in args]
    a[argnum] = a[argnum] + step * direction
    return np.sum(numpy_taylor_attention(*a)[0] * w)

  h = 1e-5
  fd = (loss64(h) - loss64(-h)) / (2 * h)
  np.testing.assert_allclose(np.sum(np.asarray(g, np.float64) * direction), fd, rtol=1e-4)


@pytest.mark.parametrize("quadratic_max_t", [512, 8])  # the quadratic and the chunked form
def test_lengths_keep_padding_out_of_the_state(monkeypatch, quadratic_max_t):
  monkeypatch.setattr(api, "QUADRATIC_MAX_T", quadratic_max_t)
  q, k, v = inputs(11, 3, 30, 2, 4, 3)
  lengths = jnp.array([30, 1, 17])
  y, state = causal_taylor_attention(q, k, v, lengths=lengths, impl="xla")
  for i, n in enumerate(np.asarray(lengths)):
    y_ref, kv_ref, k_ref = numpy_taylor_attention(q[i:i + 1, :n], k[i:i + 1, :n], v[i:i + 1, :n])
    assert rel(y[i:i + 1, :n], y_ref) < 1e-5
    assert rel(state.kv[i:i + 1], kv_ref) < 1e-5 and rel(state.k[i:i + 1], k_ref) < 1e-5


def test_decode_step_through_the_api():
  q, k, v = inputs(2, 2, 12, 2, 4, 3)
  _, state = causal_taylor_attention(q[:, :11], k[:, :11], v[:, :11])
  y, final = causal_taylor_attention(q[:, 11:], k[:, 11:], v[:, 11:], state=state)
  y_ref, kv_ref, _ = numpy_taylor_attention(q, k, v)
  assert rel(y[:, 0], y_ref[:, 11]) < 1e-5 and rel(final.kv, kv_ref) < 1e-5


def test_bfloat16_inputs_keep_a_float32_normaliser():
  t = 2048  # long enough that a bf16 normaliser (~T) would lose digits
  q, k, v = inputs(4, 1, t, 1, 4, 2)
  y, state = xla.chunked(q.astype(jnp.bfloat16), k.astype(jnp.bfloat16), v.astype(jnp.bfloat16))
  assert y.dtype == jnp.bfloat16 and state.kv.dtype == jnp.float32
  y_ref, _, _ = numpy_taylor_attention(*(np.asarray(x.astype(jnp.bfloat16), np.float32)
                                         for x in (q, k, v)))
  assert rel(y, y_ref) < 1e-2


@pytest.mark.parametrize("bad, match", [
    (dict(q=jnp.zeros((2, 3, 4))), "rank 4"),
    (dict(k=jnp.zeros((2, 3, 1, 5))), "same shape"),
    (dict(v=jnp.zeros((2, 4, 1, 3))), "v must match"),
    (dict(q=jnp.zeros((2, 3, 1, 4), jnp.int32)), "floating"),
    (dict(lengths=jnp.zeros((3,), jnp.int32)), "lengths"),
    (dict(lengths=jnp.array([4, 1])), r"lengths must lie in \[0, T=3\], got min 1 max 4"),
    (dict(lengths=jnp.array([-1, 1])), "lengths must lie in"),
    (dict(state=TaylorState(jnp.zeros((2, 1, 5, 3)), jnp.zeros((2, 1, 5)))), "state shapes"),
    (dict(impl="nope"), "impl"),
])
def test_bad_inputs_raise_clear_errors(bad, match):
  args = dict(q=jnp.zeros((2, 3, 1, 4)), k=jnp.zeros((2, 3, 1, 4)), v=jnp.zeros((2, 3, 1, 3)))
  args.update(bad)
  q, k, v = args.pop("q"), args.pop("k"), args.pop("v")
  with pytest.raises(ValueError, match=match):
    causal_taylor_attention(q, k, v, **args)


def bf16_kv(state):
  return state._replace(kv=state.kv.astype(jnp.bfloat16))


def test_bf16_kv_state_is_float32_math_rounded_once_per_update():
  q, k, v = inputs(11, 2, 1, 3, 16, 8)
  _, state = reference.quadratic(*inputs(12, 2, 40, 3, 16, 8))
  stored = bf16_kv(state)
  as_f32 = stored._replace(kv=stored.kv.astype(jnp.float32))  # the same values, in float32
  y, new = causal_taylor_attention(q, k, v, state=stored, impl="xla")
  y_ref, new_ref = causal_taylor_attention(q, k, v, state=as_f32, impl="xla")
  assert new.kv.dtype == jnp.bfloat16 and new.k.dtype == jnp.float32
  np.testing.assert_array_equal(y, y_ref)  # read out before the rounding
  np.testing.assert_array_equal(new.kv, new_ref.kv.astype(jnp.bfloat16))
  np.testing.assert_array_equal(new.k, new_ref.k)


@pytest.mark.parametrize("form", ["quadratic", "chunked"])
def test_bf16_kv_state_prefill_rounds_only_the_final_state(form):
  q, k, v = inputs(13, 2, 100, 2, 16, 8)
  _, state = reference.quadratic(*inputs(14, 2, 30, 2, 16, 8))
  fn = {"quadratic": reference.quadratic,
        "chunked": lambda *a, **kw: xla.chunked(*a, chunk_size=16, **kw)}[form]
  stored = bf16_kv(state)
  y, new = fn(q, k, v, state=stored)
  y_ref, new_ref = fn(q, k, v, state=stored._replace(kv=stored.kv.astype(jnp.float32)))
  assert new.kv.dtype == jnp.bfloat16
  assert rel(y, y_ref) < 1e-6
  np.testing.assert_allclose(np.asarray(new.kv, np.float32),
                             np.asarray(new_ref.kv.astype(jnp.bfloat16), np.float32),
                             rtol=2**-7, atol=1e-6)  # at most an ulp apart (summation order)


def test_bf16_kv_state_decoding_error_stays_small_over_300_tokens():
  q, k, v = inputs(15, 2, 300, 2, 16, 32)
  start = bf16_kv(reference.zero_state(2, 2, 16, 32))
  y, final = reference.recurrent(q, k, v, state=start)
  y_ref, kv_ref, k_ref = numpy_taylor_attention(q, k, v)
  assert final.kv.dtype == jnp.bfloat16
  # One rounding (relative 2^-9) per update, accumulating like a random walk: about
  # 2^-9 sqrt(300) = 3.4e-2 on the state after 300 tokens (measured 2.0e-2; outputs 7e-3).
  assert rel(y, y_ref) < 2e-2 and rel(final.kv, kv_ref) < 5e-2
  assert rel(final.k, k_ref) < 1e-5  # the normaliser stays float32


def test_bad_state_dtypes_are_refused():
  q, k, v = inputs(16, 1, 1, 1, 16, 8)
  state = reference.zero_state(1, 1, 16, 8)
  with pytest.raises(ValueError, match="normaliser.*float32"):
    causal_taylor_attention(q, k, v, state=state._replace(k=state.k.astype(jnp.bfloat16)))
  with pytest.raises(ValueError, match="state.kv must be float32 or bfloat16"):
    causal_taylor_attention(q, k, v, state=state._replace(kv=state.kv.astype(jnp.float16)))
  with pytest.raises(ValueError, match="kv_dtype"):
    reference.zero_state(1, 1, 16, 8, kv_dtype="float16")
