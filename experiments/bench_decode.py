"""Generation throughput of models with random weights, over batch sizes up to the first that
runs out of memory.

  python -m experiments.bench_decode --models=based_1b,transformer_pp_1b --prompt_len=1024
  python -m experiments.bench_decode --floors_only=2.9e12   # the floors alone, nothing timed

For each model and batch size: prefill time, decode time per step (the jitted
`lax.while_loop` of `based_jax.generate.decode`), generated tokens/s, peak device memory, the
compiled executables' memory, the byte and compute floors of a step (`decode_floors`) and the
implementation of every mixer path (`based_jax.implementations`). Batch sizes double from 1
or follow --batch_sizes. A prefill that runs out of memory is retried with 4x smaller prompt
chunks (down to 64), then with the batch prefilled in halved row blocks (down to 64 rows); any
other out-of-memory batch ends the model's sweep and is recorded.

--isolate runs each model, or each (model, batch), in its own process (`child_process`), so
its memory peak is its own and a crash is a recorded result. Models are presets with optional
'+field=value' overrides, e.g. `transformer_pp_1b+attention_decode_impl=cudnn`. Writes
<out>.json and <out>.png; a rerun continues <out>.json (--resume).
"""

import dataclasses
import json
import math
import os
import signal
import statistics
import sys
import time
from typing import Callable, Optional

import jax
import jax.numpy as jnp
from absl import app, flags

from based_jax import config as config_lib
from based_jax.cache import cache_bytes_by_kind
from based_jax.config import ModelConfig
from based_jax.generate import decode, prefill
from based_jax.implementations import implementations
from based_jax.mixers import registry
from based_jax.model import init_params
from experiments import child_process
from experiments.benchmarking import copy_bandwidth, model_config, parse_model, run_metadata
from experiments.child_process import OutOfMemory, first_line, is_oom
from experiments.decode_floors import floors, step_floors, taylor_state_layout

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
                                 list(config_lib.ATTENTION_DECODE_IMPLS),
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
_RESUME = flags.DEFINE_bool("resume", True, "Continue <out>.json of the same settings: models "
                            "and batches already there are not run again.")
_DEADLINE = flags.DEFINE_integer("deadline_s", 0, "Start no new point after this many seconds "
                                 "(0: none); rerun the same command to continue.")
_CHILD = flags.DEFINE_string("child_request", None, "Internal: the request of a child process.")

CHILD_MODULE = "experiments.bench_decode"  # what `child_process` runs: this script
MIN_PREFILL_CHUNK = 64
MIN_ROW_BLOCK = 64
DEFAULT_PREFILL_CHUNK = 256


# ----------------------------------------------------------------------------- prefill plans

def auto_prefill_chunk(config: ModelConfig, prompt_len: int, requested: int = 0) -> int:
  """Prompt tokens per prefill call: `requested` if set, else the whole prompt for a model with
  a cache that holds every token (full attention: one flash-attention call) and
  DEFAULT_PREFILL_CHUNK for the others."""
  if requested:
    return requested
  holds_every_token = any(registry.spec(kind).capacity is not None
                          for kind in config.layer_kinds)
  return prompt_len if holds_every_token else DEFAULT_PREFILL_CHUNK


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
  config: ModelConfig
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


def run_generation(config: ModelConfig, params, prompts: jnp.ndarray, new_tokens: int,
                   seed: int = 0, prefill_chunk: Optional[int] = None):
  """Exactly what is timed: prefill then the jitted greedy decode loop. Returns the tokens
  [B, new_tokens] and the two wall times in seconds."""
  b, p = prompts.shape
  chunk = prefill_chunk or auto_prefill_chunk(config, p)
  return Generation(config, b, p, new_tokens, chunk).compile(params).run(params, prompts, seed)


def peak_device_bytes() -> Optional[int]:
  """The device's peak bytes in use so far, where the backend reports it (not on a CPU)."""
  stats = jax.devices()[0].memory_stats() or {}
  return stats.get("peak_bytes_in_use")


def measure_point(spec: str, batch: int, *, prompt_len: int, new_tokens: int, dtype: str,
                  repeats: int, prefill_chunk: int, bandwidth: float,
                  peak_flops: float = 0.0,
                  prefill_row_block: Optional[int] = None,
                  attention_impl: Optional[str] = None,
                  attention_decode_impl: Optional[str] = None,
                  params_cache: Optional[dict] = None) -> dict:
  """Compiles and times one (model, batch) point in this process; returns its row.
  `params_cache` keeps one model's weights between calls. Raises OutOfMemory."""
  config = model_config(spec, dtype, attention_impl, attention_decode_impl)
  params_cache = {} if params_cache is None else params_cache
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
  param_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
  # Before the timing, so a failing FLOP count costs no measurement.
  floor = step_floors(config, batch, prompt_len, new_tokens, param_bytes, bandwidth,
                      peak_flops)
  prompts = jax.random.randint(jax.random.key(batch), (batch, prompt_len), 0,
                               config.vocab_size, jnp.int32)
  gen.run(params, prompts)  # warm-up
  times = [gen.run(params, prompts)[1:] for _ in range(repeats)]
  prefill_s = statistics.median(t[0] for t in times)
  decode_s = statistics.median(t[1] for t in times)
  step_ms = 1e3 * decode_s / new_tokens
  peak = peak_device_bytes()
  return {"batch": batch, "prefill_chunk": prefill_chunk, "prefill_row_block": rows,
          "prefill_ms": 1e3 * prefill_s, "decode_ms_per_step": step_ms,
          "decode_ms_per_step_min": 1e3 * min(t[1] for t in times) / new_tokens,
          "tokens_per_s": batch * new_tokens / decode_s,
          "peak_memory_gb": None if peak is None else peak / 1e9,
          "compiled_memory": gen.memory(),
          "param_bytes": param_bytes,
          "floor_bytes_per_step": floor["floor_breakdown"]["total"], **floor,
          "ratio_to_floor": step_ms / floor["floor_ms_per_step"],
          "cache_bytes_per_sequence": cache_bytes_by_kind(config, 1, prompt_len + new_tokens),
          "implementations": implementations(config)}


# ----------------------------------------------------------------------------- the sweep

def batch_sizes(explicit: list, max_batch: int) -> list[int]:
  """The batches of --batch_sizes, or powers of two from 1 up to `max_batch`."""
  if explicit:
    return [int(b) for b in explicit]
  out, b = [], 1
  while b <= max_batch:
    out.append(b)
    b *= 2
  return out


def new_result(spec: str, first_chunk: int, first_row_block: Optional[int]) -> dict:
  """A model's sweep result before any point."""
  return {"model": spec, "rows": [], "oom": None, "error": None, "prefill_retries": [],
          "prefill_chunk": first_chunk, "prefill_row_block": first_row_block}


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
  result = previous or new_result(spec, first_chunk, first_row_block)
  result["complete"] = False
  for batch in pending_batches(result, batches):
    if stop():
      log(f"{spec}: stopping before batch {batch} (deadline); rerun to continue")
      return summarise(result)
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
    save(summarise(result))
  result["complete"] = True
  save(summarise(result))
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


def summarise(result: dict) -> dict:
  """Sorts the rows of a sweep result by batch and names its best (most tokens/s)."""
  result["rows"].sort(key=lambda r: r["batch"])
  result["best"] = max(result["rows"], key=lambda r: r["tokens_per_s"], default=None)
  return result


def point_settings(batch: int, chunk: int, row_block: Optional[int]) -> dict:
  """The arguments of `measure_point` that a sweep varies."""
  return {"batch": batch, "prefill_chunk": chunk, "prefill_row_block": row_block}


def measure_here(point: dict, starting: Callable[[dict], None] = lambda settings: None):
  """A `sweep` run_point that measures in this process (`starting(settings)` first)."""
  params_cache = {}

  def run_point(batch, chunk, row_block):
    settings = point_settings(batch, chunk, row_block)
    starting(settings)
    return measure_point(**point, **settings, params_cache=params_cache)
  return run_point


def measure_in_children(point: dict, mem_fraction: float, timeout_s: int):
  """A `sweep` run_point that measures every point in its own process."""
  def run_point(batch, chunk, row_block):
    request = {"task": "point", "point": {**point, **point_settings(batch, chunk, row_block)}}
    return child_process.run_child(CHILD_MODULE, request, mem_fraction, timeout_s)
  return run_point


def sweep_model(args: dict, run_point, save: Callable[[dict], None],
                stop: Callable[[], bool]) -> dict:
  """`sweep` of one model; `args` (the "sweep" of a child's request) holds "point" (the
  settings of `measure_point` that stay), "batches", "first_chunk", "first_row_block" and
  "previous" (a result to continue, or None)."""
  return sweep(args["point"]["spec"], args["batches"], run_point, args["first_chunk"],
               args["point"]["prompt_len"], previous=args["previous"], save=save, stop=stop,
               first_row_block=args["first_row_block"])


def past(deadline: float) -> Callable[[], bool]:
  """stop() for a sweep: whether the wall clock passed `deadline` (0: never)."""
  return lambda: bool(deadline) and time.time() > deadline


def handle_request(request: dict, progress: Callable[..., None]) -> dict:
  """The child's side of --isolate (`child_process.serve`): the probe (metadata and copy
  bandwidth), one point, or one model's sweep (reporting progress)."""
  task = request["task"]
  if task == "probe":
    return {"meta": run_metadata(), "bandwidth": copy_bandwidth()}
  if task == "point":
    return measure_point(**request["point"])
  if task == "sweep":
    args = request["sweep"]
    run_point = measure_here(args["point"], lambda settings: progress(running=settings))
    return sweep_model(args, run_point, save=progress, stop=past(args["deadline"]))
  raise ValueError(f"unknown task {task!r}")


# ----------------------------------------------------------------------------- main

def plot(results: list[dict], path: str, title: str) -> None:
  """Tokens/s over batch size, a line per model, saved to `path`."""
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


def write_floors(bandwidth: float) -> None:
  """--floors_only: the floors of every (model, batch) at `bandwidth` bytes/s, printed and
  written to <out>.json."""
  rows = floors(_MODELS.value, batch_sizes(_BATCHES.value, _MAX_BATCH.value), _DTYPE.value,
                _PROMPT.value, _NEW.value, bandwidth, _PEAK_FLOPS.value)
  meta = {**run_metadata(), "prompt_len": _PROMPT.value, "new_tokens": _NEW.value,
          "dtype": _DTYPE.value, "bandwidth_Bps": bandwidth, "peak_flops": _PEAK_FLOPS.value,
          "what": "byte counts (bytes_breakdown) and XLA's FLOP count of one decode step "
                  "(flops_per_step), from shapes; nothing was timed"}
  os.makedirs(os.path.dirname(_OUT.value) or ".", exist_ok=True)
  with open(_OUT.value + ".json", "w") as f:
    json.dump({"meta": meta, "rows": rows}, f, indent=1)
  for row in rows:
    print(f"{row['model']:40s} B={row['batch']:5d} {row['bytes_per_token'] / 1e6:8.2f} MB/token "
          f"floor {row['floor_ms_per_step']:8.3f} ms/step, compute "
          f"{row.get('compute_floor_ms_per_step', 0):7.3f} ms/step")


def run_meta() -> dict:
  """The results file's metadata: the device's (measured in a child when isolating, so this
  process never touches the device) and the settings."""
  isolate = _ISOLATE.value != "none"
  if isolate:  # the parent must hold no device memory while children run
    os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
    probe = child_process.run_child(CHILD_MODULE, {"task": "probe"}, _MEM_FRACTION.value,
                                    _CHILD_TIMEOUT.value)
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
      "implementations": "per row: based_jax.implementations(config) in the process that ran "
                         "it, the implementation of each mixer path (linear_attention: "
                         "chunked = a prefill chunk, decode; attention: prefill = within the "
                         "call, decode = one token over the cache, chunked_prefill = later "
                         "prompt chunks over the cache)"})
  return meta


def model_info(config: ModelConfig, spec: str) -> dict:
  """The settings of a model recorded with its results."""
  return {"attention_impl": config.attention_impl,
          "attention_decode_impl": config.attention_decode_impl,
          "linear_attention_impl": config.linear_attention_impl,
          "taylor_state": taylor_state_layout(config),
          "dtype": config.dtype, "overrides": parse_model(spec)[1]}


def run_model(spec: str, batches: list[int], bandwidth: float, previous: Optional[dict],
              save: Callable[[dict], None], deadline: float) -> dict:
  """The sweep of one model as --isolate says; `save` gets every partial result."""
  config = model_config(spec, _DTYPE.value, _ATTN.value, _ATTN_DECODE.value)
  point = dict(spec=spec, prompt_len=_PROMPT.value, new_tokens=_NEW.value, dtype=_DTYPE.value,
               repeats=_REPEATS.value, bandwidth=bandwidth, peak_flops=_PEAK_FLOPS.value,
               attention_impl=_ATTN.value, attention_decode_impl=_ATTN_DECODE.value)
  args = {"point": point, "batches": batches,
          "first_chunk": auto_prefill_chunk(config, _PROMPT.value, _PREFILL_CHUNK.value),
          "first_row_block": _PREFILL_ROWS.value or None, "previous": previous,
          "deadline": deadline}
  info = model_info(config, spec)
  save_model = lambda result: save({**result, "config": info})  # noqa: E731
  if _ISOLATE.value == "model":
    initial = previous or new_result(spec, args["first_chunk"], args["first_row_block"])
    result = summarise(child_process.sweep_in_child(
        CHILD_MODULE, {"task": "sweep", "sweep": args}, _MEM_FRACTION.value,
        _CHILD_TIMEOUT.value, save_model, initial))
  else:
    run_point = (measure_in_children(point, _MEM_FRACTION.value, _CHILD_TIMEOUT.value)
                 if _ISOLATE.value == "point" else measure_here(point))
    result = sweep_model(args, run_point, save_model, past(deadline))
  save_model(result)
  return result


def run_sweeps() -> None:
  """Every model's sweep, saved to <out>.json and <out>.png after every point."""
  deadline = time.time() + _DEADLINE.value if _DEADLINE.value else 0
  # A terminated parent (a time limit) unwinds, and subprocess.run kills the running child.
  signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
  meta = run_meta()
  os.makedirs(os.path.dirname(_OUT.value) or ".", exist_ok=True)
  old = load_previous(_OUT.value + ".json", meta) if _RESUME.value else None
  previous = {r["model"]: r for r in old["results"]} if old else {}
  if old:  # one bandwidth for every row of the file
    meta["copy_bandwidth_Bps"] = old["meta"]["copy_bandwidth_Bps"]
    print(f"continuing {_OUT.value}.json: {sorted(previous)}", flush=True)
  bandwidth = meta["copy_bandwidth_Bps"]
  print(f"device {meta['device']}: copy bandwidth {bandwidth / 1e9:.1f} GB/s", flush=True)
  results = {spec: previous[spec] for spec in _MODELS.value if spec in previous}
  title = f"{meta['device']}: prompt {_PROMPT.value}, {_NEW.value} new tokens, {_DTYPE.value}"

  def save(result):
    results[result["model"]] = result
    ordered = [results[s] for s in _MODELS.value if s in results]
    with open(_OUT.value + ".json", "w") as f:
      json.dump({"meta": meta, "results": ordered}, f, indent=1)
    plot(ordered, _OUT.value + ".png", title)

  batches = batch_sizes(_BATCHES.value, _MAX_BATCH.value)
  for spec in _MODELS.value:
    if spec in results and not pending_batches(results[spec], batches):
      continue
    if not run_model(spec, batches, bandwidth, results.get(spec), save, deadline)["complete"]:
      print("sweep INCOMPLETE (deadline): rerun the same command to continue", flush=True)
      return
  print("sweep complete", flush=True)


def main(argv):
  del argv
  if _CHILD.value:
    child_process.serve(_CHILD.value, handle_request)
  elif _FLOORS_ONLY.value > 0:
    write_floors(_FLOORS_ONLY.value)
  else:
    run_sweeps()


if __name__ == "__main__":
  app.run(main)
