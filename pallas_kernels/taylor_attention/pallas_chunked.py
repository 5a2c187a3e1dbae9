"""Chunked causal Taylor linear attention as Pallas kernels (Triton lowering), with a custom VJP.

Shapes use the dimension letters of `based_jax/__init__.py` (here F = 16, and K, the value
head dim, is padded to a power of two). Letters local to these kernels:

    L  segment length: the tokens one program walks      G  segments per sequence, T / L
    R  F^2 / 2, the off-diagonal quadratic features      U  1 + 2F + R, the width of the
                                                            kernels' basis (161 at F = 16)

Basis. The kernels hold the quadratic features in the cyclic layout of `cyclic_basis.py`: a
diagonal block diag(x) [F] and an off-diagonal block off(x) [R] of the distinct products
x_i x_j, both power-of-two wide, formed in registers from the [C, F] tile (`_features`: off is
the product of two exact 0/1 spreading matmuls, of x / sqrt F and of x). That is F + R = 144
quadratic rows instead of the full outer product's 256: 0.56x the state products, which
dominate the arithmetic. `chunked` converts the state it takes and returns to and from the
packed basis of `feature_map.py` (width E).

State. Per (batch, head) the running sums over keys, float32 and on chip, in four blocks:

    a0 [K] = sum v,               a1 [F, K] = sum k~ v^T,
    a2 [F, K] = sum diag(k) v^T,  a3 [R, K] = sum off(k) v^T,
    k0 [1], k1 [F], k2 [F], k3 [R]: the same sums without v (the normaliser),

where k~ = k / F^(1/4) is the linear block of the feature map.

Forward. Time is cut into G segments of L tokens, and one program owns one (batch, head,
segment, block of `block_d` value columns). It walks its segment C tokens at a time, starting
from the state at the segment's start:

    s = q k^T / sqrt F,  w = causal(1 + s + s^2/2)                          [C, C]
    num = w v + a0 + sum_i phi_i(q) a_i,  den = rowsum w + k0 + sum_i phi_i(q).k_i
    y = num * (1 / den) (one division per row), then the chunk's keys join the state.

With G > 1 the segment start states come from a first pass: one program per (batch, head,
segment) sums phi(k) v^T over its segment (no outputs, no chunk-local form), and XLA adds the
sums up across segments (an exclusive prefix sum of G - 1 float32 [U, K] blocks). Segments
add that pass, so `segment_length` cuts time only while B H is below TARGET_PROGRAMS (into
about TARGET_PROGRAMS / (B H) segments, none shorter than MIN_SEGMENT tokens). Without an
initial state a single-segment forward starts from zero and reads no state.

Nothing U-wide goes to HBM except these per-segment states. Matrix products take the input
dtype (bf16 runs on tensor cores) and accumulate in float32; the state, the numerator and the
normaliser stay float32 through the division. With float32 inputs the products are IEEE
float32.

Backward. The same segment scheme, two walking kernels with a float32 state-sized
accumulator. With g = dy / den and r = -(dy . y) / den per query (r is one XLA reduction
before the kernels), dw_tj = g_t . v_j + r_t. `_dq_kernel` walks forward from the segment
start states saved by the forward pass; `_dkv_kernel` walks backward carrying the state's
cotangent (sums of phi(q) g^T over later queries), seeded per segment with the final state's
cotangent plus the sums of all later segments (a first pass, `_query_sums_kernel`, and a
reverse prefix sum), and returns the initial state's cotangent. All of them split K into
`block_d` column programs like the forward: dv and the state cotangent split exactly; dq and
dk are sums over the column blocks (each program writes its share in float32 and XLA adds
them), and the normaliser's terms (r, its state cotangent) belong to block 0 alone. An unused
final state (training) reaches the custom VJP as a symbolic zero: no cotangent conversion.

Roofline (bf16, B = 8, H = 16, F = 16, K = 64, T = 8192). HBM traffic is q, k, v, y once
(about 0.34 GB, 0.11 ms at 3 TB/s), a float32 normaliser per token and G float32 [U, K]
states per (batch, head); the arithmetic per token and (batch, head) is 4 (2F + R) K for the
state read and update, 2 C (F + K) for the chunk-local form and 4 F R per value-column block
for the spreading products, about 8e10 flops in all, 0.1 ms at tensor-core rate. The kernels
are bound by neither but by latency: the float32 [U, block_d] state lives in registers, so an
SM holds two 4-warp programs, 2 warps per scheduler. Closing the gap needs warpgroup (wgmma)
products with the state in shared memory: the Mosaic GPU lowering. The measurements, the
profiles and the designs tried are in docs/kernels.md.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.custom_derivatives import SymbolicZero
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from pallas_kernels.taylor_attention import cyclic_basis, mosaic_chunked
from pallas_kernels.taylor_attention.state import TaylorState, for_compute, stored_like


@dataclasses.dataclass(frozen=True)
class Tiling:
  """How one kernel tiles its work (see the module docstring)."""
  chunk: int = 64  # C: tokens per step of a program's walk (a power of two >= 16)
  block_d: int = 64  # value columns per program (every kernel splits K into such blocks)
  num_warps: int = 4  # Triton warps per program
  num_stages: int = 1  # Triton software-pipelining stages

  def __post_init__(self):
    for name in ("chunk", "block_d"):
      x = getattr(self, name)
      if not isinstance(x, int) or x < 16 or x & (x - 1):
        raise ValueError(f"Tiling.{name} must be a power of two >= 16, got {x!r}")
    if self.num_warps not in (1, 2, 4, 8, 16) or self.num_stages < 1:
      raise ValueError(f"bad Tiling num_warps={self.num_warps} num_stages={self.num_stages}")


# Forward and backward alike: chunks of 32 tokens, 4-warp programs of 32 value columns (K = 64
# takes two), and three software-pipelining stages, with which Triton loads the next chunk's
# tiles while the current one computes. Chosen on an H100 at B=8, H=16, K=64, T=8192, bf16 with
# `python -m experiments.bench_prefill --variants=...`; the alternatives and their timings are
# in docs/kernels.md.
FORWARD_TILING = Tiling(chunk=32, block_d=32, num_warps=4, num_stages=3)
BACKWARD_TILING = Tiling(chunk=32, block_d=32, num_warps=4, num_stages=3)
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


class _Scales:
  """The feature map's constants for feature dim F."""

  def __init__(self, f: int):
    self.linear = f ** -0.25  # k~ = k / F^(1/4)
    self.quad = 1.0 / (2.0 ** 0.5 * f ** 0.5)  # diag(k) = quad k_i^2
    self.s = f ** -0.5  # s = q . k / sqrt F
    self.off = f ** -0.5  # off(x) = x_i x_j / sqrt F


def _block_sizes(f: int) -> tuple[int, ...]:
  """Rows of the state blocks: the constant, linear, diagonal and off-diagonal features."""
  return 1, f, f, cyclic_basis.off_width(f)


def _spreading(f, dtype):
  """The 0/1 matrices (tile, roll) [F, R] of `off`."""
  shape = (f, cyclic_basis.off_width(f))
  p = jax.lax.broadcasted_iota(jnp.int32, shape, 1)
  tile, roll = cyclic_basis.spreading_rows(f, p, jax.lax.broadcasted_iota(jnp.int32, shape, 0))
  return tile.astype(dtype), roll.astype(dtype)


def _spread(x, sc):
  """x / sqrt F @ tile and x @ roll [C, R], the two factors of `off` (a [C, F] input)."""
  tile, roll = _spreading(x.shape[1], x.dtype)
  xs = (x.astype(jnp.float32) * sc.off).astype(x.dtype)
  return _dot(xs, tile, x.dtype), _dot(x, roll, x.dtype)


def _features(x, sc):
  """[C, F] -> phi(x) after its constant, as float32 blocks (linear [C, F], diag [C, F],
  off [C, R]) in the cyclic basis."""
  xf = x.astype(jnp.float32)
  x_tile, x_roll = _spread(x, sc)
  return xf * sc.linear, xf * xf * sc.quad, x_tile * x_roll


def _features_vjp(x, cots, sc):
  """Cotangent of x [C, F] given the cotangents of the three `_features` blocks."""
  dl, dd, doff = cots
  tile, roll = _spreading(x.shape[1], x.dtype)
  dtype = jnp.float32 if x.dtype == jnp.float32 else x.dtype
  x_tile, x_roll = _spread(x, sc)
  xf = x.astype(jnp.float32)
  return (dl * sc.linear + 2.0 * sc.quad * xf * dd
          + _dot(doff * x_roll, tile, dtype, trans_b=True) * sc.off
          + _dot(doff * x_tile, roll, dtype, trans_b=True))


def _chunk_local(q, k, t0, chunk, length, sc):
  """s and the causal, key-masked weights w of one chunk; also the key-valid mask."""
  s = _dot(q, k, q.dtype, trans_b=True) * sc.s
  rows = t0 + jax.lax.broadcasted_iota(jnp.int32, (chunk, chunk), 0)
  cols = t0 + jax.lax.broadcasted_iota(jnp.int32, (chunk, chunk), 1)
  keep = (cols <= rows) & (cols < length)
  w = jnp.where(keep, 1.0 + s + 0.5 * s * s, 0.0)
  return s, w, keep, _key_valid(t0, chunk, length)


def _load_state(kv_ref, k_ref, f, zero=False):
  """The state refs [U, block_d] and [U] as float32 blocks, one per `_block_sizes` entry;
  with `zero` (the refs hold zeros) zeros, without reading them."""
  if zero:
    return _zero_state(f, kv_ref.shape[1])
  starts = np.cumsum((0,) + _block_sizes(f))
  return (tuple(kv_ref[pl.ds(int(s), n), :] for s, n in zip(starts, _block_sizes(f))),
          tuple(k_ref[pl.ds(int(s), n)] for s, n in zip(starts, _block_sizes(f))))


def _store_rows(ref, blocks, f):
  """Writes the `_block_sizes` blocks of a state (kv [U, block_d] or k [U]) to its ref."""
  for start, n, x in zip(np.cumsum((0,) + _block_sizes(f)), _block_sizes(f), blocks):
    ref[pl.ds(int(start), n), ...] = x


def _store_state(kv_ref, k_ref, a, ks, f):
  _store_rows(kv_ref, a, f)
  _store_rows(k_ref, ks, f)


def _zero_state(f, d):
  return (tuple(jnp.zeros((n, d), jnp.float32) for n in _block_sizes(f)),
          tuple(jnp.zeros((n,), jnp.float32) for n in _block_sizes(f)))


def _read_state(feats, a, ks, dtype):
  """phi(q) . state for the numerator [C, block_d] and the normaliser [C]."""
  num = a[0]
  for x, a_i in zip(feats, a[1:]):
    num += _dot(x, a_i, dtype)
  (lin, diag, off), (k0, k1, k2, k3) = feats, ks  # the two [C, F] blocks share one row sum
  den = (k0 + jnp.sum(lin * k1[None, :] + diag * k2[None, :], axis=1)
         + jnp.sum(off * k3[None, :], axis=1))
  return num, den


def _accumulate(feats, g, r, a, ks, dtype):
  """The sums a_0 + sum g, a_i + x_i^T g, k_0 + sum r, k_i + x_i^T r over a chunk's rows
  (keys: g = values, r = 1; the backward's queries: g = dy / den, r = -(dy . y) / den)."""
  a = (a[0] + jnp.sum(g, axis=0, keepdims=True),
       *(a_i + _dot(x, g, dtype, trans_a=True) for x, a_i in zip(feats, a[1:])))
  ks = (ks[0] + jnp.sum(r, keepdims=True),
        *(k_i + jnp.sum(x * r[:, None], axis=0) for x, k_i in zip(feats, ks[1:])))
  return a, ks


def _add_keys(feats, v, key_valid, a, ks, dtype):
  """The state after adding the chunk's valid keys (features `feats`), values v [C, block_d]."""
  m = key_valid.astype(jnp.float32)
  return _accumulate(feats, v.astype(jnp.float32) * m[:, None], m, a, ks, dtype)


def _grads_in(dy_ref, den_ref, r_ref, rows, first):
  """g = dy / den [C, block_d] and r [C] for a chunk of queries; r is zero unless `first`
  (column block 0: the normaliser's terms of a sum over column blocks belong to one block)."""
  inv = 1.0 / den_ref[rows]  # one division per row, not per element
  return dy_ref[rows, :].astype(jnp.float32) * inv[:, None], jnp.where(first, r_ref[rows], 0.0)


def _score_grad(g, v, r, s, keep, dtype):
  """ds [C, C], the cotangent of the chunk-local scores s (dw = g v^T + r, w = 1 + s + s^2/2)."""
  return jnp.where(keep, (_dot(g, v, dtype, trans_b=True) + r[:, None]) * (1.0 + s), 0.0)


def _key_valid(t0, chunk, length):
  return (t0 + jax.lax.broadcasted_iota(jnp.int32, (chunk,), 0)) < length


# --- Kernels. Refs hold one segment: q, k [L, F], v, y, dy [L, K or block_d], den [L]. ---
# Grid axis 2 is the segment; `start` is the absolute time of the segment's first token.

def _key_sums_kernel(len_ref, k_ref, v_ref, kv_ref, ks_ref, *, chunk):
  """One segment's sums phi(k) v^T and phi(k) over its valid keys."""
  t, f = k_ref.shape
  sc, length, dtype = _Scales(f), len_ref[...], k_ref.dtype
  start = pl.program_id(2) * t

  def body(c, carry):
    rows = pl.ds(c * chunk, chunk)
    return _add_keys(_features(k_ref[rows, :], sc), v_ref[rows, :],
                     _key_valid(start + c * chunk, chunk, length), *carry, dtype)

  a, ks = jax.lax.fori_loop(0, t // chunk, body, _zero_state(f, v_ref.shape[1]))
  _store_state(kv_ref, ks_ref, a, ks, f)


def _query_sums_kernel(q_ref, dy_ref, den_ref, r_ref, dkv_ref, dks_ref, *, chunk):
  """One segment's sums phi(q) g^T and phi(q) r (the state cotangent it contributes), for one
  block of value columns (the r sums in block 0)."""
  t, f = q_ref.shape
  sc, dtype, first = _Scales(f), q_ref.dtype, pl.program_id(3) == 0

  def body(c, carry):
    rows = pl.ds(c * chunk, chunk)
    g, r = _grads_in(dy_ref, den_ref, r_ref, rows, first)
    return _accumulate(_features(q_ref[rows, :], sc), g, r, *carry, dtype)

  da, dks = jax.lax.fori_loop(0, t // chunk, body, _zero_state(f, dy_ref.shape[1]))
  _store_rows(dkv_ref, da, f)
  pl.when(first)(lambda: _store_rows(dks_ref, dks, f))


def _fwd_kernel(len_ref, q_ref, k_ref, v_ref, kv0_ref, k0_ref,
                y_ref, den_ref, kv1_ref, k1_ref, *, chunk, eps, zero_start):
  t, f = q_ref.shape
  sc, length, dtype = _Scales(f), len_ref[...], q_ref.dtype
  start = pl.program_id(2) * t

  def body(c, carry):
    a, ks = carry
    rows = pl.ds(c * chunk, chunk)
    q, k, v = q_ref[rows, :], k_ref[rows, :], v_ref[rows, :]
    _, w, _, key_valid = _chunk_local(q, k, start + c * chunk, chunk, length, sc)
    num, den = _read_state(_features(q, sc), a, ks, dtype)
    num += _dot(w, v, dtype)
    den += jnp.sum(w, axis=1) + eps
    y_ref[rows, :] = (num * (1.0 / den)[:, None]).astype(y_ref.dtype)
    den_ref[rows] = den
    return _add_keys(_features(k, sc), v, key_valid, a, ks, dtype)

  a, ks = jax.lax.fori_loop(0, t // chunk, body, _load_state(kv0_ref, k0_ref, f, zero_start))

  @pl.when(pl.program_id(2) == pl.num_programs(2) - 1)
  def _():
    _store_state(kv1_ref, k1_ref, a, ks, f)


def _dq_kernel(len_ref, q_ref, k_ref, v_ref, dy_ref, den_ref, r_ref, kv0_ref, k0_ref,
               dq_ref, *, chunk):
  """One block of value columns' share of dq (the caller sums the blocks)."""
  t, f = q_ref.shape
  sc, length, dtype = _Scales(f), len_ref[...], q_ref.dtype
  start, first = pl.program_id(2) * t, pl.program_id(3) == 0

  def body(c, carry):
    a, ks = carry
    rows = pl.ds(c * chunk, chunk)
    q, k, v = q_ref[rows, :], k_ref[rows, :], v_ref[rows, :]
    g, r = _grads_in(dy_ref, den_ref, r_ref, rows, first)
    s, _, keep, key_valid = _chunk_local(q, k, start + c * chunk, chunk, length, sc)
    ds = _score_grad(g, v, r, s, keep, dtype)
    dfeats = tuple(_dot(g, a_i, dtype, trans_b=True) + r[:, None] * k_i[None, :]
                   for a_i, k_i in zip(a[1:], ks[1:]))
    dq = _dot(ds, k, dtype) * sc.s + _features_vjp(q, dfeats, sc)
    dq_ref[rows, :] = dq
    return _add_keys(_features(k, sc), v, key_valid, a, ks, dtype)

  jax.lax.fori_loop(0, t // chunk, body, _load_state(kv0_ref, k0_ref, f))


def _dkv_kernel(len_ref, q_ref, k_ref, v_ref, dy_ref, den_ref, r_ref, dkv1_ref, dk1_ref,
                dk_ref, dv_ref, dkv0_ref, dk0_ref, *, chunk):
  """dv and dk for one block of value columns: dk_ref takes this block's share of dk (the
  caller sums the blocks); the normaliser's terms (r and the k state's cotangent dks) go to
  block 0 alone."""
  t, f = q_ref.shape
  sc, length, dtype = _Scales(f), len_ref[...], q_ref.dtype
  start, n = pl.program_id(2) * t, t // chunk
  first = pl.program_id(3) == 0

  def body(i, carry):
    da, dks = carry  # cotangents of the state seen by later queries
    c = n - 1 - i
    rows = pl.ds(c * chunk, chunk)
    q, k, v = q_ref[rows, :], k_ref[rows, :], v_ref[rows, :]
    g, r = _grads_in(dy_ref, den_ref, r_ref, rows, first)
    s, w, keep, key_valid = _chunk_local(q, k, start + c * chunk, chunk, length, sc)
    ds = _score_grad(g, v, r, s, keep, dtype)
    m = key_valid.astype(jnp.float32)[:, None]
    dv = da[0] + sum(_dot(x, da_i, dtype) for x, da_i in zip(_features(k, sc), da[1:]))
    dv = _dot(w, g, dtype, trans_a=True) + m * dv
    dfeats = tuple(_dot(v, da_i, dtype, trans_b=True) + dk_i[None, :]
                   for da_i, dk_i in zip(da[1:], dks[1:]))
    dk = _dot(ds, q, dtype, trans_a=True) * sc.s + m * _features_vjp(k, dfeats, sc)
    dk_ref[rows, :] = dk
    dv_ref[rows, :] = dv.astype(dv_ref.dtype)
    return _accumulate(_features(q, sc), g, r, da, dks, dtype)

  da, dks = _load_state(dkv1_ref, dk1_ref, f)
  da, dks = jax.lax.fori_loop(0, n, body, (da, tuple(jnp.where(first, x, 0.0) for x in dks)))

  @pl.when(pl.program_id(2) == 0)
  def _():
    _store_rows(dkv0_ref, da, f)
    pl.when(first)(lambda: _store_rows(dk0_ref, dks, f))


# --- pallas_call wrappers over [B, T, H, .] arrays (T a multiple of L, K a power of 2) ---
# Grids are (B, H, G[, column blocks]); `shift` offsets the segment a program reads.

def _seq_spec(seg, width, d_block=None, shift=0):
  """One segment of one (batch, head) sequence: [L, width] or a `d_block` column slice."""
  if d_block is None:
    return pl.BlockSpec((None, seg, None, width), lambda b, h, s, *_: (b, s + shift, h, 0))
  return pl.BlockSpec((None, seg, None, d_block), lambda b, h, s, j: (b, s + shift, h, j))


def _den_spec(seg, shift=0):
  return pl.BlockSpec((None, None, seg), lambda b, h, s, *_: (b, h, s + shift))


def _len_spec():
  return pl.BlockSpec((None, 1), lambda b, *_: (b, 0))


def _segment_state_specs(e, d_block, shared=False):
  """Per-segment states [B, H, G, U, K] and [B, H, G, U], or with `shared` one state
  [1, 1, 1, U, K] and [1, 1, 1, U] for every program."""
  pick = (lambda *_: (0, 0, 0)) if shared else (lambda b, h, s: (b, h, s))
  return (pl.BlockSpec((None, None, None, e, d_block), lambda b, h, s, j: (*pick(b, h, s), 0, j)),
          pl.BlockSpec((None, None, None, e), lambda b, h, s, j: (*pick(b, h, s), 0)))


def _with_later_sums(first, sums, reverse=False):
  """[first, first + sums_0, ...] along the segment axis (2), `first` [B or 1, H or 1, 1, ...]
  the state at the first segment start; reversed: [..., first + sums_{G-2}, first]."""
  first = jnp.broadcast_to(first, sums.shape[:2] + first.shape[2:])
  later = first + jax.lax.cumsum(sums, axis=2, reverse=reverse)
  return jnp.concatenate([later, first] if reverse else [first, later], axis=2)


def _state_specs(e, d_block):
  """One state per sequence, [B, H, U, K] and [B, H, U] (written by one segment)."""
  return (pl.BlockSpec((None, None, e, d_block), lambda b, h, s, j=0: (b, h, 0, j)),
          pl.BlockSpec((None, None, e), lambda b, h, *_: (b, h, 0)))


def _state_shapes(*lead, e, d):
  return [jax.ShapeDtypeStruct((*lead, e, d), jnp.float32),
          jax.ShapeDtypeStruct((*lead, e), jnp.float32)]


def _call(kernel, tiling, interpret, **kw):
  return pl.pallas_call(
      functools.partial(kernel, chunk=tiling.chunk, **kw.pop("static", {})),
      compiler_params=plt.CompilerParams(num_warps=tiling.num_warps,
                                         num_stages=tiling.num_stages),
      interpret=interpret, **kw)


def _triton_key_sums(k, v, lengths, *, seg, tiling, interpret):
  """`_key_sums_kernel` over the first G - 1 segments: [B, H, G - 1, U, K], [B, H, G - 1, U]."""
  b, t, h, f = k.shape
  d, e = v.shape[-1], sum(_block_sizes(f))
  bd = min(tiling.block_d, d)
  return _call(
      _key_sums_kernel, tiling, interpret, grid=(b, h, t // seg - 1, d // bd),
      in_specs=[_len_spec(), _seq_spec(seg, f), _seq_spec(seg, d, bd)],
      out_specs=list(_segment_state_specs(e, bd)),
      out_shape=_state_shapes(b, h, t // seg - 1, e=e, d=d),
      name="taylor_attention_key_sums")(lengths, k, v)


def _triton_walk(q, k, v, kv_starts, k_starts, lengths, *, seg, eps, zero_start, tiling,
                 interpret):
  """`_fwd_kernel` from each segment's start state: y, den [B, H, T], the final state."""
  b, t, h, f = q.shape
  d, e = v.shape[-1], kv_starts.shape[3]
  bd = min(tiling.block_d, d)
  return _call(
      _fwd_kernel, tiling, interpret, static=dict(eps=eps, zero_start=zero_start),
      grid=(b, h, t // seg, d // bd),
      in_specs=[_len_spec(), _seq_spec(seg, f), _seq_spec(seg, f), _seq_spec(seg, d, bd),
                *_segment_state_specs(e, bd, shared=zero_start)],
      out_specs=[_seq_spec(seg, d, bd), _den_spec(seg), *_state_specs(e, bd)],
      out_shape=[jax.ShapeDtypeStruct(v.shape, v.dtype),
                 jax.ShapeDtypeStruct((b, h, t), jnp.float32), *_state_shapes(b, h, e=e, d=d)],
      name="taylor_attention_fwd")(lengths, q, k, v, kv_starts, k_starts)


# forward_kernel -> (key sums, walk): the forward pass's two kernels (the Mosaic ones ignore
# the Triton tiling).
_FORWARD_KERNELS = {
    "triton": (_triton_key_sums, _triton_walk),
    "mosaic": (lambda *a, tiling, **kw: mosaic_chunked.key_sums(*a, **kw),
               lambda *a, tiling, **kw: mosaic_chunked.walk(*a, **kw)),
}


def _forward(q, k, v, kv0, k0, lengths, opt):
  """y, den [B, H, T] and the final state, plus the segment start states for the backward.
  Without `opt.initial_state`, kv0, k0 are the zero state [1, 1, U, K], [1, 1, U], which the
  kernel does not read (no B H copies of zeros are made or converted to the kernel basis)."""
  sums, walk = _FORWARD_KERNELS[opt.forward_kernel]
  kw = dict(seg=opt.seg, tiling=opt.forward, interpret=opt.interpret)
  zero_start = not opt.initial_state
  kv_starts, k_starts = kv0[:, :, None], k0[:, :, None]
  if q.shape[1] > opt.seg:
    kv_sums, k_sums = sums(k, v, lengths, **kw)
    kv_starts, k_starts = _with_later_sums(kv_starts, kv_sums), _with_later_sums(k_starts, k_sums)
    zero_start = False  # the later segments start from their sums
  y, den, kv1, k1 = walk(q, k, v, kv_starts, k_starts, lengths, eps=opt.eps,
                         zero_start=zero_start, **kw)
  return y, den, kv1, k1, kv_starts, k_starts


def _backward(q, k, v, y, dy, den, kv_starts, k_starts, dkv1, dk1, lengths, opt):
  """Gradients of `_forward`; every kernel splits K into `block_d` column programs, and dq
  and dk are summed over the column blocks here. A zero state of leading dims [1, 1] (no
  initial state; an unused final state) is broadcast to every sequence and read: unlike the
  forward, dq and dkv do not start from constant zeros (slower there, see docs/kernels.md)."""
  seg, tiling, interpret = opt.seg, opt.backward, opt.interpret
  b, t, h, f = q.shape
  d, e, n = v.shape[-1], dkv1.shape[2], t // seg
  kv_starts, k_starts, dkv1, dk1 = (jnp.broadcast_to(x, (b, h, *x.shape[2:]))
                                    for x in (kv_starts, k_starts, dkv1, dk1))
  bd = min(tiling.block_d, d)
  grid = (b, h, n, d // bd)
  r = -jnp.sum(dy.astype(jnp.float32) * y.astype(jnp.float32), axis=-1).transpose(0, 2, 1) / den
  dkv_ends, dk_ends = dkv1[:, :, None], dk1[:, :, None]
  if n > 1:  # the cotangent each segment's end state gets from the queries of later segments
    dkv_sums, dk_sums = _call(
        _query_sums_kernel, tiling, interpret, grid=(b, h, n - 1, d // bd),
        in_specs=[_seq_spec(seg, f, shift=1), _seq_spec(seg, d, bd, shift=1),
                  _den_spec(seg, shift=1), _den_spec(seg, shift=1)],
        out_specs=list(_segment_state_specs(e, bd)),
        out_shape=_state_shapes(b, h, n - 1, e=e, d=d),
        name="taylor_attention_query_sums")(q, dy, den, r)
    dkv_ends = _with_later_sums(dkv_ends, dkv_sums, reverse=True)
    dk_ends = _with_later_sums(dk_ends, dk_sums, reverse=True)
  seq_specs = [_len_spec(), _seq_spec(seg, f), _seq_spec(seg, f), _seq_spec(seg, d, bd),
               _seq_spec(seg, d, bd), _den_spec(seg), _den_spec(seg)]
  shares = jax.ShapeDtypeStruct((d // bd, b, t, h, f), jnp.float32)  # per column block
  share_spec = pl.BlockSpec((None, None, seg, None, f), lambda b, h, s, j: (j, b, s, h, 0))
  dq = _call(
      _dq_kernel, tiling, interpret, grid=grid,
      in_specs=[*seq_specs, *_segment_state_specs(e, bd)], out_specs=share_spec,
      out_shape=shares, name="taylor_attention_dq")(
          lengths, q, k, v, dy, den, r, kv_starts, k_starts)
  dk, dv, dkv0, dk0 = _call(
      _dkv_kernel, tiling, interpret, grid=grid,
      in_specs=[*seq_specs, *_segment_state_specs(e, bd)],
      out_specs=[share_spec, _seq_spec(seg, d, bd), *_state_specs(e, bd)],
      out_shape=[shares, jax.ShapeDtypeStruct(v.shape, v.dtype), *_state_shapes(b, h, e=e, d=d)],
      name="taylor_attention_dkv")(lengths, q, k, v, dy, den, r, dkv_ends, dk_ends)
  return (jnp.sum(dq, axis=0).astype(q.dtype), jnp.sum(dk, axis=0).astype(k.dtype), dv, dkv0,
          dk0)


@dataclasses.dataclass(frozen=True)
class _Options:
  """Static settings of one call (hashable: the custom VJP's nondiff argument)."""
  eps: float
  seg: int
  forward: Tiling
  backward: Tiling
  interpret: bool
  initial_state: bool  # a state was given; else kv0, k0 are one [1, 1, ...] zero state
  forward_kernel: str  # a key of _FORWARD_KERNELS


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _attention(q, k, v, kv0, k0, lengths, opt):
  y, _, kv1, k1, _, _ = _forward(q, k, v, kv0, k0, lengths, opt)
  return y, kv1, k1


def _attention_fwd(*args):
  *primals, opt = args
  q, k, v, kv0, k0, lengths = (x.value for x in primals)  # symbolic_zeros: wrapped primals
  y, den, kv1, k1, kv_starts, k_starts = _forward(q, k, v, kv0, k0, lengths, opt)
  return (y, kv1, k1), (q, k, v, kv_starts, k_starts, lengths, y, den)


def _attention_bwd(opt, res, cotangents):
  """The final state's cotangent is a symbolic zero when only y is used (training), and
  without an initial state nobody needs its cotangent (None)."""
  q, k, v, kv_starts, k_starts, lengths, y, den = res
  dy, dkv1, dk1 = cotangents
  if isinstance(dy, SymbolicZero):
    dy = jnp.zeros_like(y)
  dkv1, dk1 = (jnp.zeros((1, 1, *x.shape[2:]), x.dtype) if isinstance(x, SymbolicZero) else x
               for x in (dkv1, dk1))
  dq, dk, dv, dkv0, dk0 = _backward(q, k, v, y, dy.astype(v.dtype), den, kv_starts, k_starts,
                                    dkv1, dk1, lengths, opt)
  return (dq, dk, dv, *((dkv0, dk0) if opt.initial_state else (None, None)), None)


_attention.defvjp(_attention_fwd, _attention_bwd, symbolic_zeros=True)


def chunked(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, state: TaylorState | None,
            lengths: jnp.ndarray, *, eps: float, forward: Tiling = FORWARD_TILING,
            backward: Tiling = BACKWARD_TILING, segment: int | None = None,
            interpret: bool = False,
            forward_kernel: str = "triton") -> tuple[jnp.ndarray, TaylorState]:
  """Causal Taylor linear attention through the Pallas kernels.

  Args:
    q, k: [B, T, H, F] (F a power of two); v: [B, T, H, K]; any T, any K.
    state: the initial state in the packed basis ([B, H, E, K] float32 or bf16 and float32
      [B, H, E], E = `feature_width(F)`), or None for zero (then no state is read, and none
      is broadcast to B H copies).
    lengths: [B] int32, valid leading tokens per sequence (later keys are ignored).
    eps: added to the normaliser.
    forward, backward: the tilings of the forward and the backward kernels.
    segment: tokens per program along time (rounded up to the larger chunk); None picks it
      from the shape (`segment_length`).
    interpret: run the kernels in the Pallas interpreter (CPU tests).
    forward_kernel: "triton" (this module's forward kernels, any GPU) or "mosaic" (those of
      `mosaic_chunked.py`, Hopper, 16-bit inputs; `forward` is then unused). The backward
      is this module's either way.

  Returns:
    y [B, T, H, K] in v's dtype and the final state; differentiable in q, k, v and state.
  """
  if forward_kernel not in _FORWARD_KERNELS:
    raise ValueError(f"forward_kernel must be one of {tuple(_FORWARD_KERNELS)}, got "
                     f"{forward_kernel!r}")
  b, t, h, f = q.shape
  d = v.shape[-1]
  mosaic = forward_kernel == "mosaic"
  seg = segment_length(b, h, t, max(mosaic_chunked.CHUNK if mosaic else forward.chunk,
                                    backward.chunk), segment)
  t_pad = -(-t // seg) * seg
  d_pad = max(pl.next_power_of_2(d), mosaic_chunked.BLOCK_D if mosaic else 1)
  pad_t = lambda x: jnp.pad(x, [(0, 0), (0, t_pad - t), (0, 0), (0, 0)]) if t_pad > t else x
  pad_d = lambda x: jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, d_pad - d)]) if d_pad > d else x
  options = _Options(eps=eps, seg=seg, forward=forward, backward=backward, interpret=interpret,
                     initial_state=state is not None, forward_kernel=forward_kernel)
  if state is None:
    e = sum(_block_sizes(f))
    cyclic = TaylorState(jnp.zeros((1, 1, e, d), jnp.float32), jnp.zeros((1, 1, e), jnp.float32))
  else:
    cyclic = TaylorState(*(_change_basis(x, f, cyclic_basis.to_kernel)
                           for x in for_compute(state)))
  y, kv, ks = _attention(pad_t(q), pad_t(k), pad_d(pad_t(v)), pad_d(cyclic.kv), cyclic.k,
                         lengths.astype(jnp.int32).reshape(b, 1), options)
  final = TaylorState(*(_change_basis(x, f, cyclic_basis.from_kernel)
                        for x in (kv[..., :d], ks)))
  return y[:, :t, :, :d], final if state is None else stored_like(final, state)


def _change_basis(x: jnp.ndarray, f: int, convert) -> jnp.ndarray:
  """A state [B, H, E or U, ...] with its quadratic rows (axis 2, after the 1 + F others)
  converted between the packed basis of `feature_map.py` and the kernels' cyclic one."""
  return jnp.concatenate([x[:, :, :1 + f], convert(x[:, :, 1 + f:], f, axis=2)], axis=2)
