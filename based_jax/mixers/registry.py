"""The table of mixers: for each `MixerKind`, its module, its decoding cache, its state count and
its mixing FLOPs.

The model (`model.make_mixer`), the caches (`cache.init_layer_cache`, `cache.attention_capacity`)
and the state-size count (`state_size`) read this table and nothing else about a kind. A new
mixer is a module file with the `(x, positions, lengths, cache) -> (y, cache)` contract of
`based_jax.mixers`, a `MixerKind` member and an entry here (plus, in `ModelConfig`, the fields
and width checks it needs). docs/mixers.md describes each one.
"""

import dataclasses
from typing import Any, Callable, Optional

import flax.linen as nn

from based_jax.config import MixerKind, ModelConfig
from based_jax.mixers import (attention, base_conv, gla, h3, hyena, linear_attention, mamba,
                              rwkv)


@dataclasses.dataclass(frozen=True)
class MixerSpec:
  """What the model, the decoding cache and the state count know of one mixer kind."""
  # (config, name) -> the layer's mixer module.
  module: Callable[[ModelConfig, str], nn.Module]
  # (config, batch, max_len) -> the empty decoding cache of one layer.
  init_cache: Callable[[ModelConfig, int, int], Any]
  # (config, seq_len, symmetric) -> recurrent state values as the paper counts them at that
  # length (symmetric: Taylor features with the symmetric quadratic terms merged).
  state_values: Callable[[ModelConfig, int, bool], int]
  # (config, seq_len) -> forward FLOPs per token of the parameter-free sequence mixing (the
  # dense projections are counted from the parameters), for throughput / MFU figures.
  mixing_flops: Callable[[ModelConfig, int], float]
  # cache -> tokens per row it can hold, for a cache that fills up (full attention); None for
  # one that never does (a fixed-size state or a ring buffer).
  capacity: Optional[Callable[[Any], int]] = None


MIXERS: dict[MixerKind, MixerSpec] = {
    MixerKind.LINEAR_ATTENTION: MixerSpec(
        module=lambda config, name: linear_attention.TaylorLinearAttention(config, name=name),
        init_cache=linear_attention.init_linear_attention_cache,
        state_values=linear_attention.state_values,
        mixing_flops=linear_attention.mixing_flops),
    MixerKind.SLIDING_WINDOW: MixerSpec(
        module=lambda config, name: attention.Attention(config, window=config.window,
                                                        name=name),
        init_cache=lambda config, batch, max_len: attention.init_attention_cache(
            config, batch, config.window + 1),
        state_values=attention.state_values_window,
        mixing_flops=attention.mixing_flops_window),
    MixerKind.ATTENTION: MixerSpec(
        module=lambda config, name: attention.Attention(config, window=None, name=name),
        init_cache=attention.init_attention_cache,  # max_len slots
        state_values=attention.state_values_full,
        mixing_flops=attention.mixing_flops_full,
        capacity=lambda cache: cache.pos.shape[1]),
    MixerKind.BASE_CONV: MixerSpec(
        module=lambda config, name: (base_conv.ZoologyBaseConv if config.block_style == "zoology"
                                     else base_conv.BaseConv)(config, name=name),
        init_cache=base_conv.init_conv_cache,
        state_values=base_conv.state_values,
        mixing_flops=base_conv.mixing_flops),
    MixerKind.MAMBA: MixerSpec(
        module=lambda config, name: mamba.Mamba(config, name=name),
        init_cache=mamba.init_mamba_cache,
        state_values=mamba.state_values,
        mixing_flops=mamba.mixing_flops),
    MixerKind.H3: MixerSpec(
        module=lambda config, name: h3.H3(config, name=name),
        init_cache=h3.init_h3_cache,
        state_values=h3.state_values,
        mixing_flops=h3.mixing_flops),
    MixerKind.HYENA: MixerSpec(
        module=lambda config, name: hyena.Hyena(config, name=name),
        init_cache=hyena.init_hyena_cache,
        state_values=hyena.state_values,
        mixing_flops=hyena.mixing_flops),
    MixerKind.RWKV: MixerSpec(
        module=lambda config, name: rwkv.Rwkv(config, name=name),
        init_cache=rwkv.init_rwkv_cache,
        state_values=rwkv.state_values,
        mixing_flops=rwkv.mixing_flops),
    MixerKind.GLA: MixerSpec(
        module=lambda config, name: gla.Gla(config, name=name),
        init_cache=gla.init_gla_cache,
        state_values=gla.state_values,
        mixing_flops=gla.mixing_flops),
}


def spec(kind: str) -> MixerSpec:
  """The entry of a kind (a MixerKind or its value)."""
  try:
    return MIXERS[MixerKind(kind)]
  except ValueError:
    raise ValueError(f"unknown mixer kind {kind!r}; known: "
                     f"{[k.value for k in MixerKind]}") from None
