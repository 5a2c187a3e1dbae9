"""The macros of //:BUILD: one call per experiment script and per test file.

  experiment_binary  the py_binary of experiments/<name>.py;
  pytest_test        the py_test that runs tests/<name>.py with pytest.

tests/test_build.py evaluates this file as it is (its stub rules behind `native`), so what it
checks against the imports is the targets these macros create.
"""

# BUILD's genrule :pytest_main writes it: it runs pytest on the files given as arguments.
_PYTEST_MAIN = "pytest_main.py"

# What _PYTEST_MAIN imports: every pytest_test has it, listed in BUILD or not.
_PYTEST_MAIN_DEPS = ["//third_party/py:pytest"]

def experiment_binary(name, deps, **kwargs):
    """The py_binary of the root package for experiments/<name>.py (its main).

    `bazel run //:<name> -- --flags` runs it; without Bazel, `python -m experiments.<name>`.

    Args:
      name: the target, and the script's name without .py: experiments/<name>.py.
      deps: what the script imports (tests/test_build.py checks them).
      **kwargs: any other attribute of py_binary (data, ...).
    """
    native.py_binary(
        name = name,
        srcs = ["experiments/%s.py" % name],
        deps = deps,
        **kwargs
    )

def pytest_test(name, deps = [], data = [], size = "medium", **kwargs):
    """The py_test of the root package that runs tests/<name>.py with pytest and setup.cfg.

    Args:
      name: the target, and the test file's name without .py: tests/<name>.py.
      deps: what the test file imports (tests/test_build.py checks them); the pytest that the
        main imports is added.
      data: runfiles beyond setup.cfg (pytest's settings), such as the binaries a test runs.
      size: Bazel's size of the test ("medium", Bazel's default, when not given).
      **kwargs: any other attribute of py_test (tags, timeout, ...).
    """
    src = "tests/%s.py" % name
    native.py_test(
        name = name,
        size = size,
        srcs = [_PYTEST_MAIN, src],
        args = [src],
        data = ["setup.cfg"] + data,
        main = _PYTEST_MAIN,
        deps = deps + [dep for dep in _PYTEST_MAIN_DEPS if dep not in deps],
        **kwargs
    )
