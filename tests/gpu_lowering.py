"""The Triton kernels a function lowers to for CUDA, on any machine: the CPU check that a
Pallas kernel's Triton lowering accepts every construct the kernel uses, which the Pallas
interpreter does not exercise (it runs the kernel body as plain JAX). It stops at the Triton
IR: XLA's compilation of that IR and the run (register or shared-memory limits, numerics) need
a GPU."""

import re

import jax

_TRITON_CALL = re.compile(r'stablehlo\.custom_call @__gpu\$xla\.gpu\.triton.*?name = "([^"]+)"')


def triton_kernels(fn, *args) -> list[str]:
  """Names of the Triton kernels of jit(fn)(*args) lowered for CUDA, in program order (args
  may be jax.ShapeDtypeStruct); raises what the lowering raises."""
  hlo = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
  return _TRITON_CALL.findall(hlo)
