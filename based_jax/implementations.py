"""Which implementation each path of a model's mixers takes, for benchmarks to record.

The answer comes from the resolvers the mixers dispatch on (`resolve` of
`pallas_kernels.taylor_attention.api` for linear attention, `resolve_implementation` of
`based_jax.mixers.attention` for softmax attention, `resolve` of
`pallas_kernels.selective_scan.api` for Mamba's scan, `resolve` of `pallas_kernels.rms_norm.api`
for the residual stream's add + RMSNorm, `resolve` of `pallas_kernels.gemv.api` for decoding's
few-row products), so it is what runs: a function of the
config and of the backend of this process, not of the batch or the sequence length.
"""

import functools

import jax
import jax.numpy as jnp

from based_jax import config as config_lib
from based_jax.config import ModelConfig
from based_jax.mixers import attention
from based_jax.mixers.linear_attention import init_linear_attention_cache
from pallas_kernels.gemv import api as gemv_api
from pallas_kernels.rms_norm import api as norm_api
from pallas_kernels.selective_scan import api as ssm_api
from pallas_kernels.taylor_attention import api as taylor_api

LINEAR_ATTENTION_PATHS = ("chunked", "decode")


def linear_attention_implementation(config: ModelConfig, path: str) -> str:
  """What `causal_taylor_attention` runs in the model's linear-attention layers for `path`:
  'chunked' (several tokens into the cache: a prefill chunk) or 'decode' (one token)."""
  if path not in LINEAR_ATTENTION_PATHS:
    raise ValueError(f"path must be one of {LINEAR_ATTENTION_PATHS}, got {path!r}")
  state = jax.eval_shape(lambda: init_linear_attention_cache(config, 1))
  return taylor_api.resolve(
      config.linear_attention_impl, feature_dim=config.la_feature_dim,
      value_dim=config.d_model // config.la_heads,
      dtypes=(jnp.dtype(config.dtype),) * 3,  # q, k, v: the projections' compute dtype
      state_dtypes=(state.kv.dtype, state.k.dtype), decoding=path == "decode",
      backend=jax.default_backend(), hopper=taylor_api.on_hopper())


def implementations(config: ModelConfig) -> dict[str, dict[str, str]]:
  """The implementation of every path of the config's mixers on this process's backend, e.g.
  {"linear_attention": {"chunked": "pallas", "decode": "xla"},
   "attention": {"prefill": "cudnn", "decode": "xla", "chunked_prefill": "xla"},
   "mamba": {"scan": "xla", "decode": "xla"}, "norm": {"add_rms_norm": "xla"}}.

  Only the mixer kinds the config has appear; "attention" covers sliding-window and full
  attention, which share their settings. Paths: linear attention 'chunked' (a prefill chunk)
  and 'decode'; softmax attention 'prefill' (within the call: training, the first prefill
  chunk), 'decode' and 'chunked_prefill' (later prefill chunks, against the cache); Mamba
  'scan' (several tokens: training, prefill; `ssm_impl`) and 'decode' (one token with a cache:
  always the XLA step). "norm" (every model) is the residual stream's add + RMSNorm
  (`norm_impl`), and with block_style "zoology" also its add + LayerNorm ('layer_norm');
  "gemv" (every model) the dense layers' products of one row (`gemv_impl`, decoding a batch of
  one; shown for a [D, D] weight). A
  'cudnn' prefill holds unless the call warned that cuDNN rejected it (see
  `resolve_implementation`).
  """
  kinds = set(config.layer_kinds)
  out = {}
  if config_lib.LINEAR_ATTENTION in kinds:
    out["linear_attention"] = {path: linear_attention_implementation(config, path)
                               for path in LINEAR_ATTENTION_PATHS}
  if kinds & {config_lib.SLIDING_WINDOW, config_lib.ATTENTION}:
    out["attention"] = {path: attention.resolve_implementation(config, path)
                        for path in attention.PATHS}
  if config_lib.MixerKind.MAMBA in kinds:
    out["mamba"] = {"scan": ssm_api.resolve(config.ssm_impl, backend=jax.default_backend()),
                    "decode": "xla"}
  compute = jnp.dtype(config.dtype)
  norm = functools.partial(
      norm_api.resolve, config.norm_impl, width=config.d_model,
      dtypes=(jnp.float32, compute, jnp.dtype(config.param_dtype), compute),
      backend=jax.default_backend())
  out["norm"] = {"add_rms_norm": norm()}
  out["gemv"] = {"one_row": gemv_api.resolve(
      config.gemv_impl, rows=1, k=config.d_model, n=config.d_model, dtypes=(compute, compute),
      backend=jax.default_backend())}
  if config.block_style == "zoology":  # its LayerNorms (the final one at least)
    out["norm"]["layer_norm"] = norm(layer_norm=True)
  return out
