"""The Triton and Mosaic GPU kernels a function lowers to for CUDA, on any machine: the CPU
check that a Pallas kernel's lowering accepts every construct the kernel uses, which the
Pallas interpreters do not exercise (they run the kernel body as plain JAX). It stops at the
Triton IR or the Mosaic GPU module: compiling those and the run (register or shared-memory
limits, numerics) need a GPU."""

import re

import jax

_TRITON_CALL = re.compile(r'stablehlo\.custom_call @__gpu\$xla\.gpu\.triton.*?name = "([^"]+)"')
_MOSAIC_CALL = re.compile(r"stablehlo\.custom_call @mosaic_gpu")


def _cuda_hlo(fn, *args) -> str:
  return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


def triton_kernels(fn, *args) -> list[str]:
  """Names of the Triton kernels of jit(fn)(*args) lowered for CUDA, in program order (args
  may be jax.ShapeDtypeStruct); raises what the lowering raises."""
  return _TRITON_CALL.findall(_cuda_hlo(fn, *args))


def mosaic_kernels(fn, *args) -> int:
  """How many Mosaic GPU kernels jit(fn)(*args) lowers to for CUDA (their calls carry no
  name); raises what the lowering raises."""
  return len(_MOSAIC_CALL.findall(_cuda_hlo(fn, *args)))
