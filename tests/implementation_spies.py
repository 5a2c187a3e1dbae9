"""Spies on the functions behind every mixer implementation, so that a test can check what a
resolver answers against what runs."""

import jax
import jax.numpy as jnp
import numpy as np
from jax._src.cudnn import fused_attention_stablehlo as cudnn

from based_jax.mixers import attention
from pallas_kernels.cache_attention import pallas_triton as cache_kernel
from pallas_kernels.cache_attention import reference as cache_reference
from pallas_kernels.taylor_attention import pallas_chunked, pallas_decode, reference, xla
from pallas_kernels.taylor_attention import triton_decode


def cudnn_decode_stand_in(q, k, v, q_seqlen, kv_seqlen, *, scale, mask_type, qkv_layout):
  """Plain math with the contract of cuDNN's kernel as the decode path calls it (BNTH layout,
  one query per row, keys beyond kv_seqlen ignored): cuDNN is absent on a CPU."""
  assert qkv_layout == "BNTH" and mask_type == cudnn.MaskType.PADDING
  assert q.shape[2] == 1 and q_seqlen.shape == (q.shape[0],)
  assert isinstance(q_seqlen, jax.core.Tracer) or np.all(np.asarray(q_seqlen) == 1)
  logits = jnp.einsum("bhtk,bhsk->bhts", q, k) * scale
  keep = jnp.arange(k.shape[2])[None, :] < kv_seqlen[:, None]
  weights = jax.nn.softmax(jnp.where(keep[:, None, None], logits, -jnp.inf), axis=-1)
  return jnp.einsum("bhts,bhsk->bhtk", weights, v)


def spy_implementations(monkeypatch) -> list[tuple[str, str]]:
  """Makes each implementation's function append (mixer, implementation) to the returned list
  when called, then run on this CPU:
    linear_attention: pallas_chunked.chunked ('pallas', or 'mosaic' with the Mosaic
      forward) and pallas_decode.step ('pallas'), '_interpret' added when asked to interpret
      (they run interpreted), triton_decode.step
      ('triton'; runs the Pallas step), reference.quadratic, xla.chunked and
      reference.feature_step ('xla');
    attention: jax.nn.dot_product_attention (its `implementation`; runs XLA),
      _masked_attention ('xla'), cache_attention's reference ('xla') and kernel ('pallas',
      '_interpret' added when asked; runs interpreted) and cuDNN's decode kernel ('cudnn';
      runs the stand-in).
  Jit caches are cleared, so everything is traced through the spies.
  """
  calls = []

  def kernel(module, name, label, run, mixer="linear_attention"):
    def spy(*args, interpret=False, **kwargs):
      name = "mosaic" if kwargs.get("forward_kernel") == "mosaic" else label
      calls.append((mixer, f"{name}_interpret" if interpret else name))
      return run(*args, interpret=True, **kwargs)
    monkeypatch.setattr(module, name, spy)

  def recorded(module, name, mixer, implementation):
    real = getattr(module, name)

    def spy(*args, **kwargs):
      calls.append((mixer, implementation))
      return real(*args, **kwargs)
    monkeypatch.setattr(module, name, spy)

  real_dot_product_attention = jax.nn.dot_product_attention

  def dot_product_attention(*args, implementation=None, **kwargs):
    calls.append(("attention", implementation))
    return real_dot_product_attention(*args, implementation="xla", **kwargs)

  kernel(pallas_chunked, "chunked", "pallas", pallas_chunked.chunked)
  kernel(triton_decode, "step", "triton", pallas_decode.step)
  kernel(pallas_decode, "step", "pallas", pallas_decode.step)
  for module, name in ((reference, "quadratic"), (xla, "chunked"), (reference, "feature_step")):
    recorded(module, name, "linear_attention", "xla")
  recorded(attention, "_masked_attention", "attention", "xla")
  recorded(cache_reference, "decode_attention", "attention", "xla")
  kernel(cache_kernel, "decode_attention", "pallas", cache_kernel.decode_attention, "attention")
  monkeypatch.setattr(cudnn, "dot_product_attention", cudnn_decode_stand_in)
  recorded(cudnn, "dot_product_attention", "attention", "cudnn")
  monkeypatch.setattr(jax.nn, "dot_product_attention", dot_product_attention)
  jax.clear_caches()
  return calls
