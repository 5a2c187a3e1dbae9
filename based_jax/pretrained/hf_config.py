"""The released checkpoints' `config.json` <-> `ModelConfig`, both ways.

The released BASED and Transformer++ checkpoints come from the reference PyTorch repository
(HazyResearch/based, `based/models/gpt.py`): a `transformers.GPT2Config` carrying extra fields.
`from_hf_config` reads such a config the way the reference builds its model from it, field
by field, with the reference's own defaults for fields a config leaves out, and refuses (a
ValueError naming the field) every setting whose computation our model does not reproduce;
`to_hf_config` writes a config that the reference builds into our architecture.

Which mixer a layer gets follows the reference's `create_mixer_cls`: a layer listed in
`alt_mixer_2_layers` takes `alt_mixer_2`, else one in `alt_mixer_layers` takes `alt_mixer`,
else the layer takes `mixer`; a slot whose config is null is full softmax attention (MHA).
A slot's `_target_` names the mixer class: BaseConv, LinearAttention (Taylor feature map) or
SlidingAttention.

Conventions of the mapping (docs/checkpoints.md has the table):
  - `alt_mixer_2.window_size` is halved: the reference's flash-attention window is
    (window_size // 2, 0), so a query sees itself and window_size // 2 earlier tokens, our
    `window`. The released configs say 256: window 128. Attention heads are `n_head` (the
    reference overrides `alt_mixer_2.num_heads` with it).
  - The vocabulary is padded up to `pad_vocab_size_multiple` (50257 -> 50264 at 8).
  - The linear-attention normaliser eps is `alt_mixer.eps` when given, else 1e-6, the value
    the `fla` kernels hard-code and the released models were trained with (the reference's
    quadratic path defaults to 1e-12; the normaliser is at least t / 2 at token t, so the two
    differ by less than 2e-6 relative).
  - The SwiGLU width is `n_inner` rounded up to the reference GatedMlp's multiple (256 in
    based's own class, 128 in flash-attention's, which the attention baselines use); when
    the two roundings differ the caller passes the width (from_pretrained reads it from the
    weights).
  - Rotary embeddings rotate int(rotary_emb_fraction * head_dim) dims (`rotary_dims`): all
    of them in the BASED configs (fraction 1), half in the paper's Transformer++ baselines
    (hazyresearch/attn-360m: 32 of 64). An odd count (attn-1b: 35 of 70, which
    flash-attention turns into 36 rotated dims with frequencies over 35) is refused.
"""

from typing import Any, Mapping, Optional

from based_jax import config as config_lib
from based_jax.config import ModelConfig
from based_jax.training.run_config import MODEL_RUNTIME_FIELDS

BASE_CONV_TARGET = "based.models.mixers.convolution.BaseConv"
LINEAR_ATTENTION_TARGET = "based.models.mixers.linear_attention.LinearAttention"
TAYLOR_TARGET = "based.models.mixers.linear_attention.TaylorExp"
SLIDING_WINDOW_TARGET = "based.models.mixers.slide_attention.SlidingAttention"
# The reference's mixer classes by the end of their `_target_`, and our layer kind for each.
_TARGET_KINDS = {
    "convolution.BaseConv": config_lib.BASE_CONV,
    "linear_attention.LinearAttention": config_lib.LINEAR_ATTENTION,
    "slide_attention.SlidingAttention": config_lib.SLIDING_WINDOW,
}
# The reference GatedMlp rounds its width up to one of these (based's class, flash-attention's).
GATED_MLP_MULTIPLES = (256, 128)
DEFAULT_LA_EPS = 1e-6
L_MAX = 2048  # the reference mixers' required `l_max` (their training length; unused by the math)
# ModelConfig fields a caller may set on a loaded model: they choose how, not what, we compute.
OVERRIDABLE_FIELDS = ("dtype", "param_dtype") + MODEL_RUNTIME_FIELDS


def _fail(field: str, value: Any, why: str) -> None:
  raise ValueError(f"config.json: {field}={value!r} is not supported: {why}")


def _round_up(x: int, m: int) -> int:
  return -(-x // m) * m


def _int(field: str, value: Any) -> int:
  if isinstance(value, bool) or not isinstance(value, int):
    raise ValueError(f"config.json: {field} must be an integer, got {value!r}")
  return value


def mlp_widths(hf: Mapping[str, Any]) -> tuple[int, ...]:
  """The SwiGLU widths the reference may build from `hf`: `n_inner` (or int(8 d / 3) when it
  is null) rounded up to each multiple of GATED_MLP_MULTIPLES, distinct, largest first."""
  d = hf["n_embd"]
  inner = hf.get("n_inner")
  base = int(8 * d / 3) if inner is None else _int("n_inner", inner)
  return tuple(sorted({_round_up(base, m) for m in GATED_MLP_MULTIPLES}, reverse=True))


def _layer_specs(hf: Mapping[str, Any], n_layers: int) -> list[tuple[str, Optional[dict]]]:
  """(slot name, mixer config or None for MHA) of every layer, as create_mixer_cls picks."""
  lists = {}
  for field in ("alt_mixer_layers", "alt_mixer_2_layers"):
    layers = hf.get(field) or []
    if not isinstance(layers, (list, tuple)) or not all(
        isinstance(i, int) and not isinstance(i, bool) for i in layers):
      raise ValueError(f"config.json: {field} must be a list of layer indices, got {layers!r}")
    outside = [i for i in layers if not 0 <= i < n_layers]
    if outside:
      raise ValueError(f"config.json: {field} has indices {outside} outside [0, n_layer="
                       f"{n_layers})")
    lists[field] = set(layers)
  specs = []
  for i in range(n_layers):
    slot = ("alt_mixer_2" if i in lists["alt_mixer_2_layers"] else
            "alt_mixer" if i in lists["alt_mixer_layers"] else "mixer")
    spec = hf.get(slot)
    if spec is not None and not isinstance(spec, Mapping):
      raise ValueError(f"config.json: {slot} must be an object or null, got {spec!r}")
    specs.append((slot, spec))
  return specs


def _kind(slot: str, spec: Optional[Mapping[str, Any]]) -> str:
  if spec is None:
    return config_lib.ATTENTION
  target = spec.get("_target_")
  for suffix, kind in _TARGET_KINDS.items():
    if isinstance(target, str) and target.endswith(suffix):
      return kind
  raise ValueError(f"config.json: {slot}._target_={target!r} is not a mixer this port has; "
                   f"supported: {BASE_CONV_TARGET}, {LINEAR_ATTENTION_TARGET}, "
                   f"{SLIDING_WINDOW_TARGET}, or null (softmax attention)")


def _base_conv_fields(slot: str, spec: Mapping[str, Any]) -> dict:
  # Reference defaults: expand_proj 2, use_bias True, kernel_size 3 (its `kernel_sizes`
  # field is swallowed by **kwargs and changes nothing).
  if spec.get("expand_proj", 2) != 4:
    _fail(f"{slot}.expand_proj", spec.get("expand_proj", 2),
          "BaseConv here projects d -> 4d (expand_proj 4)")
  if not spec.get("use_bias", True):
    _fail(f"{slot}.use_bias", spec.get("use_bias"), "BaseConv here has in/out biases")
  return {"conv_kernel": _int(f"{slot}.kernel_size", spec.get("kernel_size", 3))}


def _linear_attention_fields(slot: str, spec: Mapping[str, Any], d_model: int) -> dict:
  heads = _int(f"{slot}.num_heads", spec.get("num_heads", 16))
  feature_dim = _int(f"{slot}.feature_dim", spec.get("feature_dim", 16))
  feature_map = spec.get("feature_map")
  if not isinstance(feature_map, Mapping) or not str(
      feature_map.get("_target_", "")).endswith("TaylorExp"):
    _fail(f"{slot}.feature_map", feature_map, f"only the Taylor feature map ({TAYLOR_TARGET})")
  if feature_map.get("input_dim", feature_dim) != feature_dim:
    _fail(f"{slot}.feature_map.input_dim", feature_map.get("input_dim"),
          f"the Taylor map here scales by feature_dim={feature_dim}")
  head_dim = spec.get("head_dim")
  if head_dim is not None and head_dim * heads != d_model:
    _fail(f"{slot}.head_dim", head_dim, f"value heads are n_embd / num_heads = {d_model} / "
          f"{heads}")
  if spec.get("parallel_implementation") == "tk":
    _fail(f"{slot}.parallel_implementation", "tk",
          "the ThunderKittens path adds an output RMSNorm this port does not have")
  eps = spec.get("eps", DEFAULT_LA_EPS)
  return {"la_heads": heads, "la_feature_dim": feature_dim, "la_eps": float(eps)}


def _sliding_window_fields(slot: str, spec: Mapping[str, Any]) -> dict:
  size = _int(f"{slot}.window_size", spec.get("window_size", 128))  # reference default
  if size // 2 < 1:
    _fail(f"{slot}.window_size", size, "the reference window is window_size // 2 >= 1 tokens")
  return {"window": size // 2}


# Settings our model computes one way: (field, the reference's default, our value, why).
_BLOCK_SETTINGS = (
    ("rms_norm", False, True, "blocks here use RMSNorm"),
    ("activation_function", "gelu_new", "swiglu", "the MLP here is SwiGLU"),
    ("fused_mlp", False, False, "the fused MLP is not gated"),
    ("fused_dense_sqrelu_dense", False, False, "the MLP here is SwiGLU"),
    ("mlp_type", "base", "base", "the MLP here is the packed fc1 / fc2 GatedMlp"),
    ("mlp_fc1_bias", True, False, "the MLP here has no biases"),
    ("mlp_fc2_bias", True, False, "the MLP here has no biases"),
    ("prenorm", True, True, "blocks here are pre-norm"),
    ("parallel_block", False, False, "blocks here are sequential"),
    ("tie_word_embeddings", True, True, "the LM head here is the input embedding"),
    ("lm_head_bias", False, False, "the LM head here has no bias"),
    ("word_embed_proj_dim", None, None, "embeddings here are n_embd wide"),
)
_ATTENTION_SETTINGS = (  # sliding-window and full attention
    ("qkv_proj_bias", True, False, "the packed Wqkv here has no bias"),
    ("out_proj_bias", True, False, "out_proj here has no bias"),
    ("scale_attn_weights", True, True, "scores here are scaled by head_dim ** -0.5"),
    ("scale_attn_by_inverse_layer_idx", False, False, "scores here are not scaled by layer"),
    ("rotary_emb_interleaved", False, False, "rotary here is the rotate-half layout"),
    ("rotary_emb_scale_base", None, None, "no xPos scaling here"),
)


def _require(hf: Mapping[str, Any], settings) -> None:
  for field, default, ours, why in settings:
    if hf.get(field, default) != ours:
      _fail(field, hf.get(field, default), why)


def _check_attention(hf: Mapping[str, Any], d_model: int, heads: int) -> tuple[float, int]:
  """Settings of sliding-window and full attention; returns the rotary base and
  `rotary_dims`."""
  head_dim = d_model // heads
  if hf.get("head_dim") not in (None, head_dim):
    _fail("head_dim", hf.get("head_dim"), f"heads here are n_embd / n_head = {head_dim} wide")
  if hf.get("n_head_kv") not in (None, heads):
    _fail("n_head_kv", hf.get("n_head_kv"), "grouped / multi-query attention")
  _require(hf, _ATTENTION_SETTINGS)
  fraction = hf.get("rotary_emb_fraction", 0.0)
  rotated = int(fraction * head_dim) if isinstance(fraction, (int, float)) else -1
  if not 0 < rotated <= head_dim or rotated % 2:
    _fail("rotary_emb_fraction", fraction,
          f"attention here rotates an even number of the {head_dim} head dims; this fraction "
          f"rotates int(fraction * head_dim) = {rotated}")
  return float(hf.get("rotary_emb_base", 10000.0)), 0 if rotated == head_dim else rotated


def from_hf_config(hf: Mapping[str, Any], *, mlp_inner: Optional[int] = None,
                   **overrides) -> ModelConfig:
  """The ModelConfig of a released checkpoint's config.json (a parsed dict).

  Args:
    hf: the config.json contents.
    mlp_inner: the SwiGLU width when the config leaves it ambiguous (see `mlp_widths`);
      must be one the reference can build. None: the config's own (ValueError if ambiguous).
    **overrides: ModelConfig fields of OVERRIDABLE_FIELDS (dtypes, implementations).

  Raises:
    ValueError naming the field for a setting this port does not compute the same way.
  """
  if not isinstance(hf, Mapping):
    raise ValueError(f"config.json must hold a JSON object, got {type(hf).__name__}")
  fixed = sorted(set(overrides) - set(OVERRIDABLE_FIELDS))
  if fixed:
    raise ValueError(f"{fixed} come from the checkpoint's config.json; only "
                     f"{list(OVERRIDABLE_FIELDS)} can be chosen when loading")
  for field in ("vocab_size", "n_embd", "n_layer"):
    if field not in hf:
      raise ValueError(f"config.json has no {field!r} (a BASED / GPT2Config model config?)")
  d = _int("n_embd", hf["n_embd"])
  n_layers = _int("n_layer", hf["n_layer"])
  heads = _int("n_head", hf.get("n_head", 12))  # GPT2Config's default
  _require(hf, _BLOCK_SETTINGS)

  fields: dict[str, Any] = {}
  layers: dict[str, list[int]] = {config_lib.LINEAR_ATTENTION: [], config_lib.SLIDING_WINDOW: [],
                                  config_lib.ATTENTION: [], config_lib.BASE_CONV: []}
  readers = {
      config_lib.BASE_CONV: _base_conv_fields,
      config_lib.LINEAR_ATTENTION: lambda slot, spec: _linear_attention_fields(slot, spec, d),
      config_lib.SLIDING_WINDOW: _sliding_window_fields,
  }
  read_slots: dict[str, str] = {}  # field -> the slot it was read from
  for i, (slot, spec) in enumerate(_layer_specs(hf, n_layers)):
    kind = _kind(slot, spec)
    layers[kind].append(i)
    if kind in readers:
      for field, value in readers[kind](slot, spec).items():
        if field in fields and fields[field] != value:
          raise ValueError(f"config.json: {slot} and {read_slots[field]} give different "
                           f"{field} ({value} vs {fields[field]}); this port has one per model")
        fields[field], read_slots[field] = value, slot
  if layers[config_lib.ATTENTION] or layers[config_lib.SLIDING_WINDOW]:
    fields["rope_base"], fields["rotary_dims"] = _check_attention(hf, d, heads)

  widths = mlp_widths(hf)
  if mlp_inner is None:
    if len(widths) > 1:
      raise ValueError(f"config.json: n_inner={hf.get('n_inner')!r} gives a SwiGLU width of "
                       f"{' or '.join(map(str, widths))} depending on the reference class; "
                       "pass mlp_inner (from_pretrained reads it from the weights)")
    mlp_inner = widths[0]
  elif mlp_inner not in widths:
    raise ValueError(f"mlp_inner={mlp_inner} is not a width the reference builds from "
                     f"n_inner={hf.get('n_inner')!r} (it builds {widths})")

  multiple = _int("pad_vocab_size_multiple", hf.get("pad_vocab_size_multiple", 1))
  vocab = _round_up(_int("vocab_size", hf["vocab_size"]), max(multiple, 1))
  return ModelConfig(
      vocab_size=vocab, d_model=d, n_layers=n_layers, mlp_inner=mlp_inner,
      linear_attention_layers=tuple(layers[config_lib.LINEAR_ATTENTION]),
      sliding_window_layers=tuple(layers[config_lib.SLIDING_WINDOW]),
      attention_layers=tuple(layers[config_lib.ATTENTION]),
      attn_heads=heads, norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
      init_std=float(hf.get("initializer_range", 0.02)), **fields, **overrides)


def to_hf_config(config: ModelConfig) -> dict:
  """A config.json for `config` that the reference (`based.models.gpt.GPTLMHeadModel`) builds
  into the same architecture; `from_hf_config` maps it back to `config` (up to the fields that
  only choose how we compute: dtypes and implementations).

  Raises:
    ValueError when the reference cannot express the model: block_style "zoology" (the
    paper's MQAR architecture: LayerNorms, zoology's BaseConv and biases), a mixer kind or
    feature map it lacks, no MLP (mlp_inner 0), a SwiGLU width no GatedMlp builds (not a
    multiple of 128; based's own class needs 256), attention without rotary embeddings
    (`rotary` False: the mapping has rotary attention only), or BaseConv, linear,
    sliding-window and full attention layers all in one model (it has three mixer slots).
  """
  if config.block_style != "based":
    raise ValueError(f"block_style={config.block_style!r}: the reference's blocks are the "
                     "released BASED code's (RMSNorm, its BaseConv, attention without biases); "
                     "only block_style 'based' models can be written for it")
  if config.mlp_inner <= 0 or config.mlp_inner % min(GATED_MLP_MULTIPLES):
    raise ValueError(f"mlp_inner={config.mlp_inner}: every reference block has a GatedMlp, "
                     f"whose width is a multiple of {min(GATED_MLP_MULTIPLES)} (flash-attention's "
                     f"class) or {max(GATED_MLP_MULTIPLES)} (based's), so this model would not "
                     "load there")
  kinds = config.layer_kinds
  others = sorted({str(k) for k in kinds} - {str(k) for k in _TARGET_KINDS.values()}
                  - {str(config_lib.ATTENTION)})
  if others:
    raise ValueError(f"the reference's BASED model has no {others} layers; it has BaseConv, "
                     "Taylor linear attention, sliding-window and full attention")
  if not config.rotary and {config_lib.SLIDING_WINDOW, config_lib.ATTENTION} & set(kinds):
    raise ValueError("rotary=False: the reference's attention is written here with rotary "
                     "embeddings only (rotary_emb_fraction > 0), so it would add positions")
  if config_lib.LINEAR_ATTENTION in kinds and config.la_feature_map != "taylor":
    raise ValueError(f"la_feature_map={config.la_feature_map!r}: the reference's linear "
                     "attention is written here with its Taylor feature map only")
  by_kind = {kind: [i for i, k in enumerate(kinds) if k == kind]
             for kind in (config_lib.BASE_CONV, config_lib.LINEAR_ATTENTION,
                          config_lib.SLIDING_WINDOW, config_lib.ATTENTION)}
  head_dim = config.d_model // config.attn_heads
  slots: dict[str, Optional[dict]] = {"mixer": None, "alt_mixer": None, "alt_mixer_2": None}
  slot_layers = {"alt_mixer": by_kind[config_lib.LINEAR_ATTENTION],
                 "alt_mixer_2": by_kind[config_lib.SLIDING_WINDOW]}
  if by_kind[config_lib.BASE_CONV]:
    slots["mixer"] = {"_target_": BASE_CONV_TARGET, "l_max": L_MAX, "use_bias": True,
                      "expand_proj": 4, "kernel_size": config.conv_kernel}
  if by_kind[config_lib.LINEAR_ATTENTION]:
    slots["alt_mixer"] = {
        "_target_": LINEAR_ATTENTION_TARGET, "l_max": L_MAX,
        "feature_map": {"_target_": TAYLOR_TARGET, "input_dim": config.la_feature_dim},
        "feature_dim": config.la_feature_dim, "num_heads": config.la_heads,
        "eps": config.la_eps}
  if by_kind[config_lib.SLIDING_WINDOW]:
    slots["alt_mixer_2"] = {"_target_": SLIDING_WINDOW_TARGET, "window_size": 2 * config.window,
                            "num_heads": config.attn_heads, "causal": True}
  attention = by_kind[config_lib.ATTENTION]
  if attention and by_kind[config_lib.BASE_CONV]:
    # Full attention is a slot whose config is null: it needs a slot no other mixer uses.
    free = [slot for slot in ("alt_mixer_2", "alt_mixer") if not slot_layers[slot]]
    if not free:
      raise ValueError("the reference has three mixer slots: a model with BaseConv, linear, "
                       "sliding-window and full attention layers cannot be written for it")
    slot_layers[free[0]] = attention
  hf = {
      "vocab_size": config.vocab_size,
      "pad_vocab_size_multiple": 8 if config.vocab_size % 8 == 0 else 1,
      "n_embd": config.d_model, "n_layer": config.n_layers, "n_head": config.attn_heads,
      "n_inner": config.mlp_inner, "n_positions": 0,  # no absolute position embedding
      "layer_norm_epsilon": config.norm_eps, "initializer_range": config.init_std,
      "rms_norm": True, "activation_function": "swiglu", "fused_mlp": False,
      "mlp_fc1_bias": False, "mlp_fc2_bias": False, "qkv_proj_bias": False,
      "out_proj_bias": False, "rotary_emb_base": config.rope_base,
      "rotary_emb_fraction": (config.rotary_dims or head_dim) / head_dim if head_dim else 1.0,
      "rotary_emb_interleaved": False, "scale_attn_weights": True,
      "scale_attn_by_inverse_layer_idx": False, "tie_word_embeddings": True,
      "residual_in_fp32": True, "prenorm": True,
      "attn_pdrop": 0.0, "embd_pdrop": 0.0, "resid_pdrop": 0.0,
      "alt_mixer_layers": slot_layers["alt_mixer"],
      "alt_mixer_2_layers": slot_layers["alt_mixer_2"], **slots,
      "torch_dtype": config.param_dtype,
  }
  return hf
