"""Multi-process training on CPU, and checkpoints that move between device and process counts.

Two processes on localhost form one run through JAX's distributed runtime (`jax.distributed.
initialize`, cross-process CPU collectives through gloo, jaxlib's default), each with fake CPU
devices (XLA_FLAGS=--xla_force_host_platform_device_count), and train a tiny text run through
`based_jax.training.trainer.train` in one shared workdir (`multihost_worker.py`). Every case
is checked against one single-process run of the same global batch: the same final parameters
and optimizer state up to float32 summation order (the devices reduce in another order).
Cases: 2 processes from scratch (process 0 tokenizes first), paused and resumed in 2 processes
past an unreadable newest checkpoint; a busy workdir refusing both processes; the 2-process
checkpoint resumed in 1 process on 1 device; 8 -> 2 -> 1 devices in one process; a per-process
data position refused under another process count.
"""

import json
import os
import shutil
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

import multihost_worker as worker
from based_jax.config import get_config
from based_jax.data import text_sources
from based_jax.model import LanguageModel
from based_jax.training import step as step_lib
from based_jax.training.checkpointing import (Checkpointer, ProcessCountChanged, abstract_like,
                                              checkpoint_dir)
from based_jax.training.optimizer import make_optimizer
from based_jax.training.sharding import make_mesh
from based_jax.training.tasks import make_task
from based_jax.training.workdir import WorkdirLock

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "multihost_worker.py")
# Float32 sums over 8 rows reduced in another order (other devices, other processes): each leaf
# agrees with the reference to a few 1e-6 of its largest entry (measured: <= 3e-6); a run
# that resumed at the wrong data position is off by about 1 of it.
RTOL = 1e-4


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _run_workers(tmp_path, name: str, workdir, corpus, devices: int, processes: int,
                 steps_this_run) -> tuple[list[int], list[str]]:
  """Runs the worker in `processes` processes of `devices` CPU devices each: their exit codes
  and outputs."""
  port, out = _free_port(), str(tmp_path / name)
  flags = " ".join(f for f in os.environ.get("XLA_FLAGS", "").split()
                   if not f.startswith("--xla_force_host_platform_device_count"))
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT,
         "XLA_FLAGS": f"{flags} --xla_force_host_platform_device_count={devices}",
         # Launches of the same device and process counts compile the same programs once.
         "JAX_COMPILATION_CACHE_DIR": str(tmp_path.parent / "compilation_cache"),
         "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
         "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
  procs, logs = [], []
  for i in range(processes):
    request = tmp_path / f"{name}_{i}.json"
    request.write_text(json.dumps({
        "data": corpus["data"], "tokenizer": corpus["tokenizer"],
        "cache_dir": str(tmp_path / "cache"), "workdir": str(workdir),
        "out": out, "steps_this_run": steps_this_run, "num_processes": processes,
        "process_id": i, "coordinator": f"localhost:{port}"}))
    logs.append(open(tmp_path / f"{name}_{i}.log", "w+"))
    procs.append(subprocess.Popen([sys.executable, WORKER, str(request)], env=env, cwd=ROOT,
                                  stdout=logs[-1], stderr=subprocess.STDOUT))
  try:
    codes = [p.wait(timeout=150) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  outputs = []
  for log in logs:
    log.seek(0)
    outputs.append(log.read())
    log.close()
  return codes, outputs


def _launch(tmp_path, name: str, workdir, corpus, devices: int, processes: int = 1,
            steps_this_run=None):
  """Runs the worker (`_run_workers`); returns process 0's record (summary, counts), its
  gathered final {path: array} and its output."""
  codes, outputs = _run_workers(tmp_path, name, workdir, corpus, devices, processes,
                                steps_this_run)
  out = str(tmp_path / name)
  assert codes == [0] * processes, "\n".join(
      f"process {i} exited {c}:\n{o[-3000:]}" for i, (c, o) in enumerate(zip(codes, outputs)))
  with open(out + ".json") as f:
    record = json.load(f)
  with np.load(out + ".npz") as arrays:
    return record, dict(arrays), outputs[0]


def _assert_matches(arrays, reference):
  assert sorted(arrays) == sorted(reference)
  for key, want in reference.items():
    scale = float(np.max(np.abs(want))) or 1.0
    np.testing.assert_allclose(arrays[key], want, rtol=RTOL, atol=RTOL * scale, err_msg=key)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  """Two Bible chapters as JSONL and a byte-level tokenizer (256 bytes, then EOS): each run
  tokenizes them into its own cache (in 2 processes: process 0 first)."""
  folder = tmp_path_factory.mktemp("corpus")
  (source,) = text_sources.parse_spec("bible").text
  with open(folder / "chapters.jsonl", "w") as f:
    for _, chapter in zip(range(2), source.documents()):
      f.write(json.dumps({"text": chapter}) + "\n")
  vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
  vocab["<|endoftext|>"] = len(vocab)
  tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
  tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tokenizer.decoder = decoders.ByteLevel()
  tokenizer.add_special_tokens(["<|endoftext|>"])
  tokenizer.save(str(folder / "tokenizer.json"))
  return {"data": str(folder / "chapters.jsonl"), "tokenizer": str(folder / "tokenizer.json")}


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory):
  """The whole run in one process on 8 devices."""
  tmp = tmp_path_factory.mktemp("reference")
  record, arrays, _ = _launch(tmp, "ref", tmp / "run", corpus, devices=8)
  assert record["summary"]["step"] == worker.TOTAL_STEPS
  return record, arrays


@pytest.fixture(scope="module")
def two_process_half(corpus, tmp_path_factory):
  """Steps 1-3 of the run in 2 processes x 2 devices: (tmp dir, workdir, record); tests
  resume copies of the workdir (`_copy`)."""
  tmp = tmp_path_factory.mktemp("two")
  workdir = tmp / "half"
  record, _, _ = _launch(tmp, "half", workdir, corpus, devices=2, processes=2,
                         steps_this_run=3)
  return tmp, workdir, record


def _copy(two_process_half, name: str):
  tmp, workdir, _ = two_process_half
  shutil.copytree(workdir, tmp / name)
  return tmp / name


def test_two_processes_train_like_one_and_resume(corpus, reference, two_process_half):
  tmp, half, record = two_process_half
  assert (record["summary"]["step"], record["process_count"], record["device_count"]) == (3, 2, 4)
  # One token file, written by process 0 before process 1 read it (the same stream).
  cache = sorted(os.listdir(tmp / "cache"))
  assert len(cache) == 2 and cache[0].endswith(".bin") and cache[1].endswith(".json")
  assert record["summary"]["tokens"] == reference[0]["summary"]["tokens"]
  steps = sorted(int(s) for s in os.listdir(checkpoint_dir(str(half))) if s.isdigit())
  assert steps == [2, 3]
  data = os.path.join(checkpoint_dir(str(half)), "3", "data")
  states = [json.load(open(os.path.join(data, f"process_{i}-of-2.json"))) for i in (0, 1)]
  assert states == [{"next_index": 3}] * 2  # global batches read, the same in both processes
  assert (half / "lock").read_text() == ""  # process 0 held it and released it

  # Resumed with its newest checkpoint unreadable (truncated arrays): process 0 sets it aside,
  # all resume from step 2.
  workdir = _copy(two_process_half, "rest")
  newest = checkpoint_dir(str(workdir)) + "/3"
  for root, _, files in os.walk(os.path.join(newest, "state")):
    for name in files:
      open(os.path.join(root, name), "w").close()
  record, arrays, output = _launch(tmp, "rest", workdir, corpus, devices=2, processes=2)
  assert f"checkpoint step 3 at {newest} cannot be read" in output
  assert os.path.isdir(newest + ".unreadable") and "resumed from step 2" in output
  assert record["summary"]["step"] == worker.TOTAL_STEPS
  _assert_matches(arrays, reference[1])
  want = reference[0]["summary"]
  assert record["summary"]["val/loss"] == pytest.approx(want["val/loss"], rel=1e-5)
  results = json.loads((workdir / "results.json").read_text())
  assert results["step"] == worker.TOTAL_STEPS
  # Only process 0 writes metrics: each step's once per run that trained it (step 3 twice).
  lines = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert sorted(l["step"] for l in lines if "train/loss" in l) == [1, 2, 3, 3, 4, 5, 6]


def test_a_busy_workdir_refuses_every_process(corpus, tmp_path):
  workdir = tmp_path / "busy"
  with WorkdirLock(str(workdir)):
    codes, outputs = _run_workers(tmp_path, "busy", workdir, corpus, devices=1, processes=2,
                                  steps_this_run=None)
  assert codes[0] and codes[1]
  assert f"WorkdirBusy: workdir {str(workdir)!r} is in use by pid {os.getpid()}" in outputs[0]
  assert "another process of this run could not use it" in outputs[1]
  assert not (workdir / "checkpoints").exists()


def test_a_two_process_checkpoint_resumes_in_one_process_on_one_device(corpus, reference,
                                                                       two_process_half):
  """The text iterator's position is global: 2 processes -> 1, 4 devices -> 1."""
  workdir = _copy(two_process_half, "one")
  record, arrays, output = _launch(two_process_half[0], "one", workdir, corpus, devices=1)
  assert "resumed from step 3" in output and record["device_count"] == 1
  _assert_matches(arrays, reference[1])


def test_a_checkpoint_moves_from_8_to_2_to_1_devices(corpus, reference, tmp_path):
  """Params, optimizer state and data position written on 8 devices resume on 2, then on 1."""
  workdir = tmp_path / "run"
  for devices, stop in ((8, 2), (2, 4), (1, 6)):
    record, arrays, output = _launch(tmp_path, f"d{devices}", workdir, corpus, devices,
                                     steps_this_run=2)
    assert record["summary"]["step"] == stop and record["device_count"] == devices
    if devices != 8:
      assert f"resumed from step {stop - 2}" in output
  _assert_matches(arrays, reference[1])


def test_a_per_process_data_position_refuses_another_process_count(corpus, two_process_half):
  """An iterator state that is not global (MQAR's: each process shuffles its own shard) does
  not resume with another process count: a clear error, and the checkpoints stay."""
  copy = _copy(two_process_half, "refuse")
  run = worker.run_config(corpus["data"], corpus["tokenizer"], str(two_process_half[0] / "cache"))
  model_config = get_config(worker.MODEL_PRESET, vocab_size=worker.VOCAB)
  mesh = make_mesh(jax.devices()[:1])
  model, optimizer = LanguageModel(model_config), make_optimizer(run.optimizer)
  shapes = jax.eval_shape(lambda: step_lib.init_state(
      model, optimizer, run.seed, np.zeros((1, 8), np.int32)))
  target = abstract_like(shapes, step_lib.state_shardings(mesh, shapes))
  iterator = make_task(run, model_config, mesh).train_iterator
  checkpointer = Checkpointer(checkpoint_dir(str(copy)), run.keep_checkpoints)
  with pytest.raises(ProcessCountChanged, match="written by 2 processes and this run has 1"):
    checkpointer.restore(target, iterator, global_data_state=False)
  checkpointer.close()
  assert sorted(os.listdir(checkpoint_dir(str(copy)))) == ["2", "3"]
