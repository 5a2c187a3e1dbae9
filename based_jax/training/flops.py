"""Training FLOPs per token and device peaks: model FLOPs utilisation (MFU).

A training step costs 3x the forward (forward 1, backward 2). Per token the forward is
  2 N      N = the parameters used in matrix products: every Dense kernel and the LM head
           (the tied embedding, V x D; the embedding lookup itself is free);
plus what mixes the sequence without parameters, per layer:
  full attention       4 D (T + 1) / 2   (q.k and the weighted sum of v over the causal half);
  sliding window       4 D min(W + 1, (T + 1) / 2);
  Taylor linear attn   4 H E K           (the recurrent form: state update and read-out;
                                          the chunked kernels do a little more);
  BaseConv             2 k (2 D)         (the depthwise causal convolution, k taps).
So a Transformer++ is the usual 6 N + 12 L D T / 2 per token. MFU is the achieved FLOP rate
over the device's dense bf16 peak from its datasheet (`PEAK_BF16_FLOPS`), not over a measured
matmul rate.
"""

from typing import Optional

import jax

from based_jax import config as config_lib
from based_jax.config import ModelConfig
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
  d, causal = config.d_model, (seq_len + 1) / 2
  features = 1 + config.la_feature_dim + config.la_feature_dim * (config.la_feature_dim + 1) // 2
  per_kind = {
      config_lib.ATTENTION: 4 * d * causal,
      config_lib.SLIDING_WINDOW: 4 * d * min(config.window + 1, causal),
      config_lib.LINEAR_ATTENTION: 4 * features * d,
      config_lib.BASE_CONV: 2 * config.conv_kernel * 2 * d,
  }
  return sum(per_kind[kind] for kind in config.layer_kinds)


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
