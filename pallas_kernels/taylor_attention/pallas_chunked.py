"""Chunked causal Taylor linear attention as Pallas kernels (Triton lowering), with a custom VJP.

Letters as in `reference.py`: B batch, T time, H heads, F feature dim (d' = 16), D value head
dim; C is the chunk length, P = F^2 the quadratic features, E = 1 + F + P the width of the full
basis the kernels work in, L the segment length, S = T / L the number of segments.

The kernels keep the full outer product vec(k k^T) (formed in registers, where its duplicate
terms cost nothing to store and make the products plain reshapes); `chunked` converts the
state it takes and returns to and from the packed basis of `feature_map.py` (E = 153).

The state. Per (batch, head) the running sums over keys, float32 and on chip:

    a0 [D] = sum v,   a1 [F, D] = sum k~ v^T,   a2 [P, D] = sum phi2(k) v^T,
    k0 [1], k1 [F], k2 [P]: the same sums without v (the normaliser),

where k~ = k / F^(1/4) and phi2(k) = vec(k k^T) / (sqrt 2 sqrt F) are the linear and
quadratic blocks of the feature map.

Tiling. Time is cut into S segments of L tokens, and one program owns one (batch, head,
segment) triple (in the forward also one block of `block_d` value columns). It walks its
segment C tokens at a time, starting from the state at the segment's start:

    s = q k^T / sqrt F,  w = causal(1 + s + s^2/2)                          [C, C]
    num = w v + a0 + q~ a1 + phi2(q) a2,  den = rowsum w + k0 + q~.k1 + phi2(q).k2
    then the chunk's keys are added to the state.

The segment start states come from a cheap first pass: one program per (batch, head, segment)
sums phi(k) v^T over its segment (no outputs, no chunk-local quadratic form), and XLA adds the
sums up across segments (an exclusive prefix sum of S - 1 float32 [E, D] blocks). Segments pay
only when B H alone cannot fill the GPU (small batch, long prompts): measured on an H100 at
B = 8, H = 16, T = 8192 the kernels are throughput-bound (register-resident state, small
products) and S = 1 is fastest (compare `bench_prefill --variants=//8192,//1024`), so
`segment_length` splits time only up to about TARGET_PROGRAMS programs.

Nothing E-wide ever goes to HBM except these per-segment states: phi2 is formed in registers
from the [C, F] tile (`_phi2`). Matrix products take the input dtype (bf16 runs on tensor cores)
and accumulate in float32; the state, the numerator and the normaliser stay float32 through the
division. With float32 inputs the products are IEEE float32.

Roofline (H100, bf16, B=8, H=16, F=16, D=64, T=8192): HBM traffic is q, k, v, y once
(about 0.34 GB, 0.11 ms at 3 TB/s), a float32 normaliser per token and S float32 [E, D] states
per (batch, head) (S = 4 would be 36 MB); the arithmetic is about 4 T P D (state read + update) +
2 T C (F + D) (the chunk-local quadratic form) per (batch, head), about 9e10 flops, 0.1 ms at
tensor-core rate. Measured, the forward takes 1.30 ms there (experiments/results/
prefill_h100_d64.json): the kernels are bound by the
issue rate of many small products on Triton's mma path (K = 16 for the phi2 spreading
products, which are about 45% of the flops with expand="matmul"; a [P, block_d] float32 state
held in registers caps block_d and warps), not by HBM. Closing the gap to the roofline needs
warpgroup (wgmma) products with the state in shared memory: the Mosaic GPU lowering.

Backward: the same segment scheme, two walking kernels with a [P, D] float32 accumulator.
`_dq_kernel` walks forward from the segment start states saved by the forward pass;
`_dkv_kernel` walks backward carrying the state's cotangent (sums of phi(q) g^T over later
queries), seeded per segment with the final state's cotangent plus the sums of all later
segments (a first pass, `_query_sums_kernel`, and a reverse prefix sum), and returns the
initial state's cotangent. With g = dy / den and r = -(dy . y) / den per query,
dw_tj = g_t . v_j + r_t.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from pallas_kernels.taylor_attention.feature_map import pack_quadratic, unpack_quadratic
from pallas_kernels.taylor_attention.state import TaylorState, for_compute, stored_like


@dataclasses.dataclass(frozen=True)
class Tiling:
  """How one kernel tiles its work (see the module docstring)."""
  chunk: int = 64  # C: tokens per step of a program's walk (a power of two >= 16)
  block_d: int = 64  # value columns per program (forward only; the backward keeps all of D)
  num_warps: int = 4  # Triton warps per program
  num_stages: int = 1  # Triton software-pipelining stages
  expand: str = "reshape"  # how phi2 is formed in registers: "reshape" or "matmul" (`_phi2`)

  def __post_init__(self):
    for name in ("chunk", "block_d"):
      x = getattr(self, name)
      if not isinstance(x, int) or x < 16 or x & (x - 1):
        raise ValueError(f"Tiling.{name} must be a power of two >= 16, got {x!r}")
    if self.num_warps not in (1, 2, 4, 8, 16) or self.num_stages < 1:
      raise ValueError(f"bad Tiling num_warps={self.num_warps} num_stages={self.num_stages}")
    if self.expand not in ("reshape", "matmul"):
      raise ValueError(f"Tiling.expand must be 'reshape' or 'matmul', got {self.expand!r}")


# Tuned on an H100 at B=8, H=16, D=64, bf16 (experiments/bench_prefill.py --variants).
FORWARD_TILING = Tiling(chunk=32, block_d=32, num_warps=4, expand="matmul")
BACKWARD_TILING = Tiling(chunk=64, num_warps=8, expand="reshape")
# float32 operands take twice the shared memory: at D = 112 (padded to 128) the bf16 backward
# tiling asks for 288 KiB on an H100 (227 KiB available), so float32 gets half the chunk.
BACKWARD_TILING_F32 = Tiling(chunk=32, num_warps=8, expand="reshape")
TARGET_PROGRAMS = 128  # auto segments: split time until about this many programs (~SM count)
MIN_SEGMENT = 512  # auto segments: never shorter than this many tokens


def segment_length(b: int, h: int, t: int, step: int, segment: int | None = None) -> int:
  """Tokens per segment, a multiple of `step`; `segment=None` picks it from the shape."""
  if segment is None:
    n = max(1, min(-(-TARGET_PROGRAMS // (b * h)), t // MIN_SEGMENT))
    segment = -(-t // n)
  if not isinstance(segment, int) or segment < 1:
    raise ValueError(f"segment must be a positive int, got {segment!r}")
  return -(-min(segment, t) // step) * step


def _dot(a, b, dtype, trans_a=False, trans_b=False):
  """a @ b with operands cast to `dtype`, accumulated in float32 (IEEE for float32, not tf32)."""
  precision = jax.lax.DotAlgorithmPreset.F32_F32_F32 if dtype == jnp.float32 else None
  return plt.dot(a.astype(dtype), b.astype(dtype), trans_a=trans_a, trans_b=trans_b,
                 precision=precision)


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


def _zero_state(f, d):
  p = f * f
  return ((jnp.zeros((1, d), jnp.float32), jnp.zeros((f, d), jnp.float32),
           jnp.zeros((p, d), jnp.float32)),
          (jnp.zeros((1,), jnp.float32), jnp.zeros((f,), jnp.float32),
           jnp.zeros((p,), jnp.float32)))


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




def _add_queries(ql, qp, g, r, da, dks, dtype):
  """The state cotangent after adding the chunk's queries ql [C, F], qp [C, P] (g [C, D], r [C])."""
  da = (da[0] + jnp.sum(g, axis=0, keepdims=True), da[1] + _dot(ql, g, dtype, trans_a=True),
        da[2] + _dot(qp, g, dtype, trans_a=True))
  dks = (dks[0] + jnp.sum(r, keepdims=True), dks[1] + jnp.sum(ql * r[:, None], axis=0),
         dks[2] + jnp.sum(qp * r[:, None], axis=0))
  return da, dks


def _grads_in(dy, y, den):
  """g = dy / den [C, D] and r = -(dy . y) / den [C] for a chunk of queries."""
  dy = dy.astype(jnp.float32)
  inv = 1.0 / den
  return dy * inv[:, None], -jnp.sum(dy * y.astype(jnp.float32), axis=1) * inv


def _key_valid(t0, chunk, length):
  return (t0 + jax.lax.broadcasted_iota(jnp.int32, (chunk,), 0)) < length


# --- Kernels. Refs hold one segment: q, k [L, F], v, y, dy [L, D or block_d], den [L]. ---
# Grid axis 2 is the segment; `start` is the absolute time of the segment's first token.

def _key_sums_kernel(len_ref, k_ref, v_ref, kv_ref, ks_ref, *, chunk, expand):
  """One segment's sums phi(k) v^T and phi(k) over its valid keys."""
  t, f = k_ref.shape
  sc, length, dtype = _Scales(f), len_ref[...], k_ref.dtype
  start = pl.program_id(2) * t

  def body(c, carry):
    rows = pl.ds(c * chunk, chunk)
    kl, kp = _features(k_ref[rows, :], sc, expand)
    return _add_keys(kl, kp, v_ref[rows, :], _key_valid(start + c * chunk, chunk, length),
                     *carry, dtype)

  a, ks = jax.lax.fori_loop(0, t // chunk, body, _zero_state(f, v_ref.shape[1]))
  _store_state(kv_ref, ks_ref, a, ks, f)


def _query_sums_kernel(q_ref, y_ref, dy_ref, den_ref, dkv_ref, dks_ref, *, chunk, expand):
  """One segment's sums phi(q) g^T and phi(q) r (the state cotangent it contributes)."""
  t, f = q_ref.shape
  sc, dtype = _Scales(f), q_ref.dtype

  def body(c, carry):
    rows = pl.ds(c * chunk, chunk)
    g, r = _grads_in(dy_ref[rows, :], y_ref[rows, :], den_ref[rows])
    ql, qp = _features(q_ref[rows, :], sc, expand)
    return _add_queries(ql, qp, g, r, *carry, dtype)

  da, dks = jax.lax.fori_loop(0, t // chunk, body, _zero_state(f, y_ref.shape[1]))
  _store_state(dkv_ref, dks_ref, da, dks, f)


def _fwd_kernel(len_ref, q_ref, k_ref, v_ref, kv0_ref, k0_ref,
                y_ref, den_ref, kv1_ref, k1_ref, *, chunk, eps, expand):
  t, f = q_ref.shape
  sc, length, dtype = _Scales(f), len_ref[...], q_ref.dtype
  start = pl.program_id(2) * t

  def body(c, carry):
    a, ks = carry
    rows = pl.ds(c * chunk, chunk)
    q, k, v = q_ref[rows, :], k_ref[rows, :], v_ref[rows, :]
    _, w, _, key_valid = _chunk_local(q, k, start + c * chunk, chunk, length, sc)
    ql, qp = _features(q, sc, expand)
    num, den = _read_state(ql, qp, a, ks, dtype)
    num += _dot(w, v, dtype)
    den += jnp.sum(w, axis=1) + eps
    y_ref[rows, :] = (num / den[:, None]).astype(y_ref.dtype)
    den_ref[rows] = den
    kl, kp = _features(k, sc, expand)
    return _add_keys(kl, kp, v, key_valid, a, ks, dtype)

  a, ks = jax.lax.fori_loop(0, t // chunk, body, _load_state(kv0_ref, k0_ref, f))

  @pl.when(pl.program_id(2) == pl.num_programs(2) - 1)
  def _():
    _store_state(kv1_ref, k1_ref, a, ks, f)


def _dq_kernel(len_ref, q_ref, k_ref, v_ref, y_ref, dy_ref, den_ref, kv0_ref, k0_ref,
               dq_ref, *, chunk, expand):
  t, f = q_ref.shape
  sc, length, dtype = _Scales(f), len_ref[...], q_ref.dtype
  start = pl.program_id(2) * t

  def body(c, carry):
    a, ks = carry
    rows = pl.ds(c * chunk, chunk)
    q, k, v = q_ref[rows, :], k_ref[rows, :], v_ref[rows, :]
    g, r = _grads_in(dy_ref[rows, :], y_ref[rows, :], den_ref[rows])
    s, _, keep, key_valid = _chunk_local(q, k, start + c * chunk, chunk, length, sc)
    ds = jnp.where(keep, (_dot(g, v, dtype, trans_b=True) + r[:, None]) * (1.0 + s), 0.0)
    dq = _dot(ds, k, dtype) * sc.s
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
  sc, length, dtype = _Scales(f), len_ref[...], q_ref.dtype
  start, n = pl.program_id(2) * t, t // chunk

  def body(i, carry):
    da, dks = carry  # cotangents of the state seen by later queries
    c = n - 1 - i
    rows = pl.ds(c * chunk, chunk)
    q, k, v = q_ref[rows, :], k_ref[rows, :], v_ref[rows, :]
    g, r = _grads_in(dy_ref[rows, :], y_ref[rows, :], den_ref[rows])
    s, w, keep, key_valid = _chunk_local(q, k, start + c * chunk, chunk, length, sc)
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
    return _add_queries(ql, qp, g, r, da, dks, dtype)

  da, dks = jax.lax.fori_loop(0, n, body, _load_state(dkv1_ref, dk1_ref, f))

  @pl.when(pl.program_id(2) == 0)
  def _():
    _store_state(dkv0_ref, dk0_ref, da, dks, f)


# --- pallas_call wrappers over [B, T, H, .] arrays (T a multiple of L, D a power of 2) ---
# Grids are (B, H, segments[, column blocks]); `shift` offsets the segment a program reads.

def _seq_spec(seg, width, d_block=None, shift=0):
  """One segment of one (batch, head) sequence: [L, width] or a `d_block` column slice."""
  if d_block is None:
    return pl.BlockSpec((None, seg, None, width), lambda b, h, s, *_: (b, s + shift, h, 0))
  return pl.BlockSpec((None, seg, None, d_block), lambda b, h, s, j: (b, s + shift, h, j))


def _den_spec(seg, shift=0):
  return pl.BlockSpec((None, None, seg), lambda b, h, s, *_: (b, h, s + shift))


def _len_spec():
  return pl.BlockSpec((None, 1), lambda b, *_: (b, 0))


def _segment_state_specs(e, d_block):
  """Per-segment states [B, H, S, E, D] and [B, H, S, E]."""
  return (pl.BlockSpec((None, None, None, e, d_block), lambda b, h, s, j=0: (b, h, s, 0, j)),
          pl.BlockSpec((None, None, None, e), lambda b, h, s, *_: (b, h, s, 0)))


def _state_specs(e, d_block):
  """One state per sequence, [B, H, E, D] and [B, H, E] (written by one segment)."""
  return (pl.BlockSpec((None, None, e, d_block), lambda b, h, s, j=0: (b, h, 0, j)),
          pl.BlockSpec((None, None, e), lambda b, h, *_: (b, h, 0)))


def _state_shapes(*lead, e, d):
  return [jax.ShapeDtypeStruct((*lead, e, d), jnp.float32),
          jax.ShapeDtypeStruct((*lead, e), jnp.float32)]


def _call(kernel, tiling, interpret, **kw):
  return pl.pallas_call(
      functools.partial(kernel, chunk=tiling.chunk, expand=tiling.expand, **kw.pop("static", {})),
      compiler_params=plt.CompilerParams(num_warps=tiling.num_warps,
                                         num_stages=tiling.num_stages),
      interpret=interpret, **kw)


def _forward(q, k, v, kv0, k0, lengths, *, eps, seg, tiling, interpret):
  """y, den [B, H, T] and the final state, plus the segment start states for the backward."""
  b, t, h, f = q.shape
  d, e, n = v.shape[-1], kv0.shape[2], t // seg
  bd = min(tiling.block_d, d)
  kv_starts, k_starts = kv0[:, :, None], k0[:, :, None]
  if n > 1:
    kv_sums, k_sums = _call(
        _key_sums_kernel, tiling, interpret, grid=(b, h, n - 1, d // bd),
        in_specs=[_len_spec(), _seq_spec(seg, f), _seq_spec(seg, d, bd)],
        out_specs=list(_segment_state_specs(e, bd)), out_shape=_state_shapes(b, h, n - 1, e=e, d=d),
        name="taylor_attention_key_sums")(lengths, k, v)
    kv_starts = jnp.concatenate([kv_starts, kv_starts + jnp.cumsum(kv_sums, axis=2)], axis=2)
    k_starts = jnp.concatenate([k_starts, k_starts + jnp.cumsum(k_sums, axis=2)], axis=2)
  y, den, kv1, k1 = _call(
      _fwd_kernel, tiling, interpret, static=dict(eps=eps), grid=(b, h, n, d // bd),
      in_specs=[_len_spec(), _seq_spec(seg, f), _seq_spec(seg, f), _seq_spec(seg, d, bd),
                *_segment_state_specs(e, bd)],
      out_specs=[_seq_spec(seg, d, bd), _den_spec(seg), *_state_specs(e, bd)],
      out_shape=[jax.ShapeDtypeStruct(v.shape, v.dtype),
                 jax.ShapeDtypeStruct((b, h, t), jnp.float32), *_state_shapes(b, h, e=e, d=d)],
      name="taylor_attention_fwd")(lengths, q, k, v, kv_starts, k_starts)
  return y, den, kv1, k1, kv_starts, k_starts


def _backward(q, k, v, y, dy, den, kv_starts, k_starts, dkv1, dk1, lengths, *, seg, tiling,
              interpret):
  b, t, h, f = q.shape
  d, e, n = v.shape[-1], dkv1.shape[2], t // seg
  dkv_ends, dk_ends = dkv1[:, :, None], dk1[:, :, None]
  if n > 1:  # the cotangent each segment's end state gets from the queries of later segments
    dkv_sums, dk_sums = _call(
        _query_sums_kernel, tiling, interpret, grid=(b, h, n - 1),
        in_specs=[_seq_spec(seg, f, shift=1), _seq_spec(seg, d, shift=1),
                  _seq_spec(seg, d, shift=1), _den_spec(seg, shift=1)],
        out_specs=list(_segment_state_specs(e, d)), out_shape=_state_shapes(b, h, n - 1, e=e, d=d),
        name="taylor_attention_query_sums")(q, y, dy, den)
    dkv_ends = jnp.concatenate(
        [dkv_ends + jax.lax.cumsum(dkv_sums, axis=2, reverse=True), dkv_ends], axis=2)
    dk_ends = jnp.concatenate(
        [dk_ends + jax.lax.cumsum(dk_sums, axis=2, reverse=True), dk_ends], axis=2)
  seq_in = [_len_spec(), _seq_spec(seg, f), _seq_spec(seg, f), _seq_spec(seg, d),
            _seq_spec(seg, d), _seq_spec(seg, d), _den_spec(seg), *_segment_state_specs(e, d)]
  common = dict(grid=(b, h, n), in_specs=seq_in)
  dq = _call(_dq_kernel, tiling, interpret, out_specs=_seq_spec(seg, f),
             out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype), name="taylor_attention_dq",
             **common)(lengths, q, k, v, y, dy, den, kv_starts, k_starts)
  dk, dv, dkv0, dk0 = _call(
      _dkv_kernel, tiling, interpret,
      out_specs=[_seq_spec(seg, f), _seq_spec(seg, d), *_state_specs(e, d)],
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype),
                 *_state_shapes(b, h, e=e, d=d)],
      name="taylor_attention_dkv", **common)(lengths, q, k, v, y, dy, den, dkv_ends, dk_ends)
  return dq, dk, dv, dkv0, dk0


@dataclasses.dataclass(frozen=True)
class _Options:
  """Static settings of one call (hashable: the custom VJP's nondiff argument)."""
  eps: float
  seg: int
  forward: Tiling
  backward: Tiling
  interpret: bool


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _attention(q, k, v, kv0, k0, lengths, opt):
  y, _, kv1, k1, _, _ = _forward(q, k, v, kv0, k0, lengths, eps=opt.eps, seg=opt.seg,
                                 tiling=opt.forward, interpret=opt.interpret)
  return y, kv1, k1


def _attention_fwd(q, k, v, kv0, k0, lengths, opt):
  y, den, kv1, k1, kv_starts, k_starts = _forward(
      q, k, v, kv0, k0, lengths, eps=opt.eps, seg=opt.seg, tiling=opt.forward,
      interpret=opt.interpret)
  return (y, kv1, k1), (q, k, v, kv_starts, k_starts, lengths, y, den)


def _attention_bwd(opt, res, cotangents):
  q, k, v, kv_starts, k_starts, lengths, y, den = res
  dy, dkv1, dk1 = cotangents
  dq, dk, dv, dkv0, dk0 = _backward(q, k, v, y, dy.astype(v.dtype), den, kv_starts, k_starts,
                                    dkv1, dk1, lengths, seg=opt.seg, tiling=opt.backward,
                                    interpret=opt.interpret)
  return dq, dk, dv, dkv0, dk0, None


_attention.defvjp(_attention_fwd, _attention_bwd)


def chunked(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, state: TaylorState,
            lengths: jnp.ndarray, *, eps: float, forward: Tiling = FORWARD_TILING,
            backward: Tiling | None = None, segment: int | None = None,
            interpret: bool = False) -> tuple[jnp.ndarray, TaylorState]:
  """Causal Taylor linear attention through the Pallas kernels.

  Args:
    q, k: [B, T, H, F] (F a power of two); v: [B, T, H, D]; any T, any D.
    state: the initial state in the packed basis ([B, H, E', D] float32 or bf16 and float32
      [B, H, E'], E' = `feature_width(F)`).
    lengths: [B] int32, valid leading tokens per sequence (later keys are ignored).
    eps: added to the normaliser.
    forward, backward: the tilings of the forward and the backward kernels (backward None:
      BACKWARD_TILING, or BACKWARD_TILING_F32 for float32 inputs).
    segment: tokens per program along time (rounded up to the larger chunk); None picks it
      from the shape (`segment_length`).
    interpret: run the kernels in the Pallas interpreter (CPU tests).

  Returns:
    y [B, T, H, D] in v's dtype and the final state; differentiable in q, k, v and state.
  """
  b, t, h, f = q.shape
  d = v.shape[-1]
  if backward is None:
    wide = jnp.float32 in (q.dtype, k.dtype, v.dtype)
    backward = BACKWARD_TILING_F32 if wide else BACKWARD_TILING
  seg = segment_length(b, h, t, max(forward.chunk, backward.chunk), segment)
  t_pad, d_pad = -(-t // seg) * seg, pl.next_power_of_2(d)
  pad_t = lambda x: jnp.pad(x, [(0, 0), (0, t_pad - t), (0, 0), (0, 0)]) if t_pad > t else x
  pad_d = lambda x: jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, d_pad - d)]) if d_pad > d else x
  options = _Options(eps=eps, seg=seg, forward=forward, backward=backward, interpret=interpret)
  full = TaylorState(*(_change_basis(x, f, unpack_quadratic) for x in for_compute(state)))
  y, kv, ks = _attention(pad_t(q), pad_t(k), pad_d(pad_t(v)), pad_d(full.kv), full.k,
                         lengths.astype(jnp.int32).reshape(b, 1), options)
  final = TaylorState(*(_change_basis(x, f, pack_quadratic) for x in (kv[..., :d], ks)))
  return y[:, :t, :, :d], stored_like(final, state)


def _change_basis(x: jnp.ndarray, f: int, convert) -> jnp.ndarray:
  """A state [B, H, E, ...] with its quadratic rows (axis 2, after the 1 + F others) converted
  between the packed basis of `feature_map.py` and the kernels' full F^2 one."""
  return jnp.concatenate([x[:, :, :1 + f], convert(x[:, :, 1 + f:], f, axis=2)], axis=2)
