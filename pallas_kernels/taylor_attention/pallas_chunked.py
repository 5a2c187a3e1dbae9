"""Chunked causal Taylor linear attention as Pallas kernels (Triton lowering), with a custom VJP.

Letters as in `reference.py`: B batch, T time, H heads, F feature dim (d' = 16), D value head
dim, E = 1 + F + F^2; C is the chunk length, P = F^2 the quadratic features.

Tiling. One program owns one (batch, head) pair (and, in the forward, one block of Dv value
columns) and walks its sequence chunk by chunk, C tokens at a time, keeping the running state
on chip in float32 for the whole sequence:

    a0 [Dv] = sum v,   a1 [F, Dv] = sum k~ v^T,   a2 [P, Dv] = sum phi2(k) v^T,
    k0 [1], k1 [F], k2 [P]: the same sums without v (the normaliser),

where k~ = k / F^(1/4) and phi2(k) = vec(k k^T) / (sqrt 2 sqrt F) are the linear and
quadratic blocks of the feature map. Per chunk:

    s = q k^T / sqrt F,  w = causal(1 + s + s^2/2)                          [C, C]
    num = w v + a0 + q~ a1 + phi2(q) a2,  den = rowsum w + k0 + q~.k1 + phi2(q).k2
    then the chunk's keys are added to the state.

Nothing E-wide ever goes to HBM: phi2 is formed in registers from the [C, F] tile (an outer
product and a reshape). Matrix products take the input dtype (bf16 runs on tensor cores) and
accumulate in float32; the state, the numerator and the normaliser stay float32 through the
division. With float32 inputs the products are IEEE float32.

Roofline (H100, bf16, B=8, H=16, F=16, D=64, T=8192): HBM traffic is q, k, v, y once
(about 0.34 GB, 0.11 ms at 3 TB/s) plus a float32 normaliser per token; the arithmetic is
about 4 T P D (state read + update) + 2 T C (F + D) (the chunk-local quadratic form) per
(batch, head), about 9e10 flops, 0.1 ms at tensor-core rate. The sequential walk over T / C
chunks per program is the real limit, so the value columns can be split over programs
(`block_d`) to put more programs in flight.

Backward: two kernels, each a walk over chunks with a [P, D] float32 accumulator on chip.
`_dq_kernel` walks forward and rebuilds the state to get dq; `_dkv_kernel` walks backward
carrying the state's cotangent (sums of phi(q) g^T over later queries, seeded with the
cotangent of the final state) to get dk and dv, and returns the initial state's cotangent.
With g = dy / den and r = -(dy . y) / den per query, dw_tj = g_t . v_j + r_t.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from pallas_kernels.taylor_attention.state import TaylorState


def _dot(a, b, dtype, trans_a=False, trans_b=False):
  """a @ b with operands cast to `dtype`, accumulated in float32 (IEEE for float32)."""
  return plt.dot(a.astype(dtype), b.astype(dtype), trans_a=trans_a, trans_b=trans_b,
                 allow_tf32=False if dtype == jnp.float32 else None)


def _spread(f, dtype):
  """0/1 matrices [F, F*F]: x @ rep puts x_i at column i*F + m, x @ tile puts x_m there."""
  rows = jax.lax.broadcasted_iota(jnp.int32, (f, f * f), 0)
  cols = jax.lax.broadcasted_iota(jnp.int32, (f, f * f), 1)
  return (cols // f == rows).astype(dtype), (cols % f == rows).astype(dtype)


def _phi2(x, scale, expand):
  """[C, F] -> [C, F*F]: scale * vec(x x^T) per row, column i*F + m holding x_i x_m.

  expand="reshape" forms the outer product as a [C, F, F] tensor; "matmul" as the product of
  two exact 0/1 spreading matmuls, which keeps everything in 2-D tensor-core layouts.
  """
  c, f = x.shape
  if expand == "reshape":
    xf = x.astype(jnp.float32)
    return (xf[:, :, None] * xf[:, None, :]).reshape(c, f * f) * scale
  rep, tile = _spread(f, x.dtype)
  return _dot(x, rep, x.dtype) * _dot(x, tile, x.dtype) * scale


def _phi2_vjp(x, dp, scale, expand):
  """Cotangent of x [C, F] given the cotangent dp [C, F*F] of `_phi2(x, scale)`."""
  c, f = x.shape
  if expand == "reshape":
    xf = x.astype(jnp.float32)
    dp = dp.reshape(c, f, f)
    return scale * (jnp.sum(dp * xf[:, None, :], axis=2) + jnp.sum(dp * xf[:, :, None], axis=1))
  rep, tile = _spread(f, x.dtype)
  x_rep, x_tile = _dot(x, rep, x.dtype), _dot(x, tile, x.dtype)
  dtype = jnp.float32 if x.dtype == jnp.float32 else x.dtype
  return scale * (_dot(dp * x_tile, rep, dtype, trans_b=True)
                  + _dot(dp * x_rep, tile, dtype, trans_b=True))


class _Scales:
  """The feature map's constants for feature dim F."""

  def __init__(self, f: int):
    self.linear = f ** -0.25  # k~ = k / F^(1/4)
    self.quad = 1.0 / (2.0 ** 0.5 * f ** 0.5)  # phi2(k) = vec(k k^T) / (sqrt 2 sqrt F)
    self.s = f ** -0.5  # s = q . k / sqrt F


def _chunk_local(q, k, t0, chunk, length, sc):
  """s and the causal, key-masked weights w of one chunk; also the key-valid mask."""
  s = _dot(q, k, q.dtype, trans_b=True) * sc.s
  rows = t0 + jax.lax.broadcasted_iota(jnp.int32, (chunk, chunk), 0)
  cols = t0 + jax.lax.broadcasted_iota(jnp.int32, (chunk, chunk), 1)
  keep = (cols <= rows) & (cols < length)
  w = jnp.where(keep, 1.0 + s + 0.5 * s * s, 0.0)
  key_valid = (t0 + jax.lax.broadcasted_iota(jnp.int32, (chunk,), 0)) < length
  return s, w, keep, key_valid


def _load_state(kv_ref, k_ref, f):
  """The state refs [E, Dv] and [E] (E = 1 + F + F^2) as float32 blocks (a0..a2, k0..k2)."""
  p = f * f
  a = (kv_ref[pl.ds(0, 1), :], kv_ref[pl.ds(1, f), :], kv_ref[pl.ds(1 + f, p), :])
  ks = (k_ref[pl.ds(0, 1)], k_ref[pl.ds(1, f)], k_ref[pl.ds(1 + f, p)])
  return a, ks


def _store_state(kv_ref, k_ref, a, ks, f):
  p = f * f
  for ref, val, (start, size) in ((kv_ref, a[0], (0, 1)), (kv_ref, a[1], (1, f)),
                                  (kv_ref, a[2], (1 + f, p))):
    ref[pl.ds(start, size), :] = val
  if k_ref is not None:
    for val, (start, size) in zip(ks, ((0, 1), (1, f), (1 + f, p))):
      k_ref[pl.ds(start, size)] = val


def _features(x, sc, expand):
  return x.astype(jnp.float32) * sc.linear, _phi2(x, sc.quad, expand)


def _read_state(ql, qp, a, ks, dtype):
  """phi(q) . state for the numerator [C, Dv] and the normaliser [C]."""
  num = a[0] + _dot(ql, a[1], dtype) + _dot(qp, a[2], dtype)
  den = ks[0] + jnp.sum(ql * ks[1][None, :], axis=1) + jnp.sum(qp * ks[2][None, :], axis=1)
  return num, den


def _add_keys(kl, kp, v, key_valid, a, ks, dtype):
  """The state after adding the chunk's valid keys kl [C, F], kp [C, P] with values v [C, Dv]."""
  m = key_valid.astype(jnp.float32)
  kl, kp = kl * m[:, None], kp * m[:, None]
  a = (a[0] + jnp.sum(v.astype(jnp.float32) * m[:, None], axis=0, keepdims=True),
       a[1] + _dot(kl, v, dtype, trans_a=True),
       a[2] + _dot(kp, v, dtype, trans_a=True))
  ks = (ks[0] + jnp.sum(m, keepdims=True), ks[1] + jnp.sum(kl, axis=0), ks[2] + jnp.sum(kp, axis=0))
  return a, ks


def _fwd_kernel(len_ref, q_ref, k_ref, v_ref, kv0_ref, k0_ref,
                y_ref, den_ref, kv1_ref, k1_ref, *, chunk, eps, expand):
  t, f = q_ref.shape
  sc = _Scales(f)
  length = len_ref[...]
  dtype = q_ref.dtype

  def body(c, carry):
    a, ks = carry
    t0 = c * chunk
    rows = pl.ds(t0, chunk)
    q, k, v = q_ref[rows, :], k_ref[rows, :], v_ref[rows, :]
    _, w, _, key_valid = _chunk_local(q, k, t0, chunk, length, sc)
    ql, qp = _features(q, sc, expand)
    num, den = _read_state(ql, qp, a, ks, dtype)
    num += _dot(w, v, dtype)
    den += jnp.sum(w, axis=1) + eps
    y_ref[rows, :] = (num / den[:, None]).astype(y_ref.dtype)
    den_ref[rows] = den
    kl, kp = _features(k, sc, expand)
    return _add_keys(kl, kp, v, key_valid, a, ks, dtype)

  a, ks = jax.lax.fori_loop(0, t // chunk, body, _load_state(kv0_ref, k0_ref, f))
  _store_state(kv1_ref, k1_ref, a, ks, f)


def _grads_in(dy, y, den):
  """g = dy / den [C, D] and r = -(dy . y) / den [C] for a chunk of queries."""
  dy = dy.astype(jnp.float32)
  inv = 1.0 / den
  return dy * inv[:, None], -jnp.sum(dy * y.astype(jnp.float32), axis=1) * inv


def _dq_kernel(len_ref, q_ref, k_ref, v_ref, y_ref, dy_ref, den_ref, kv0_ref, k0_ref,
               dq_ref, *, chunk, expand):
  t, f = q_ref.shape
  sc = _Scales(f)
  length = len_ref[...]
  dtype = q_ref.dtype

  def body(c, carry):
    a, ks = carry
    t0 = c * chunk
    rows = pl.ds(t0, chunk)
    q, k, v = q_ref[rows, :], k_ref[rows, :], v_ref[rows, :]
    g, r = _grads_in(dy_ref[rows, :], y_ref[rows, :], den_ref[rows])
    s, _, keep, key_valid = _chunk_local(q, k, t0, chunk, length, sc)
    ds = jnp.where(keep, (_dot(g, v, dtype, trans_b=True) + r[:, None]) * (1.0 + s), 0.0)
    dq = _dot(ds, k, dtype) * sc.s
    ql, qp = _features(q, sc, expand)
    dql = _dot(g, a[1], dtype, trans_b=True) + r[:, None] * ks[1][None, :]
    dqp = _dot(g, a[2], dtype, trans_b=True) + r[:, None] * ks[2][None, :]
    dq += dql * sc.linear + _phi2_vjp(q, dqp, sc.quad, expand)
    dq_ref[rows, :] = dq.astype(dq_ref.dtype)
    kl, kp = _features(k, sc, expand)
    return _add_keys(kl, kp, v, key_valid, a, ks, dtype)

  jax.lax.fori_loop(0, t // chunk, body, _load_state(kv0_ref, k0_ref, f))


def _dkv_kernel(len_ref, q_ref, k_ref, v_ref, y_ref, dy_ref, den_ref, dkv1_ref, dk1_ref,
                dk_ref, dv_ref, dkv0_ref, dk0_ref, *, chunk, expand):
  t, f = q_ref.shape
  sc = _Scales(f)
  length = len_ref[...]
  dtype = q_ref.dtype
  n = t // chunk

  def body(i, carry):
    da, dks = carry  # cotangents of the state seen by later chunks' queries
    t0 = (n - 1 - i) * chunk
    rows = pl.ds(t0, chunk)
    q, k, v = q_ref[rows, :], k_ref[rows, :], v_ref[rows, :]
    g, r = _grads_in(dy_ref[rows, :], y_ref[rows, :], den_ref[rows])
    s, w, keep, key_valid = _chunk_local(q, k, t0, chunk, length, sc)
    ds = jnp.where(keep, (_dot(g, v, dtype, trans_b=True) + r[:, None]) * (1.0 + s), 0.0)
    kl, kp = _features(k, sc, expand)
    m = key_valid.astype(jnp.float32)[:, None]
    dv = _dot(w, g, dtype, trans_a=True)
    dv += m * (da[0] + _dot(kl, da[1], dtype) + _dot(kp, da[2], dtype))
    dkl = _dot(v, da[1], dtype, trans_b=True) + dks[1][None, :]
    dkp = _dot(v, da[2], dtype, trans_b=True) + dks[2][None, :]
    dk = _dot(ds, q, dtype, trans_a=True) * sc.s
    dk += m * (dkl * sc.linear + _phi2_vjp(k, dkp, sc.quad, expand))
    dk_ref[rows, :] = dk.astype(dk_ref.dtype)
    dv_ref[rows, :] = dv.astype(dv_ref.dtype)
    ql, qp = _features(q, sc, expand)
    da = (da[0] + jnp.sum(g, axis=0, keepdims=True), da[1] + _dot(ql, g, dtype, trans_a=True),
          da[2] + _dot(qp, g, dtype, trans_a=True))
    dks = (dks[0] + jnp.sum(r, keepdims=True), dks[1] + jnp.sum(ql * r[:, None], axis=0),
           dks[2] + jnp.sum(qp * r[:, None], axis=0))
    return da, dks

  da, dks = jax.lax.fori_loop(0, n, body, _load_state(dkv1_ref, dk1_ref, f))
  _store_state(dkv0_ref, dk0_ref, da, dks, f)


# --- pallas_call wrappers over [B, T, H, .] arrays (T a multiple of the chunk, D a power of 2) ---

def _seq_spec(t, width, d_block=None):
  """Block of one (batch, head) sequence: [T, width] (or a `d_block` column slice)."""
  if d_block is None:
    return pl.BlockSpec((None, t, None, width), lambda b, h, *_: (b, 0, h, 0))
  return pl.BlockSpec((None, t, None, d_block), lambda b, h, j: (b, 0, h, j))


def _state_specs(e, width, d_block=None):
  if d_block is None:
    kv = pl.BlockSpec((None, None, e, width), lambda b, h, *_: (b, h, 0, 0))
  else:
    kv = pl.BlockSpec((None, None, e, d_block), lambda b, h, j: (b, h, 0, j))
  return kv, pl.BlockSpec((None, None, e), lambda b, h, *_: (b, h, 0))


def _len_spec():
  return pl.BlockSpec((None, 1), lambda b, *_: (b, 0))


def _den_spec(t):
  return pl.BlockSpec((None, None, t), lambda b, h, *_: (b, h, 0))


def _params(num_warps, num_stages):
  return plt.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def _forward(q, k, v, kv0, k0, lengths, *, eps, chunk, block_d, num_warps, num_stages,
             interpret, expand):
  b, t, h, f = q.shape
  d, e = v.shape[-1], kv0.shape[2]
  block_d = min(block_d, d)
  kv_spec, k_spec = _state_specs(e, d, block_d)
  return pl.pallas_call(
      functools.partial(_fwd_kernel, chunk=chunk, eps=eps, expand=expand),
      grid=(b, h, d // block_d),
      in_specs=[_len_spec(), _seq_spec(t, f), _seq_spec(t, f), _seq_spec(t, d, block_d),
                kv_spec, k_spec],
      out_specs=[_seq_spec(t, d, block_d), _den_spec(t), kv_spec, k_spec],
      out_shape=[jax.ShapeDtypeStruct(v.shape, v.dtype),
                 jax.ShapeDtypeStruct((b, h, t), jnp.float32),
                 jax.ShapeDtypeStruct(kv0.shape, jnp.float32),
                 jax.ShapeDtypeStruct(k0.shape, jnp.float32)],
      compiler_params=_params(num_warps, num_stages),
      interpret=interpret,
      name="taylor_attention_fwd",
  )(lengths, q, k, v, kv0, k0)


def _backward(q, k, v, y, dy, den, kv0, k0, dkv1, dk1, lengths, *, chunk, num_warps,
              num_stages, interpret, expand):
  b, t, h, f = q.shape
  d, e = v.shape[-1], kv0.shape[2]
  kv_spec, k_spec = _state_specs(e, d)
  seq_in = [_len_spec(), _seq_spec(t, f), _seq_spec(t, f), _seq_spec(t, d), _seq_spec(t, d),
            _seq_spec(t, d), _den_spec(t)]
  common = dict(grid=(b, h), compiler_params=_params(num_warps, num_stages),
                interpret=interpret)
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, chunk=chunk, expand=expand),
      in_specs=seq_in + [kv_spec, k_spec], out_specs=_seq_spec(t, f),
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype), name="taylor_attention_dq", **common,
  )(lengths, q, k, v, y, dy, den, kv0, k0)
  dk, dv, dkv0, dk0 = pl.pallas_call(
      functools.partial(_dkv_kernel, chunk=chunk, expand=expand),
      in_specs=seq_in + [kv_spec, k_spec],
      out_specs=[_seq_spec(t, f), _seq_spec(t, d), kv_spec, k_spec],
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype),
                 jax.ShapeDtypeStruct(kv0.shape, jnp.float32),
                 jax.ShapeDtypeStruct(k0.shape, jnp.float32)],
      name="taylor_attention_dkv", **common,
  )(lengths, q, k, v, y, dy, den, dkv1, dk1)
  return dq, dk, dv, dkv0, dk0


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _attention(q, k, v, kv0, k0, lengths, options):
  y, _, kv1, k1 = _forward(q, k, v, kv0, k0, lengths, **options.forward)
  return y, kv1, k1


def _attention_fwd(q, k, v, kv0, k0, lengths, options):
  y, den, kv1, k1 = _forward(q, k, v, kv0, k0, lengths, **options.forward)
  return (y, kv1, k1), (q, k, v, kv0, k0, lengths, y, den)


def _attention_bwd(options, res, cotangents):
  q, k, v, kv0, k0, lengths, y, den = res
  dy, dkv1, dk1 = cotangents
  dq, dk, dv, dkv0, dk0 = _backward(q, k, v, y, dy.astype(v.dtype), den, kv0, k0, dkv1, dk1,
                                    lengths, **options.backward)
  return dq, dk, dv, dkv0, dk0, None


_attention.defvjp(_attention_fwd, _attention_bwd)


class _Options:
  """Static kernel settings (hashable, so they can be a nondiff argument)."""

  def __init__(self, **kw):
    self._kw = tuple(sorted(kw.items()))
    kw = dict(kw)
    self.forward = {k: kw[k] for k in ("eps", "chunk", "block_d", "num_warps", "num_stages",
                                       "interpret", "expand")}
    self.backward = {k: kw[k] for k in ("chunk", "num_warps", "num_stages", "interpret",
                                        "expand")}

  def __hash__(self):
    return hash(self._kw)

  def __eq__(self, other):
    return isinstance(other, _Options) and self._kw == other._kw


def chunked(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, state: TaylorState,
            lengths: jnp.ndarray, *, eps: float, chunk: int = 64, block_d: int = 64,
            num_warps: int = 4, num_stages: int = 1, expand: str = "reshape",
            interpret: bool = False) -> tuple[jnp.ndarray, TaylorState]:
  """Causal Taylor linear attention through the Pallas kernels.

  Args:
    q, k: [B, T, H, F] (F a power of two); v: [B, T, H, D]; any T, any D.
    state: the initial state (float32 [B, H, E, D] and [B, H, E]).
    lengths: [B] int32, valid leading tokens per sequence (later keys are ignored).
    eps: added to the normaliser.
    chunk, block_d, num_warps, num_stages: tiling (see the module docstring).
    expand: how phi2 is formed in registers, "reshape" or "matmul" (see `_phi2`).
    interpret: run the kernels in the Pallas interpreter (CPU tests).

  Returns:
    y [B, T, H, D] in v's dtype and the final state; differentiable in q, k, v and state.
  """
  b, t, h, f = q.shape
  d = v.shape[-1]
  t_pad, d_pad = -(-t // chunk) * chunk, pl.next_power_of_2(d)
  pad_t = lambda x: jnp.pad(x, [(0, 0), (0, t_pad - t), (0, 0), (0, 0)]) if t_pad > t else x
  pad_d = lambda x: jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, d_pad - d)]) if d_pad > d else x
  options = _Options(eps=eps, chunk=chunk, block_d=block_d, num_warps=num_warps,
                     num_stages=num_stages, interpret=interpret, expand=expand)
  y, kv, ks = _attention(pad_t(q), pad_t(k), pad_d(pad_t(v)), pad_d(state.kv), state.k,
                         lengths.astype(jnp.int32).reshape(b, 1), options)
  return y[:, :t, :, :d], TaylorState(kv[..., :d], ks)
