"""What the processes of a multi-host run agree on before they act.

In a multi-host run (`jax.distributed.initialize`) every process runs the same train loop, and
a decision that one process takes alone (a busy workdir, an unreadable checkpoint, a stop
signal, a failed tokenization) would leave the others waiting in a collective. These helpers
turn a local fact into a shared one. Each is a collective: every process calls it at the same
point of the program. With one process they cost nothing and return the local fact.
"""

from typing import Callable, Optional, TypeVar

import jax
import numpy as np

T = TypeVar("T")


def is_lead() -> bool:
  """Whether this is process 0, the one that prints, writes metrics and owns the workdir lock."""
  return jax.process_index() == 0


def all_true(flag: bool) -> bool:
  """True where `flag` is true on every process."""
  if jax.process_count() == 1:
    return bool(flag)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return bool(np.all(multihost_utils.process_allgather(np.int32(bool(flag)))))


def any_true(flag: bool) -> bool:
  """True where `flag` is true on some process."""
  return not all_true(not flag)


def barrier(name: str) -> None:
  """Returns once every process has reached the barrier `name`."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)


def lead_first(fn: Callable[[], T], what: str) -> T:
  """`fn()` on process 0, then on the others (which then typically find its work done: a
  cache it filled). An error of process 0 is raised there and, as a ValueError saying that
  process 0 failed at `what`, on every other process, so no process goes on alone."""
  error: Optional[Exception] = None
  result = None
  if is_lead():
    try:
      result = fn()
    except Exception as e:  # noqa: BLE001 - raised again below, once the others know
      error = e
  if not all_true(error is None):
    if error is not None:
      raise error
    raise ValueError(f"process 0 failed at {what} (its error says why)")
  return result if is_lead() else fn()
