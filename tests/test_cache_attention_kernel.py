"""Decode attention over a key / value cache (`pallas_kernels.cache_attention`): the kernel and
the XLA reference against float64, the dispatch, and models decoding with
`attention_decode_impl="pallas_interpret"` against "xla".

On CPU the kernel runs in the Pallas interpreter, which fills every output with NaN before the
kernel runs and pads blocks past the arrays' edges with NaN: an element no program writes, or
a load past S slots or K' columns the kernel forgets to mask, fails the comparison. On GPU the
same cases run compiled, after filling the device allocator with NaN. Tolerances: the kernel
keeps the softmax weights in float32 (within 2e-6 of float64, relative to max |v|); the XLA
path rounds them to the values' dtype first (half a bf16 ulp, 2^-8, more for bf16 caches).
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
from based_jax.mixers import attention
from based_jax.model import LanguageModel, init_params
from pallas_kernels.cache_attention import decode_attention, pallas_triton

ON_GPU = jax.default_backend() == "gpu"
gpu = pytest.mark.skipif(not ON_GPU, reason="needs a GPU")
IMPLS = ["pallas_interpret", pytest.param("pallas", marks=[pytest.mark.gpu, gpu])]


def poison_device_memory():
  """On GPU: fill and free a large block so fresh buffers start as NaN (no-op on CPU)."""
  if ON_GPU:
    jnp.full((256 << 20,), jnp.nan, jnp.float32).block_until_ready().delete()


def ring_cache(seed, b, h, s, width, dtype):
  """The arguments of `decode_attention` as a step meets them after each row decoded a
  different number of tokens: q, new_k, new_v [B, H, K'], k, v [B, H, S, K'] (the slot of the
  new key holds a stale one), the slots' positions pos [B, S] with the new key's already
  written (some rows not yet full: empty slots -1), q_pos [B] and slot [B] = q_pos mod S; the
  last row of two or more is padding (slot S: nothing stored)."""
  g = np.random.default_rng(seed)
  q, new_k, new_v, k, v = (jnp.asarray(g.normal(size=shape), dtype) for shape in (
      (b, h, width), (b, h, width), (b, h, width), (b, h, s, width), (b, h, s, width)))
  q_pos = g.integers(0, 3 * s, size=b)
  q_pos[0] = 0  # a row that sees only its own key
  slot = np.arange(s)
  # slot j holds the latest position p <= q_pos with p mod S == j, or nothing
  pos = q_pos[:, None] - (q_pos[:, None] - slot[None, :]) % s
  pos = np.where(pos >= 0, pos, -1)
  written = q_pos % s
  if b > 1:
    written[-1] = s
  return (q, new_k, new_v, k, v, jnp.asarray(pos, jnp.int32), jnp.asarray(q_pos, jnp.int32),
          jnp.asarray(written, jnp.int32))


def float64_written(cache, new, slot):
  """cache as float64 with each row's new [H, K'] at its slot (S or more: unchanged)."""
  cache = np.array(cache, np.float64)
  for row, j in enumerate(np.asarray(slot)):
    if j < cache.shape[2]:
      cache[row, :, j] = np.asarray(new[row], np.float64)
  return cache


def float64_decode(q, new_k, new_v, k, v, pos, q_pos, slot, window, scale):
  return float64_attention(q, float64_written(k, new_k, slot), float64_written(v, new_v, slot),
                           pos, q_pos, window, scale)


def float64_attention(q, k, v, pos, q_pos, window, scale):
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  pos, qp = np.asarray(pos), np.asarray(q_pos)[:, None]
  allowed = (pos >= 0) & (pos <= qp)
  if window is not None:
    allowed &= pos >= qp - window
  logits = np.where(allowed[:, None], np.einsum("bhk,bhsk->bhs", q, k) * scale, -np.inf)
  weights = np.exp(logits - logits.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  return np.einsum("bhs,bhsk->bhk", weights, v)


CASES = [  # (B, H, S, K', window): a ring of W + 1 slots, and a full cache (window None)
    (3, 2, 9, 12, 8), (2, 3, 40, 16, 39), (2, 2, 17, 24, None), (1, 1, 129, 112, 128)]


@pytest.mark.parametrize("impl", IMPLS + ["xla"])
@pytest.mark.parametrize("b,h,s,width,window", CASES)
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_matches_float64(impl, b, h, s, width, window, dtype):
  args = ring_cache(s + width, b, h, s, width, dtype)
  q, new_k, new_v, k, v, pos, q_pos, slot = args
  scale = width ** -0.5
  poison_device_memory()
  out, keys, values = decode_attention(*args, window=window, scale=scale, impl=impl)
  assert out.shape == (b, h, width) and out.dtype == jnp.float32
  rounding = 2.0**-8 if impl == "xla" and dtype == jnp.bfloat16 else 0.0
  largest = max(float(jnp.max(jnp.abs(x.astype(jnp.float32)))) for x in (v, new_v))
  np.testing.assert_allclose(out, float64_decode(*args, window, scale), rtol=0,
                             atol=(2e-6 + rounding) * largest)
  # The new key and value in their slots, every other slot untouched (padding: none stored).
  np.testing.assert_array_equal(np.asarray(keys, np.float64), float64_written(k, new_k, slot))
  np.testing.assert_array_equal(np.asarray(values, np.float64), float64_written(v, new_v, slot))


def test_block_of_slots_smaller_than_the_cache_walks_every_slot():
  args = ring_cache(0, 2, 2, 40, 16, jnp.float32)
  out, _, _ = pallas_triton.decode_attention(*args, window=None, scale=0.25, interpret=True,
                                             tiling=pallas_triton.Tiling(block_slots=8))
  np.testing.assert_allclose(out, float64_decode(*args, None, 0.25), rtol=0, atol=1e-5)


def test_lowers_to_one_triton_kernel_for_cuda():
  s = jax.ShapeDtypeStruct
  head, cache = s((4, 16, 112), jnp.bfloat16), s((4, 16, 129, 112), jnp.bfloat16)
  args = (head, head, head, cache, cache, s((4, 129), jnp.int32), s((4,), jnp.int32),
          s((4,), jnp.int32))
  fn = lambda *a: pallas_triton.decode_attention(*a, window=128, scale=0.1)
  assert triton_kernels(fn, *args) == ["cache_attention_decode"]


@pytest.mark.parametrize("change,message", [
    (dict(k=np.zeros((2, 2, 5, 4))), "k and v must be"),
    (dict(q=np.zeros((2, 2, 3))), r"q must be \[B, H, K'\] = \(2, 2, 4\)"),
    (dict(new_v=np.zeros((2, 2, 3))), r"new_v must be \[B, H, K'\]"),
    (dict(pos=np.zeros((2, 4), np.int32)), r"pos must be \[B, S\]"),
    (dict(slot=np.zeros((3,), np.int32)), r"q_pos, slot \[B\] = \(2,\)"),
    (dict(q_pos=np.zeros((2,), np.float32)), "must be integers"),
    (dict(slot=np.zeros((2,), np.float32)), "must be integers"),
    (dict(window=-1), "window must be None or an int >= 0"),
    (dict(impl="cudnn"), "impl must be one of"),
    (dict(impl="pallas"), "needs a GPU"),
])
def test_bad_inputs_name_the_problem(change, message):
  if ON_GPU and change.get("impl") == "pallas":
    pytest.skip("a GPU runs it")
  names = ("q", "new_k", "new_v", "k", "v", "pos", "q_pos", "slot")
  args = dict(q=np.zeros((2, 2, 4)), new_k=np.zeros((2, 2, 4)), new_v=np.zeros((2, 2, 4)),
              k=np.zeros((2, 2, 6, 4)), v=np.zeros((2, 2, 6, 4)),
              pos=np.zeros((2, 6), np.int32), q_pos=np.zeros((2,), np.int32),
              slot=np.zeros((2,), np.int32), window=3, impl="pallas_interpret")
  args.update(change)
  arrays = {name: jnp.asarray(x) if isinstance(x, np.ndarray) else x for name, x in args.items()}
  positional = [arrays.pop(name) for name in names]
  with pytest.raises(ValueError, match=message):
    decode_attention(*positional, scale=0.5, **arrays)


def test_the_mixer_reports_the_kernel_and_refuses_it_without_a_gpu():
  config = get_config("based_tiny", attention_decode_impl="pallas_interpret")
  assert attention.resolve_implementation(config, "decode") == "pallas_interpret"
  if not ON_GPU:
    with pytest.raises(ValueError, match="impl='pallas' needs a GPU"):
      attention.resolve_implementation(config.replace(attention_decode_impl="pallas"), "decode")


@pytest.mark.parametrize("preset", ["based_tiny", "transformer_pp_tiny"])  # window, full
def test_models_decode_the_same_logits_with_the_kernel(preset):
  logits = {}
  prompt = jnp.array([[3, 4, 5, 6, 7, 8, 9, 10, 11, 12], [5, 6, 7, 8, 9, 10, 0, 0, 0, 0]])
  for impl in ("xla", "pallas_interpret"):
    config = get_config(preset, attention_decode_impl=impl)
    params, model = init_params(config), LanguageModel(config)
    step = jax.jit(lambda p, t, c, n=None: model.apply(p, t, lengths=n, cache=c))
    out, cache = step(params, prompt, init_cache(config, 2, 32), jnp.array([10, 6]))
    token, steps = jnp.array([[1], [2]]), []
    for _ in range(6):  # past the window of 8 on the first row
      out, cache = step(params, token, cache)
      token = jnp.argmax(out, -1)
      steps.append(out)
    logits[impl] = jnp.concatenate(steps, axis=1)
  np.testing.assert_allclose(logits["pallas_interpret"], logits["xla"], rtol=1e-5, atol=1e-5)


def test_the_benchmark_times_checked_tilings(tmp_path):
  # A process of its own: the script's absl flags would clash with other scripts' in this one.
  out = tmp_path / "cache_attention"
  subprocess.run([sys.executable, "-m", "experiments.bench_cache_attention", "--interpret",
                  "--batch_sizes=2", "--heads=2", "--head_dim=24", "--window=8", "--repeats=1",
                  "--tilings=4:4:2", f"--out={out}"], check=True, capture_output=True)
  result = json.loads(out.with_suffix(".json").read_text())
  rows = result["rows"]
  assert [r["impl"] for r in rows] == ["xla", "pallas 4:4:2"]
  # The XLA path rounds the softmax weights to bf16 (see the module docstring).
  assert rows[1]["max_rel_error_vs_xla"] < 2.0**-7 and rows[1]["median_ms"] > 0
  # caches read; positions; q, new_k, new_v and the float32 output; the new keys, values stored
  assert rows[1]["bytes"] == 2 * (2 * 2 * 9 * 24 * 2) + 2 * 9 * 4 + 2 * 2 * 24 * (3 * 2 + 4 + 4)
  assert result["meta"]["argv"][-1] == f"--out={out}" and "| 2 | pallas 4:4:2 |" in (
      out.with_suffix(".md").read_text())
  bad = subprocess.run([sys.executable, "-m", "experiments.bench_cache_attention",
                        "--tilings=32:4", f"--out={out}"], capture_output=True, text=True)
  assert bad.returncode != 0 and "a tiling is block_slots:num_warps:num_stages" in bad.stderr
