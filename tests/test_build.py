"""BUILD matches the imports: Bazel's targets are checked against the real tree, without Bazel.

BUILD files are Starlark, a Python subset: `check` evaluates them with stub rules (and the .bzl
files they load, as written, with the same stubs as `native`: a macro's targets are the ones it
creates, reported at the line of BUILD that calls it) and checks
  * every first-party .py file (FIRST_PARTY_DIRS) is in the srcs of exactly one target;
  * strict deps: every first-party module that a target's files import (anywhere: at the top,
    inside functions, inside try blocks) is in that target or in one of its direct deps;
  * every third-party import is declared: THIRD_PARTY maps its module to a placeholder label of
    third_party/py/BUILD and the importing target lists that label (optional imports too);
  * no stale deps: each dep of a target is imported by one of its files, and THIRD_PARTY,
    third_party/py/BUILD and the imports name the same packages;
  * each experiment script (a file with `if __name__ == "__main__":`) is a py_binary's main,
    each tests/test_*.py is run by a py_test.
A failure names the file, the import and the target. After adding a file or an import:
`python -m pytest tests/test_build.py`. Stdlib only; docs/development.md says how Bazel itself
builds and tests these targets.
"""

import ast
import builtins
import os
import re
import sys
import tempfile
import textwrap
import types
from pathlib import Path
from typing import NamedTuple, Optional

# resolve(): under `bazel test` this file is a symlink into the source tree, which is checked.
ROOT = Path(__file__).resolve().parents[1]
FIRST_PARTY_DIRS = ("based_jax", "pallas_kernels", "experiments", "tests")
SCRIPT_DIRS = ("experiments",)  # where a __main__ guard makes a file a script (py_binary)
TEST_GLOB = re.compile(r"tests/test_[^/]*\.py")
BUILD_NAMES = ("BUILD.bazel", "BUILD")
THIRD_PARTY_PACKAGE = "third_party/py"

# Third-party module (the top-level name, or a dotted prefix for namespace packages) -> the label
# of its placeholder py_library in third_party/py/BUILD. The longest matching prefix wins.
THIRD_PARTY = {
    "absl": "//third_party/py:absl",
    "datasets": "//third_party/py:datasets",
    "fla": "//third_party/py:fla",
    "flax": "//third_party/py:flax",
    "grain": "//third_party/py:grain",
    "huggingface_hub": "//third_party/py:huggingface_hub",
    "jax": "//third_party/py:jax",
    "jax_triton": "//third_party/py:jax_triton",
    "lm_eval": "//third_party/py:lm_eval",
    "matplotlib": "//third_party/py:matplotlib",
    "numpy": "//third_party/py:numpy",
    "optax": "//third_party/py:optax",
    "orbax.checkpoint": "//third_party/py:orbax_checkpoint",
    "pyarrow": "//third_party/py:pyarrow",
    "pytest": "//third_party/py:pytest",
    "safetensors": "//third_party/py:safetensors",
    "tensorboardX": "//third_party/py:tensorboardX",
    "tokenizers": "//third_party/py:tokenizers",
    "torch": "//third_party/py:torch",
    "tqdm": "//third_party/py:tqdm",
    "triton": "//third_party/py:triton",
    "yaml": "//third_party/py:yaml",
}
# Every py_test's main is the generated pytest_main.py (BUILD's genrule), which imports pytest.
PYTEST_MAIN = "pytest_main.py"
PYTEST_MAIN_DEPS = ("//third_party/py:pytest",)

# Rules whose attributes hold no Python sources or deps to check.
OTHER_RULES = ("package", "licenses", "exports_files", "filegroup", "alias", "test_suite",
               "sh_binary", "sh_test", "py_runtime", "py_runtime_pair", "toolchain")
STARLARK_BUILTINS = {name: getattr(builtins, name) for name in (
    "all", "any", "bool", "dict", "enumerate", "getattr", "hasattr", "int", "len", "list", "max",
    "min", "print", "range", "reversed", "sorted", "str", "tuple", "type", "zip")}


def fail(msg="", *args, **_):
  """Starlark's fail()."""
  raise RuntimeError(" ".join(str(a) for a in (msg, *args)))


class Target(NamedTuple):
  kind: str  # py_library, py_binary or py_test
  label: str  # //package:name
  where: str  # BUILD file and line
  srcs: tuple  # repository-relative paths
  deps: tuple  # absolute labels
  imports: tuple  # repository-relative directories put on sys.path
  main: Optional[str]  # repository-relative path (binaries and tests)
  args: tuple


class Import(NamedTuple):
  line: int
  text: str  # as written, for messages
  names: tuple  # candidate module names, the most specific first
  optional: bool  # inside a try that catches ImportError


def absolute_label(label: str, package: str) -> str:
  if label.startswith("@"):
    return label
  if label.startswith("//"):
    path, _, name = label[2:].partition(":")
    return f"//{path}:{name or path.rsplit('/', 1)[-1]}"
  return f"//{package}:{label[1:] if label.startswith(':') else label}"


def label_path(label: str) -> str:
  """//pkg:a/b.py -> pkg/a/b.py: where a file label lies in the repository."""
  path, _, name = label[2:].partition(":")
  return f"{path}/{name}" if path else name


def _glob_regex(pattern: str) -> str:
  parts = pattern.split("/")
  out = []
  for i, part in enumerate(parts):
    last = i == len(parts) - 1
    if part == "**":
      out.append(".+" if last else "(?:[^/]+/)*")
    else:
      out.append("".join("[^/]*" if c == "*" else re.escape(c) for c in part)
                 + ("" if last else "/"))
  return "".join(out)


def join(directory: str, path: str) -> str:
  """Repository-relative join; "" is the repository root."""
  return os.path.normpath(os.path.join(directory, path)) if directory else os.path.normpath(path)


def _skip_dir(name: str) -> bool:
  return name.startswith((".", "bazel-")) or name == "__pycache__"


class Tree:
  """The repository as the checker sees it: files on disk, BUILD texts possibly overridden."""

  def __init__(self, root: Path, overrides: Optional[dict] = None):
    self.root = Path(root)
    self.overrides = dict(overrides or {})

  def read(self, rel: str) -> str:
    if rel in self.overrides:
      return self.overrides[rel]
    return (self.root / rel).read_text()

  def is_file(self, rel: str) -> bool:
    return rel in self.overrides or (self.root / rel).is_file()

  def build_file(self, package: str) -> Optional[str]:
    for name in BUILD_NAMES:
      rel = f"{package}/{name}" if package else name
      if self.is_file(rel):
        return rel
    return None

  def walk(self, top: str, stop_at_packages: bool):
    """Repository-relative paths of the files under top (not crossing into subpackages)."""
    for dirpath, dirnames, filenames in os.walk(self.root / top):
      rel_dir = Path(dirpath).relative_to(self.root).as_posix()
      dirnames[:] = sorted(
          d for d in dirnames if not _skip_dir(d)
          and not (stop_at_packages and self.build_file(join(rel_dir, d))))
      for name in sorted(filenames):
        yield f"{rel_dir}/{name}" if rel_dir != "." else name


def load_package(tree: Tree, package: str, problems: list):
  """Evaluates one BUILD file: its py_* targets and the files its genrules generate."""
  build = tree.build_file(package)
  targets, generated = [], set()
  if build is None:
    return None, generated

  def rel(src: str) -> str:
    return label_path(absolute_label(src, package))

  def glob(include, exclude=(), **_):
    out = set()
    exclude_re = re.compile("|".join(_glob_regex(p) for p in exclude)) if exclude else None
    for pattern in include:
      regex = re.compile(_glob_regex(pattern))
      literal = []
      for part in pattern.split("/")[:-1]:
        if "*" in part:
          break
        literal.append(part)
      top = join(package, "/".join(literal) or ".")
      if not (tree.root / top).is_dir():
        continue
      for path in tree.walk(top, stop_at_packages=True):
        in_package = path[len(package) + 1:] if package else path
        if regex.fullmatch(in_package) and not (exclude_re and exclude_re.fullmatch(in_package)):
          out.add(in_package)
    return sorted(out)

  def build_line() -> int:
    """The line of BUILD that declares the target being created, through macros too."""
    frame = sys._getframe(1)
    while frame is not None and frame.f_code.co_filename != build:
      frame = frame.f_back
    return frame.f_lineno if frame is not None else 0

  def rule(kind):
    def stub(name, srcs=(), deps=(), imports=(), main=None, args=(), **_):
      line = build_line()
      if kind != "py_library" and main is None:  # Bazel: the src named after the target
        main = next((s for s in srcs if os.path.basename(rel(s)) == f"{name}.py"), f"{name}.py")
      targets.append(Target(
          kind, f"//{package}:{name}", f"{build}:{line}", tuple(rel(s) for s in srcs),
          tuple(absolute_label(d, package) for d in deps),
          tuple(join(package, i) for i in imports),
          main if main is None else rel(main), tuple(args)))
    return stub

  def genrule(name, outs=(), **_):
    generated.update(rel(o) for o in outs)

  def other(*_, **__):
    pass

  def unknown(symbol):
    def stub(*_, **__):
      raise NameError(f"tests/test_build.py does not know the loaded macro {symbol!r}")
    return stub

  rules = {"glob": glob, "genrule": genrule,
           **{kind: rule(kind) for kind in ("py_library", "py_binary", "py_test")},
           **{name: other for name in OTHER_RULES}}
  # What a .bzl macro reaches as `native`: the same stubs, so a macro's call of
  # native.py_test(...) records the very target that Bazel would create for this package.
  native = types.SimpleNamespace(**rules, package_name=lambda: package)

  def loader(bzl_package: str, loading: tuple):
    """Starlark's load() for a file of bzl_package: the symbols of an evaluated .bzl file."""
    def load(label, *symbols, **aliases):
      if not isinstance(label, str) or not label.endswith(".bzl"):
        raise ValueError(f"load({label!r}): not the label of a .bzl file")
      wanted = {**{s: s for s in symbols}, **aliases}  # local name -> the .bzl's name
      if label.startswith("@"):  # another repository's macro: not evaluated, fails when called
        return {local: unknown(symbol) for local, symbol in wanted.items()}
      label = absolute_label(label, bzl_package)
      module = evaluate_bzl(label, loading)
      for local, symbol in wanted.items():
        if symbol.startswith("_"):
          raise NameError(f"load({label!r}): {symbol!r} is private to that file")
        if symbol not in module:
          raise NameError(f"load({label!r}): that file defines no {symbol!r}")
      return {local: module[symbol] for local, symbol in wanted.items()}
    return load

  def evaluate_bzl(label: str, loading: tuple) -> dict:
    path, bzl_package = label_path(label), label[2:].partition(":")[0]
    if label in loading:
      raise ImportError(f"load() cycle: {' -> '.join((*loading, label))}")
    if tree.build_file(bzl_package) is None:
      raise ImportError(f"load({label!r}): {bzl_package or '//'} is no package (no BUILD file)")
    if not tree.is_file(path):
      raise ImportError(f"load({label!r}): no such file {path}")
    module = {"__builtins__": STARLARK_BUILTINS, "native": native, "fail": fail}
    load = loader(bzl_package, (*loading, label))
    module["load"] = lambda *a, **k: module.update(load(*a, **k))
    exec(compile(tree.read(path), path, "exec"), module)
    return module

  namespace = {"__builtins__": STARLARK_BUILTINS, "fail": fail, **rules}
  load_into_build = loader(package, ())
  namespace["load"] = lambda *a, **k: namespace.update(load_into_build(*a, **k))
  try:
    exec(compile(tree.read(build), build, "exec"), namespace)
  except Exception as e:  # noqa: BLE001 - any error is a broken BUILD file
    problems.append(f"{build}: cannot be evaluated: {type(e).__name__}: {e}")
  return targets, generated


def _is_main_guard(node) -> bool:
  return (isinstance(node, ast.If) and isinstance(node.test, ast.Compare)
          and isinstance(node.test.left, ast.Name) and node.test.left.id == "__name__"
          and any(isinstance(c, ast.Constant) and c.value == "__main__"
                  for c in node.test.comparators))


def _catches_import_error(handler: ast.ExceptHandler) -> bool:
  names = {"ImportError", "ModuleNotFoundError", "Exception", "BaseException"}
  types = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
  return handler.type is None or any(isinstance(t, ast.Name) and t.id in names for t in types)


def parse_imports(path: str, text: str):
  """(imports anywhere in the file, whether it has a module-level __main__ guard)."""
  tree = ast.parse(text, path)
  optional_nodes = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Try) and any(_catches_import_error(h) for h in node.handlers):
      for stmt in node.body:
        optional_nodes.update(id(n) for n in ast.walk(stmt))
  package = path.split("/")[:-1]  # of a relative import: the file's directory
  imports = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      for alias in node.names:
        imports.append(Import(node.lineno, f"import {alias.name}", (alias.name,),
                              id(node) in optional_nodes))
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        up = package[:len(package) - node.level + 1]
        base = ".".join([*up, *([base] if base else [])])
      text_from = f"from {'.' * node.level}{node.module or ''} import"
      for alias in node.names:
        names = (base,) if alias.name == "*" else (f"{base}.{alias.name}", base)
        imports.append(Import(node.lineno, f"{text_from} {alias.name}",
                              tuple(n.strip(".") for n in names), id(node) in optional_nodes))
  return imports, any(_is_main_guard(n) for n in tree.body)


def third_party_label(names, table) -> Optional[str]:
  for name in names:
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
      if ".".join(parts[:n]) in table:
        return table[".".join(parts[:n])]
  return None


def check(root: Path = ROOT, overrides: Optional[dict] = None, third_party=None,
          first_party_dirs=FIRST_PARTY_DIRS) -> list:
  """Every way in which BUILD disagrees with the tree, one line each (empty: they agree)."""
  third_party = THIRD_PARTY if third_party is None else third_party
  tree = Tree(root, overrides)
  problems = []
  packages, generated = {}, set()

  def package_targets(package: str):
    if package not in packages:
      targets, outs = load_package(tree, package, problems)
      packages[package] = None if targets is None else {t.label: t for t in targets}
      generated.update(outs)
    return packages[package]

  files = [path for top in first_party_dirs if (tree.root / top).is_dir()
           for path in tree.walk(top, stop_at_packages=False)]
  sources = [path for path in files if path.endswith(".py")]
  package_targets("")
  for path in files:
    if os.path.basename(path) in BUILD_NAMES:
      package_targets(os.path.dirname(path))
  if package_targets("") is None:
    return [f"{root}: no BUILD file"]
  targets = [t for pkg in list(packages.values()) if pkg for t in pkg.values()]

  def exists(label: str) -> bool:
    if label.startswith("@"):
      return True  # another repository: not checked here
    package = label[2:].partition(":")[0]
    found = package_targets(package)
    return found is not None and label in found

  # Each first-party file in exactly one target; each src exists.
  owners = {}
  for target in targets:
    for src in target.srcs:
      owners.setdefault(src, []).append(target.label)
      if not tree.is_file(src) and src not in generated:
        problems.append(f"{target.where}: {target.label} lists {src}, which does not exist")
  for path in sources:
    if path not in owners:
      problems.append(f"{path} is in no target's srcs: add it to a target of BUILD")
    elif len(owners[path]) > 1:
      problems.append(f"{path} is in the srcs of several targets: {', '.join(owners[path])}")
  owner = {path: labels[0] for path, labels in owners.items()}

  roots = sorted({"."} | {i for t in targets for i in t.imports})

  def module_file(name: str) -> Optional[str]:
    parts = name.split(".")
    for r in roots:
      base = "/".join(parts) if r == "." else "/".join([r, *parts])
      for candidate in (f"{base}.py", f"{base}/__init__.py"):
        if tree.is_file(candidate):
          return candidate
    return None

  def first_party_top(name: str) -> bool:
    top = name.split(".")[0]
    return module_file(top) is not None or any(
        (tree.root / (top if r == "." else f"{r}/{top}")).is_dir()
        and any(p.endswith(".py") for p in tree.walk(top if r == "." else f"{r}/{top}", False))
        for r in roots)

  # Imports against deps.
  stdlib = set(sys.stdlib_module_names) | {"__future__"}
  used_third_party = set()
  scripts = []
  lacking = {}  # (file, line, dep) -> the first message: one per statement and missing dep
  for target in targets:
    used = set()
    deps = set(target.deps)
    for dep in target.deps:
      if not exists(dep):
        problems.append(f"{target.where}: {target.label} depends on {dep}, which is no target")
    for src in target.srcs:
      if src in generated or not src.endswith(".py") or not tree.is_file(src):
        continue
      try:
        imports, has_main = parse_imports(src, tree.read(src))
      except SyntaxError as e:
        problems.append(f"{src}: cannot be parsed: {e}")
        continue
      if has_main and src.split("/")[0] in SCRIPT_DIRS:
        scripts.append(src)
      for imp in imports:
        where = f"{src}:{imp.line} `{imp.text}`{' (optional)' if imp.optional else ''}"
        if imp.names[-1].split(".")[0] in stdlib:
          continue
        files = [f for f in (module_file(n) for n in imp.names) if f]
        if files:
          need = owner.get(files[0])
          if need is None:
            problems.append(f"{where}: {files[0]} is in no target's srcs")
          elif need != target.label and need not in deps:
            lacking.setdefault((src, imp.line, need), f"{where}: {target.label} lacks the dep "
                               f"{need} (it holds {files[0]}): add it to {target.label}'s deps")
          used.add(need)
          continue
        label = third_party_label(imp.names, third_party)
        if label is None and first_party_top(imp.names[-1]):
          problems.append(f"{where}: no such first-party module ({target.label})")
          continue
        if label is None:
          problems.append(
              f"{where}: {imp.names[-1]} is no first-party module, not stdlib, and not in "
              f"THIRD_PARTY of tests/test_build.py ({target.label}); a third-party package "
              f"needs a line there and a placeholder in {THIRD_PARTY_PACKAGE}/BUILD")
          continue
        used_third_party.add(label)
        used.add(label)
        if label not in deps:
          lacking.setdefault((src, imp.line, label), f"{where}: {target.label} lacks the dep "
                             f"{label}: add it to {target.label}'s deps")
    # Binaries and tests.
    if target.kind != "py_library":
      if target.main not in target.srcs:
        problems.append(f"{target.where}: {target.label}'s main {target.main} is not in its "
                        "srcs")
      if target.main == PYTEST_MAIN:
        used.update(PYTEST_MAIN_DEPS)
        used_third_party.update(PYTEST_MAIN_DEPS)
        for dep in PYTEST_MAIN_DEPS:
          if dep not in deps:
            problems.append(f"{target.where}: {target.label} lacks the dep {dep}, which its "
                            f"main {PYTEST_MAIN} imports")
        tests = [s for s in target.srcs if s != PYTEST_MAIN]
        if list(target.args) != tests:
          problems.append(f"{target.where}: {target.label}'s args must be its test files "
                          f"{tests} (what {PYTEST_MAIN} runs), not {list(target.args)}")
    for dep in target.deps:
      if dep not in used and exists(dep):
        problems.append(f"{target.where}: {target.label} depends on {dep}, which none of its "
                        "srcs imports (stale dep): remove it")

  problems.extend(lacking.values())
  for path in sources:
    if TEST_GLOB.fullmatch(path) and path in owners:
      runners = [t for t in targets if path in t.srcs and t.kind == "py_test"]
      if not runners:
        problems.append(f"{path} is a test file but {owner[path]} is no py_test")
  for path in scripts:
    if not any(t.kind == "py_binary" and t.main == path for t in targets):
      problems.append(f"{path} is a script (it has a __main__ guard) but no py_binary's main: "
                      f"give it a py_binary (not {owner[path]})")

  # THIRD_PARTY, third_party/py/BUILD and the imports name the same packages.
  placeholders = set(package_targets(THIRD_PARTY_PACKAGE) or {})
  for module, label in sorted(third_party.items()):
    if label not in placeholders:
      problems.append(f"THIRD_PARTY maps {module} to {label}, which "
                      f"{THIRD_PARTY_PACKAGE}/BUILD does not declare")
    elif label not in used_third_party:
      problems.append(f"THIRD_PARTY maps {module} to {label} but nothing imports it: remove "
                      f"both the entry and the placeholder")
  for label in sorted(placeholders - set(third_party.values())):
    problems.append(f"{THIRD_PARTY_PACKAGE}/BUILD declares {label}, which THIRD_PARTY of "
                    "tests/test_build.py does not map: map its module or remove it")
  return sorted(set(problems))


def test_build_matches_the_imports():
  problems = check()
  assert not problems, "BUILD does not match the tree:\n  " + "\n  ".join(problems)


# ----------------------------------------------------------------------------- negative tests

MACROS = "third_party/bazel/defs.bzl"  # experiment_binary and pytest_test, which BUILD loads
FIXTURE = {
    "BUILD": """
        load("//third_party/bazel:defs.bzl", "experiment_binary", "pytest_test")

        py_library(
            name = "lib",
            srcs = glob(["lib/**/*.py"]),
            deps = ["//third_party/py:numpy"],
        )
        experiment_binary(name = "run", deps = [":lib"])
        genrule(name = "pytest_main", outs = ["pytest_main.py"], cmd = "touch $@")
        pytest_test(name = "test_lib", deps = [":lib"])
        """,
    "third_party/bazel/BUILD": "",
    MACROS: (ROOT / MACROS).read_text(),  # the real macros, as BUILD loads them
    "third_party/py/BUILD": """
        py_library(name = "numpy")
        py_library(name = "pytest")
        """,
    "lib/__init__.py": "import os\nimport numpy as np\n",
    "lib/sub/mod.py": "from lib import np\n",
    "experiments/run.py": "import lib.sub.mod\n\nif __name__ == '__main__':\n  print(lib)\n",
    "tests/test_lib.py": "from lib.sub import mod\n\n\ndef test_mod():\n  assert mod\n",
}
FIXTURE_THIRD_PARTY = {"numpy": "//third_party/py:numpy", "pytest": "//third_party/py:pytest"}
# What the macro calls of FIXTURE's BUILD stand for, written out as Bazel creates them.
FIXTURE_EXPANDED = {
    'experiment_binary(name = "run", deps = [":lib"])':
        'py_binary(name = "run", srcs = ["experiments/run.py"], deps = [":lib"])',
    'pytest_test(name = "test_lib", deps = [":lib"])': """py_test(
            name = "test_lib",
            size = "medium",
            srcs = ["pytest_main.py", "tests/test_lib.py"],
            args = ["tests/test_lib.py"],
            data = ["setup.cfg"],
            main = "pytest_main.py",
            deps = [":lib", "//third_party/py:pytest"],
        )""",
}


def write_fixture(root, **changes):
  for rel, text in {**FIXTURE, **changes}.items():
    if text is not None:
      (Path(root) / rel).parent.mkdir(parents=True, exist_ok=True)
      (Path(root) / rel).write_text(textwrap.dedent(text))


def check_fixture(**changes):
  """check() on a small tree: FIXTURE with changes (a file's new text, or None to delete it)."""
  with tempfile.TemporaryDirectory() as root:
    write_fixture(root, **changes)
    return check(Path(root), third_party=FIXTURE_THIRD_PARTY,
                 first_party_dirs=("lib", "experiments", "tests"))


def fixture_build(*replacements):
  """FIXTURE's BUILD with (old, new) replacements, each of which must apply."""
  build = FIXTURE["BUILD"]
  for old, new in replacements:
    assert old in build, old
    build = build.replace(old, new)
  return build


def expanded_build():
  """FIXTURE's BUILD with its macro calls written out as the rules they create."""
  return fixture_build(*FIXTURE_EXPANDED.items(), ('load("//third_party/bazel:defs.bzl", '
                                                   '"experiment_binary", "pytest_test")', ""))


def assert_reported(problems, *words):
  assert any(all(w in p for w in words) for p in problems), (words, problems)


def test_fixture_is_clean():
  assert check_fixture() == []
  assert check_fixture(BUILD=expanded_build()) == []


def test_the_macros_create_the_targets_written_out():
  with tempfile.TemporaryDirectory() as root:
    write_fixture(root)
    tree = Tree(Path(root), {"BUILD": textwrap.dedent(expanded_build())})
    problems = []
    by_macro, _ = load_package(Tree(Path(root)), "", problems)
    written_out, _ = load_package(tree, "", problems)
  assert problems == []
  assert [t._replace(where="") for t in by_macro] == [t._replace(where="") for t in written_out]
  # Where a macro's target is reported: the line of BUILD that calls the macro, not the .bzl's.
  lines = textwrap.dedent(FIXTURE["BUILD"]).splitlines()
  for target in by_macro:
    if target.label in ("//:run", "//:test_lib"):
      path, _, line = target.where.partition(":")
      assert path == "BUILD" and f'(name = "{target.label[3:]}"' in lines[int(line) - 1], target


def test_a_file_outside_every_target_is_reported():
  problems = check_fixture(**{"experiments/plot.py": "import lib\n"})
  assert_reported(problems, "experiments/plot.py", "in no target")


def test_a_new_script_needs_a_py_binary():
  script = "import lib\n\nif __name__ == '__main__':\n  pass\n"
  problems = check_fixture(**{"lib/tool.py": "x = 1\n", "experiments/tool.py": script})
  assert_reported(problems, "experiments/tool.py", "in no target")
  build = FIXTURE["BUILD"] + 'py_library(name = "tools", srcs = ["experiments/tool.py"])\n'
  problems = check_fixture(BUILD=build, **{"experiments/tool.py": script})
  assert_reported(problems, "experiments/tool.py", "no py_binary's main", "not //:tools")


def test_a_file_in_two_targets_is_reported():
  build = fixture_build(('experiment_binary(name = "run", deps = [":lib"])',
                         'py_binary(name = "run", srcs = ["experiments/run.py", '
                         '"lib/__init__.py"], deps = [":lib"])'))
  assert_reported(check_fixture(BUILD=build), "lib/__init__.py", "several targets", "//:run")


def test_a_first_party_import_needs_a_direct_dep():
  # Inside a function: ast.walk sees it. //:test_lib has :lib but not :run.
  test = FIXTURE["tests/test_lib.py"] + "\n\ndef test_run():\n  from experiments import run\n"
  problems = check_fixture(**{"tests/test_lib.py": test})
  assert_reported(problems, "tests/test_lib.py:9", "from experiments import run", "//:test_lib",
                  "lacks the dep //:run")


def test_a_third_party_import_needs_a_declared_dep():
  optional = "try:\n  import pytest\nexcept ImportError:\n  pytest = None\n"
  problems = check_fixture(**{"lib/sub/mod.py": FIXTURE["lib/sub/mod.py"] + optional})
  assert_reported(problems, "lib/sub/mod.py:3", "import pytest` (optional)", "//:lib",
                  "lacks the dep //third_party/py:pytest")


def test_an_unmapped_module_is_reported():
  problems = check_fixture(**{"lib/sub/mod.py": "import yaml\nfrom lib import np\n"})
  assert_reported(problems, "lib/sub/mod.py:1", "import yaml", "not in THIRD_PARTY", "//:lib")


def test_a_missing_first_party_module_is_reported():
  problems = check_fixture(**{"lib/sub/mod.py": "from lib import np\nfrom lib.sub import gone\n"})
  assert_reported(problems, "lib/sub/mod.py:2", "from lib.sub import gone",
                  "no such first-party module", "//:lib")


def test_stale_deps_and_placeholders_are_reported():
  problems = check_fixture(**{"lib/__init__.py": "np = None\n", "lib/sub/mod.py": "import lib\n"})
  assert_reported(problems, "//:lib", "//third_party/py:numpy", "stale dep")
  assert_reported(problems, "THIRD_PARTY maps numpy", "nothing imports it")
  problems = check_fixture(**{"third_party/py/BUILD": 'py_library(name = "numpy")\n'})
  assert_reported(problems, "//:test_lib", "//third_party/py:pytest", "which is no target")


def test_the_deps_of_a_macro_call_are_checked():
  build = fixture_build(('pytest_test(name = "test_lib", deps = [":lib"])',
                         'pytest_test(name = "test_lib", deps = [])'))
  assert_reported(check_fixture(BUILD=build), "tests/test_lib.py:1", "//:test_lib",
                  "lacks the dep //:lib")
  # A stale dep is reported at the macro's call in BUILD.
  line = next(n for n, text in enumerate(textwrap.dedent(FIXTURE["BUILD"]).splitlines(), 1)
              if text.startswith("pytest_test("))
  build = fixture_build(('pytest_test(name = "test_lib", deps = [":lib"])',
                         'pytest_test(name = "test_lib", deps = [":lib", ":run"])'))
  assert_reported(check_fixture(BUILD=build), f"BUILD:{line}:", "//:test_lib",
                  "depends on //:run", "stale dep")
  build = fixture_build(('experiment_binary(name = "run", deps = [":lib"])',
                         'experiment_binary(name = "run", deps = [])'))
  assert_reported(check_fixture(BUILD=build), "experiments/run.py:1", "//:run",
                  "lacks the dep //:lib")


def test_a_py_test_runs_its_files():
  test = FIXTURE_EXPANDED['pytest_test(name = "test_lib", deps = [":lib"])']
  build = fixture_build(('pytest_test(name = "test_lib", deps = [":lib"])',
                         test.replace('args = ["tests/test_lib.py"]', "args = []")))
  assert_reported(check_fixture(BUILD=build), "//:test_lib", "args must be its test files")
  build = fixture_build(('pytest_test(name = "test_lib", deps = [":lib"])',
                         test.replace('"//third_party/py:pytest"', "")))
  assert_reported(check_fixture(BUILD=build), "//:test_lib",
                  "lacks the dep //third_party/py:pytest, which its main pytest_main.py imports")


def test_the_macros_are_checked_as_written():
  # The checker runs the .bzl file itself: a macro that creates a wrong target is caught.
  macros = FIXTURE[MACROS]
  no_args = macros.replace("args = [src],", "")
  no_pytest = macros.replace("for dep in _PYTEST_MAIN_DEPS if", "for dep in [] if")
  assert no_args != macros and no_pytest != macros
  assert_reported(check_fixture(**{MACROS: no_args}), "//:test_lib", "args must be its test files")
  assert_reported(check_fixture(**{MACROS: no_pytest}), "//:test_lib",
                  "lacks the dep //third_party/py:pytest")


def test_a_bad_load_is_reported():
  load = 'load("//third_party/bazel:defs.bzl", "experiment_binary", "pytest_test")'
  for bad, words in [
      ('load("//third_party/bazel:defs.bzl", "experiment_binary", "pytest")', "defines no"),
      ('load("//third_party/bazel:gone.bzl", "experiment_binary", "pytest_test")',
       "no such file"),
      ('load("//third_party/rules:defs.bzl", "experiment_binary", "pytest_test")',
       "is no package"),
      ('load("@rules_python//python:defs.bzl", "experiment_binary", "pytest_test")',
       "does not know the loaded macro"),
  ]:
    problems = check_fixture(BUILD=fixture_build((load, bad)))
    assert_reported(problems, "BUILD: cannot be evaluated", words)


def test_the_real_build_with_a_dep_dropped_is_reported():
  build = (ROOT / "BUILD").read_text()
  dropped = build.replace('":pallas_kernels",', "", 1)
  assert dropped != build
  problems = check(overrides={"BUILD": dropped})
  assert_reported(problems, "lacks the dep //:pallas_kernels")
  dropped = re.sub(r'\n\s*"//third_party/py:jax",', "", build, count=1)
  assert dropped != build
  assert_reported(check(overrides={"BUILD": dropped}), "`import jax`",
                  "lacks the dep //third_party/py:jax")
  # In a macro call: the first dep of each pytest_test and experiment_binary.
  for macro in ("pytest_test", "experiment_binary"):
    call = re.search(macro + r'\(name = "(\w+)",[^)]*?deps = \[("[^"]+"), ?', build)
    assert call, macro
    dropped = build.replace(call.group(0), call.group(0).replace(call.group(2) + ",", ""), 1)
    assert dropped != build
    label = absolute_label(call.group(2).strip('"'), "")
    assert_reported(check(overrides={"BUILD": dropped}),
                    f"//:{call.group(1)} lacks the dep {label}")
