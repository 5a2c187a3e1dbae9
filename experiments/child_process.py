"""Runs benchmark work in fresh Python processes, so each has the device memory to itself and
an out-of-memory failure, even one that kills the process, becomes a recorded result.

Protocol: the parent writes a request (JSON) and runs `python -m <module>
--child_request=<path>`; the child's `serve` runs it and rewrites a response file:
  {"result": r}                     the answer (a partial one while work goes on),
  {"result": r, "running": point}   a partial answer and the point now being run,
  {"result": r, "done": true}       the final answer,
  {"oom": {"phase", "error"}}       the work ran out of device memory,
  {"error": traceback}              it failed otherwise.
"""

import ctypes
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from typing import Callable, Optional

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_POLL_S = 2


class OutOfMemory(Exception):
  """Work ran out of device memory; `phase` says when ('prefill', 'decode', 'setup', ...)."""

  def __init__(self, phase: str, message: str):
    super().__init__(f"{phase}: {message}")
    self.phase, self.message = phase, message


def is_oom(error) -> bool:
  """Whether an exception (or a process's output) reports an out-of-memory failure."""
  text = str(error)
  return "RESOURCE_EXHAUSTED" in text or "Out of memory" in text or "out of memory" in text


def first_line(error, limit: int = 300) -> str:
  """The line of an error that says it ran out of memory, else its first non-blank line."""
  lines = [l for l in str(error).splitlines() if l.strip()]
  oom = [l for l in lines if is_oom(l)]
  return ((oom or lines or [""])[0]).strip()[:limit]


# ----------------------------------------------------------------------------- the parent

def die_with_parent() -> None:
  """In a child (before exec, or as a worker starts): be killed if the parent dies (Linux), so
  no orphan keeps the GPU's memory."""
  try:
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
  except Exception:  # noqa: BLE001 - best effort
    pass


def _read_json(path: str) -> Optional[dict]:
  """The JSON in `path`, or None if it is missing or caught mid-write."""
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def _spawn(module: str, request: dict, mem_fraction: float, timeout_s: int,
           on_progress: Optional[Callable[[dict], None]] = None
           ) -> tuple[Optional[dict], str, Optional[int]]:
  """Runs `request` in `python -m module`. Returns (its last response or None, its stderr,
  its exit code). The child's stdout is echoed; `on_progress(response)` is called whenever
  the child rewrites its response file. Raises TimeoutError after `timeout_s`."""
  with tempfile.TemporaryDirectory() as tmp:
    path, response_path = os.path.join(tmp, "request.json"), os.path.join(tmp, "response.json")
    with open(path, "w") as f:
      json.dump({**request, "response": response_path}, f)
    env = {**os.environ, "XLA_PYTHON_CLIENT_MEM_FRACTION": str(mem_fraction),
           "PYTHONUNBUFFERED": "1"}
    env.pop("XLA_PYTHON_CLIENT_PREALLOCATE", None)  # the parent's setting is not the child's
    out_path, err_path = os.path.join(tmp, "stdout"), os.path.join(tmp, "stderr")
    with open(out_path, "w") as out, open(err_path, "w") as err:
      proc = subprocess.Popen([sys.executable, "-m", module, f"--child_request={path}"],
                              env=env, stdout=out, stderr=err, cwd=_REPO_ROOT,
                              preexec_fn=die_with_parent)
      try:
        code = _watch(proc, out_path, response_path, timeout_s, on_progress)
      finally:
        if proc.poll() is None:
          proc.kill()
          proc.wait()
    with open(err_path) as f:
      stderr = f.read()
    return _read_json(response_path), stderr, code


def _watch(proc: subprocess.Popen, out_path: str, response_path: str, timeout_s: int,
           on_progress: Optional[Callable[[dict], None]]) -> int:
  """Polls the child until it exits (returns its exit code), echoing its stdout and passing
  each new response to `on_progress`. Raises TimeoutError after `timeout_s`."""
  echoed, seen, deadline = 0, None, time.monotonic() + timeout_s
  while True:
    try:
      code = proc.wait(timeout=_POLL_S)
    except subprocess.TimeoutExpired:
      code = None
    with open(out_path) as f:
      text = f.read()
    print(text[echoed:], end="", flush=True)
    echoed = len(text)
    if on_progress and os.path.exists(response_path):
      stamp = os.stat(response_path).st_mtime_ns
      response = _read_json(response_path) if stamp != seen else None
      if response is not None:  # a response caught mid-write is read at the next poll
        seen = stamp
        on_progress(response)
    if code is not None:
      return code
    if time.monotonic() > deadline:
      raise TimeoutError(f"child timed out after {timeout_s} s")


def run_child(module: str, request: dict, mem_fraction: float, timeout_s: int) -> dict:
  """Runs one request in a fresh process; returns its result. An out-of-memory error
  (reported, or a crash whose output says so) raises OutOfMemory; any other failure raises
  RuntimeError with the child's error."""
  response, output, code = _spawn(module, request, mem_fraction, timeout_s)
  if response is not None and "oom" in response:
    raise OutOfMemory(response["oom"]["phase"], response["oom"]["error"])
  if response is not None and "result" in response:
    return response["result"]
  if is_oom(output):
    raise OutOfMemory("unknown", first_line(output))
  detail = response["error"] if response else output[-3000:]
  raise RuntimeError(f"child exited with {code}: {detail}")


def sweep_in_child(module: str, request: dict, mem_fraction: float, timeout_s: int,
                   save: Callable[[dict], None], initial: dict) -> dict:
  """Runs a sweep request in a fresh process: one whose result has "oom" and "error" fields and
  which reports the point it is running ({"batch", ...}); each partial result goes to `save`.

  A child that dies (a hard out-of-memory abort, say) or times out leaves the rows of its last
  partial result (`initial` if it reported none); the point it was running is recorded as
  the result's "oom" (when its output says so) or its "error". Returns the result with
  "complete" True."""
  def progress(response):
    if response.get("result"):
      save(response["result"])

  try:
    response, output, code = _spawn(module, request, mem_fraction, timeout_s, progress)
  except TimeoutError as e:
    response, output, code = None, str(e), None
  response = response or {}
  if "done" in response:
    return response["result"]
  result = response.get("result") or initial
  point = response.get("running") or {"batch": None}  # None: it died between points
  if is_oom(output):
    result["oom"] = {**point, "phase": "unknown (the process died)", "error": first_line(output)}
  else:
    detail = response.get("error") or output[-3000:]
    result["error"] = {"batch": point["batch"],
                       "error": f"child exited with {code}: {detail}"[-4000:]}
  result["complete"] = True
  return result


# ----------------------------------------------------------------------------- the child

def serve(request_path: str, handle: Callable[[dict, Callable[..., None]], dict]) -> None:
  """The child's side: runs `handle(request, progress)` on the request at `request_path` and
  writes its final response. `progress(result=None, running=None)` reports a partial result
  (None: the last one reported) and the point now running, if any (a dict such as
  {"batch", "prefill_chunk", "prefill_row_block"})."""
  with open(request_path) as f:
    request = json.load(f)
  last = {"result": None}

  def respond(response: dict) -> None:
    tmp = request["response"] + ".tmp"
    with open(tmp, "w") as f:
      json.dump(response, f)
    os.replace(tmp, request["response"])

  def progress(result: Optional[dict] = None, running: Optional[dict] = None) -> None:
    last["result"] = last["result"] if result is None else result
    respond({"result": last["result"], **({} if running is None else {"running": running})})

  try:
    respond({"result": handle(request, progress), "done": True})
  except OutOfMemory as e:
    respond({"oom": {"phase": e.phase, "error": e.message}})
  except Exception:  # noqa: BLE001 - reported to the parent
    respond({"error": traceback.format_exc()[-4000:]})
