"""Sequence mixers. Each `__call__(x, positions, lengths, cache)` returns (y, new_cache).

One call serves training (cache None), prefill (a fresh cache, many tokens, ragged `lengths`)
and decoding (one token per sequence).
"""

from based_jax.mixers.attention import Attention, AttentionCache
from based_jax.mixers.base_conv import BaseConv, ConvCache
from based_jax.mixers.linear_attention import TaylorLinearAttention
