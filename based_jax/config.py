"""Model configuration: a frozen, validated dataclass and the named presets.

Layer kinds are chosen per layer index: the indices listed in `linear_attention_layers`,
`sliding_window_layers` and `attention_layers` get that mixer; every other layer is a
BaseConv gated short convolution.
"""

import dataclasses
import math
import numbers
import typing
from typing import Iterable

from pallas_kernels.taylor_attention import IMPLEMENTATIONS as LINEAR_ATTENTION_IMPLS

LINEAR_ATTENTION = "linear_attention"
SLIDING_WINDOW = "sliding_window"
ATTENTION = "attention"
BASE_CONV = "base_conv"

DTYPES = ("float32", "bfloat16")
ATTENTION_IMPLS = ("auto", "xla", "cudnn")


def _check_field_types(config) -> None:
  """Every field of a config dataclass has its annotated type: int (not bool), float, str,
  bool or tuple[int, ...]. NumPy scalars and ints for floats are converted, and any sequence
  of ints becomes a tuple; anything else is a ValueError naming the field."""
  hints = typing.get_type_hints(type(config))
  for field in dataclasses.fields(config):
    kind, value = hints[field.name], getattr(config, field.name)
    if typing.get_origin(kind) is tuple:
      ok = isinstance(value, (list, tuple)) and all(_is_int(x) for x in value)
      converted = tuple(int(x) for x in value) if ok else None
    elif kind is int:
      ok, converted = _is_int(value), value
    elif kind is float:
      ok = _is_int(value) or isinstance(value, numbers.Real) and not isinstance(value, bool)
      converted = value
    else:  # str, bool
      ok, converted = isinstance(value, kind), value
    if not ok:
      raise ValueError(f"{type(config).__name__}.{field.name} must be {_type_name(kind)}, got "
                       f"{value!r} ({type(value).__name__})")
    if kind in (int, float):
      converted = kind(converted)
    object.__setattr__(config, field.name, converted)


def _is_int(x) -> bool:
  return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _type_name(kind) -> str:
  return {int: "an int", float: "a float", str: "a str", bool: "a bool"}.get(
      kind, "a tuple of ints")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """A BASED (or Transformer++) language model. Validated on construction."""
  vocab_size: int  # number of token ids (padded vocabularies included).
  d_model: int  # width of the residual stream.
  n_layers: int  # number of residual blocks.
  mlp_inner: int  # SwiGLU inner width; 0 means blocks have no MLP (the MQAR models).
  linear_attention_layers: tuple[int, ...] = ()  # 0-based indices of Taylor linear attention.
  sliding_window_layers: tuple[int, ...] = ()  # 0-based indices of sliding-window attention.
  attention_layers: tuple[int, ...] = ()  # 0-based indices of full causal softmax attention.
  la_heads: int = 16  # linear-attention heads; value head dim is d_model / la_heads.
  la_feature_dim: int = 16  # d', query/key width per head before the Taylor feature map.
  la_eps: float = 1e-6  # added to the linear-attention normaliser.
  # Storage dtype of the decoding state's numerator (kv sums): "bfloat16" halves the bytes a
  # decode step moves; math stays float32 and the normaliser float32 (pallas_kernels state.py).
  la_state_dtype: str = "float32"
  attn_heads: int = 16  # heads of sliding-window and full attention (head dim d_model / heads).
  window: int = 128  # sliding window lookback: each query sees itself and `window` earlier tokens.
  conv_kernel: int = 3  # taps of the BaseConv causal depthwise convolution.
  rope_base: float = 10000.0  # rotary embedding base (rotate-half layout, full head dim).
  norm_eps: float = 1e-5  # RMSNorm epsilon.
  init_std: float = 0.02  # std of linear and embedding weights; output projections get less.
  dtype: str = "float32"  # compute dtype of mixers and MLPs ("float32" or "bfloat16").
  param_dtype: str = "float32"  # storage dtype of the parameters.
  # Taylor attention implementation (pallas_kernels.taylor_attention.IMPLEMENTATIONS): "auto"
  # (the Pallas kernels on a GPU where they apply, else XLA), "xla", "pallas", ...
  linear_attention_impl: str = "auto"
  # Softmax attention within a call (training, prefill): "auto" (cuDNN flash attention on a
  # CUDA GPU in bfloat16, else XLA), "xla" or "cudnn". See mixers/attention.py.
  attention_impl: str = "auto"
  # One decoded token against the cache: "auto" (= "xla": an einsum over the cache), "xla" or
  # "cudnn" (cuDNN with per-row key lengths; pads the cached head dim to a multiple of 8).
  attention_decode_impl: str = "auto"

  def __post_init__(self):
    _check_field_types(self)
    for name in ("vocab_size", "d_model", "n_layers", "la_heads", "attn_heads", "conv_kernel",
                 "la_feature_dim", "window"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
    if self.mlp_inner < 0:
      raise ValueError(f"mlp_inner must be >= 0 (0 = no MLP), got {self.mlp_inner}")
    for name in ("norm_eps", "rope_base", "init_std"):
      if not getattr(self, name) > 0 or not math.isfinite(getattr(self, name)):
        raise ValueError(f"{name} must be a finite number > 0, got {getattr(self, name)}")
    if not 0 <= self.la_eps < math.inf:
      raise ValueError(f"la_eps must be a finite number >= 0, got {self.la_eps}")
    for name, allowed in (("dtype", DTYPES), ("param_dtype", DTYPES),
                          ("la_state_dtype", DTYPES),
                          ("linear_attention_impl", LINEAR_ATTENTION_IMPLS),
                          ("attention_impl", ATTENTION_IMPLS),
                          ("attention_decode_impl", ATTENTION_IMPLS)):
      if getattr(self, name) not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
    seen: dict[int, str] = {}
    for field in ("linear_attention_layers", "sliding_window_layers", "attention_layers"):
      for i in getattr(self, field):
        if not 0 <= i < self.n_layers:
          raise ValueError(f"{field} has index {i} outside [0, n_layers={self.n_layers})")
        if i in seen:
          raise ValueError(f"{field} has index {i}, already listed in {seen[i]}")
        seen[i] = field
    kinds = set(self.layer_kinds)
    if LINEAR_ATTENTION in kinds and self.d_model % self.la_heads:
      raise ValueError(f"la_heads={self.la_heads} must divide d_model={self.d_model}")
    if kinds & {SLIDING_WINDOW, ATTENTION}:
      if self.d_model % self.attn_heads:
        raise ValueError(f"attn_heads={self.attn_heads} must divide d_model={self.d_model}")
      if (self.d_model // self.attn_heads) % 2:
        raise ValueError(f"attention head dim d_model/attn_heads="
                         f"{self.d_model // self.attn_heads} must be even for rotary embeddings")

  @property
  def layer_kinds(self) -> tuple[str, ...]:
    """The mixer kind of every layer, in order."""
    kind = {i: LINEAR_ATTENTION for i in self.linear_attention_layers}
    kind.update({i: SLIDING_WINDOW for i in self.sliding_window_layers})
    kind.update({i: ATTENTION for i in self.attention_layers})
    return tuple(kind.get(i, BASE_CONV) for i in range(self.n_layers))

  def replace(self, **changes) -> "ModelConfig":
    """A validated copy with some fields changed."""
    return dataclasses.replace(self, **changes)


GPT2_PADDED_VOCAB = 50264

PRESETS: dict[str, ModelConfig] = {
    # Released BASED 360M (363M parameters).
    "based_360m": ModelConfig(
        vocab_size=GPT2_PADDED_VOCAB, d_model=1024, n_layers=27, mlp_inner=2048,
        linear_attention_layers=(1, 6, 11, 16, 21), sliding_window_layers=(2, 7, 12, 17, 22),
        la_heads=16, attn_heads=16, window=128),
    # Released BASED 1.3B (1.35B parameters): head dim 112.
    "based_1b": ModelConfig(
        vocab_size=GPT2_PADDED_VOCAB, d_model=1792, n_layers=36, mlp_inner=3584,
        linear_attention_layers=(1, 6, 11, 16, 21, 27, 33),
        sliding_window_layers=(2, 7, 12, 17, 22, 28, 34),
        la_heads=16, attn_heads=16, window=128),
    # The paper's Transformer++ baselines: rotary, SwiGLU (inner 8/3 d rounded), RMSNorm.
    "transformer_pp_360m": ModelConfig(
        vocab_size=GPT2_PADDED_VOCAB, d_model=1024, n_layers=24, mlp_inner=2816,
        attention_layers=tuple(range(24)), attn_heads=16),
    "transformer_pp_1b": ModelConfig(
        vocab_size=GPT2_PADDED_VOCAB, d_model=1680, n_layers=36, mlp_inner=4480,
        attention_layers=tuple(range(36)), attn_heads=24),
    # Small models for tests and examples: every mixer kind in four layers.
    "based_tiny": ModelConfig(
        vocab_size=512, d_model=64, n_layers=4, mlp_inner=128,
        linear_attention_layers=(1,), sliding_window_layers=(2,),
        la_heads=4, la_feature_dim=8, attn_heads=4, window=8),
    "transformer_pp_tiny": ModelConfig(
        vocab_size=512, d_model=64, n_layers=2, mlp_inner=128,
        attention_layers=(0, 1), attn_heads=4),
    # The paper's MQAR models: BaseConv then the mixer, no MLP.
    "mqar_based": ModelConfig(
        vocab_size=8192, d_model=128, n_layers=2, mlp_inner=0,
        linear_attention_layers=(1,), la_heads=1, la_feature_dim=16),
    # The CPU default: a wider feature map (d' 64) and a larger initialisation (std 0.05:
    # larger q.k from the start sharpen the Taylor weights) recall within a few hundred steps.
    "mqar_based_cpu": ModelConfig(
        vocab_size=8192, d_model=128, n_layers=2, mlp_inner=0,
        linear_attention_layers=(1,), la_heads=1, la_feature_dim=64, init_std=0.05),
    "mqar_sliding_window": ModelConfig(
        vocab_size=8192, d_model=128, n_layers=2, mlp_inner=0,
        sliding_window_layers=(1,), attn_heads=1, window=64),
    "mqar_attention": ModelConfig(
        vocab_size=8192, d_model=128, n_layers=2, mlp_inner=0,
        attention_layers=(1,), attn_heads=1),
}


def get_config(name: str, **overrides) -> ModelConfig:
  """A preset by name, with optional field overrides (validated)."""
  if name not in PRESETS:
    raise ValueError(f"unknown preset {name!r}; known presets: {sorted(PRESETS)}")
  return PRESETS[name].replace(**overrides) if overrides else PRESETS[name]


def preset_names() -> Iterable[str]:
  return sorted(PRESETS)
