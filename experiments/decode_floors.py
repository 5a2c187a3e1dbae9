"""The floor model of a decode step: the bytes it must move and the FLOPs it must do.

From shapes alone (nothing runs on a device): `bytes_breakdown` counts the weights, states and
KV caches one step reads and writes, `flops_per_step` takes XLA's FLOP count of the step, and
`floors` gives the rows of `bench_decode --floors_only`: both floors of each (model, batch) at
a given bandwidth and peak FLOP/s.
"""

import jax
import jax.numpy as jnp

from based_jax import config as config_lib
from based_jax.cache import as_carry, init_cache
from based_jax.config import ModelConfig
from based_jax.mixers import registry
from based_jax.model import LanguageModel, count_params, init_params
from experiments.benchmarking import model_config
from pallas_kernels.taylor_attention import feature_width


def bytes_breakdown(config: ModelConfig, batch: int, prompt_len: int, new_tokens: int,
                    param_bytes: int) -> dict:
  """Bytes one decode step must move (the floor; B tokens per step):
    weights: every parameter read once (amortised over the batch);
    state_read / state_written per layer kind:
      linear attention: the whole state (kv in la_state_dtype, the normaliser in float32)
        read and written (a rank-1 update);
      BaseConv: its last taps read and written;
      sliding window: its W + 1 ring slots read (K and V), one slot written;
      full attention: the valid KV slots read, on average P + (N + 1) / 2 over the N steps,
        one slot written.
  Also `kv_dense_read`: what a dense read of the whole preallocated cache (P + N slots, the
  XLA decode path) moves for full attention, for comparison with the floor."""
  itemsize = jnp.dtype(config.dtype).itemsize
  kv_slot = 2 * config.d_model * itemsize * batch  # K and V of one position, all heads
  read = written = dense = 0
  for kind in config.layer_kinds:
    if kind == config_lib.ATTENTION:
      avg = prompt_len + (new_tokens + 1) / 2
      read += int(round(avg * kv_slot))
      written += kv_slot
      dense += (prompt_len + new_tokens) * kv_slot
    elif kind == config_lib.SLIDING_WINDOW:
      read += min(config.window + 1, prompt_len + 1) * kv_slot
      written += kv_slot
    else:
      layer = jax.eval_shape(lambda kind=kind: registry.spec(kind).init_cache(config, batch, 1))
      state = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(layer))
      read += state
      written += state
  out = {"weights": param_bytes, "state_read": read, "state_written": written,
         "total": param_bytes + read + written}
  if dense:
    out["kv_dense_read"] = dense
  return out


def bytes_per_step(config: ModelConfig, batch: int, prompt_len: int, new_tokens: int,
                   param_bytes: int) -> int:
  """The floor's bytes per decode step (see `bytes_breakdown`)."""
  return bytes_breakdown(config, batch, prompt_len, new_tokens, param_bytes)["total"]


def flops_per_step(config: ModelConfig, batch: int, max_len: int) -> float:
  """Floating-point operations of one decode step of B tokens: XLA's count for the step's HLO
  (lowered from shapes, nothing run), with every mixer on its XLA path so all work is visible
  (kernels and cuDNN calls are opaque to the count; the math is the same). At large batches the
  weight matmuls (2 * params * B) dominate."""
  config = config.all_xla()  # also: lowered for the CPU below, whatever the default backend
  model = LanguageModel(config)
  params = jax.eval_shape(lambda: init_params(config))
  cache = jax.eval_shape(lambda: as_carry(init_cache(config, batch, max_len)))
  tokens = jax.ShapeDtypeStruct((batch, 1), jnp.int32)
  # Counted on the CPU backend: a GPU (PJRT plugin) cannot analyse unoptimised HLO, and one
  # count everywhere keeps results comparable across machines.
  with jax.default_device(jax.devices("cpu")[0]):
    lowered = jax.jit(lambda p, t, c: model.apply(p, t, cache=c)).lower(params, tokens, cache)
    cost = lowered.cost_analysis()
  if not cost or "flops" not in cost:
    raise RuntimeError(f"XLA gave no FLOP count for the decode step (got {cost!r})")
  return float(cost["flops"])


def compute_floors(config: ModelConfig, batch: int, max_len: int, bytes_floor_s: float,
                   peak_flops: float) -> dict:
  """FLOPs per step, the compute floor at `peak_flops` and the roofline max(bytes, compute)
  per step in ms; nothing when `peak_flops` is 0."""
  if not peak_flops:
    return {}
  flops = flops_per_step(config, batch, max_len)
  compute_s = flops / peak_flops
  return {"flops_per_step": flops, "compute_floor_ms_per_step": 1e3 * compute_s,
          "roofline_ms_per_step": 1e3 * max(compute_s, bytes_floor_s)}


def step_floors(config: ModelConfig, batch: int, prompt_len: int, new_tokens: int,
                param_bytes: int, bandwidth: float, peak_flops: float) -> dict:
  """The floors of one decode step: its bytes (`bytes_breakdown`), the byte floor in ms at
  `bandwidth` bytes/s and, when `peak_flops` > 0, the compute floor and roofline
  (`compute_floors`)."""
  floor = bytes_breakdown(config, batch, prompt_len, new_tokens, param_bytes)
  floor_s = floor["total"] / bandwidth
  return {"floor_breakdown": floor, "floor_ms_per_step": 1e3 * floor_s,
          **compute_floors(config, batch, prompt_len + new_tokens, floor_s, peak_flops)}


def taylor_state_layout(config: ModelConfig) -> dict:
  """How the model stores its Taylor decoding state (features per head, numerator dtype)."""
  return {"features": feature_width(config.la_feature_dim), "kv_dtype": config.la_state_dtype}


def floors(specs: list[str], batches: list[int], dtype: str, prompt_len: int, new_tokens: int,
           bandwidth: float, peak_flops: float) -> list[dict]:
  """The `step_floors` of every (model spec, batch), with the bytes per generated token."""
  rows = []
  for spec in specs:
    config = model_config(spec, dtype)
    param_bytes = count_params(config) * jnp.dtype(config.param_dtype).itemsize
    for batch in batches:
      row = step_floors(config, batch, prompt_len, new_tokens, param_bytes, bandwidth,
                        peak_flops)
      rows.append({"model": spec, "batch": batch, **row,
                   "bytes_per_token": row["floor_breakdown"]["total"] / batch,
                   "taylor_state": taylor_state_layout(config)})
  return rows
