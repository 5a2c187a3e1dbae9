"""Shared benchmark helpers: model specs, timing, GPU time per kernel and per source op, the
copy-bandwidth ceiling, metadata."""

import collections
import dataclasses
import datetime
import glob
import gzip
import importlib.metadata
import json
import platform
import re
import statistics
import sys
import tempfile
import time
from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

from based_jax.config import ModelConfig, get_config


def parse_model(spec: str) -> tuple[str, dict]:
  """'preset+field=value+...' -> (preset, overrides); values parsed as int/float if they can."""
  preset, *parts = spec.split("+")
  overrides = {}
  for part in parts:
    if "=" not in part:
      raise ValueError(f"model override {part!r} of {spec!r} is not field=value")
    key, value = part.split("=", 1)
    for cast in (int, float):
      try:
        value = cast(value)
        break
      except ValueError:
        pass
    overrides[key] = value
  return preset, overrides


def model_config(spec: str, dtype: str, attention_impl: Optional[str] = None,
                 attention_decode_impl: Optional[str] = None) -> ModelConfig:
  """The config of a model spec ('preset+field=value+...', see `parse_model`) with `dtype` for
  parameters and compute and, when given, the attention implementations; the spec's own
  overrides win."""
  preset, overrides = parse_model(spec)
  base = {"dtype": dtype, "param_dtype": dtype}
  if attention_impl:
    base["attention_impl"] = attention_impl
  if attention_decode_impl:
    base["attention_decode_impl"] = attention_decode_impl
  return get_config(preset, **{**base, **overrides})


def median_ms(call: Callable[[], object], sync: Callable[[object], object], *,
              warmup: int = 3, repeats: int = 20, inner: int = 5) -> dict:
  """Median and min milliseconds per call of `call`.

  Each repeat launches `inner` calls back to back and synchronises once, so host dispatch
  overlaps device work (as in a real training or serving loop); warm-up calls compile first.
  """
  for _ in range(warmup):
    sync(call())
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    for _ in range(inner):
      out = call()
    sync(out)
    times.append((time.perf_counter() - start) / inner * 1e3)
  return {"median_ms": statistics.median(times), "min_ms": min(times)}


def kernel_events(trace_dir: str) -> list[dict]:
  """The GPU-stream events ("X" phase: name, dur in microseconds, args) of the trace in
  `trace_dir`."""
  path = glob.glob(f"{trace_dir}/**/*.trace.json.gz", recursive=True)[0]
  events = json.load(gzip.open(path))
  events = events["traceEvents"] if isinstance(events, dict) else events
  gpu = {e["pid"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"
         and "GPU" in e["args"]["name"]}
  return [e for e in events if e.get("ph") == "X" and e["pid"] in gpu]


def kernel_times(trace_dir: str) -> collections.Counter:
  """Microseconds per kernel name over the GPU streams of the trace in `trace_dir`."""
  total = collections.Counter()
  for e in kernel_events(trace_dir):
    total[e["name"]] += e.get("dur", 0)
  return total


_HLO_OP_NAME = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+) = .*?metadata=\{[^}]*?"
                          r"op_name=\"([^\"]+)\"", re.MULTILINE)


def hlo_op_names(hlo_text: str) -> dict[str, str]:
  """HLO instruction name -> its source `op_name` metadata (the jax/Flax scope path), from a
  compiled module's text; names also under their kernel spelling ('.' -> '_')."""
  names = {}
  for instruction, op_name in _HLO_OP_NAME.findall(hlo_text):
    names.setdefault(instruction, op_name)
    names.setdefault(instruction.replace(".", "_"), op_name)
  return names


# Kernel name fragments -> what they compute, for kernels the trace does not tie to an op.
_KERNEL_FAMILIES = (("nvjet", "matmul"), ("gemm", "matmul"), ("cutlass", "matmul"),
                    ("cudnn", "cuDNN attention"), ("taylor_attention", "Taylor kernels"),
                    ("Memcpy", "copies"), ("Memset", "copies"))


def kernel_family(kernel: str) -> str:
  """'unattributed <family>' for a kernel whose HLO op the trace does not name: library
  kernels (cuBLAS, cuDNN, Pallas) launched from a CUDA-graph command buffer lose theirs."""
  family = next((f for part, f in _KERNEL_FAMILIES if part in kernel), "other")
  return f"unattributed {family}"


class ScopeProfile(NamedTuple):
  by_scope: collections.Counter  # GPU microseconds per call, by scope
  by_kernel: collections.Counter  # the same by "scope | kernel name"
  launches: collections.Counter  # kernel launches per call, by scope


def profile_scopes(call: Callable[[], object], sync: Callable[[object], object],
                   hlo_text: str, scope: Callable[[str], str], calls: int = 3) -> ScopeProfile:
  """Where one call of `call` (already compiled, its module's text `hlo_text`) spends its GPU
  time, by `scope(op_name)` of the HLO op that launched each kernel. A kernel whose op is not
  found counts under its `kernel_family`."""
  op_names = hlo_op_names(hlo_text)
  by_scope, by_kernel, launches = (collections.Counter() for _ in range(3))
  with tempfile.TemporaryDirectory() as trace_dir:
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
      for _ in range(calls):
        sync(call())
    for e in kernel_events(trace_dir):
      # The profiler names a library call's (cuBLAS, cuDNN, Pallas) source op itself; a fusion
      # only by its module, so its op comes from the HLO text through its instruction name.
      args = e.get("args", {})
      op = args.get("name") if "/" in args.get("name", "") else next(
          (op_names[a] for a in (args.get("hlo_op"), e["name"]) if a in op_names), None)
      where = kernel_family(e["name"]) if op is None else scope(op)
      by_scope[where] += e.get("dur", 0) / calls
      by_kernel[f"{where} | {e['name']}"] += e.get("dur", 0) / calls
      launches[where] += 1 / calls
  return ScopeProfile(by_scope, by_kernel, launches)


def profile_kernels(call: Callable[[], object], sync: Callable[[object], object],
                    calls: int = 5) -> collections.Counter:
  """Microseconds per kernel name per call of `call` (already compiled), from a profiler trace
  of `calls` calls: where the time of one call goes, without the host's launch gaps."""
  with tempfile.TemporaryDirectory() as trace_dir:
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
      for _ in range(calls):
        sync(call())
    total = kernel_times(trace_dir)
  return collections.Counter({name: us / calls for name, us in total.items()})


def module_scope(layer_kinds: tuple[str, ...], op_name: str) -> str:
  """Where an op of a train step (its `op_name` metadata) belongs: "<layer kind> <module>" for
  the blocks (e.g. "base_conv mixer", "sliding_window mlp", "attention residual"), "embed",
  "final_norm", "head" (the rest of the model: the tied LM head), "loss" (the cross-entropy
  and its gradient) or "optimizer"."""
  layer = re.search(r"/layers_(\d+)/(\w+)", op_name)
  if layer:
    module = layer[2] if layer[2] in ("mixer", "norm1", "norm2", "mlp") else "residual"
    return f"{layer_kinds[int(layer[1])]} {module}"
  for module in ("embed", "final_norm"):
    if f"/{module}/" in op_name:
      return module
  if "LanguageModel" in op_name:
    return "head"
  return "loss" if "jvp(" in op_name or "transpose(" in op_name else "optimizer"


def parse_tiling(spec: str, tiling_class):
  """A kernel's frozen tiling dataclass from 'a:b:...', its integer fields in order (a bench
  script's --tilings entry); a ValueError names the expected fields."""
  fields = [f.name for f in dataclasses.fields(tiling_class)]
  parts = spec.split(":")
  if len(parts) != len(fields):
    raise ValueError(f"a tiling is {':'.join(fields)}, got {spec!r}")
  return tiling_class(**dict(zip(fields, map(int, parts))))


def copy_bandwidth() -> float:
  """Device copy bandwidth in bytes/s, counting bytes read plus bytes written."""
  x = jax.random.normal(jax.random.key(0), (256 * 2**20,), jnp.float32)  # 1 GiB
  copy = jax.jit(lambda x: x * 1.0001)
  # On a GPU enough warm-up for the clocks to ramp and several copies per sync, so neither
  # idle clocks nor the host's launch latency lowers the ceiling the benchmarks divide by. A
  # CPU needs neither, and a copy there takes most of a second.
  gpu = jax.default_backend() == "gpu"
  timing = median_ms(lambda: copy(x), jax.block_until_ready, warmup=50 if gpu else 1,
                     repeats=20 if gpu else 3, inner=10 if gpu else 1)
  return 2 * x.nbytes / (timing["min_ms"] / 1e3)


def versions(*packages: str) -> dict:
  """Installed versions of `packages` (None when missing)."""
  out = {}
  for name in packages:
    try:
      out[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      out[name] = None
  return out


def run_metadata(*packages: str) -> dict:
  """Device, date, argv and versions for a results file."""
  return {"device": jax.devices()[0].device_kind, "backend": jax.default_backend(),
          "argv": sys.argv,  # the script's path and flags
          "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
          "python": platform.python_version(),
          "versions": versions("jax", "jaxlib", "flax", *packages)}
