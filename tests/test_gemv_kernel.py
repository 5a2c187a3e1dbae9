"""The few-row matrix-product kernel (`pallas_kernels.gemv`) against float64, forward and
gradients, its dispatch, and a model decoding with `gemv_impl="pallas_interpret"` against
`gemv_impl="xla"`.

On CPU the kernel runs in the Pallas interpreter, which fills every output with NaN before the
kernel runs: an element no program writes fails the comparison. On GPU the same cases run
compiled, after filling the device allocator with NaN. Tolerance: float32 accumulation of K
products, within 1e-5 of the float64 value relative to sum |x_k w_kn| (plus half a bf16 ulp,
2^-8 relative, for bf16 outputs).
"""

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gpu_lowering import triton_kernels

from based_jax.cache import init_cache
from based_jax.config import get_config
from based_jax.model import LanguageModel, init_params
from pallas_kernels.gemv import api, matmul, pallas_triton

ON_GPU = jax.default_backend() == "gpu"
gpu = pytest.mark.skipif(not ON_GPU, reason="needs a GPU")
IMPLS = ["pallas_interpret", pytest.param("pallas", marks=[pytest.mark.gpu, gpu])]
# (K, N): split along K (S > 1) at the default tiling; N not a multiple of 128 (BN 64) and K
# a multiple of 8 only (BK 8); one program per column block with a tiling of few programs.
SHAPES = [(256, 256), (96, 320), (40, 64)]
FEW_PROGRAMS = pallas_triton.Tiling(min_programs=2)


def poison_device_memory():
  """On GPU: fill and free a large block so fresh buffers start as NaN (no-op on CPU)."""
  if ON_GPU:
    jnp.full((256 << 20,), jnp.nan, jnp.float32).block_until_ready().delete()


def random_inputs(seed, m, k, n, dtype):
  g = np.random.default_rng(seed)
  return (jnp.asarray(g.normal(size=(m, k)), dtype), jnp.asarray(g.normal(size=(k, n)), dtype))


def check_close(y, x, w, out_dtype):
  x64, w64 = np.asarray(x, np.float64), np.asarray(w, np.float64)
  scale = np.abs(x64) @ np.abs(w64)
  rtol = 1e-5 + (2.0**-8 if out_dtype == jnp.bfloat16 else 0.0)
  np.testing.assert_array_less(np.abs(np.asarray(y, np.float64) - x64 @ w64), rtol * scale + 1e-30)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("rows", api.ROWS)
@pytest.mark.parametrize("k,n", SHAPES)
@pytest.mark.parametrize("dtype,out_dtype", [(jnp.bfloat16, jnp.float32),
                                             (jnp.bfloat16, jnp.bfloat16),
                                             (jnp.float32, jnp.float32)])
def test_kernel_matches_float64(impl, rows, k, n, dtype, out_dtype):
  x, w = random_inputs(rows * k + n, rows, k, n, dtype)
  poison_device_memory()
  y = matmul(x, w, out_dtype=out_dtype, impl=impl)
  assert y.shape == (rows, n) and y.dtype == out_dtype
  check_close(y, x, w, out_dtype)
  if (k, n) == SHAPES[0]:  # the same product without the split along K
    assert pallas_triton.blocks(rows, k, n, FEW_PROGRAMS)[2] == 1
    assert pallas_triton.blocks(rows, k, n)[2] > 1
    check_close(pallas_triton.matmul(x, w, out_dtype=out_dtype, tiling=FEW_PROGRAMS,
                                     interpret=impl == "pallas_interpret"), x, w, out_dtype)


@pytest.mark.parametrize("impl", IMPLS)
def test_gradients_match_float64(impl):
  x, w = random_inputs(0, 2, 96, 64, jnp.float32)
  c = jnp.asarray(np.random.default_rng(1).normal(size=(2, 64)), jnp.float32)
  with jax.default_matmul_precision("highest"):  # XLA's backward: no TF32 on a GPU
    dx, dw = jax.grad(lambda x, w: jnp.sum(matmul(x, w, impl=impl) * c), argnums=(0, 1))(x, w)
  c64 = np.asarray(c, np.float64)
  np.testing.assert_allclose(dx, c64 @ np.asarray(w, np.float64).T, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dw, np.asarray(x, np.float64).T @ c64, rtol=1e-5, atol=1e-5)


def test_lowers_to_one_triton_kernel_for_cuda():
  for rows, k, n in ((1, 1792, 7168), (4, 3584, 1792), (1, 1024, 50304)):
    x = jax.ShapeDtypeStruct((rows, k), jnp.bfloat16)
    w = jax.ShapeDtypeStruct((k, n), jnp.bfloat16)
    fn = lambda x, w: pallas_triton.matmul(x, w, out_dtype=jnp.bfloat16)
    assert triton_kernels(fn, x, w) == ["gemv"]


def test_split_along_k_reaches_the_program_count():
  bn, bk, s = pallas_triton.blocks(1, 3584, 1792)  # based_1b's MLP output: 14 column blocks
  assert (bn, bk) == (128, 32) and s == 56 and (1792 // bn) * s >= 528
  assert pallas_triton.blocks(1, 1792, 50304 * 2)[2] == 1  # 786 column blocks: no split
  assert pallas_triton.blocks(4, 1792, 7168)[:2] == (128, 8)  # M BK BN = 4096 products


def test_resolve():
  r = lambda impl, rows=1, k=256, n=256, dtypes=(jnp.bfloat16,) * 2, backend="gpu": api.resolve(
      impl, rows=rows, k=k, n=n, dtypes=dtypes, backend=backend)
  assert r("auto") == "pallas" and r("auto", backend="cpu") == "xla"
  assert r("auto", rows=2) == r("auto", rows=4) == "xla" and r("pallas", rows=4) == "pallas"
  assert r("auto", k=100) == "xla" and r("xla") == "xla"
  assert r("pallas", rows=3) == "xla" and r("pallas", rows=8) == "xla"  # not a few-row product
  assert r("pallas_interpret", backend="cpu") == "pallas_interpret"
  with pytest.raises(ValueError, match=r"cannot run x \[M, K=100\] @ w \[K, N=256\]"):
    r("pallas", k=100)
  with pytest.raises(ValueError, match="dtypes \\['int8'"):
    r("pallas", dtypes=(jnp.int8, jnp.bfloat16))
  with pytest.raises(ValueError, match="needs a GPU"):
    r("pallas", backend="cpu")
  with pytest.raises(ValueError, match="impl must be one of"):
    r("triton")


@pytest.mark.parametrize("x,w,message", [
    (np.ones((1, 8)), np.ones((16, 8)), r"x.shape\[1\] == w.shape\[0\]"),
    (np.ones(8), np.ones((8, 8)), "x must be a 2-D floating-point array"),
    (np.ones((1, 8)), np.ones((8, 8), np.int32), "w must be a 2-D floating-point array"),
    ([[1.0]], np.ones((1, 8)), "x must be an array"),
])
def test_bad_inputs_name_the_problem(x, w, message):
  with pytest.raises(ValueError, match=message):
    matmul(x if isinstance(x, list) else jnp.asarray(x), jnp.asarray(w), impl="pallas_interpret")


def test_a_model_decodes_the_same_logits_with_the_kernel():
  logits = {}
  for impl in ("xla", "pallas_interpret"):
    config = get_config("based_tiny", gemv_impl=impl)
    params, model = init_params(config), LanguageModel(config)
    step = jax.jit(lambda p, t, c: model.apply(p, t, cache=c))
    out, cache = step(params, jnp.array([[3, 4, 5]]), init_cache(config, 1, 16))
    steps = []
    for _ in range(3):
      out, cache = step(params, jnp.argmax(out[:, -1:], -1), cache)
      steps.append(out)
    logits[impl] = jnp.concatenate(steps, axis=1)
  np.testing.assert_allclose(logits["pallas_interpret"], logits["xla"], rtol=1e-5, atol=1e-5)


def test_the_benchmark_times_checked_products(tmp_path):
  # A process of its own: the script's absl flags would clash with other scripts' in this one.
  out = tmp_path / "gemv"
  subprocess.run([sys.executable, "-m", "experiments.bench_gemv", "--interpret",
                  "--shapes=96x128", "--rows=2", "--layers=2", "--repeats=1",
                  "--tilings=64:8192:2:4:3", f"--out={out}"], check=True, capture_output=True)
  result = json.loads(out.with_suffix(".json").read_text())
  rows = result["rows"]
  assert [r["impl"] for r in rows] == ["xla", "gemv 64:8192:2:4:3"]
  assert rows[1]["blocks"] == {"bn": 64, "bk": 32, "splits": 1}
  assert rows[1]["max_rel_error_vs_xla"] < 2.0**-7 and rows[1]["us_per_product"] > 0
  assert result["meta"]["argv"][-1] == f"--out={out}" and "| 96 x 128 | 2 |" in (
      out.with_suffix(".md").read_text())
  bad = subprocess.run([sys.executable, "-m", "experiments.bench_gemv", "--tilings=128:8192",
                        f"--out={out}"], capture_output=True, text=True)
  assert bad.returncode != 0 and "a tiling is block_n:block_elements" in bad.stderr
