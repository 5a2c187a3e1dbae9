"""Offline Bazel 4: stand-ins for the repositories Bazel would download, and the .venv's Python.

Bazel 4.2.3 (Debian's bazel-bootstrap) fetches rules_cc, rules_java and remote_coverage_tools
from the network even for Python-only targets: its tool packages load them. The network is
closed here, so WORKSPACE defines these names first (Bazel then skips its own downloads of the
same names) as small local repositories:
  rules_cc, rules_java   forward each rule to Bazel's native one (as Bazel's own test mocks do);
  remote_coverage_tools  stand-ins that fail: `bazel coverage` is not supported.
venv_python makes the interpreter of the repository's .venv (or $BAZEL_PYTHON) the Python
toolchain, so the targets import the packages pip installed there (//third_party/py).
"""

_NATIVE_RULES = {
    "rules_cc": ("cc", ["cc_binary", "cc_import", "cc_library", "cc_proto_library", "cc_test",
                        "cc_toolchain", "cc_toolchain_suite", "objc_library"]),
    "rules_java": ("java", ["java_binary", "java_import", "java_library", "java_lite_proto_library",
                            "java_plugin", "java_proto_library", "java_runtime", "java_test",
                            "java_toolchain"]),
}

def _native_rules_impl(ctx):
    directory, rules = _NATIVE_RULES[ctx.name]
    ctx.file("WORKSPACE", 'workspace(name = "%s")\n' % ctx.name)
    ctx.file(directory + "/BUILD", "")
    ctx.file(directory + "/defs.bzl", "".join([
        '"""Stand-in for @%s: the native rules."""\n' % ctx.name,
    ] + ["\ndef %s(**kwargs):\n    native.%s(**kwargs)\n" % (r, r) for r in rules]))

_native_rules = repository_rule(implementation = _native_rules_impl)

def _no_coverage_impl(ctx):
    ctx.file("WORKSPACE", 'workspace(name = "remote_coverage_tools")\n')
    ctx.file("no_coverage.sh", "#!/bin/sh\necho 'bazel coverage is not supported offline' >&2\n" +
                               "exit 1\n", executable = True)
    ctx.file("BUILD", "\n".join([
        'package(default_visibility = ["//visibility:public"])',
        'sh_binary(name = "coverage_report_generator", srcs = ["no_coverage.sh"])',
        'sh_binary(name = "lcov_merger", srcs = ["no_coverage.sh"])',
        "",
    ]))

_no_coverage = repository_rule(implementation = _no_coverage_impl)

def _venv_python_impl(ctx):
    workspace = ctx.path(Label("//:WORKSPACE")).dirname
    python = ctx.os.environ.get("BAZEL_PYTHON") or "%s/.venv/bin/python" % workspace
    if not ctx.path(python).exists:
        fail("No Python at %s: create the venv (README.md: pip install -e \".[test]\" in .venv) " %
             python + "or point BAZEL_PYTHON at an interpreter with the packages installed.")
    ctx.file("BUILD", "\n".join([
        'load("@bazel_tools//tools/python:toolchain.bzl", "py_runtime_pair")',
        "py_runtime(",
        '    name = "python3",',
        '    interpreter_path = "%s",' % python,
        '    python_version = "PY3",',
        '    stub_shebang = "#!%s",  # the launcher too, not `env python`' % python,
        ")",
        'py_runtime_pair(name = "runtimes", py3_runtime = ":python3")',
        "toolchain(",
        '    name = "toolchain",',
        '    toolchain = ":runtimes",',
        '    toolchain_type = "@bazel_tools//tools/python:toolchain_type",',
        ")",
        "",
    ]))

_venv_python = repository_rule(
    implementation = _venv_python_impl,
    environ = ["BAZEL_PYTHON"],
    local = True,
)

def offline_repositories():
    """Defines @rules_cc, @rules_java, @remote_coverage_tools and @venv_python."""
    _native_rules(name = "rules_cc")
    _native_rules(name = "rules_java")
    _no_coverage(name = "remote_coverage_tools")
    _venv_python(name = "venv_python")
