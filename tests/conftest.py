"""Session setup for the suite: one persistent XLA compilation cache per test run.

Many tests compile the same programs: in-process, and in the subprocesses that the training,
fault and multi-host tests start (`python -m experiments.train ...`). JAX's persistent
compilation cache, pointed at a fresh directory for the run and inherited by those
subprocesses through the environment, compiles each program once per run. The directory starts empty every run and is removed at its end, so a
run never reuses another's executables. A cache directory the caller set is left alone.
"""

import os
import shutil
import tempfile

if "JAX_COMPILATION_CACHE_DIR" not in os.environ:  # before anything imports jax
  _CACHE = tempfile.mkdtemp(prefix="based_jax_test_xla_cache_")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
else:
  _CACHE = None


def pytest_unconfigure(config):
  del config
  if _CACHE is not None:
    shutil.rmtree(_CACHE, ignore_errors=True)
