"""based-jax: the BASED language model (Taylor linear attention, sliding-window attention,
gated short convolutions) in functional Flax.

Dimension letters: B batch, T time, S cache slots, D model width, H heads, K head dim,
F linear-attention feature dim, E Taylor feature width 1 + F + F(F+1)/2, V vocabulary.
"""

from based_jax.cache import ModelCache, cache_bytes, init_cache
from based_jax.config import ModelConfig, PRESETS, get_config
from based_jax.generate import GenerateOutput, decode, generate, prefill
from based_jax.model import LanguageModel, count_params, init_params
from based_jax.sampling import SamplingConfig, sample_tokens
from based_jax.state_size import StateSize, state_size_bytes
