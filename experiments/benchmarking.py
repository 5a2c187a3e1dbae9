"""Shared benchmark helpers: timing, the copy-bandwidth ceiling, run metadata."""

import datetime
import importlib.metadata
import platform
import statistics
import sys
import time
from typing import Callable

import jax
import jax.numpy as jnp


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


def copy_bandwidth() -> float:
  """Device copy bandwidth in bytes/s, counting bytes read plus bytes written."""
  x = jax.random.normal(jax.random.key(0), (256 * 2**20,), jnp.float32)  # 1 GiB
  copy = jax.jit(lambda x: x * 1.0001)
  # Enough warm-up for the clocks to ramp and several copies per sync, so neither idle
  # clocks nor the host's launch latency lowers the ceiling the benchmarks divide by.
  timing = median_ms(lambda: copy(x), jax.block_until_ready, warmup=50, inner=10)
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
