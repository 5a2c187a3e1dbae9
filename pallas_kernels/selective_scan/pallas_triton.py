"""The selective scan as Pallas kernels (Triton lowering) that walk the tokens, with a custom VJP.

Letters: those of `based_jax/__init__.py`, with I the channels (Mamba's inner width), N the
state per channel (`ssm_state`; not the legend's generated tokens), and, local to these
kernels, BI the channels of one program and J = I / BI the channel blocks.

Forward. One program owns one (batch row, block of BI channels), grid (B, J). Its state h
[BI, N] is float32 and stays on chip (registers) while a `fori_loop` walks the T tokens in
order; per token it loads dt_t, x_t [BI] and b_t, c_t [N] and computes

    h = exp(dt_t a) * h + (dt_t x_t)[:, None] * b_t[None, :],    y_t = sum_n h * c_t,

writing y_t [BI]. The last h is the final state. For the backward it also writes the state
each token starts from, h_{t-1} (h0 at t = 0), to a float32 [B, T, I, N] residual: written
once here and read once there.

Backward. The same grid, walking the tokens in reverse with the cotangent g of the state
(float32 [BI, N], on chip), seeded with the final state's cotangent. At token t, with hp =
h_{t-1} (the residual), h = h_t (carried from the later token; the final state at T - 1) and
decay = exp(dt_t a):

    g += dy_t[:, None] * c_t[None, :]                   (g is now dL/dh_t)
    s = sum_n g * b_t,  q = g * hp * decay
    dx_t = dt_t s,  ddt_t = sum_n q * a + x_t s
    db_t = sum_i g * (dt_t x_t)[:, None],  dc_t = sum_i dy_t[:, None] * h
    da += q * dt_t[:, None],  then g *= decay           (dL/dh_{t-1} from h_t)

and at the end g is the initial state's cotangent. db and dc are sums over all I channels:
each program writes its block's share, [B, T, J, N], and XLA adds the J shares; da [BI, N]
sums over the tokens on chip, and XLA adds its [B, I, N] shares over the batch.

Shapes. T is anything (one token at a time; the loop runs T steps). The Triton lowering needs
power-of-two tiles, so `scan` zero-pads I to a multiple of BI (BI itself at most the next
power of two of I) and N to a power of two. Padding is exact: a padded channel has dt = x =
a = h0 = 0, so its state stays 0; a padded state entry has b = c = a = h0 = 0, so it stays 0
and adds 0 to y; their cotangents are cut off with the padding.

Roofline (MQAR, per layer: B = 256, T = 256, I = 256, N = 16). HBM traffic is dt, x and y
in the forward, dt, x, dy, ddt and dx in the backward (b, c and their shares are N-wide), about
0.55 GB, plus the 1.07 GB residual written once and read once: 2.7 GB, 0.6 ms at 4.8 TB/s.
The arithmetic, about 20 flops and 2 exponentials per (token, channel, state entry) forward
and backward, is 5.4 GFLOP and 0.5 G exponentials, about 0.1 ms each. A program's walk is a
chain of T dependent steps of a few small loads and [BI, N] elementwise products; B J = 2048
programs at BI = 32 keep many programs on every SM to cover the load latency.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt


@dataclasses.dataclass(frozen=True)
class Tiling:
  """How one kernel tiles its work (see the module docstring)."""
  block_i: int = 32  # BI: channels per program (a power of two; capped at I's next one)
  num_warps: int = 4  # Triton warps per program
  num_stages: int = 1  # Triton software-pipelining stages

  def __post_init__(self):
    x = self.block_i
    if not isinstance(x, int) or x < 1 or x & (x - 1):
      raise ValueError(f"Tiling.block_i must be a power of two >= 1, got {x!r}")
    if self.num_warps not in (1, 2, 4, 8, 16) or self.num_stages < 1:
      raise ValueError(f"bad Tiling num_warps={self.num_warps} num_stages={self.num_stages}")


# Not yet tuned on a GPU: a later GPU session times them (docs/kernels.md).
FORWARD_TILING = Tiling(block_i=32, num_warps=4, num_stages=1)
BACKWARD_TILING = Tiling(block_i=32, num_warps=4, num_stages=1)


# --- Kernels. Refs hold one (batch row, channel block): dt, x, y, dy [T, BI]; b, c [T, N];
# a [BI, N]; states [BI, N]; the residual [T, BI, N]; the db, dc shares [T, N].

def _forward_kernel(dt_ref, x_ref, b_ref, c_ref, a_ref, h0_ref, y_ref, final_ref, *starts_ref):
  """`starts_ref`, when given, takes the state each token starts from (the backward's)."""
  a = a_ref[...]

  def body(t, h):
    dt, x, b, c = dt_ref[t, :], x_ref[t, :], b_ref[t, :], c_ref[t, :]
    for ref in starts_ref:
      ref[t, :, :] = h
    h = jnp.exp(dt[:, None] * a) * h + (dt * x)[:, None] * b[None, :]
    y_ref[t, :] = jnp.sum(h * c[None, :], axis=1)
    return h

  final_ref[...] = jax.lax.fori_loop(0, dt_ref.shape[0], body, h0_ref[...])


def _backward_kernel(dt_ref, x_ref, b_ref, c_ref, a_ref, starts_ref, final_ref, dy_ref,
                     dfinal_ref, ddt_ref, dx_ref, db_ref, dc_ref, da_ref, dh0_ref):
  """This block's dt, x cotangents, its shares of the b, c cotangents, its batch row's share
  of a's cotangent and the initial state's cotangent."""
  a, n_tokens = a_ref[...], dt_ref.shape[0]

  def body(i, carry):
    g, h, da = carry  # dL/dh_t from the later tokens, h_t, the sum of a's cotangent
    t = n_tokens - 1 - i
    dt, x, b, c, dy = dt_ref[t, :], x_ref[t, :], b_ref[t, :], c_ref[t, :], dy_ref[t, :]
    hp = starts_ref[t, :, :]
    decay = jnp.exp(dt[:, None] * a)
    g = g + dy[:, None] * c[None, :]
    s = jnp.sum(g * b[None, :], axis=1)
    q = g * hp * decay
    dx_ref[t, :] = dt * s
    ddt_ref[t, :] = jnp.sum(q * a, axis=1) + x * s
    db_ref[t, :] = jnp.sum(g * (dt * x)[:, None], axis=0)
    dc_ref[t, :] = jnp.sum(dy[:, None] * h, axis=0)
    return g * decay, hp, da + q * dt[:, None]

  g, _, da = jax.lax.fori_loop(0, n_tokens, body,
                               (dfinal_ref[...], final_ref[...], jnp.zeros_like(a)))
  da_ref[...] = da
  dh0_ref[...] = g


# --- pallas_call wrappers over [B, T, I, ...] arrays (I a multiple of BI, N a power of 2) ---

def _channels_spec(t, bi):
  """[B, T, I] -> one row's [T, BI] channel block."""
  return pl.BlockSpec((None, t, bi), lambda b, j: (b, 0, j))


def _tokens_spec(t, n):
  """[B, T, N] -> one row's [T, N] (every channel block reads it)."""
  return pl.BlockSpec((None, t, n), lambda b, j: (b, 0, 0))


def _a_spec(bi, n):
  return pl.BlockSpec((bi, n), lambda b, j: (j, 0))


def _state_spec(bi, n):
  """[B, I, N] -> one row's [BI, N]."""
  return pl.BlockSpec((None, bi, n), lambda b, j: (b, j, 0))


def _call(kernel, tiling, interpret, **kw):
  return pl.pallas_call(
      kernel, compiler_params=plt.CompilerParams(num_warps=tiling.num_warps,
                                                 num_stages=tiling.num_stages),
      interpret=interpret, **kw)


def _forward(dt, x, b_in, c_out, a, h0, opt, save_starts):
  """y [B, T, I], the final state [B, I, N] and, with `save_starts`, the state each token
  starts from [B, T, I, N]."""
  bsz, t, inner = dt.shape
  n, bi = b_in.shape[-1], opt.forward.block_i
  f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
  out_specs = [_channels_spec(t, bi), _state_spec(bi, n)]
  out_shape = [f32(bsz, t, inner), f32(bsz, inner, n)]
  if save_starts:
    out_specs.append(pl.BlockSpec((None, t, bi, n), lambda b, j: (b, 0, j, 0)))
    out_shape.append(f32(bsz, t, inner, n))
  return _call(
      _forward_kernel, opt.forward, opt.interpret, grid=(bsz, inner // bi),
      in_specs=[_channels_spec(t, bi), _channels_spec(t, bi), _tokens_spec(t, n),
                _tokens_spec(t, n), _a_spec(bi, n), _state_spec(bi, n)],
      out_specs=out_specs, out_shape=out_shape, name="selective_scan_fwd")(
          dt, x, b_in, c_out, a, h0)


def _backward(dt, x, b_in, c_out, a, starts, final, dy, dfinal, opt):
  """Cotangents of dt, x, b_in, c_out, a and h0; the shares of db, dc and da summed here."""
  bsz, t, inner = dt.shape
  n, bi = b_in.shape[-1], opt.backward.block_i
  blocks = inner // bi
  f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
  share_spec = pl.BlockSpec((None, t, None, n), lambda b, j: (b, 0, j, 0))
  ddt, dx, db, dc, da, dh0 = _call(
      _backward_kernel, opt.backward, opt.interpret, grid=(bsz, blocks),
      in_specs=[_channels_spec(t, bi), _channels_spec(t, bi), _tokens_spec(t, n),
                _tokens_spec(t, n), _a_spec(bi, n),
                pl.BlockSpec((None, t, bi, n), lambda b, j: (b, 0, j, 0)),
                _state_spec(bi, n), _channels_spec(t, bi), _state_spec(bi, n)],
      out_specs=[_channels_spec(t, bi), _channels_spec(t, bi), share_spec, share_spec,
                 _state_spec(bi, n), _state_spec(bi, n)],
      out_shape=[f32(bsz, t, inner), f32(bsz, t, inner), f32(bsz, t, blocks, n),
                 f32(bsz, t, blocks, n), f32(bsz, inner, n), f32(bsz, inner, n)],
      name="selective_scan_bwd")(dt, x, b_in, c_out, a, starts, final, dy, dfinal)
  return ddt, dx, jnp.sum(db, axis=2), jnp.sum(dc, axis=2), jnp.sum(da, axis=0), dh0


@dataclasses.dataclass(frozen=True)
class _Options:
  """Static settings of one call (hashable: the custom VJP's nondiff argument)."""
  forward: Tiling
  backward: Tiling
  interpret: bool


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _scan(dt, x, b_in, c_out, a, h0, opt):
  return tuple(_forward(dt, x, b_in, c_out, a, h0, opt, save_starts=False))


def _scan_fwd(dt, x, b_in, c_out, a, h0, opt):
  y, final, starts = _forward(dt, x, b_in, c_out, a, h0, opt, save_starts=True)
  return (y, final), (dt, x, b_in, c_out, a, starts, final)


def _scan_bwd(opt, res, cotangents):
  dy, dfinal = cotangents
  return _backward(*res, dy, dfinal, opt)


_scan.defvjp(_scan_fwd, _scan_bwd)


def _block_size(tiling: Tiling, inner: int) -> Tiling:
  """The tiling with BI capped at the next power of two of I."""
  return dataclasses.replace(tiling, block_i=min(tiling.block_i, pl.next_power_of_2(inner)))


def scan(dt: jnp.ndarray, x: jnp.ndarray, b_in: jnp.ndarray, c_out: jnp.ndarray,
         a: jnp.ndarray, h0: jnp.ndarray, *, forward: Tiling = FORWARD_TILING,
         backward: Tiling = BACKWARD_TILING,
         interpret: bool = False) -> tuple[jnp.ndarray, jnp.ndarray]:
  """The selective scan through the Pallas kernels, differentiable in every input.

  Args:
    dt, x: [B, T, I]; b_in, c_out: [B, T, N]; a: [I, N] (negative); h0: [B, I, N]; any
      float dtype (the arithmetic is float32), any T >= 1, I and N.
    forward, backward: the tilings of the forward and the backward kernel.
    interpret: run the kernels in the Pallas interpreter (CPU tests).

  Returns:
    y [B, T, I] and the final state [B, I, N], float32.
  """
  inner, n = a.shape
  forward, backward = _block_size(forward, inner), _block_size(backward, inner)
  block = max(forward.block_i, backward.block_i)  # a multiple of the other (powers of two)
  i_pad = -(-inner // block) * block
  n_pad = pl.next_power_of_2(n)

  def pad(v, *widths):  # zeros after the last entries of the trailing axes
    v = v.astype(jnp.float32)
    lead = [(0, 0)] * (v.ndim - len(widths))
    return jnp.pad(v, lead + [(0, w - s) for w, s in zip(widths, v.shape[-len(widths):])])

  y, final = _scan(pad(dt, i_pad), pad(x, i_pad), pad(b_in, n_pad), pad(c_out, n_pad),
                   pad(a, i_pad, n_pad), pad(h0, i_pad, n_pad),
                   _Options(forward=forward, backward=backward, interpret=interpret))
  return y[..., :inner], final[:, :inner, :n]
