"""Recurrent state size, counted as the BASED paper's recall / state-size plots count it.

Per layer, in float32 values (x4 bytes), at sequence length T, by each kind's `state_values`
in `based_jax.mixers.registry`: e.g. full attention 2 D T; sliding window 2 D W; linear
attention H K E + H E with E the feature width (Taylor: 1 + F + F(F+1)/2 with the symmetric
quadratic terms merged, as the paper's plots count it and as our decoding state stores it;
1 + F + F^2 for the full outer product); short convolution D * taps; Mamba 2 D N; H3 D N;
Hyena D T (docs/mixers.md lists every kind).
`cache.cache_bytes` gives the bytes our decoding cache really holds instead.
"""

import dataclasses

from based_jax.config import ModelConfig
from based_jax.mixers import registry


@dataclasses.dataclass(frozen=True)
class StateSize:
  per_layer: tuple[tuple[str, int], ...]  # (layer kind, bytes) in layer order.
  total: int  # sum over layers, bytes.


def layer_state_values(config: ModelConfig, kind: str, seq_len: int, symmetric: bool) -> int:
  """Number of state values of one layer of `kind`."""
  return registry.spec(kind).state_values(config, seq_len, symmetric)


def state_size_bytes(config: ModelConfig, seq_len: int, *, symmetric_features: bool = True,
                     bytes_per_value: int = 4) -> StateSize:
  """State bytes per layer and in total for sequences of `seq_len` tokens."""
  if seq_len < 1:
    raise ValueError(f"seq_len must be >= 1, got {seq_len}")
  per_layer = tuple(
      (str(kind), bytes_per_value * layer_state_values(config, kind, seq_len, symmetric_features))
      for kind in config.layer_kinds)
  return StateSize(per_layer, sum(b for _, b in per_layer))
