"""Sequence mixers. Each `__call__(x, positions, lengths, cache)` returns (y, new_cache).

One call serves training (cache None), prefill (a fresh cache, many tokens, ragged `lengths`)
and decoding (one token per sequence). `registry.MIXERS` maps every `MixerKind` to its module,
cache, state count and mixing FLOPs.
"""

from based_jax.mixers.attention import Attention, AttentionCache
from based_jax.mixers.base_conv import BaseConv, ConvCache, ZoologyBaseConv
from based_jax.mixers.gla import Gla, GlaCache
from based_jax.mixers.h3 import H3, H3Cache
from based_jax.mixers.hyena import Hyena, HyenaCache
from based_jax.mixers.linear_attention import TaylorLinearAttention
from based_jax.mixers.mamba import Mamba, MambaCache
from based_jax.mixers.rwkv import Rwkv, RwkvCache
