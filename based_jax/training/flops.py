"""Training FLOPs per token and device peaks: model FLOPs utilisation (MFU).

A training step costs 3x the forward (forward 1, backward 2). Per token the forward is
  2 N      N = the parameters used in matrix products: every Dense kernel and the LM head
           (the tied embedding, V x D; the embedding lookup itself is free);
plus what mixes the sequence without parameters: each layer's `mixing_flops` from the mixer
table (`based_jax.mixers.registry`; e.g. 4 D (T + 1) / 2 for causal attention, 4 H E K for
Taylor linear attention's recurrent form). So a Transformer++ is the usual 6 N + 12 L D T / 2
per token. MFU is the achieved FLOP rate over the device's dense bf16 peak from its datasheet
(`PEAK_BF16_FLOPS`), not over a measured matmul rate.
"""

from typing import Optional

import jax

from based_jax.config import ModelConfig
from based_jax.mixers import registry
from based_jax.model import init_params

# Dense (no sparsity) bf16 tensor-core peak, FLOP/s, by a substring of jax's device_kind.
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12}


def matmul_params(config: ModelConfig) -> int:
  """N above: parameters of Dense kernels plus the LM head, from shapes only."""
  shapes = jax.eval_shape(lambda: init_params(config))
  n = 0
  for path, leaf in jax.tree_util.tree_leaves_with_path(shapes):
    name = getattr(path[-1], "key", "")
    if name == "kernel" and leaf.ndim >= 2:
      n += leaf.size
  return n + config.vocab_size * config.d_model


def mixing_flops_per_token(config: ModelConfig, seq_len: int) -> float:
  """Forward FLOPs per token of the parameter-free sequence mixing, summed over layers."""
  return sum(registry.spec(kind).mixing_flops(config, seq_len) for kind in config.layer_kinds)


def train_flops_per_token(config: ModelConfig, seq_len: int) -> float:
  """FLOPs of one training step per token (forward + backward)."""
  return 3 * (2 * matmul_params(config) + mixing_flops_per_token(config, seq_len))


def peak_flops(device=None) -> Optional[float]:
  """The dense bf16 peak of `device` (default: the first), None if unknown (CPUs)."""
  kind = (device or jax.devices()[0]).device_kind
  for name, flops in PEAK_BF16_FLOPS.items():
    if name in kind:
      return flops
  return None
