"""Causal Taylor linear attention speed: our kernels against fla, cuDNN attention and XLA.

  python -m experiments.bench_prefill --out=experiments/results/prefill_h100

Times in one process and one run, bf16, B=8, H=16, d'=16 by default, for each T and value
head dim: the forward and the forward+backward (the VJP with a random cotangent) of
  pallas           our Pallas kernels (`causal_taylor_attention(impl="pallas")`),
  mosaic           our Mosaic GPU forward with the same backward (`impl="mosaic"`, Hopper),
  xla              the chunked pure-JAX form (`impl="xla"`),
  cudnn            `jax.nn.dot_product_attention(is_causal=True, implementation="cudnn")`
                   with q, k, v of head dim D (softmax attention: the speed to beat),
  fla_parallel,    `fla.ops.based.parallel_based` / `fused_chunk_based` (flash-linear-
  fla_fused_chunk  attention's Triton kernels, PyTorch), when importable.
Every linear-attention output is checked against the XLA form (relative L2 error in the
JSON) so the table times correct code. Extra `--variants` time other tilings of our kernel;
`--profile` adds where each JAX competitor's time goes, per GPU kernel.
Writes <out>.json (device, versions, shapes) and <out>.md (a table per mode and D).
"""

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # share the GPU with PyTorch

import functools  # noqa: E402
import json  # noqa: E402
import traceback  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from experiments.benchmarking import median_ms, profile_kernels, run_metadata  # noqa: E402
from pallas_kernels.taylor_attention import causal_taylor_attention, pallas_chunked  # noqa: E402

_T = flags.DEFINE_list("seq_lens", ["1024", "2048", "4096", "8192", "16384"], "Sequence lengths.")
_DV = flags.DEFINE_list("value_dims", ["64", "112"], "Value head dims D.")
_B = flags.DEFINE_integer("batch", 8, "Batch size.")
_H = flags.DEFINE_integer("heads", 16, "Heads.")
_F = flags.DEFINE_integer("feature_dim", 16, "Query/key feature dim d'.")
_IMPLS = flags.DEFINE_list("impls", ["pallas", "mosaic", "fla_parallel", "fla_fused_chunk",
                                     "cudnn", "xla"], "What to time.")
_MODES = flags.DEFINE_list("modes", ["fwd", "fwd_bwd"], "fwd and/or fwd_bwd.")
_VARIANTS = flags.DEFINE_list(
    "variants", [], "Extra tilings of our kernel, each FWD/BWD/SEGMENT with FWD and BWD = "
    "chunk:block_d:num_warps:num_stages, SEGMENT tokens; an empty part keeps the default "
    "(e.g. '//1024', '32:32:4:1', '/32:32:8:3/').")
_DTYPE = flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "Input dtype.")
_REPEATS = flags.DEFINE_integer("repeats", 20, "Timed repetitions (median reported).")
_PROFILE = flags.DEFINE_bool(
    "profile", False, "Also record each JAX competitor's GPU time per kernel per call "
    "(kernels_us in the JSON, from a profiler trace; launch gaps excluded).")
_OUT = flags.DEFINE_string("out", "experiments/results/prefill", "Output path prefix.")


def jax_impls(variants):
  """name -> f(q, k, v) -> y for the JAX competitors."""
  out = {impl: functools.partial(_ours, impl=impl)
         for impl in ("pallas", "pallas_interpret", "mosaic", "mosaic_interpret", "xla")}
  for spec in variants:
    out[f"pallas[{spec}]"] = functools.partial(_pallas_variant, **parse_variant(spec))
  return out


def _ours(q, k, v, *, impl):
  return causal_taylor_attention(q, k, v, impl=impl)[0]


def parse_variant(spec: str) -> dict:
  """'FWD/BWD/SEGMENT' (see --variants) -> keyword arguments of `pallas_chunked.chunked`."""
  parts = (spec.split("/") + ["", ""])[:3]
  kw = {}
  try:
    for name, part in zip(("forward", "backward"), parts):
      if part:
        c, bd, w, s = part.split(":")
        kw[name] = pallas_chunked.Tiling(int(c), int(bd), int(w), int(s))
    if parts[2]:
      kw["segment"] = int(parts[2])
  except ValueError as e:
    raise app.UsageError(f"bad --variants entry {spec!r}: {e}") from e
  return kw


def _pallas_variant(q, k, v, **tiling):
  b, t = q.shape[:2]
  return pallas_chunked.chunked(q, k, v, None,
                                jnp.full((b,), t, jnp.int32), eps=1e-6, **tiling)[0]


def cudnn_attention(q, k, v):
  return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")


def time_jax(fn, args, dy, mode):
  if mode == "fwd":
    f = jax.jit(fn)
    call = lambda: f(*args)
  else:
    f = jax.jit(lambda dy, *a: jax.vjp(fn, *a)[1](dy))
    call = lambda: f(dy, *args)
  out = median_ms(call, jax.block_until_ready, repeats=_REPEATS.value)
  if _PROFILE.value:
    kernels = profile_kernels(call, jax.block_until_ready)
    out["kernels_total_us"] = round(sum(kernels.values()), 1)
    out["kernels_us"] = {name[:120]: round(us, 1) for name, us in kernels.most_common()}
  return out


def torch_impls():
  """name -> f(q, k, v) for fla's kernels, or {} with the reason when unavailable."""
  try:
    import torch
    from fla.ops.based import fused_chunk_based, parallel_based
  except Exception as e:  # noqa: BLE001 - any import failure means "not available"
    return {}, f"{type(e).__name__}: {e}"
  if not torch.cuda.is_available():
    return {}, "no CUDA device for PyTorch"
  return {"fla_parallel": parallel_based, "fla_fused_chunk": fused_chunk_based}, None


def time_torch(fn, args, dy, mode):
  import torch
  args = [torch.from_numpy(np.asarray(a, np.float32)).to("cuda", torch.bfloat16
                                                           if _DTYPE.value == "bfloat16"
                                                           else torch.float32) for a in args]
  dy = torch.from_numpy(np.asarray(dy, np.float32)).to("cuda", args[0].dtype)
  if mode == "fwd":
    with torch.no_grad():
      call = lambda: fn(*args)
      y = call()
  else:
    for a in args:
      a.requires_grad_(True)

    def call():
      for a in args:
        a.grad = None
      out = fn(*args)
      out.backward(dy)
      return out
    y = call()
  sync = lambda _: torch.cuda.synchronize()
  return median_ms(call, sync, repeats=_REPEATS.value), np.asarray(
      y.detach().float().cpu().numpy())


def rel_error(y, ref) -> float:
  y, ref = np.asarray(y, np.float64), np.asarray(ref, np.float64)
  return float(np.linalg.norm(y - ref) / np.linalg.norm(ref))


def markdown(rows, impls) -> str:
  lines = []
  for mode in _MODES.value:
    for d in sorted({r["D"] for r in rows}):
      sub = [r for r in rows if r["mode"] == mode and r["D"] == d]
      names = [n for n in impls if any(r["impl"] == n for r in sub)]
      lines += [f"\n### {mode}, D={d} (median ms)\n", "| T | " + " | ".join(names) + " |",
                "|---" * (len(names) + 1) + "|"]
      for t in sorted({r["T"] for r in sub}):
        cells = []
        for n in names:
          hit = [r for r in sub if r["T"] == t and r["impl"] == n]
          cells.append(f"{hit[0]['median_ms']:.3f}" if hit and "median_ms" in hit[0]
                       else (hit[0].get("error", "-")[:20] if hit else "-"))
        lines.append(f"| {t} | " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def main(argv):
  del argv
  if _PROFILE.value and jax.default_backend() != "gpu":
    raise app.UsageError(f"--profile reads GPU kernels; the backend is {jax.default_backend()}")
  dtype = jnp.bfloat16 if _DTYPE.value == "bfloat16" else jnp.float32
  ours = jax_impls(_VARIANTS.value)
  theirs, torch_reason = torch_impls()
  impls = [n for n in _IMPLS.value] + [f"pallas[{v}]" for v in _VARIANTS.value]
  meta = {**run_metadata("torch", "triton", "fla-core"), "batch": _B.value, "heads": _H.value,
          "feature_dim": _F.value, "dtype": _DTYPE.value, "fla_unavailable": torch_reason,
          "cudnn_head_dim": "D (q, k, v all of head dim D)"}
  print(f"device {meta['device']}; fla: {torch_reason or 'available'}", flush=True)
  rows = []
  os.makedirs(os.path.dirname(_OUT.value) or ".", exist_ok=True)
  for d in (int(x) for x in _DV.value):
    for t in (int(x) for x in _T.value):
      r = np.random.default_rng(t + d)
      b, h, f = _B.value, _H.value, _F.value
      q, k = (jnp.asarray(r.normal(size=(b, t, h, f)), dtype) for _ in range(2))
      v = jnp.asarray(r.normal(size=(b, t, h, d)), dtype)
      dy = jnp.asarray(r.normal(size=(b, t, h, d)), dtype)
      ref = np.asarray(jax.jit(ours["xla"])(q, k, v), np.float32)
      for mode in _MODES.value:
        for name in impls:
          row = {"impl": name, "T": t, "D": d, "mode": mode}
          try:
            if name in theirs:
              timing, y = time_torch(theirs[name], (q, k, v), dy, mode)
              row.update(timing)
              if mode == "fwd":
                row["rel_err_vs_xla"] = rel_error(y, ref)
            elif name == "cudnn":
              qc, kc = (jnp.asarray(r.normal(size=(b, t, h, d)), dtype) for _ in range(2))
              row.update(time_jax(cudnn_attention, (qc, kc, v), dy, mode))
            elif name in ours:
              row.update(time_jax(ours[name], (q, k, v), dy, mode))
              if mode == "fwd":
                row["rel_err_vs_xla"] = rel_error(jax.jit(ours[name])(q, k, v), ref)
            else:
              row["error"] = "unavailable" if name.startswith("fla") else "unknown impl"
          except Exception as e:  # noqa: BLE001 - record, keep benchmarking the rest
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
            traceback.print_exc()
          rows.append(row)
          print(f"{mode:8s} D={d:4d} T={t:6d} {name:26s} "
                + (f"{row['median_ms']:9.3f} ms" if "median_ms" in row else row["error"])
                + (f"  err {row['rel_err_vs_xla']:.1e}" if "rel_err_vs_xla" in row else ""),
                flush=True)
          for name, us in list(row.get("kernels_us", {}).items())[:8]:
            print(f"    {us:9.1f} us  {name[:90]}")
      with open(_OUT.value + ".json", "w") as fh:  # after every shape: partial runs keep data
        json.dump({"meta": meta, "rows": rows}, fh, indent=1)
  table = markdown(rows, impls)
  with open(_OUT.value + ".md", "w") as fh:
    fh.write(f"# Prefill / training attention on {meta['device']}\n\n"
             f"B={_B.value}, H={_H.value}, d'={_F.value}, {_DTYPE.value}; "
             f"versions {meta['versions']}\n" + table)
  print(table)


if __name__ == "__main__":
  app.run(main)
