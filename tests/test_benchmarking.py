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


def test_profile_scopes_attributes_kernels_to_their_source_ops(monkeypatch):
  hlo = ('  %loop_add_fusion.3 = f32[4]{0} fusion(%p), kind=kLoop, calls=%c, '
         'metadata={op_type="add" op_name="jit(step)/layers_1/mlp/add" source_file="m.py"}\n'
         '  ROOT %custom-call.7 = f32[4] custom-call(%x), metadata={op_name="jit(step)/x"}\n')
  events = [
      {"name": "loop_add_fusion_3", "dur": 30, "args": {"name": "jit(step)"}},  # HLO text
      {"name": "nvjet_tst_128x128", "dur": 60,  # named by the profiler itself
       "args": {"name": "jit(step)/layers_0/mixer/dot_general", "hlo_op": "custom-call.9"}},
      {"name": "nvjet_tst_64x64", "dur": 90, "args": {}},  # nothing names it: its family
      {"name": "cudnn_sdpa_bprop", "dur": 12, "args": {"hlo_op": "custom-call.7"}},
  ]
  events.append(events[1])  # a second launch of the same kernel
  monkeypatch.setattr(benchmarking, "kernel_events", lambda trace_dir: events)
  by_scope, by_kernel, launches = benchmarking.profile_scopes(
      lambda: jnp.ones(2), lambda x: x, hlo, lambda op: op.split("/", 1)[1], calls=3)
  assert by_scope == {"layers_1/mlp/add": 10, "layers_0/mixer/dot_general": 40,
                      "unattributed matmul": 30, "x": 4}
  assert by_kernel["unattributed matmul | nvjet_tst_64x64"] == 30
  assert launches == {"layers_1/mlp/add": 1 / 3, "layers_0/mixer/dot_general": 2 / 3,
                      "unattributed matmul": 1 / 3, "x": 1 / 3}


def test_train_step_scopes_name_layer_kind_and_module():
  scope = lambda op: benchmarking.module_scope(("base_conv", "linear_attention"), op)
  prefix = "jit(train_step)/while/body/closed_call/transpose(jvp(LanguageModel))"
  assert scope(f"{prefix}/layers_1/mixer/dot_general") == "linear_attention mixer"
  assert scope(f"{prefix}/layers_0/add_any") == "base_conv residual"
  assert scope(f"{prefix}/final_norm/mul") == "final_norm"
  assert scope(f"{prefix}/dot_general") == "head"
  assert scope("jit(train_step)/while/body/closed_call/jvp()/log") == "loss"
  assert scope("jit(train_step)/jit(clip)/max") == "optimizer"
