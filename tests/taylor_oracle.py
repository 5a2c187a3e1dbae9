"""The test oracle of Taylor linear attention, shared by the reference and kernel tests: an
independent float64 NumPy loop written from the paper's formulas alone, and the error metric."""

import numpy as np


def numpy_taylor_attention(q, k, v, kv0=None, k0=None, eps=1e-6):
  """Float64 loop over time, written from the paper's formulas alone."""
  b, t, h, f = q.shape
  d = v.shape[-1]

  def phi(x):  # [1, x / F^(1/4), x_i x_j w_ij / sqrt(F) for i <= j], w_ii = 1/sqrt(2), else 1
    quad = [x[..., i] * x[..., j] * (2**-0.5 if i == j else 1.0) / np.sqrt(f)
            for i in range(f) for j in range(i, f)]
    return np.concatenate([np.ones(x.shape[:-1] + (1,)), x / f**0.25,
                           np.stack(quad, axis=-1)], axis=-1)

  e = 1 + f + f * (f + 1) // 2
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  kv = np.zeros((b, h, e, d)) if kv0 is None else np.asarray(kv0, np.float64).copy()
  ks = np.zeros((b, h, e)) if k0 is None else np.asarray(k0, np.float64).copy()
  y = np.zeros((b, t, h, d))
  for i in range(t):
    pk, pq = phi(k[:, i]), phi(q[:, i])
    kv += pk[..., :, None] * v[:, i, :, None, :]
    ks += pk
    y[:, i] = np.einsum("bhe,bhed->bhd", pq, kv) / (np.einsum("bhe,bhe->bh", pq, ks)[..., None]
                                                      + eps)
  return y, kv, ks


def rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.linalg.norm(a - b) / np.linalg.norm(b)
