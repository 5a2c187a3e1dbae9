"""The chunked forward of causal Taylor linear attention as Pallas Mosaic GPU kernels (Hopper).

Shapes use the dimension letters of `based_jax/__init__.py` (here F = 16, C = 64), and L, G, U
of `pallas_chunked.py` (segment length, segments, the cyclic basis's 1 + 2F + F^2/2 rows).
Letters local to these kernels:

    M  panels: the state's rows in blocks of 64 (3 at F = 16)    J  value columns per program

`pallas_chunked.chunked(..., forward_kernel="mosaic")` runs these kernels for its forward
pass, with its segment scheme, custom VJP and Triton backward; they take and return states in
its cyclic basis (`to_panels`, `from_panels` convert).

Basis. Every product is a warpgroup MMA (wgmma) of [64, 64]-sized tiles, so the features and
the state are cut into M = 3 panels of 64 rows: panel 0 holds the cyclic basis's first 1 + 2F
rows [1, x_i, x_i^2] and zeros, panels 1-2 its F^2/2 off-diagonal products (`cyclic_basis.py`).
The query side's features carry no weights and the key side's carry the squares of the
packed basis's (1/4, 1/32, 1/16 at F = 16): powers of two, exact in bf16, with
phi_q(q) . phi_k(k) = 1 + s + s^2 / 2, s = q . k / sqrt F. So a panel-basis state row is the
cyclic one times that row's packed weight. A panel is X * Y of two wgmma products of the
[C, F] tile with constant 0/1 spreading matrices (`spreading`); the key side's is formed
transposed ([64, C], keys along columns) from k^T, which is what the state update takes.

Walk. A program owns one (batch, head, segment, block of J value columns) and walks its
segment C tokens at a time from the segment's start state, the next chunk's q, k^T and v
arriving by TMA into a second buffer while the current chunk computes:

    w = causal(1 + s + s^2 / 2)  [C, C]             (s: one wgmma of q k^T)
    num = w @ v + sum_m phi_q,m @ S_m,  den = rowsum w + sum_m phi_q,m . z_m + eps,  y = num / den
    S_m += phi_k,m^T @ v,  z_m += rowsum phi_k,m^T   (keys past the length masked)

S (float32 [64, J] per panel) and z stay in registers for the walk; each chunk copies S to
shared memory in bf16 for the query side's products (as the Triton kernels round their
state for theirs) and z in float32, which the normaliser reads exactly. With G > 1 segments a
first pass of the same kernel without queries sums each segment's keys (`key_sums`).

Every wgmma operand is in shared memory, with equal swizzles on both sides (32 bytes for the
[., F] and [F, .] tiles, 128 for the rest): the Pallas GPU interpreter that runs these kernels
on CPU takes no register operand and no transposed one (hence k^T, an XLA transpose of k).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.taylor_attention import cyclic_basis

CHUNK = 64  # C: tokens per step of a walk (the wgmma M)
PANEL = 64  # state rows per panel
BLOCK_D = 64  # J: value columns per program (128-byte rows of bf16, the wide swizzle)


def panel_count(f: int) -> int:
  """M: one panel for [1, x, x^2] and F^2/2 / 64 for the off-diagonal products."""
  if 1 + 2 * f > PANEL or cyclic_basis.off_width(f) % PANEL:
    raise ValueError(f"the Mosaic kernels need F = 16 or 8-fold F^2 / 2 panels, got F={f}")
  return 1 + cyclic_basis.off_width(f) // PANEL


def _key_weights(f: int) -> tuple[float, float, float]:
  """The key side's weights of the linear, diagonal and off-diagonal rows: the squares of the
  packed basis's (F^-1/4, 1 / sqrt(2F), F^-1/2)."""
  return f ** -0.5, 0.5 / f, 1.0 / f


def spreading(f: int) -> tuple[np.ndarray, np.ndarray]:
  """The 0/1 matrices (X, Y) [M, F, 64]: panel m of phi(x) is (x @ X[m]) * (x @ Y[m]) but for
  the small panel's constant and linear rows (taken from x @ X[0] alone) and the weights.
  Panel 0 puts x_i at rows 1 + i (X) and 1 + F + i (X and Y); panels 1.. are
  `cyclic_basis.spreading_rows`'s tile and roll."""
  m = panel_count(f)
  x, y = np.zeros((m, f, PANEL), np.float32), np.zeros((m, f, PANEL), np.float32)
  i = np.arange(f)
  x[0, i, 1 + i] = x[0, i, 1 + f + i] = y[0, i, 1 + f + i] = 1.0
  cols = np.arange(cyclic_basis.off_width(f))
  tile, roll = cyclic_basis.spreading_rows(f, cols[None, :], i[:, None])
  x[1:] = tile.reshape(f, m - 1, PANEL).transpose(1, 0, 2)
  y[1:] = roll.reshape(f, m - 1, PANEL).transpose(1, 0, 2)
  return x, y


def _row_scales(f: int) -> np.ndarray:
  """[U]: a panel-basis state row over the cyclic one (the row's packed weight)."""
  lin, diag, off = (w ** 0.5 for w in _key_weights(f))
  return np.concatenate([[1.0], np.full(f, lin), np.full(f, diag),
                         np.full(cyclic_basis.off_width(f), off)])


def _along(x: np.ndarray, ndim: int, axis: int) -> np.ndarray:
  return x.reshape((-1,) + (1,) * (ndim - 1 - axis)).astype(np.float32)


def to_panels(x: jnp.ndarray, f: int, axis: int) -> jnp.ndarray:
  """A state's U cyclic-basis rows along `axis` -> the M * 64 panel-basis rows."""
  x = x * _along(_row_scales(f), x.ndim, axis)
  small = 1 + 2 * f
  pad = [(0, 0)] * x.ndim
  pad[axis] = (0, PANEL - small)
  head, tail = jnp.split(x, [small], axis=axis)
  return jnp.concatenate([jnp.pad(head, pad), tail], axis=axis)


def from_panels(x: jnp.ndarray, f: int, axis: int) -> jnp.ndarray:
  """`to_panels`'s inverse (the zero rows of panel 0 dropped)."""
  head, _, tail = jnp.split(x, [1 + 2 * f, PANEL], axis=axis)
  return jnp.concatenate([head, tail], axis=axis) / _along(_row_scales(f), x.ndim, axis)


def _swizzled(width_bytes: int, itemsize: int = 2):
  """SMEM transforms for tiles with rows of `width_bytes` (swizzle = row bytes, at most 128)."""
  swizzle = min(128, width_bytes)
  return (plgpu.TilingTransform((8, swizzle // itemsize)), plgpu.SwizzleTransform(swizzle))


def _matmul(a, b, shape) -> jax.Array:
  """a @ b [M, N] float32: one wgmma of two shared-memory operands."""
  def run(acc_ref):
    plgpu.wgmma(acc_ref, a, b)
    return acc_ref[...]
  return pl.run_scoped(run, plgpu.ACC(shape, jnp.float32))


def _zeros(shape, layout=plgpu.Layout.WGMMA):
  return plgpu.layout_cast(jnp.zeros(shape, jnp.float32), layout)


def _iota(shape, dim):
  return plgpu.broadcasted_iota(jnp.int32, shape, dim, layout=plgpu.Layout.WGMMA)


def _panel(x, y, m, f, weights, feature_axis):
  """Panel m of phi from the spread products x, y (float32, features along `feature_axis`)."""
  lin, diag, off = weights
  if m:
    return x * y * off
  i = _iota(x.shape, feature_axis)
  return jnp.where(i == 0, 1.0, jnp.where(i < 1 + f, x * lin, x * y * diag))


def _kernel(*refs, f, seg, eps, queries, zero_start, dtype):
  """One (batch, head, segment, J value columns): the walk of the module docstring, or with
  `queries` False the key sums of a segment (refs without q, the outputs, the start state)."""
  if queries:
    (len_gmem, q_gmem, kt_gmem, v_gmem, xs_gmem, ys_gmem, xst_gmem, yst_gmem, s0_gmem, z0_gmem,
     y_gmem, den_gmem, s1_gmem, z1_gmem) = refs
  else:
    len_gmem, kt_gmem, v_gmem, xst_gmem, yst_gmem, s1_gmem, z1_gmem = refs
  b, h, g, j = (lax.axis_index(a) for a in "bhgj")
  chunks, panels, n = seg // CHUNK, panel_count(f), BLOCK_D
  length, cols, start = len_gmem[b], pl.ds(j * n, n), g * seg

  def walk(consts, q_buf, kt_buf, v_buf, y_buf, den_buf, w_smem, phi_smem, s_smem, z_smem,
           stage, const_bar, start_bar, q_bar, kt_bar, v_bar):
    xs, ys, xst, yst = consts
    sources = (xs_gmem, ys_gmem, xst_gmem, yst_gmem) if queries else (xst_gmem, yst_gmem)
    dests = (xs, ys, xst, yst) if queries else (xst, yst)
    for i, (src, dst) in enumerate(zip(sources, dests)):
      plgpu.copy_gmem_to_smem(src, dst, const_bar.at[i])

    def fetch(c, slot):
      """Starts the TMA copies of chunk c's inputs into buffer slot `slot`."""
      rows = pl.ds(start + c * CHUNK, CHUNK)
      if queries:
        plgpu.copy_gmem_to_smem(q_gmem.at[b, rows, h], q_buf.at[slot], q_bar.at[slot])
      plgpu.copy_gmem_to_smem(kt_gmem.at[b, h, :, rows], kt_buf.at[slot], kt_bar.at[slot])
      plgpu.copy_gmem_to_smem(v_gmem.at[b, rows, h, cols], v_buf.at[slot], v_bar.at[slot])

    def publish(s, z):
      """The state to shared memory for the next chunk's query side: S in bf16 for its
      products, z in float32 (read back along the features)."""
      for m in range(panels):
        s_smem[m] = s[m].astype(dtype)
        z_smem[m] = z[m]
      plgpu.commit_smem()

    def outputs(slot, t0, q_smem, kt_smem, v_smem):
      """y and den of the chunk at t0 from the chunk-local weights and the state in shared memory."""
      qk = _matmul(q_smem, kt_smem, (CHUNK, CHUNK))
      keep = (col <= row) & (t0 + col < length)
      w = jnp.where(keep, 1.0 + qk * (f ** -0.5) + qk * qk * (0.5 / f), 0.0)
      den = w.sum(axis=1) + eps
      w_smem[...] = w.astype(dtype)
      for m in range(panels):
        phi = _panel(_matmul(q_smem, xs.at[m], (CHUNK, PANEL)),
                     _matmul(q_smem, ys.at[m], (CHUNK, PANEL)), m, f, (1.0, 1.0, 1.0), 1)
        zm = plgpu.layout_cast(z_smem[m], plgpu.Layout.WGMMA.reduce(0))
        den += (phi * lax.broadcast_in_dim(zm, phi.shape, [1])).sum(axis=1)
        phi_smem[m] = phi.astype(dtype)
      plgpu.commit_smem()
      num = _matmul(w_smem, v_smem, (CHUNK, n))
      for m in range(panels):
        num += _matmul(phi_smem.at[m], s_smem.at[m], (CHUNK, n))
      plgpu.wait_smem_to_gmem(2, wait_read_only=True)  # the slot's stores of 2 chunks ago left
      y_buf[slot] = (num / lax.broadcast_in_dim(den, num.shape, [0])).astype(y_buf.dtype)
      den_buf[slot] = den
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(y_buf.at[slot], y_gmem.at[b, pl.ds(t0, CHUNK), h, cols])
      plgpu.copy_smem_to_gmem(den_buf.at[slot], den_gmem.at[b, h, pl.ds(t0, CHUNK)])

    def step(c, carry):
      s, z = carry
      slot, t0 = c % 2, start + c * CHUNK
      for bar in (q_bar, kt_bar, v_bar) if queries else (kt_bar, v_bar):
        plgpu.barrier_wait(bar.at[slot])
      kt_smem, v_smem = kt_buf.at[slot], v_buf.at[slot]
      if queries:
        outputs(slot, t0, q_buf.at[slot], kt_smem, v_smem)
      # The chunk's valid keys join the state. phi_smem takes phi_k^T: the query side's
      # products have completed (a wgmma result is read only after it has).
      key_valid = (t0 + _iota((PANEL, CHUNK), 1)) < length
      s, z = list(s), list(z)
      for m in range(panels):
        phi = _panel(_matmul(xst.at[m], kt_smem, (PANEL, CHUNK)),
                     _matmul(yst.at[m], kt_smem, (PANEL, CHUNK)), m, f, _key_weights(f), 0)
        phi = jnp.where(key_valid, phi, 0.0)
        z[m] += phi.sum(axis=1)
        phi_smem[m] = phi.astype(dtype)
      plgpu.commit_smem()
      for m in range(panels):
        s[m] += _matmul(phi_smem.at[m], v_smem, (PANEL, n))
      if queries:
        publish(s, z)
      pl.when(c + 2 < chunks)(lambda: fetch(c + 2, slot))  # the slot's inputs are used up
      return tuple(s), tuple(z)

    fetch(0, 0)
    if chunks > 1:
      fetch(1, 1)
    row, col = _iota((CHUNK, CHUNK), 0), _iota((CHUNK, CHUNK), 1)
    if zero_start or not queries:
      s = tuple(_zeros((PANEL, n)) for _ in range(panels))
      z = tuple(_zeros((PANEL,), plgpu.Layout.WGMMA.reduce(1)) for _ in range(panels))
    else:  # the segment's start state, staged through shared memory a panel at a time
      s, z = [], []
      for m in range(panels):
        if m:
          plgpu.commit_smem()  # every thread has read the previous panel out of `stage`
        rows = pl.ds(m * PANEL, PANEL)
        plgpu.copy_gmem_to_smem(s0_gmem.at[b, h, g, rows, cols], stage, start_bar.at[0])
        plgpu.copy_gmem_to_smem(z0_gmem.at[b, h, g, rows], z_smem.at[m], start_bar.at[1])
        plgpu.barrier_wait(start_bar.at[0])
        plgpu.barrier_wait(start_bar.at[1])
        s.append(plgpu.layout_cast(stage[...], plgpu.Layout.WGMMA))
        z.append(plgpu.layout_cast(z_smem[m], plgpu.Layout.WGMMA.reduce(1)))
    if queries:
      publish(s, z)
    for i in range(len(sources)):
      plgpu.barrier_wait(const_bar.at[i])
    s, z = lax.fori_loop(0, chunks, step, (tuple(s), tuple(z)))
    plgpu.wait_smem_to_gmem(0)
    last = g == pl.num_programs(2) - 1 if queries else True  # the final state, or every sum

    @pl.when(last)
    def _():
      idx = (b, h) if queries else (b, h, g)
      for m in range(panels):
        s1_gmem[(*idx, pl.ds(m * PANEL, PANEL), cols)] = s[m]
        z1_gmem[(*idx, pl.ds(m * PANEL, PANEL))] = z[m]

  narrow = _swizzled(32)  # rows of F bf16
  wide = lambda width: _swizzled(width * 2)  # noqa: E731
  consts = (plgpu.SMEM((panels, f, PANEL), dtype, transforms=narrow),  # X, Y
            plgpu.SMEM((panels, f, PANEL), dtype, transforms=narrow),
            plgpu.SMEM((panels, PANEL, f), dtype, transforms=narrow),  # X^T, Y^T
            plgpu.SMEM((panels, PANEL, f), dtype, transforms=narrow))
  if not queries:
    consts = (None, None, *consts[2:])
  pl.run_scoped(
      walk, consts,
      plgpu.SMEM((2, CHUNK, f), dtype, transforms=narrow) if queries else None,  # q
      plgpu.SMEM((2, f, CHUNK), dtype, transforms=narrow),  # k^T
      plgpu.SMEM((2, CHUNK, n), dtype, transforms=wide(n)),  # v
      plgpu.SMEM((2, CHUNK, n), dtype, transforms=wide(n)) if queries else None,  # y
      plgpu.SMEM((2, CHUNK), jnp.float32) if queries else None,  # den
      plgpu.SMEM((CHUNK, CHUNK), dtype, transforms=wide(CHUNK)) if queries else None,  # w
      plgpu.SMEM((panels, CHUNK, PANEL), dtype, transforms=wide(PANEL)),  # phi_q, phi_k^T
      plgpu.SMEM((panels, PANEL, n), dtype, transforms=wide(n)) if queries else None,  # S
      plgpu.SMEM((panels, PANEL), jnp.float32) if queries else None,  # z
      plgpu.SMEM((PANEL, n), jnp.float32, transforms=_swizzled(n * 4, 4))  # a start panel
      if queries and not zero_start else None,
      plgpu.Barrier(num_barriers=4),
      plgpu.Barrier(num_barriers=2),
      *[plgpu.Barrier(num_barriers=2)] * 3,
  )


@functools.cache
def interpret_params():
  """The Pallas GPU interpreter's settings, with the one lowering it lacks on CPU: a layout
  cast (a no-op on values), registered once."""
  from jax._src.interpreters import mlir  # pylint: disable=import-outside-toplevel
  from jax._src.pallas.mosaic_gpu import core  # pylint: disable=import-outside-toplevel
  from jax._src.pallas.mosaic_gpu.interpret import params  # pylint: disable=import-outside-toplevel
  mlir.register_lowering(core.layout_cast_p, lambda ctx, x, **_: [x], platform="cpu")
  return params.InterpretGPUParams()


def _constants(f, dtype, transposed):
  xs, ys = (jnp.asarray(x, dtype) for x in spreading(f))
  return (xs.transpose(0, 2, 1), ys.transpose(0, 2, 1)) if transposed else (xs, ys)


def _launch(queries, args, out_type, *, b, h, g, d, f, seg, eps=0.0, zero_start=True,
            interpret=False):
  kernel = functools.partial(_kernel, f=f, seg=seg, eps=eps, queries=queries,
                             zero_start=zero_start, dtype=args[1].dtype)
  return plgpu.kernel(kernel, out_type=out_type, grid=(b, h, g, d // BLOCK_D),
                      grid_names=tuple("bhgj"),
                      interpret=interpret_params() if interpret else None)(*args)


def key_sums(k, v, lengths, *, seg: int, interpret: bool = False):
  """The sums of phi(k) v^T [B, H, G - 1, U, K] and phi(k) [B, H, G - 1, U] over each of the
  first G - 1 segments' valid keys, in the cyclic basis (k [B, T, H, F], v [B, T, H, K] of
  one 16-bit dtype, T = G L, K a multiple of J, lengths [B, 1] int32)."""
  b, t, h, f = k.shape
  d, g, rows = v.shape[-1], t // seg - 1, panel_count(f) * PANEL
  kv, ks = _launch(
      False, (lengths[:, 0], k.transpose(0, 2, 3, 1), v, *_constants(f, k.dtype, True)),
      (jax.ShapeDtypeStruct((b, h, g, rows, d), jnp.float32),
       jax.ShapeDtypeStruct((b, h, g, rows), jnp.float32)),
      b=b, h=h, g=g, d=d, f=f, seg=seg, interpret=interpret)
  return from_panels(kv, f, axis=3), from_panels(ks, f, axis=3)


def walk(q, k, v, kv_starts, k_starts, lengths, *, seg: int, eps: float, zero_start: bool,
         interpret: bool = False):
  """y [B, T, H, K], den [B, H, T] and the final state ([B, H, U, K], [B, H, U]) from each
  segment's start state (kv_starts [B, H, G, U, K], k_starts [B, H, G, U] in the cyclic basis;
  unread and of leading dims [1, 1, 1] with `zero_start`); shapes and dtypes as `key_sums`."""
  b, t, h, f = q.shape
  d, rows = v.shape[-1], panel_count(f) * PANEL
  s0, z0 = to_panels(kv_starts, f, axis=3), to_panels(k_starts, f, axis=3)
  y, den, kv1, k1 = _launch(
      True, (lengths[:, 0], q, k.transpose(0, 2, 3, 1), v, *_constants(f, q.dtype, False),
             *_constants(f, q.dtype, True), s0, z0),
      (jax.ShapeDtypeStruct(v.shape, v.dtype), jax.ShapeDtypeStruct((b, h, t), jnp.float32),
       jax.ShapeDtypeStruct((b, h, rows, d), jnp.float32),
       jax.ShapeDtypeStruct((b, h, rows), jnp.float32)),
      b=b, h=h, g=t // seg, d=d, f=f, seg=seg, eps=eps, zero_start=zero_start,
      interpret=interpret)
  return y, den, from_panels(kv1, f, axis=2), from_panels(k1, f, axis=2)
