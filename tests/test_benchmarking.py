"""Shared benchmark helpers: per-kernel times read from a profiler trace, run metadata."""

import gzip
import json
import sys

import jax.numpy as jnp

from experiments import benchmarking


def write_trace(directory, events):
  path = directory / "plugins" / "profile" / "run" / "host.trace.json.gz"
  path.parent.mkdir(parents=True)
  with gzip.open(path, "wt") as fh:
    json.dump({"traceEvents": events}, fh)


def test_kernel_times_sums_complete_events_on_gpu_streams_only(tmp_path):
  write_trace(tmp_path, [
      {"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/device:GPU:0"}},
      {"ph": "M", "name": "process_name", "pid": 2, "args": {"name": "/host:CPU"}},
      {"ph": "X", "pid": 1, "name": "taylor_attention_fwd", "dur": 180.5},
      {"ph": "X", "pid": 1, "name": "taylor_attention_fwd", "dur": 19.5},
      {"ph": "X", "pid": 1, "name": "input_reduce_fusion", "dur": 28},
      {"ph": "X", "pid": 2, "name": "PjitFunction", "dur": 900},  # host work: not a kernel
      {"ph": "i", "pid": 1, "name": "marker"},  # not a complete event
  ])
  assert benchmarking.kernel_times(str(tmp_path)) == {"taylor_attention_fwd": 200.0,
                                                      "input_reduce_fusion": 28}


def test_profile_kernels_runs_the_call_under_the_profiler(monkeypatch):
  seen = []
  monkeypatch.setattr(benchmarking, "kernel_times",
                      lambda trace_dir: seen.append(trace_dir) or {"k": 30.0})
  calls = []
  out = benchmarking.profile_kernels(lambda: calls.append(1) or jnp.ones(2), lambda x: x,
                                     calls=3)
  assert len(calls) == 3 and len(seen) == 1
  assert out == {"k": 10.0}  # per call


def test_run_metadata_records_the_command_line():
  meta = benchmarking.run_metadata("optax")
  assert meta["argv"] == sys.argv and "optax" in meta["versions"]
