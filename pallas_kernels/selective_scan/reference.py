"""The selective scan in plain JAX: an associative scan inside chunks, a sequential scan across.

Letters: those of `based_jax/__init__.py`, with I the channels (Mamba's inner width) and N the
state per channel (`ssm_state`; not the legend's generated tokens).

Within a chunk of C tokens the recurrence h_t = decay_t h_{t-1} + drive_t (decay_t =
exp(dt_t a), drive_t = dt_t x_t b_t, all [B, I, N]) is the composition of affine maps, which
`jax.lax.associative_scan` combines in log2 C levels, every level a [B, C, I, N] block; the
state entering the chunk joins its first drive. A `lax.scan` carries the state across chunks,
rematerialising each chunk's blocks in the backward (autodiff). Time is zero-padded to whole
chunks: dt = 0 is the identity step.
"""

import jax
import jax.numpy as jnp

CHUNK = 64  # C: tokens per associative scan


def _combine(left, right):
  a1, b1 = left
  a2, b2 = right
  return a1 * a2, a2 * b1 + b2


def associative_scan(dt, x, b_in, c_out, a, h0, chunk: int = CHUNK):
  """h_t = exp(dt_t a) h_{t-1} + dt_t x_t b_t, y_t = c_t . h_t over T >= 1 tokens.

  Args:
    dt, x: [B, T, I]; b_in, c_out: [B, T, N]; a: [I, N] (negative); h0: [B, I, N]. The
      arithmetic takes their dtype (float32 in Mamba).
    chunk: C, tokens per associative scan.

  Returns:
    y [B, T, I] and the final state [B, I, N].
  """
  bsz, t, inner = x.shape
  c = min(chunk, t)
  n = -(-t // c)

  def split(v):  # zero padding: dt = 0 is the identity step
    v = jnp.pad(v, [(0, 0), (0, n * c - t), (0, 0)])
    return jnp.moveaxis(v.reshape(bsz, n, c, v.shape[-1]), 1, 0)

  def body(h, xs):
    dtc, xc, bc, cc = xs
    decay = jnp.exp(dtc[..., None] * a)  # [B, C, I, N]
    drive = (dtc * xc)[..., None] * bc[:, :, None, :]
    drive = drive.at[:, 0].add(decay[:, 0] * h)
    _, hs = jax.lax.associative_scan(_combine, (decay, drive), axis=1)
    return hs[:, -1], jnp.einsum("bcin,bcn->bci", hs, cc)

  final, ys = jax.lax.scan(jax.checkpoint(body), h0,
                           (split(dt), split(x), split(b_in), split(c_out)))
  return jnp.moveaxis(ys, 0, 1).reshape(bsz, n * c, inner)[:, :t], final
