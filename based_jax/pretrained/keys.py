"""The released checkpoints' state-dict names and layouts <-> our parameter tree, both ways.

A released state dict maps PyTorch names to arrays. Per layer `transformer.layers.{i}.`:

  norm1.weight, norm2.weight        RMSNorm scales [D]           -> norm1 / norm2 scale
  mlp.fc1.weight [2 inner, D]       SwiGLU in: rows [y; gate]    -> mlp/fc1 kernel (transposed)
  mlp.fc2.weight [D, inner]                                      -> mlp/fc2 kernel (transposed)
  BaseConv:          mixer.in_proj.weight [4D, D] and .bias, mixer.conv.conv.weight [2D, 1,
                     taps] (depthwise; tap i multiplies input t - (taps - 1) + i),
                     mixer.out_proj.weight [D, 2D] and .bias
  linear attention:  mixer.proj_q / proj_k.weight [H F, D], mixer.proj_v / out_proj.weight
                     [D, D]
  sliding window or
  full attention:    mixer.Wqkv.weight [3D, D] (rows "(three h d)": q, k, v, each head-major,
                     the layout our Wqkv kernel's columns have), mixer.out_proj.weight [D, D]

and `transformer.embeddings.word_embeddings.weight` [V, D], `transformer.ln_f.weight` [D],
`lm_head.weight` [V, D] (tied: the embedding; a file may hold either or both). A linear's
weight [out, in] is our Dense kernel [in, out] transposed; the conv weight [C, 1, taps] is our
`conv_kernel` [taps, C] transposed.

Names are normalised first, as the reference's `from_pretrained_hf` does: a leading `model.`
is dropped (the based-1b-50b files carry it) and so is every entry whose name contains
`metrics` (training counters). Two buffers that hold no parameter are checked and ignored:
`transformer.decay.decay` (the per-head decay rates of `fixed_decay`, which no mixer reads)
and a mixer's `rotary_emb.inv_freq` (must be the frequencies our rotary embedding uses).
Anything else unknown, anything missing and every shape mismatch is one ValueError listing
them all.

The mapping only reshapes and transposes, so `import_state_dict` runs on numpy arrays, jax
arrays or, under `jax.eval_shape`, shapes alone (the full-size configs are checked that way).
"""

import functools
import re
from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from based_jax import config as config_lib
from based_jax.config import ModelConfig
from based_jax.model import init_params

EMBEDDING = "transformer.embeddings.word_embeddings.weight"
LM_HEAD = "lm_head.weight"
DECAY_BUFFER = "transformer.decay.decay"
_INV_FREQ = re.compile(r"^transformer\.layers\.(\d+)\.mixer\.rotary_emb\.inv_freq$")
_FC2 = re.compile(r"^transformer\.layers\.(\d+)\.mlp\.fc2\.weight$")
_LISTED = 12  # names listed per kind of problem in an error

# How a parameter is stored in the released layout.
LINEAR = "linear"  # our kernel [in, out] is the weight [out, in] transposed
CONV = "conv"  # our conv_kernel [taps, C] is the weight [C, 1, taps] transposed
SAME = "same"  # same array (norm scales, biases, the embedding)

_MIXER_PARAMS = {  # layer kind -> (released name under `mixer.`, our path under `mixer`, layout)
    config_lib.BASE_CONV: (("in_proj.weight", ("in_proj", "kernel"), LINEAR),
                           ("in_proj.bias", ("in_proj", "bias"), SAME),
                           ("conv.conv.weight", ("conv_kernel",), CONV),
                           ("out_proj.weight", ("out_proj", "kernel"), LINEAR),
                           ("out_proj.bias", ("out_proj", "bias"), SAME)),
    config_lib.LINEAR_ATTENTION: (("proj_q.weight", ("proj_q", "kernel"), LINEAR),
                                  ("proj_k.weight", ("proj_k", "kernel"), LINEAR),
                                  ("proj_v.weight", ("proj_v", "kernel"), LINEAR),
                                  ("out_proj.weight", ("out_proj", "kernel"), LINEAR)),
    config_lib.SLIDING_WINDOW: (("Wqkv.weight", ("Wqkv", "kernel"), LINEAR),
                                ("out_proj.weight", ("out_proj", "kernel"), LINEAR)),
}
_MIXER_PARAMS[config_lib.ATTENTION] = _MIXER_PARAMS[config_lib.SLIDING_WINDOW]
_MLP_PARAMS = (("norm2.weight", ("norm2", "scale"), SAME),
               ("mlp.fc1.weight", ("mlp", "fc1", "kernel"), LINEAR),
               ("mlp.fc2.weight", ("mlp", "fc2", "kernel"), LINEAR))


class Entry(NamedTuple):
  name: str  # the released state-dict name
  path: tuple[str, ...]  # our path under params["params"]
  layout: str  # LINEAR, CONV or SAME


def entries(config: ModelConfig) -> tuple[Entry, ...]:
  """Every parameter of `config`'s model, once, with its released name (the tied head,
  `lm_head.weight`, is the embedding's second name and not listed)."""
  if config.block_style != "based":
    raise ValueError(f"block_style={config.block_style!r} has no released layout: the released "
                     "models are block_style 'based' (RMSNorm, BASED's BaseConv, no biases)")
  out = [Entry(EMBEDDING, ("embed", "embedding"), SAME)]
  for i, kind in enumerate(config.layer_kinds):
    if kind not in _MIXER_PARAMS or (kind == config_lib.LINEAR_ATTENTION
                                     and config.la_feature_map != "taylor"):
      raise ValueError(f"layer {i} ({kind}, feature map {config.la_feature_map!r}) has no "
                       "released layout: the released models have BaseConv, Taylor linear "
                       "attention, sliding-window and full attention layers")
    prefix, layer = f"transformer.layers.{i}.", f"layers_{i}"
    out.append(Entry(prefix + "norm1.weight", (layer, "norm1", "scale"), SAME))
    out += [Entry(f"{prefix}mixer.{name}", (layer, "mixer") + path, layout)
            for name, path, layout in _MIXER_PARAMS[kind]]
    if config.mlp_inner:
      out += [Entry(prefix + name, (layer,) + path, layout) for name, path, layout in _MLP_PARAMS]
  out.append(Entry("transformer.ln_f.weight", ("final_norm", "scale"), SAME))
  return tuple(out)


def _to_released(layout: str, x):
  if layout == LINEAR:
    return x.T
  if layout == CONV:
    return x.T[:, None, :]
  return x


def _from_released(layout: str, w):
  if layout == LINEAR:
    return w.T
  if layout == CONV:
    return w[:, 0, :].T
  return w


def _released_shape(layout: str, shape: tuple) -> tuple:
  if layout == LINEAR:
    return tuple(reversed(shape))
  if layout == CONV:
    return (shape[1], 1, shape[0])
  return tuple(shape)


@functools.lru_cache(maxsize=16)
def _param_shapes(config: ModelConfig) -> dict:
  """Our parameters' ShapeDtypeStructs (nothing allocated), by path."""
  tree = jax.eval_shape(functools.partial(init_params, config))["params"]
  return {tuple(k.key for k in path): leaf
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def state_dict_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
  """The released layout's names and shapes for `config`, `lm_head.weight` included."""
  shapes = _param_shapes(config)
  out = {e.name: _released_shape(e.layout, shapes[e.path].shape) for e in entries(config)}
  out[LM_HEAD] = out[EMBEDDING]
  return out


def normalize_names(state_dict: Mapping[str, Any]) -> dict[str, Any]:
  """The reference's renaming: a leading `model.` dropped, `*metrics*` entries dropped."""
  out: dict[str, Any] = {}
  for name, value in state_dict.items():
    if not isinstance(name, str):
      raise ValueError(f"state-dict names must be strings, got {name!r}")
    if "metrics" in name:
      continue
    short = name[len("model."):] if name.startswith("model.") else name
    if short in out:
      raise ValueError(f"state dict holds {short!r} twice (with and without 'model.')")
    out[short] = value
  return out


def mlp_width(state_dict: Mapping[str, Any]) -> int | None:
  """The SwiGLU width of a (normalised) state dict: fc2's input width; None without an MLP."""
  for name, value in state_dict.items():
    if _FC2.match(name) and len(value.shape) == 2:
      return int(value.shape[1])
  return None


def _listing(names) -> str:
  names = sorted(names)
  shown = ", ".join(names[:_LISTED])
  return shown + (f", ... ({len(names) - _LISTED} more)" if len(names) > _LISTED else "")


def _hints(unknown) -> str:
  hints = []
  if any("position_embeddings" in n for n in unknown):
    hints.append("absolute position embeddings: the model here has none (rotary only)")
  if any(n.endswith(".bias") for n in unknown):
    hints.append("biases where the model here has none (norms, attention, MLP or conv)")
  if any(".g_norm." in n for n in unknown):
    hints.append("an output norm of the 'tk' linear attention, not in the model here")
  return "".join(f"\n  hint: {h}" for h in hints)


def _check_buffers(config: ModelConfig, state_dict: Mapping[str, Any]) -> list[str]:
  """Checks the ignored buffers; returns their names."""
  ignored = []
  kinds = config.layer_kinds
  half = (config.rotary_dims or config.d_model // config.attn_heads) // 2
  for name, value in state_dict.items():
    match = _INV_FREQ.match(name)
    if name == DECAY_BUFFER:
      if len(value.shape) != 1:
        raise ValueError(f"{name} must be a vector of per-head decay rates, got shape "
                         f"{tuple(value.shape)}")
    elif match:
      i = int(match.group(1))
      if i >= len(kinds) or kinds[i] not in (config_lib.SLIDING_WINDOW, config_lib.ATTENTION):
        continue  # not an attention layer: reported as unknown
      if tuple(value.shape) != (half,):
        raise ValueError(f"{name} has shape {tuple(value.shape)}: rotary over {2 * value.shape[0]}"
                         f" dims, the attention here rotates {2 * half}")
      if isinstance(value, np.ndarray):
        want = config.rope_base ** (-np.arange(half, dtype=np.float64) / half)
        if not np.allclose(value.astype(np.float64), want, rtol=1e-5, atol=0):
          raise ValueError(f"{name} is not the rotary frequencies of rope_base="
                           f"{config.rope_base} over {2 * half} dims")
    else:
      continue
    ignored.append(name)
  return ignored


def import_state_dict(config: ModelConfig, state_dict: Mapping[str, Any]) -> dict:
  """Our parameters (`{"params": ...}`, in config.param_dtype) from a released state dict.

  Args:
    config: the model (from `hf_config.from_hf_config`).
    state_dict: released name -> array [released shape] (numpy, jax, or abstract shapes
      under `jax.eval_shape`); names are normalised as `normalize_names` says.

  Raises:
    ValueError listing every unknown name, missing name and shape mismatch, or a tied head
    whose two copies differ.
  """
  state_dict = normalize_names(state_dict)
  shapes = _param_shapes(config)
  table = entries(config)
  expected = {e.name: _released_shape(e.layout, shapes[e.path].shape) for e in table}
  heads = [n for n in (EMBEDDING, LM_HEAD) if n in state_dict]
  if len(heads) == 2:
    a, b = state_dict[EMBEDDING], state_dict[LM_HEAD]
    if tuple(a.shape) != tuple(b.shape) or (
        isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and not np.array_equal(a, b)):
      raise ValueError(f"{LM_HEAD} differs from {EMBEDDING}: the model here ties its output "
                       "head to the input embedding")
  source = {n: v for n, v in state_dict.items() if n != LM_HEAD}
  if heads == [LM_HEAD]:
    source[EMBEDDING] = state_dict[LM_HEAD]  # files that keep the tied tensor once
  ignored = set(_check_buffers(config, source))
  unknown = set(source) - set(expected) - ignored
  missing = set(expected) - set(source)
  mismatched = [f"{n} {tuple(source[n].shape)} (expected {expected[n]})"
                for n in sorted(set(expected) & set(source))
                if tuple(source[n].shape) != expected[n]]
  if unknown or missing or mismatched:
    parts = []
    if missing:
      parts.append(f"{len(missing)} missing: {_listing(missing)}")
    if unknown:
      parts.append(f"{len(unknown)} unknown: {_listing(unknown)}")
    if mismatched:
      parts.append(f"{len(mismatched)} of the wrong shape: {_listing(mismatched)}")
    raise ValueError(f"the state dict does not match the model ({config.n_layers} layers, "
                     f"kinds {_kind_summary(config)}): " + "; ".join(parts) + _hints(unknown))
  dtype = jnp.dtype(config.param_dtype)
  tree: dict = {}
  for e in table:
    value = source[e.name]
    if not jnp.issubdtype(value.dtype, jnp.floating):
      raise ValueError(f"{e.name} holds {value.dtype}, not floating-point weights")
    node = tree
    for key in e.path[:-1]:
      node = node.setdefault(key, {})
    node[e.path[-1]] = jnp.asarray(_from_released(e.layout, value), dtype)
  return {"params": tree}


def _kind_summary(config: ModelConfig) -> str:
  counts: dict[str, int] = {}
  for kind in config.layer_kinds:
    counts[kind] = counts.get(kind, 0) + 1
  return ", ".join(f"{n} {k}" for k, n in counts.items())


def export_state_dict(config: ModelConfig, params) -> dict[str, np.ndarray]:
  """The released state dict (host numpy arrays in the parameters' dtype, `lm_head.weight`
  included) of our parameters (`{"params": ...}` or the inner tree).

  Raises:
    ValueError listing paths missing from or extra in `params`, and shape mismatches.
  """
  tree = params.get("params", params) if isinstance(params, Mapping) else params
  flat = {tuple(getattr(k, "key", getattr(k, "name", k)) for k in path): leaf
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}
  shapes = _param_shapes(config)
  missing, extra = set(shapes) - set(flat), set(flat) - set(shapes)
  mismatched = [f"{'/'.join(p)} {tuple(flat[p].shape)} (expected {tuple(shapes[p].shape)})"
                for p in sorted(set(shapes) & set(flat))
                if tuple(flat[p].shape) != tuple(shapes[p].shape)]
  if missing or extra or mismatched:
    parts = [f"{len(v)} {what}: {_listing(v)}" for what, v in (
        ("missing", ["/".join(p) for p in missing]), ("unexpected", ["/".join(p) for p in extra]),
        ("of the wrong shape", mismatched)) if v]
    raise ValueError("params do not match the config: " + "; ".join(parts))
  out = {e.name: np.ascontiguousarray(_to_released(e.layout, np.asarray(flat[e.path])))
         for e in entries(config)}
  out[LM_HEAD] = out[EMBEDDING]
  return out
