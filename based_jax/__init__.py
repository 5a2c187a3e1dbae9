"""based-jax: the BASED language model (Taylor linear attention, sliding-window attention,
gated short convolutions) in functional Flax, with Pallas kernels (`pallas_kernels`).

Dimension letters, shared by the docstrings of based_jax and pallas_kernels:

  B  batch                        T  tokens in one call (the sequence length in training)
  P  prompt tokens                N  generated tokens
  S  cache slots                  V  vocabulary
  D  model width (d_model)        H  heads
  K  head dim: an attention head's q / k / v width, a linear-attention head's value width
     (D / H in both)
  F  linear-attention query / key feature dim (the paper's d')
  E  Taylor feature width 1 + F + F(F+1)/2 (153 at F = 16)
  W  sliding-window lookback      C  chunk length (tokens per step of a chunked scan)
  Q  labelled positions per row of a training batch

A module that needs more letters (a kernel's tiling) defines them in its own docstring.
"""

from based_jax.cache import ModelCache, cache_bytes, cache_bytes_by_kind, init_cache
from based_jax.config import ModelConfig, PRESETS, get_config
from based_jax.generate import GenerateOutput, decode, generate, prefill
from based_jax.model import LanguageModel, count_params, init_params
from based_jax.pretrained import export_pretrained, from_pretrained
from based_jax.sampling import SamplingConfig, sample_tokens
from based_jax.state_size import StateSize, state_size_bytes
from based_jax.training.checkpointing import load_checkpoint
