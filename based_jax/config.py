"""Model configuration: a frozen, validated dataclass and the named presets.

Layer kinds (`MixerKind`) are chosen per layer index in one of two ways: `layer_mixers` names
every layer's kind, or (the released BASED and Transformer++ presets) the indices listed in
`linear_attention_layers`, `sliding_window_layers` and `attention_layers` get that mixer and
every other layer is a BaseConv gated short convolution. What each kind builds, caches and
counts is `based_jax.mixers.registry`.
"""

import dataclasses
import enum
import math
import numbers
import typing
from typing import Iterable

from pallas_kernels.gemv import IMPLEMENTATIONS as GEMV_IMPLS
from pallas_kernels.rms_norm import IMPLEMENTATIONS as NORM_IMPLS
from pallas_kernels.selective_scan import IMPLEMENTATIONS as SSM_IMPLS
from pallas_kernels.taylor_attention import IMPLEMENTATIONS as LINEAR_ATTENTION_IMPLS


class MixerKind(enum.StrEnum):
  """The sequence mixers a layer can have (each a `based_jax.mixers.registry` entry)."""
  LINEAR_ATTENTION = "linear_attention"  # linear attention (Taylor or another feature map)
  SLIDING_WINDOW = "sliding_window"  # softmax attention over the last `window` tokens
  ATTENTION = "attention"  # full causal softmax attention
  BASE_CONV = "base_conv"  # BaseConv gated short convolution
  MAMBA = "mamba"  # Mamba selective SSM
  H3 = "h3"  # H3: shift SSM on keys, diagonal SSM on key-value products
  HYENA = "hyena"  # Hyena order-2 operator with an implicit FFT long convolution
  RWKV = "rwkv"  # RWKV-5 time mixing (matrix state with per-channel decay)
  GLA = "gla"  # gated linear attention (data-dependent decay on the key dim)


LINEAR_ATTENTION = MixerKind.LINEAR_ATTENTION
SLIDING_WINDOW = MixerKind.SLIDING_WINDOW
ATTENTION = MixerKind.ATTENTION
BASE_CONV = MixerKind.BASE_CONV
# Linear attention feature maps (`based_jax.mixers.feature_maps`); only "taylor" has kernels.
FEATURE_MAPS = ("taylor", "pos_elu", "relu", "identity", "square", "cosformer", "performer",
                "all_poly")
H3_HEAD_DIM = 2  # channels per H3 head: its diagonal SSM runs on 2 x 2 key-value products.

DTYPES = ("float32", "bfloat16")
ATTENTION_IMPLS = ("auto", "xla", "cudnn")
# One decoded token against the cache: also the Pallas kernel (pallas_kernels.cache_attention).
ATTENTION_DECODE_IMPLS = ATTENTION_IMPLS + ("pallas", "pallas_interpret")
REMAT_POLICIES = ("none", "block")
# Whose architecture details a model follows (`ModelConfig.block_style`, docs/mixers.md).
BLOCK_STYLES = ("based", "zoology")
# Every implementation switch of ModelConfig and what it takes; each takes "xla", plain JAX.
IMPL_CHOICES = {"linear_attention_impl": LINEAR_ATTENTION_IMPLS,
                "attention_impl": ATTENTION_IMPLS, "attention_decode_impl": ATTENTION_DECODE_IMPLS,
                "norm_impl": NORM_IMPLS, "ssm_impl": SSM_IMPLS, "gemv_impl": GEMV_IMPLS}


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
  # The kind of every layer, comma-separated MixerKind values ("base_conv,mamba"); instead of
  # the three index fields above (give one or the other). Empty: those fields decide.
  layer_mixers: str = ""
  la_heads: int = 16  # linear-attention heads; value head dim is d_model / la_heads.
  la_feature_dim: int = 16  # d', query/key width per head before the Taylor feature map.
  # Linear attention's feature map (FEATURE_MAPS): "taylor" (BASED) or an ablation, which runs
  # the pure-JAX path (linear_attention_impl "auto" or "xla").
  la_feature_map: str = "taylor"
  la_eps: float = 1e-6  # added to the linear-attention normaliser.
  # Storage dtype of the decoding state's numerator (kv sums): "bfloat16" halves the bytes a
  # decode step moves; math stays float32 and the normaliser float32 (pallas_kernels state.py).
  la_state_dtype: str = "float32"
  attn_heads: int = 16  # heads of sliding-window and full attention (head dim d_model / heads).
  window: int = 128  # sliding window lookback: each query sees itself and `window` earlier tokens.
  conv_kernel: int = 3  # taps of the BaseConv causal depthwise convolution (and Hyena's short one).
  ssm_state: int = 16  # N: state per channel of Mamba's selective SSM and of H3's SSMs.
  # Longest lag a position-dependent mixer sees: Hyena's long-filter length, CosFormer's M.
  horizon: int = 1024
  # Softmax and sliding-window attention rotate queries and keys by position (rotary); False:
  # attention sees no positions (the paper's MQAR models: order comes from the convolutions).
  rotary: bool = True
  rope_base: float = 10000.0  # rotary embedding base (rotate-half layout).
  # Head dims the rotary embedding rotates, the first ones (even); 0 = the whole head. The
  # paper's Transformer++ baselines rotate half of each head (flash-attention's
  # rotary_emb_fraction 0.5); the rest of the head carries no position.
  rotary_dims: int = 0
  norm_eps: float = 1e-5  # epsilon of every norm (RMSNorm; LayerNorm with block_style zoology).
  init_std: float = 0.02  # std of linear and embedding weights; output projections get less.
  # Dropout rate on the token embeddings in training passes (`LanguageModel(train=True)`);
  # 0 = none. zoology's MQAR models use 0.1 (docs/mixers.md). Parameters do not depend on it.
  embed_dropout: float = 0.0
  dtype: str = "float32"  # compute dtype of mixers and MLPs ("float32" or "bfloat16").
  param_dtype: str = "float32"  # storage dtype of the parameters.
  # Taylor attention implementation (pallas_kernels.taylor_attention.IMPLEMENTATIONS): "auto"
  # (the Pallas kernels on a GPU where they apply, else XLA), "xla", "pallas", ...
  linear_attention_impl: str = "auto"
  # Softmax attention within a call (training, prefill): "auto" (cuDNN flash attention on a
  # CUDA GPU in bfloat16, else XLA), "xla" or "cudnn". See mixers/attention.py.
  attention_impl: str = "auto"
  # One decoded token against the cache (ATTENTION_DECODE_IMPLS): "auto" ("pallas" on a GPU
  # when every attention layer has a window, else "xla"), "xla" (einsums over the cache),
  # "cudnn" (cuDNN with per-row key lengths; pads the cached head dim to a multiple of 8),
  # "pallas" (a kernel storing the new key and value and reading each row's cache once; GPU)
  # or "pallas_interpret" (it in the interpreter; tests).
  attention_decode_impl: str = "auto"
  # Residual adds and RMSNorms (pallas_kernels.rms_norm.IMPLEMENTATIONS): "auto" (the kernels on
  # a GPU for an RMSNorm, else "xla"; docs/kernels.md), "xla", "pallas" (the fused add + norm
  # Pallas kernels, GPU) or "pallas_interpret" (the same kernels interpreted; tests).
  norm_impl: str = "auto"
  # Mamba's selective scan in training and prefill (pallas_kernels.selective_scan's
  # IMPLEMENTATIONS): "auto" ("pallas" on a GPU, else "xla"), "xla" (associative
  # scan), "pallas" (the Pallas kernels; GPU) or "pallas_interpret" (them in the interpreter).
  ssm_impl: str = "auto"
  # The dense layers' products of a few rows (decoding batches of 1, 2 or 4;
  # pallas_kernels.gemv's IMPLEMENTATIONS): "auto" (the Pallas GEMV kernel on a GPU for one
  # row where it takes the shapes, else "xla"), "xla", "pallas" (the kernel for 1, 2 or 4 rows;
  # GPU) or "pallas_interpret" (tests). Other row counts, and the tied LM head, always run
  # XLA's matrix product.
  gemv_impl: str = "auto"
  # Rematerialisation in training: "none" keeps every activation for the backward pass,
  # "block" recomputes each residual block's insides from its input (less memory, ~1/3 more
  # compute). The function and the parameters are the same.
  remat: str = "none"
  # Whose architecture details the model follows (BLOCK_STYLES): "based", the released BASED
  # code's; "zoology", the paper's MQAR code's (HazyResearch/zoology): LayerNorms with biases,
  # its identity sublayer in blocks without an MLP (not in Mamba's blocks, which keep RMSNorm),
  # its BaseConv conv(u) * proj(u) + u, biased attention projections. docs/mixers.md.
  block_style: str = "based"

  def __post_init__(self):
    _check_field_types(self)
    for name in ("vocab_size", "d_model", "n_layers", "la_heads", "attn_heads", "conv_kernel",
                 "la_feature_dim", "window", "ssm_state", "horizon"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
    if self.mlp_inner < 0:
      raise ValueError(f"mlp_inner must be >= 0 (0 = no MLP), got {self.mlp_inner}")
    for name in ("norm_eps", "rope_base", "init_std"):
      if not getattr(self, name) > 0 or not math.isfinite(getattr(self, name)):
        raise ValueError(f"{name} must be a finite number > 0, got {getattr(self, name)}")
    if not 0 <= self.la_eps < math.inf:
      raise ValueError(f"la_eps must be a finite number >= 0, got {self.la_eps}")
    if not 0 <= self.embed_dropout < 1:
      raise ValueError(f"embed_dropout must be a rate in [0, 1), got {self.embed_dropout}")
    for name, allowed in (("dtype", DTYPES), ("param_dtype", DTYPES),
                          ("la_state_dtype", DTYPES),
                          *IMPL_CHOICES.items(),
                          ("remat", REMAT_POLICIES),
                          ("block_style", BLOCK_STYLES),
                          ("la_feature_map", FEATURE_MAPS)):
      if getattr(self, name) not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
    if self.block_style == "zoology" and self.norm_impl not in ("auto", "xla"):
      raise ValueError(f"norm_impl={self.norm_impl!r} runs the RMSNorm kernels only; "
                       "block_style='zoology' has LayerNorms, which run on norm_impl 'auto' or "
                       "'xla'")
    if self.la_feature_map != "taylor" and self.linear_attention_impl not in ("auto", "xla"):
      raise ValueError(f"linear_attention_impl={self.linear_attention_impl!r} runs the Taylor "
                       f"kernels only; la_feature_map={self.la_feature_map!r} runs the pure-JAX "
                       "path: use linear_attention_impl 'auto' or 'xla'")
    self._check_layer_mixers()
    seen: dict[int, str] = {}
    for field in ("linear_attention_layers", "sliding_window_layers", "attention_layers"):
      for i in getattr(self, field):
        if not 0 <= i < self.n_layers:
          raise ValueError(f"{field} has index {i} outside [0, n_layers={self.n_layers})")
        if i in seen:
          raise ValueError(f"{field} has index {i}, already listed in {seen[i]}")
        seen[i] = field
    kinds = set(self.layer_kinds)
    if kinds & {LINEAR_ATTENTION, MixerKind.RWKV, MixerKind.GLA} and self.d_model % self.la_heads:
      raise ValueError(f"la_heads={self.la_heads} must divide d_model={self.d_model}")
    if MixerKind.GLA in kinds and (self.d_model % 2 or (self.d_model // 2) % self.la_heads):
      raise ValueError(f"GLA's key width d_model/2 must be a whole multiple of la_heads="
                       f"{self.la_heads}, got d_model={self.d_model}")
    if MixerKind.H3 in kinds and (self.d_model % H3_HEAD_DIM or self.ssm_state % 2):
      raise ValueError(f"H3 needs d_model divisible by its head dim {H3_HEAD_DIM} and an even "
                       f"ssm_state (complex modes in pairs), got d_model={self.d_model}, "
                       f"ssm_state={self.ssm_state}")
    if kinds & {SLIDING_WINDOW, ATTENTION}:
      if self.d_model % self.attn_heads:
        raise ValueError(f"attn_heads={self.attn_heads} must divide d_model={self.d_model}")
      head_dim = self.d_model // self.attn_heads
      if not self.rotary:
        if self.rotary_dims:
          raise ValueError(f"rotary_dims={self.rotary_dims} with rotary=False: without rotary "
                           "embeddings no head dims rotate; leave rotary_dims at 0")
      elif not 0 <= self.rotary_dims <= head_dim or self.rotary_dims % 2:
        raise ValueError(f"rotary_dims must be an even number in [0, head dim {head_dim}] "
                         f"(0: the whole head), got {self.rotary_dims}")
      elif head_dim % 2:
        raise ValueError(f"attention head dim d_model/attn_heads={head_dim} must be even for "
                         "rotary embeddings (or rotary=False)")

  def _check_layer_mixers(self) -> None:
    """`layer_mixers` names n_layers known kinds, and is not given with the index fields."""
    if not self.layer_mixers:
      return
    names = [name.strip() for name in self.layer_mixers.split(",")]
    unknown = [name for name in names if name not in {kind.value for kind in MixerKind}]
    if unknown:
      raise ValueError(f"layer_mixers names unknown kinds {unknown}; known: "
                       f"{[kind.value for kind in MixerKind]}")
    if len(names) != self.n_layers:
      raise ValueError(f"layer_mixers names {len(names)} kinds for n_layers={self.n_layers}")
    for field in ("linear_attention_layers", "sliding_window_layers", "attention_layers"):
      if getattr(self, field):
        raise ValueError(f"layer_mixers and {field} both give layer kinds: give one of them")

  @property
  def layer_kinds(self) -> tuple[MixerKind, ...]:
    """The mixer kind of every layer, in order."""
    if self.layer_mixers:
      return tuple(MixerKind(name.strip()) for name in self.layer_mixers.split(","))
    kind = {i: LINEAR_ATTENTION for i in self.linear_attention_layers}
    kind.update({i: SLIDING_WINDOW for i in self.sliding_window_layers})
    kind.update({i: ATTENTION for i in self.attention_layers})
    return tuple(kind.get(i, BASE_CONV) for i in range(self.n_layers))

  def replace(self, **changes) -> "ModelConfig":
    """A validated copy with some fields changed."""
    return dataclasses.replace(self, **changes)

  def all_xla(self) -> "ModelConfig":
    """This model with every implementation switch on "xla": plain JAX that any backend can
    lower (a CPU lowering on a GPU machine, such as an HLO FLOP count) and whose work XLA
    sees (kernels and cuDNN calls are opaque to its cost analysis). The same math."""
    return self.replace(**{field: "xla" for field in IMPL_CHOICES})


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
    # GPT-2-small-sized pair (d 768, 12 layers) for single-GPU comparisons on text: the 360M
    # layout scaled down (linear attention every 5th layer from 1, sliding window after it).
    "based_125m": ModelConfig(
        vocab_size=GPT2_PADDED_VOCAB, d_model=768, n_layers=12, mlp_inner=1792,
        linear_attention_layers=(1, 6, 11), sliding_window_layers=(2, 7),
        la_heads=12, attn_heads=12, window=128),
    "transformer_pp_125m": ModelConfig(
        vocab_size=GPT2_PADDED_VOCAB, d_model=768, n_layers=12, mlp_inner=2048,
        attention_layers=tuple(range(12)), attn_heads=12),
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
    # The paper's MQAR models: BaseConv then the mixer, no MLP, no positions in attention
    # (zoology's MHA and SlidingAttn have none; its models have no position embeddings).
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
        sliding_window_layers=(1,), attn_heads=1, window=64, rotary=False),
    "mqar_attention": ModelConfig(
        vocab_size=8192, d_model=128, n_layers=2, mlp_inner=0,
        attention_layers=(1,), attn_heads=1, rotary=False),
    # The paper's MQAR baselines (docs/mixers.md): two layers of Mamba, H3 (N = d/4) or Hyena
    # as its configs stack them; RWKV-5 (heads of 64) twice; GLA after a BaseConv, as BASED.
    "mqar_mamba": ModelConfig(
        vocab_size=8192, d_model=128, n_layers=2, mlp_inner=0, layer_mixers="mamba,mamba",
        ssm_state=16),
    "mqar_h3": ModelConfig(
        vocab_size=8192, d_model=128, n_layers=2, mlp_inner=0, layer_mixers="h3,h3",
        ssm_state=32),
    "mqar_hyena": ModelConfig(
        vocab_size=8192, d_model=128, n_layers=2, mlp_inner=0, layer_mixers="hyena,hyena",
        horizon=1024),
    "mqar_rwkv": ModelConfig(
        vocab_size=8192, d_model=128, n_layers=2, mlp_inner=0, layer_mixers="rwkv,rwkv",
        la_heads=2),
    "mqar_gla": ModelConfig(
        vocab_size=8192, d_model=128, n_layers=2, mlp_inner=0, layer_mixers="base_conv,gla",
        la_heads=4),
    # Small GPT-2-vocabulary language models that train on text on a CPU in minutes: BASED
    # (BaseConv, linear attention, sliding window, BaseConv) and its Transformer++ twin.
    "based_text_cpu": ModelConfig(
        vocab_size=GPT2_PADDED_VOCAB, d_model=128, n_layers=4, mlp_inner=256,
        linear_attention_layers=(1,), sliding_window_layers=(2,),
        la_heads=4, attn_heads=4, window=64),
    "transformer_pp_text_cpu": ModelConfig(
        vocab_size=GPT2_PADDED_VOCAB, d_model=128, n_layers=4, mlp_inner=352,
        attention_layers=(0, 1, 2, 3), attn_heads=4),
}


def get_config(name: str, **overrides) -> ModelConfig:
  """A preset by name, with optional field overrides (validated)."""
  if name not in PRESETS:
    raise ValueError(f"unknown preset {name!r}; known presets: {sorted(PRESETS)}")
  return PRESETS[name].replace(**overrides) if overrides else PRESETS[name]


def preset_names() -> Iterable[str]:
  return sorted(PRESETS)
