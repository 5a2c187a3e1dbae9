"""Generation throughput: BASED vs Transformer++ (random weights), batch swept until OOM.

  python -m experiments.bench_decode --models=based_1b,transformer_pp_1b --prompt_len=1024
  python -m experiments.bench_decode --print_commands       # the full H100 run, with estimates
  python -m experiments.bench_decode --floors_only=2.9e12   # byte-count floors only, no device

For each model and batch size: prefill time, decode time per step (the whole jitted
`lax.while_loop` of `based_jax.generate.decode`, no host round trip per token), generated
tokens/s, peak device memory, and the bandwidth floor per step: the bytes that must move per
step (weights once, plus every layer's state or KV cache read and written) over the measured
copy bandwidth, beside the compute floor (XLA's FLOP count of one step at --peak_flops): at
large batches the weight matmuls are compute-bound. Batch sizes double from 1 (or follow
--batch_sizes); the sweep of a model stops at the first batch that runs out of memory, which
is recorded. A prefill that runs out of memory is first retried with 4x smaller prompt
chunks (down to 64), then with the batch prefilled in halved row blocks
(`prefill(row_block=...)`, down to 64 rows), so a model's largest batch is set by what
decoding needs, not by the prefill's temporaries.

Isolation (--isolate): by default every model runs in its own subprocess, so its device
memory and peak (`peak_bytes_in_use`) are its own; batches increase, so each row's peak is
that batch's. `--isolate=point` gives every (model, batch) its own process (exact peaks, an
out-of-memory error cannot leave a fragmented allocator behind; about 10 s more per point).
The parent never touches the device. The children get XLA_PYTHON_CLIENT_MEM_FRACTION=
--mem_fraction (the same for every model). Each row also holds the compiled executables' own
memory (arguments + outputs + temporaries), which is per point in every mode.

Models are preset names, optionally with config overrides after '+', e.g.
`transformer_pp_1b+attention_decode_impl=cudnn`; the attention implementations each model
resolved and traced are recorded. Writes <out>.json (device, versions, shapes) and <out>.png.
"""

import dataclasses
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from typing import Callable, Optional

import jax
import jax.numpy as jnp
from absl import app, flags

from based_jax import config as config_lib
from based_jax.cache import as_carry, cache_bytes, init_cache
from based_jax.config import get_config
from based_jax.generate import decode, prefill
from based_jax.mixers import attention
from based_jax.model import LanguageModel, count_params, init_params
from experiments.benchmarking import copy_bandwidth, run_metadata
from pallas_kernels.taylor_attention import api as taylor_api
from pallas_kernels.taylor_attention import feature_width

_MODELS = flags.DEFINE_list("models", ["based_360m", "transformer_pp_360m", "based_1b",
                                       "transformer_pp_1b"],
                            "Model presets, each optionally '+field=value+...' overrides.")
_PROMPT = flags.DEFINE_integer("prompt_len", 1024, "Prompt tokens per sequence.")
_NEW = flags.DEFINE_integer("new_tokens", 1024, "Generated tokens per sequence.")
_BATCHES = flags.DEFINE_list("batch_sizes", [], "Batch sizes, increasing; empty: double from "
                             "1 up to --max_batch. The sweep stops at the first OOM.")
_MAX_BATCH = flags.DEFINE_integer("max_batch", 4096, "Largest batch of the doubling sweep.")
_DTYPE = flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "Params and compute.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed repetitions after one warm-up (median).")
_PREFILL_CHUNK = flags.DEFINE_integer(
    "prefill_chunk", 0, "Prompt tokens per prefill call; 0: the whole prompt for models with "
    "full attention (one flash-attention call), 256 for the others.")
_PREFILL_ROWS = flags.DEFINE_integer(
    "prefill_row_block", 0, "Sequences per prefill call (0: the whole batch); prefill "
    "out-of-memory errors halve it down to 64 rows anyway (after the chunk reaches 64).")
_ATTN = flags.DEFINE_enum("attention_impl", None, list(config_lib.ATTENTION_IMPLS),
                          "Override every model's attention_impl (prefill).")
_ATTN_DECODE = flags.DEFINE_enum("attention_decode_impl", None,
                                 list(config_lib.ATTENTION_IMPLS),
                                 "Override every model's attention_decode_impl.")
_ISOLATE = flags.DEFINE_enum(
    "isolate", "model", ["model", "point", "none"],
    "model: one subprocess per model (batches increase, so each row's process peak is that "
    "batch's); point: one per (model, batch), exact peaks, ~10 s more per point; none: all "
    "in this process (peaks cumulative over models).")
_MEM_FRACTION = flags.DEFINE_float("mem_fraction", 0.95,
                                   "XLA_PYTHON_CLIENT_MEM_FRACTION of isolated children.")
_CHILD_TIMEOUT = flags.DEFINE_integer("child_timeout_s", 4 * 3600,
                                      "Time limit of one child process.")
_OUT = flags.DEFINE_string("out", "experiments/results/decode", "Output path prefix.")
_FLOORS_ONLY = flags.DEFINE_float(
    "floors_only", 0.0, "If > 0: no device work; write <out>.json with every (model, batch) "
    "floor (bytes per step and per token, ms at this many bytes/s; FLOPs per step, ms at "
    "--peak_flops) and exit.")
_PEAK_FLOPS = flags.DEFINE_float(
    "peak_flops", 989e12, "Matmul FLOP/s for the compute floor (default: the H100 SXM "
    "datasheet's dense bf16 figure; 0: no compute floor).")
_PRINT_COMMANDS = flags.DEFINE_bool("print_commands", False,
                                    "Print the commands of the full H100 run and exit.")
_RESUME = flags.DEFINE_bool("resume", True, "Continue <out>.json of the same settings: models "
                            "and batches already there are not run again.")
_DEADLINE = flags.DEFINE_integer("deadline_s", 0, "Start no new point after this many seconds "
                                 "(0: none); rerun the same command to continue.")
_CHILD = flags.DEFINE_string("child_request", None, "Internal: run one point from this JSON.")

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MIN_PREFILL_CHUNK = 64
MIN_ROW_BLOCK = 64
DEFAULT_PREFILL_CHUNK = 256


class OutOfMemory(Exception):
  """A point ran out of device memory; `phase` is 'prefill', 'decode' or 'setup'."""

  def __init__(self, phase: str, message: str):
    super().__init__(f"{phase}: {message}")
    self.phase, self.message = phase, message


def is_oom(error) -> bool:
  text = str(error)
  return "RESOURCE_EXHAUSTED" in text or "Out of memory" in text or "out of memory" in text


def first_line(error, limit: int = 300) -> str:
  lines = [l for l in str(error).splitlines() if l.strip()]
  oom = [l for l in lines if is_oom(l)]
  return ((oom or lines or [""])[0]).strip()[:limit]


# ----------------------------------------------------------------------------- models

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
                 attention_decode_impl: Optional[str] = None):
  preset, overrides = parse_model(spec)
  base = {"dtype": dtype, "param_dtype": dtype}
  if attention_impl:
    base["attention_impl"] = attention_impl
  if attention_decode_impl:
    base["attention_decode_impl"] = attention_decode_impl
  return get_config(preset, **{**base, **overrides})


def has_full_attention(config) -> bool:
  return config_lib.ATTENTION in config.layer_kinds


def auto_prefill_chunk(config, prompt_len: int, requested: int = 0) -> int:
  if requested:
    return requested
  return prompt_len if has_full_attention(config) else DEFAULT_PREFILL_CHUNK


def smaller_prefill(chunk: int, row_block: Optional[int], batch: int,
                    prompt_len: int) -> Optional[tuple[int, Optional[int]]]:
  """The next (prompt chunk, row block) to try after an out-of-memory prefill, or None: 4x
  smaller chunks down to MIN_PREFILL_CHUNK, then halved row blocks down to MIN_ROW_BLOCK."""
  chunk = min(chunk, prompt_len)
  if chunk > MIN_PREFILL_CHUNK:
    return max(MIN_PREFILL_CHUNK, chunk // 4), row_block
  rows = row_block_for(batch, row_block) // 2
  if rows < MIN_ROW_BLOCK or batch % rows:
    return None
  return chunk, rows


def row_block_for(batch: int, row_block: Optional[int]) -> int:
  """Rows per prefill call at this batch: the sweep's block where it divides the batch."""
  return batch if row_block is None else math.gcd(batch, row_block)


# ----------------------------------------------------------------------------- one point

@dataclasses.dataclass
class Generation:
  """Prefill + greedy decode of `new_tokens`, compiled ahead of time for one shape: exactly
  the code `based_jax.generate.generate` runs (jitted prefill, then the on-device
  `lax.while_loop` decode with the cache donated)."""
  config: config_lib.ModelConfig
  batch: int
  prompt_len: int
  new_tokens: int
  prefill_chunk: int
  prefill_row_block: Optional[int] = None  # rows per prefill call; None or >= batch: all.

  def compile(self, params) -> "Generation":
    max_len = self.prompt_len + self.new_tokens
    prompts = jax.ShapeDtypeStruct((self.batch, self.prompt_len), jnp.int32)
    lengths = jax.ShapeDtypeStruct((self.batch,), jnp.int32)
    plan = (max_len, self.prefill_chunk, self.prefill_row_block)
    self._prefill = prefill.lower(self.config, params, prompts, lengths, *plan).compile()
    logits, cache = jax.eval_shape(lambda p, t, n: prefill(self.config, p, t, n, *plan),
                                   params, prompts, lengths)
    self._decode = decode.lower(self.config, params, logits, cache, jax.random.key(0),
                                self.new_tokens).compile()
    return self

  def memory(self) -> dict:
    """Bytes of each compiled executable (arguments, outputs, temporaries), when known."""
    out = {}
    for name, compiled in (("prefill", self._prefill), ("decode", self._decode)):
      try:
        m = compiled.memory_analysis()
        out[name] = {"argument_bytes": int(m.argument_size_in_bytes),
                     "output_bytes": int(m.output_size_in_bytes),
                     "temp_bytes": int(m.temp_size_in_bytes),
                     "alias_bytes": int(m.alias_size_in_bytes)}
      except Exception:  # noqa: BLE001 - not every backend reports it
        pass
    return out

  def run(self, params, prompts, seed: int = 0):
    """Returns the generated tokens [B, new_tokens] and the prefill and decode wall seconds.
    Raises OutOfMemory naming the phase that ran out."""
    lengths = jnp.full((prompts.shape[0],), prompts.shape[1], jnp.int32)
    phase = "prefill"
    try:
      start = time.perf_counter()
      logits, cache = self._prefill(params, prompts, lengths)
      jax.block_until_ready(logits)
      mid = time.perf_counter()
      phase = "decode"
      out, _ = self._decode(params, logits, cache, jax.random.key(seed))
      tokens = jax.block_until_ready(out.tokens)
      end = time.perf_counter()
    except Exception as e:  # noqa: BLE001 - only out-of-memory is translated
      if is_oom(e):
        raise OutOfMemory(phase, first_line(e)) from e
      raise
    return tokens, mid - start, end - mid


def run_generation(config, params, prompts, new_tokens: int, seed: int = 0,
                   prefill_chunk: Optional[int] = None):
  """Exactly what is timed: prefill then the jitted greedy decode loop. Returns the tokens
  [B, new_tokens] and the two wall times in seconds."""
  b, p = prompts.shape
  chunk = prefill_chunk or auto_prefill_chunk(config, p)
  return Generation(config, b, p, new_tokens, chunk).compile(params).run(params, prompts, seed)


def bytes_breakdown(config, batch: int, prompt_len: int, new_tokens: int,
                    param_bytes: int) -> dict:
  """Bytes one decode step must move (the floor; B tokens per step):
    weights: every parameter read once (amortised over the batch);
    state_read / state_written per layer kind:
      linear attention: the whole float32 state read and written (a rank-1 update);
      BaseConv: its last taps read and written;
      sliding window: its W + 1 ring slots read (K and V), one slot written;
      full attention: the valid KV slots read, on average P + (N + 1) / 2 over the N steps,
        one slot written.
  Also `kv_dense_read`: what a dense read of the whole preallocated cache (P + N slots, the
  XLA decode path) moves for full attention, for comparison with the floor."""
  itemsize = jnp.dtype(config.dtype).itemsize
  kv_slot = 2 * config.d_model * itemsize * batch  # K and V of one position, all heads
  read = written = dense = 0
  kinds = config.layer_kinds
  empty = dict(linear_attention_layers=(), sliding_window_layers=(), attention_layers=())
  for kind in kinds:
    if kind == config_lib.ATTENTION:
      avg = prompt_len + (new_tokens + 1) / 2
      read += int(round(avg * kv_slot))
      written += kv_slot
      dense += (prompt_len + new_tokens) * kv_slot
    elif kind == config_lib.SLIDING_WINDOW:
      read += min(config.window + 1, prompt_len + 1) * kv_slot
      written += kv_slot
    else:
      layer = {config_lib.LINEAR_ATTENTION: dict(linear_attention_layers=(0,))}.get(kind, {})
      one = config.replace(n_layers=1, **{**empty, **layer})
      state = cache_bytes(one, batch, 1) - 4 * batch  # less the [B] length counter
      read += state
      written += state
  out = {"weights": param_bytes, "state_read": read, "state_written": written,
         "total": param_bytes + read + written}
  if dense:
    out["kv_dense_read"] = dense
  return out


def flops_per_step(config, batch: int, max_len: int) -> float:
  """Floating-point operations of one decode step of B tokens: XLA's count for the step's HLO
  (lowered from shapes, nothing run), with every mixer on its XLA path so all work is visible
  (kernels and cuDNN calls are opaque to the count; the math is the same). At large batches the
  weight matmuls (2 * params * B) dominate."""
  config = config.replace(linear_attention_impl="xla", attention_impl="xla",
                          attention_decode_impl="xla")
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


def compute_floors(config, batch: int, max_len: int, bytes_floor_s: float,
                   peak_flops: float) -> dict:
  """FLOPs per step, the compute floor at `peak_flops` and the roofline max(bytes, compute)
  per step in ms; nothing when `peak_flops` is 0."""
  if not peak_flops:
    return {}
  flops = flops_per_step(config, batch, max_len)
  compute_s = flops / peak_flops
  return {"flops_per_step": flops, "compute_floor_ms_per_step": 1e3 * compute_s,
          "roofline_ms_per_step": 1e3 * max(compute_s, bytes_floor_s)}


def bytes_per_step(config, batch: int, prompt_len: int, new_tokens: int, param_bytes: int) -> int:
  """The floor's bytes per decode step (see `bytes_breakdown`)."""
  return bytes_breakdown(config, batch, prompt_len, new_tokens, param_bytes)["total"]


def peak_device_bytes() -> Optional[int]:
  stats = jax.devices()[0].memory_stats() or {}
  return stats.get("peak_bytes_in_use")


def measure_point(spec: str, batch: int, *, prompt_len: int, new_tokens: int, dtype: str,
                  repeats: int, prefill_chunk: int, bandwidth: float,
                  peak_flops: float = 0.0,
                  prefill_row_block: Optional[int] = None,
                  attention_impl: Optional[str] = None,
                  attention_decode_impl: Optional[str] = None, params_cache: dict = None) -> dict:
  """Compiles and times one (model, batch) point in this process; returns its row.
  Raises OutOfMemory."""
  config = model_config(spec, dtype, attention_impl, attention_decode_impl)
  params_cache = {} if params_cache is None else params_cache
  attention.reset_implementations_used()
  taylor_api.reset_implementations_used()
  try:
    if spec not in params_cache:
      params_cache.clear()  # one model's weights at a time
      params_cache[spec] = jax.jit(init_params, static_argnums=0)(config)
    params = params_cache[spec]
    rows = row_block_for(batch, prefill_row_block)
    gen = Generation(config, batch, prompt_len, new_tokens, prefill_chunk, rows).compile(params)
  except Exception as e:  # noqa: BLE001
    if is_oom(e):
      raise OutOfMemory("setup", first_line(e)) from e
    raise
  # What compiling traced; taken now, as the FLOP count below traces every mixer's XLA path.
  traced = {"attention_traced": attention.implementations_used(),
            "linear_attention_traced": taylor_api.implementations_used()}
  param_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
  floor = bytes_breakdown(config, batch, prompt_len, new_tokens, param_bytes)
  floor_s = floor["total"] / bandwidth
  # Before the timing, so a failing count costs no measurement.
  compute = compute_floors(config, batch, prompt_len + new_tokens, floor_s, peak_flops)
  prompts = jax.random.randint(jax.random.key(batch), (batch, prompt_len), 0,
                               config.vocab_size, jnp.int32)
  gen.run(params, prompts)  # warm-up
  times = [gen.run(params, prompts)[1:] for _ in range(repeats)]
  prefill_s = statistics.median(t[0] for t in times)
  decode_s = statistics.median(t[1] for t in times)
  step_s = decode_s / new_tokens
  peak = peak_device_bytes()
  return {"batch": batch, "prefill_chunk": prefill_chunk, "prefill_row_block": rows,
          "prefill_ms": 1e3 * prefill_s, "decode_ms_per_step": 1e3 * step_s,
          "decode_ms_per_step_min": 1e3 * min(t[1] for t in times) / new_tokens,
          "tokens_per_s": batch * new_tokens / decode_s,
          "peak_memory_gb": None if peak is None else peak / 1e9,
          "compiled_memory": gen.memory(),
          "param_bytes": param_bytes,
          "floor_bytes_per_step": floor["total"], "floor_breakdown": floor,
          "floor_ms_per_step": 1e3 * floor_s, "ratio_to_floor": step_s / floor_s,
          **compute, **traced}


# ----------------------------------------------------------------------------- the sweep

def batch_sizes(explicit: list, max_batch: int) -> list[int]:
  if explicit:
    return [int(b) for b in explicit]
  out, b = [], 1
  while b <= max_batch:
    out.append(b)
    b *= 2
  return out


def sweep(spec: str, batches: list[int], run_point: Callable[[int, int, Optional[int]], dict],
          first_chunk: int, prompt_len: int, log: Callable[[str], None] = print,
          previous: Optional[dict] = None, save: Callable[[dict], None] = lambda r: None,
          stop: Callable[[], bool] = lambda: False,
          first_row_block: Optional[int] = None) -> dict:
  """Runs `run_point(batch, prefill_chunk, prefill_row_block)` for increasing batches until
  one runs out of memory. A prefill OOM is retried with smaller chunks, then smaller row blocks
  (both kept for the larger batches); any other OOM, or a prefill OOM at the smallest chunk and
  row block, ends the sweep and is recorded as `oom`.
  A non-OOM error also ends it, recorded as `error`.

  `previous` (an earlier result of the same model) is continued: its batches are not run
  again, nor batches at or above its out-of-memory batch. `save(result)` is called after
  every point; before each point `stop()` may end the sweep early (then `complete` stays
  False and a later call can continue it)."""
  result = previous or {"model": spec, "rows": [], "oom": None, "error": None,
                        "prefill_retries": [], "prefill_chunk": first_chunk,
                        "prefill_row_block": first_row_block}
  result["complete"] = False
  for batch in pending_batches(result, batches):
    if stop():
      log(f"{spec}: stopping before batch {batch} (deadline); rerun to continue")
      return _summarise(result)
    while True:
      chunk, rows = result["prefill_chunk"], result.get("prefill_row_block")
      try:
        row = run_point(batch, chunk, rows)
      except OutOfMemory as e:
        nxt = smaller_prefill(chunk, rows, batch, prompt_len) if e.phase == "prefill" else None
        if nxt is not None:
          result["prefill_retries"].append({"batch": batch, "prefill_chunk": chunk,
                                            "prefill_row_block": rows, "phase": e.phase,
                                            "error": e.message})
          log(f"{spec}: batch {batch} prefill out of memory at chunk {chunk}, row block "
              f"{rows or batch}; retrying with chunk {nxt[0]}, row block {nxt[1] or batch}")
          result["prefill_chunk"], result["prefill_row_block"] = nxt
          continue
        result["oom"] = {"batch": batch, "prefill_chunk": chunk, "prefill_row_block": rows,
                         "phase": e.phase, "error": e.message}
        log(f"{spec}: batch {batch} out of memory ({e.phase}); stopping the sweep")
      except Exception as e:  # noqa: BLE001 - recorded; the other models still run
        result["error"] = {"batch": batch, "error": str(e)[-4000:]}
        last = [l for l in str(e).splitlines() if l.strip()][-1:] or [repr(e)]
        log(f"{spec}: batch {batch} failed: {last[0][:300]}; stopping the sweep")
      else:
        result["rows"].append(row)
        peak = row.get("peak_memory_gb")
        log(f"{spec:28s} B={batch:5d} prefill {row['prefill_ms']:9.1f} ms  step "
            f"{row['decode_ms_per_step']:7.3f} ms (floor {row['floor_ms_per_step']:.3f}, "
            f"x{row['ratio_to_floor']:.2f})  {row['tokens_per_s']:>10,.0f} tok/s  peak "
            f"{'?' if peak is None else f'{peak:.1f}'} GB")
      break
    if result["error"] is not None or (result["oom"] or {}).get("batch") == batch:
      break
    save(_summarise(result))
  result["complete"] = True
  save(_summarise(result))
  return result


def pending_batches(result: Optional[dict], batches: list[int]) -> list[int]:
  """The batches of `batches` a (previous) result still lacks: none after an error, none at
  or above a recorded out-of-memory batch."""
  if not result:
    return list(batches)
  if result.get("error"):
    return []
  done = {r["batch"] for r in result["rows"]}
  limit = result["oom"]["batch"] if result.get("oom") else None
  return [b for b in batches if b not in done and (limit is None or b < limit)]


def _summarise(result: dict) -> dict:
  result["rows"].sort(key=lambda r: r["batch"])
  rows = result["rows"]
  for key in ("attention_traced", "linear_attention_traced"):
    result[key] = sorted({n for r in rows for n in r.get(key, [])})
  result["best"] = max(rows, key=lambda r: r["tokens_per_s"], default=None)
  return result


# ----------------------------------------------------------------------------- isolation

def _die_with_parent() -> None:
  """In the child, before exec: be killed if the parent dies (Linux), so no orphan keeps the
  GPU's memory."""
  try:
    import ctypes
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
  except Exception:  # noqa: BLE001 - best effort
    pass


def child_command(request_path: str) -> list[str]:
  return [sys.executable, "-m", "experiments.bench_decode", f"--child_request={request_path}"]


def _spawn(request: dict, mem_fraction: float, timeout_s: int,
           on_progress: Optional[Callable[[dict], None]] = None) -> tuple[Optional[dict], str, int]:
  """Runs one request in a fresh Python process. Returns (its last response or None, its
  stderr, its exit code). The child's stdout is echoed; `on_progress(response)` is called
  whenever the child rewrites its response file."""
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "request.json")
    response_path = os.path.join(tmp, "response.json")
    with open(path, "w") as f:
      json.dump({**request, "response": response_path}, f)
    env = {**os.environ, "XLA_PYTHON_CLIENT_MEM_FRACTION": str(mem_fraction),
           "PYTHONUNBUFFERED": "1"}
    env.pop("XLA_PYTHON_CLIENT_PREALLOCATE", None)  # the parent's setting is not the child's
    out_path, err_path = os.path.join(tmp, "stdout"), os.path.join(tmp, "stderr")
    seen, echoed, deadline = None, 0, time.monotonic() + timeout_s
    with open(out_path, "w") as out, open(err_path, "w") as err:
      proc = subprocess.Popen(child_command(path), env=env, stdout=out, stderr=err,
                              cwd=_REPO_ROOT, preexec_fn=_die_with_parent)
      try:
        while True:
          try:
            code = proc.wait(timeout=2)
          except subprocess.TimeoutExpired:
            code = None
          with open(out_path) as f:  # echo the child's progress lines
            text = f.read()
          if len(text) > echoed:
            print(text[echoed:], end="", flush=True)
            echoed = len(text)
          if on_progress and os.path.exists(response_path):
            stamp = os.stat(response_path).st_mtime_ns
            if stamp != seen:
              seen = stamp
              try:
                with open(response_path) as f:
                  on_progress(json.load(f))
              except ValueError:  # caught mid-write; the next poll reads it
                seen = None
          if code is not None:
            break
          if time.monotonic() > deadline:
            raise TimeoutError(f"child timed out after {timeout_s} s")
      finally:
        if proc.poll() is None:
          proc.kill()
          proc.wait()
    response = None
    if os.path.exists(response_path):
      with open(response_path) as f:
        response = json.load(f)
    with open(err_path) as f:
      stderr = f.read()
  return response, stderr, code


def run_child(request: dict, mem_fraction: float, timeout_s: int) -> dict:
  """Runs one request (a point, or the probe) in a fresh process; returns its result. An
  out-of-memory error (reported, or a crash whose output says so) raises OutOfMemory."""
  response, output, code = _spawn(request, mem_fraction, timeout_s)
  if response is not None and "oom" in response:
    raise OutOfMemory(response["oom"]["phase"], response["oom"]["error"])
  if response is not None and "result" in response:
    return response["result"]
  if is_oom(output):
    raise OutOfMemory("unknown", first_line(output))
  detail = response["error"] if response else output[-3000:]
  raise RuntimeError(f"child exited with {code}: {detail}")


def sweep_in_child(spec: str, sweep_args: dict, mem_fraction: float, timeout_s: int,
                   save: Callable[[dict], None]) -> dict:
  """`sweep` of one model in its own process (its device memory and peak are its own);
  partial results are saved as they come. A child that dies (a hard out-of-memory abort,
  say) leaves its rows; the batch it was running is recorded as the OOM (or the error)."""
  def progress(response):
    if response.get("result"):
      save(response["result"])

  try:
    response, output, code = _spawn({"task": "sweep", "sweep": sweep_args}, mem_fraction,
                                    timeout_s, progress)
  except TimeoutError as e:
    response, output, code = None, str(e), None
  if response and "done" in response:
    return response["result"]
  result = (response or {}).get("result") or {
      "model": spec, "rows": [], "oom": None, "error": None, "prefill_retries": [],
      "prefill_chunk": sweep_args["first_chunk"],
      "prefill_row_block": sweep_args.get("first_row_block")}
  running = (response or {}).get("running") or {}
  if is_oom(output):
    result["oom"] = {"batch": running.get("batch"), "prefill_chunk": running.get("chunk"),
                     "prefill_row_block": running.get("row_block"),
                     "phase": "unknown (the process died)", "error": first_line(output)}
  else:
    detail = (response or {}).get("error") or output[-3000:]
    result["error"] = {"batch": running.get("batch"),
                       "error": f"child exited with {code}: {detail}"[-4000:]}
  result["complete"] = True
  return _summarise(result)


def child_main(request_path: str) -> None:
  """Runs one request (the probe, a point or a model's sweep) and writes the response."""
  with open(request_path) as f:
    request = json.load(f)

  def respond(response):
    tmp = request["response"] + ".tmp"
    with open(tmp, "w") as f:
      json.dump(response, f)
    os.replace(tmp, request["response"])

  try:
    if request["task"] == "probe":
      respond({"result": {"meta": run_metadata(), "bandwidth": copy_bandwidth()}})
    elif request["task"] == "point":
      respond({"result": measure_point(**request["point"])})
    else:
      args = request["sweep"]
      state = {"result": args["previous"]}
      params_cache = {}

      def run_point(batch, chunk, rows):
        respond({"result": state["result"],
                 "running": {"batch": batch, "chunk": chunk, "row_block": rows}})
        return measure_point(**args["point"], batch=batch, prefill_chunk=chunk,
                             prefill_row_block=rows,
                             params_cache=params_cache)

      def save(result):
        state["result"] = result
        respond({"result": result})

      result = sweep(args["point"]["spec"], args["batches"], run_point, args["first_chunk"],
                     args["point"]["prompt_len"], previous=args["previous"], save=save,
                     stop=lambda: bool(args["deadline"]) and time.time() > args["deadline"],
                     first_row_block=args.get("first_row_block"))
      respond({"result": result, "done": True})
  except OutOfMemory as e:
    respond({"oom": {"phase": e.phase, "error": e.message}})
  except Exception:  # noqa: BLE001 - reported to the parent
    respond({"error": traceback.format_exc()[-4000:]})


# ----------------------------------------------------------------------------- commands

_TRANSFORMERS = "{0},{0}+attention_decode_impl=cudnn"
H100_RUNS = [  # (name, models, prompt_len, rough minutes: full doubling sweep, quick ladder)
    ("decode_1b_p1024", "based_1b," + _TRANSFORMERS.format("transformer_pp_1b"), 1024, 45, 20),
    ("decode_360m_p1024", "based_360m," + _TRANSFORMERS.format("transformer_pp_360m"), 1024,
     35, 15),
    ("decode_1b_p128", "based_1b," + _TRANSFORMERS.format("transformer_pp_1b"), 128, 40, 18),
    ("decode_360m_p128", "based_360m," + _TRANSFORMERS.format("transformer_pp_360m"), 128,
     30, 14),
]
QUICK_BATCHES = "1,4,16,64,128,256,512,1024,2048,4096"


def taylor_state_layout(config) -> dict:
  """How the model stores its Taylor decoding state (features per head, numerator dtype)."""
  return {"features": feature_width(config.la_feature_dim), "kv_dtype": config.la_state_dtype}


def floors(specs: list[str], batches: list[int], dtype: str, prompt_len: int, new_tokens: int,
           bandwidth: float, peak_flops: float) -> list[dict]:
  """The floors of every (model, batch), from shapes alone (`bytes_breakdown`,
  `flops_per_step`)."""
  rows = []
  for spec in specs:
    config = model_config(spec, dtype)
    param_bytes = count_params(config) * jnp.dtype(config.param_dtype).itemsize
    for batch in batches:
      floor = bytes_breakdown(config, batch, prompt_len, new_tokens, param_bytes)
      rows.append({"model": spec, "batch": batch, "floor_breakdown": floor,
                   "bytes_per_token": floor["total"] / batch,
                   "floor_ms_per_step": 1e3 * floor["total"] / bandwidth,
                   **compute_floors(config, batch, prompt_len + new_tokens,
                                    floor["total"] / bandwidth, peak_flops),
                   "taylor_state": taylor_state_layout(config)})
  return rows


def print_commands(deadline_s: int = 300) -> None:
  """The H100 run: one command per (model size, prompt length), most important first."""
  print(f"""# Generation throughput on one H100 80GB: bf16, 1024 new tokens, batch sweep until out
# of memory; BASED, Transformer++ with XLA decode attention, and Transformer++ with cuDNN
# decode attention (the faster Transformer++ is the baseline). Run from the repository root.
# Each command starts no new point after {deadline_s} s and saves after every point, so it
# fits a 600 s command limit: rerun the SAME command until it prints 'sweep complete'. On a
# device machine that gets a fresh copy of the working tree per call, end each call with
# `cp experiments/results/NAME.* $OUT/` and copy the two files back into
# experiments/results/ before the next call (the rerun continues from them).
# Minutes are rough totals over the reruns (about 30 s of compilation per point assumed).""")
  for plan, extra in (("full: batch doubling from 1 (what the issue asks for)", "--repeats=2"),
                      ("quick: a sparser ladder, one timed run after one warm-up",
                       f"--batch_sizes={QUICK_BATCHES} --repeats=1")):
    print(f"\n## {plan}")
    for name, models, prompt, full, quick in H100_RUNS:
      minutes = full if plan.startswith("full") else quick
      print(f"# {name}: about {minutes} min")
      print(f"PYTHONUNBUFFERED=1 python -m experiments.bench_decode --models={models} "
            f"--prompt_len={prompt} --new_tokens=1024 {extra} --deadline_s={deadline_s} "
            f"--out=experiments/results/{name}")


# ----------------------------------------------------------------------------- main

def plot(results: list[dict], path: str, title: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6.5, 4.2))
  for r in results:
    if r["rows"]:
      ax.plot([x["batch"] for x in r["rows"]], [x["tokens_per_s"] for x in r["rows"]], "o-",
              label=r["model"])
  ax.set_xscale("log", base=2)
  ax.set_yscale("log")
  ax.set_xlabel("batch size")
  ax.set_ylabel("generated tokens / s")
  ax.set_title(title, fontsize=9)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=150)


def load_previous(path: str, meta: dict) -> Optional[dict]:
  """An earlier run of the same settings at `path` ({"meta", "results"}), to continue."""
  if not os.path.exists(path):
    return None
  with open(path) as f:
    old = json.load(f)
  keys = ("prompt_len", "new_tokens", "dtype", "device")
  if any(old["meta"].get(k) != meta.get(k) for k in keys):
    raise ValueError(f"{path} holds a run with other settings "
                     f"({ {k: old['meta'].get(k) for k in keys} }); use another --out or "
                     "--noresume")
  return old


def main(argv):
  del argv
  if _CHILD.value:
    child_main(_CHILD.value)
    return
  if _PRINT_COMMANDS.value:
    print_commands()
    return
  if _FLOORS_ONLY.value > 0:
    rows = floors(_MODELS.value, batch_sizes(_BATCHES.value, _MAX_BATCH.value), _DTYPE.value,
                  _PROMPT.value, _NEW.value, _FLOORS_ONLY.value, _PEAK_FLOPS.value)
    meta = {**run_metadata(), "prompt_len": _PROMPT.value, "new_tokens": _NEW.value,
            "dtype": _DTYPE.value, "bandwidth_Bps": _FLOORS_ONLY.value,
            "peak_flops": _PEAK_FLOPS.value,
            "what": "byte counts (bytes_breakdown) and XLA's FLOP count of one decode step "
                    "(flops_per_step), from shapes; nothing was timed"}
    os.makedirs(os.path.dirname(_OUT.value) or ".", exist_ok=True)
    with open(_OUT.value + ".json", "w") as f:
      json.dump({"meta": meta, "rows": rows}, f, indent=1)
    for row in rows:
      print(f"{row['model']:40s} B={row['batch']:5d} {row['bytes_per_token'] / 1e6:8.2f} MB/token "
            f"floor {row['floor_ms_per_step']:8.3f} ms/step, compute "
            f"{row.get('compute_floor_ms_per_step', 0):7.3f} ms/step")
    return
  started = time.monotonic()
  # A terminated parent (a time limit) unwinds, and subprocess.run kills the running child.
  signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
  isolate = _ISOLATE.value != "none"
  if isolate:  # the parent must hold no device memory while children run
    os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
    probe = run_child({"task": "probe"}, _MEM_FRACTION.value, _CHILD_TIMEOUT.value)
    meta, bandwidth = probe["meta"], probe["bandwidth"]
  else:
    meta, bandwidth = run_metadata(), copy_bandwidth()
  meta.update({
      "prompt_len": _PROMPT.value, "new_tokens": _NEW.value, "dtype": _DTYPE.value,
      "copy_bandwidth_Bps": bandwidth, "repeats": _REPEATS.value,
      "isolation": {"model": "one subprocess per model", "point": "one subprocess per "
                    "(model, batch)", "none": "one process"}[_ISOLATE.value],
      "peak_memory_scope": {"model": "the model's process up to this batch (batches "
                            "increase)", "point": "this point alone",
                            "none": "the process up to this point"}[_ISOLATE.value],
      "mem_fraction": _MEM_FRACTION.value if isolate else os.environ.get(
          "XLA_PYTHON_CLIENT_MEM_FRACTION"),
      "decode": "based_jax.generate.decode: greedy, lax.while_loop on device, cache donated",
      "attention": "per model: resolved config fields and the paths traced ('prefill:cudnn' = "
                   "jax.nn.dot_product_attention cuDNN flash attention within the prompt, "
                   "'decode:xla' = einsum over the [B, H, S, K] cache, 'decode:cudnn' = cuDNN "
                   "with per-row key lengths, 'chunked:xla' = masked attention over the cache "
                   "for prompt chunks after the first)",
      "linear_attention": "pallas_kernels dispatch (config.linear_attention_impl); per model the "
                          "paths traced, as '<chunked or decode>:<implementation>' that 'auto' "
                          "resolved to"})
  os.makedirs(os.path.dirname(_OUT.value) or ".", exist_ok=True)
  old = load_previous(_OUT.value + ".json", meta) if _RESUME.value else None
  previous = {r["model"]: r for r in old["results"]} if old else {}
  if old:  # one bandwidth for every row of the file
    bandwidth = meta["copy_bandwidth_Bps"] = old["meta"]["copy_bandwidth_Bps"]
    print(f"continuing {_OUT.value}.json: {sorted(previous)}", flush=True)
  print(f"device {meta['device']}: copy bandwidth {bandwidth / 1e12:.2f} TB/s", flush=True)
  results = {spec: previous[spec] for spec in _MODELS.value if spec in previous}
  title = f"{meta['device']}: prompt {_PROMPT.value}, {_NEW.value} new tokens, {_DTYPE.value}"

  def save(result):
    results[result["model"]] = result
    ordered = [results[s] for s in _MODELS.value if s in results]
    with open(_OUT.value + ".json", "w") as f:  # after every point: partial runs keep data
      json.dump({"meta": meta, "results": ordered}, f, indent=1)
    plot(ordered, _OUT.value + ".png", title)

  def stop():
    return bool(_DEADLINE.value) and time.monotonic() - started > _DEADLINE.value

  batches = batch_sizes(_BATCHES.value, _MAX_BATCH.value)
  complete = True
  for spec in _MODELS.value:
    if spec in results and not pending_batches(results[spec], batches):
      continue
    config = model_config(spec, _DTYPE.value, _ATTN.value, _ATTN_DECODE.value)
    point = dict(spec=spec, prompt_len=_PROMPT.value, new_tokens=_NEW.value,
                 dtype=_DTYPE.value, repeats=_REPEATS.value, bandwidth=bandwidth,
                 peak_flops=_PEAK_FLOPS.value,
                 attention_impl=_ATTN.value, attention_decode_impl=_ATTN_DECODE.value)
    info = {"attention_impl": config.attention_impl,
            "attention_decode_impl": config.attention_decode_impl,
            "linear_attention_impl": config.linear_attention_impl,
            "taylor_state": taylor_state_layout(config),
            "dtype": config.dtype, "overrides": parse_model(spec)[1]}
    save_model = lambda r, info=info: save({**r, "config": info})  # noqa: E731
    first_chunk = auto_prefill_chunk(config, _PROMPT.value, _PREFILL_CHUNK.value)
    first_rows = _PREFILL_ROWS.value or None
    if _ISOLATE.value == "model":
      deadline = time.time() + _DEADLINE.value - (time.monotonic() - started) \
          if _DEADLINE.value else 0
      result = sweep_in_child(spec, {"point": point, "batches": batches,
                                     "first_chunk": first_chunk, "previous": results.get(spec),
                                     "first_row_block": first_rows,
                                     "deadline": deadline},
                              _MEM_FRACTION.value, _CHILD_TIMEOUT.value, save_model)
    else:
      params_cache = {}

      def run_point(batch, chunk, rows, point=point, params_cache=params_cache):
        if isolate:
          return run_child({"task": "point", "point": {**point, "batch": batch,
                                                        "prefill_chunk": chunk,
                                                        "prefill_row_block": rows}},
                           _MEM_FRACTION.value, _CHILD_TIMEOUT.value)
        return measure_point(**point, batch=batch, prefill_chunk=chunk, prefill_row_block=rows,
                             params_cache=params_cache)

      result = sweep(spec, batches, run_point, first_chunk, _PROMPT.value,
                     previous=results.get(spec), save=save_model, stop=stop,
                     first_row_block=first_rows)
      params_cache.clear()
    save_model(result)
    if not result["complete"]:
      complete = False
      break
  print("sweep complete" if complete else
        "sweep INCOMPLETE (deadline): rerun the same command to continue", flush=True)


if __name__ == "__main__":
  app.run(main)
