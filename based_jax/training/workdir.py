"""One run per workdir at a time: a lock file naming its owner.

`<workdir>/lock` holds the owner's pid, host and start time, and the owner holds an exclusive
`fcntl.flock` on it for as long as it runs. The operating system drops that lock when the
process ends, however it ends (kill -9 included), so a lock file whose lock is free is stale:
the next run takes it over with a message. A held lock refuses the second run with an error
naming the owner.

Multi-host: the workdir is shared by all processes of the run (Orbax writes every checkpoint
into one directory), so the run, not each process, owns it: process 0 holds the lock and every
process learns whether it got it (`multihost.all_true`), so a busy workdir refuses the whole
run at once, on every process.
"""

import datetime
import fcntl
import json
import os
import socket
import sys
import tempfile

from based_jax.training import multihost

LOCK_NAME = "lock"


def check_writable(directory: str) -> None:
  """Fails early, with a clear message, if files cannot be written to `directory`."""
  try:
    os.makedirs(directory, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=directory):
      pass
  except OSError as e:
    raise ValueError(f"directory {directory!r} is not writable: {e}") from e


class WorkdirBusy(ValueError):
  """Another live process runs in this workdir."""


class WorkdirLock:
  """Context manager: `with WorkdirLock(workdir): train(...)`."""

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, LOCK_NAME)
    self._file = None

  def __enter__(self) -> "WorkdirLock":
    error = None
    try:
      check_writable(os.path.dirname(self.path) or ".")
      if multihost.is_lead():
        self._file = self._take()
    except ValueError as e:  # WorkdirBusy included
      error = e
    if not multihost.all_true(error is None):
      if self._file is not None:
        self._release()
      raise error or WorkdirBusy(
          f"workdir {os.path.dirname(self.path)!r}: another process of this run could not "
          "use it (its error says why)")
    return self

  def _take(self):
    """The open lock file, flock'd and naming this process."""
    f = open(self.path, "a+")  # never truncates: a live owner's record stays readable
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      owner = _read_owner(f)
      f.close()
      raise WorkdirBusy(f"workdir {os.path.dirname(self.path)!r} is in use by {owner}; wait "
                        "for that run to finish or stop it, or use another --workdir") from None
    previous = _read_owner(f)
    if previous != "an unknown process":
      print(f"taking over the stale lock of {previous} (that process has ended): "
            f"{self.path}", file=sys.stderr)
    f.seek(0)
    f.truncate()
    json.dump({"pid": os.getpid(), "host": socket.gethostname(),
               "started": datetime.datetime.now().isoformat(timespec="seconds")}, f)
    f.flush()
    return f

  def __exit__(self, *exc) -> None:
    if self._file is not None:
      self._release()

  def _release(self) -> None:
    self._file.seek(0)
    self._file.truncate()  # released cleanly: no stale owner left behind
    self._file.close()  # closing releases the flock
    self._file = None


def _read_owner(f) -> str:
  f.seek(0)
  try:
    owner = json.loads(f.read())
    return f"pid {owner['pid']} on host {owner['host']} (started {owner['started']})"
  except (ValueError, KeyError, TypeError):
    return "an unknown process"
