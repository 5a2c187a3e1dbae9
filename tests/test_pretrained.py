"""Loading the released PyTorch checkpoints (based_jax.pretrained) and writing them back.

The released config.json files are fixtures (tests/fixtures/pretrained/, reconstructed from
the reference repository's training configs: the Hub cannot be reached here). The expected
state-dict names and shapes are written below from the reference's module tree, independently
of the mapping under test; the numerics are checked against a plain-PyTorch rendering of the
reference's mixers (skipped where PyTorch is not installed).
"""

import copy
import functools
import json
import math
import os
import pickle
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

import based_jax
import torch_zip
from based_jax.layers import SwiGLU
from based_jax.model import LanguageModel, make_mixer
from based_jax.pretrained import export_pretrained, from_pretrained, hf_config, keys, torch_pickle
from based_jax.training import checkpointing
from experiments import convert_checkpoint

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "pretrained")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METRICS = ("train_metrics.num-tokens.count", "val_metrics.num-tokens.count",
           "test_metrics.num-tokens.count")  # what the Lightning checkpoints carry


def released_config(name: str) -> dict:
  with open(os.path.join(FIXTURES, f"{name}.json")) as f:
    return json.load(f)


def reference_shapes(hf: dict) -> dict[str, tuple]:
  """The parameters of the reference GPTLMHeadModel built from `hf`, by state-dict name:
  GPT2Embeddings (no position table), Blocks of norm1 / mixer / norm2 / GatedMlp, ln_f and
  the tied lm_head; mixers BaseConv (in_proj, ShortConvolution's depthwise Conv1d, out_proj),
  LinearAttention (proj_q, proj_k, proj_v, out_proj) and SlidingAttention (Wqkv, out_proj)."""
  d, heads = hf["n_embd"], hf["n_head"]
  vocab = math.ceil(hf["vocab_size"] / hf["pad_vocab_size_multiple"]) * hf[
      "pad_vocab_size_multiple"]
  inner, la_heads = hf["n_inner"], hf["alt_mixer"]["num_heads"]
  qk = la_heads * hf["alt_mixer"]["feature_dim"]
  out = {"transformer.embeddings.word_embeddings.weight": (vocab, d),
         "lm_head.weight": (vocab, d), "transformer.ln_f.weight": (d,)}
  for i in range(hf["n_layer"]):
    p = f"transformer.layers.{i}."
    out.update({p + "norm1.weight": (d,), p + "norm2.weight": (d,),
                p + "mlp.fc1.weight": (2 * inner, d), p + "mlp.fc2.weight": (d, inner)})
    if i in hf["alt_mixer_2_layers"]:
      out.update({p + "mixer.Wqkv.weight": (3 * d, d), p + "mixer.out_proj.weight": (d, d)})
    elif i in hf["alt_mixer_layers"]:
      out.update({p + "mixer.proj_q.weight": (qk, d), p + "mixer.proj_k.weight": (qk, d),
                  p + "mixer.proj_v.weight": (d, d), p + "mixer.out_proj.weight": (d, d)})
    else:
      out.update({p + "mixer.in_proj.weight": (4 * d, d), p + "mixer.in_proj.bias": (4 * d,),
                  p + "mixer.conv.conv.weight": (2 * d, 1, 3),
                  p + "mixer.out_proj.weight": (d, 2 * d), p + "mixer.out_proj.bias": (d,)})
  del heads
  return out


def small_config(**changes) -> dict:
  """based-360m's config.json at a test size: the same structure and fields."""
  hf = copy.deepcopy(released_config("based-360m"))
  hf.update(n_embd=64, n_layer=6, n_head=4, n_inner=256, vocab_size=500,
            alt_mixer_layers=[1, 4], alt_mixer_2_layers=[2, 5])
  hf["alt_mixer"].update(num_heads=4, feature_dim=8)
  hf["alt_mixer"]["feature_map"]["input_dim"] = 8
  hf["alt_mixer_2"].update(num_heads=4, window_size=16)  # 8 earlier tokens
  hf.update(changes)
  return hf


def random_state_dict(hf: dict, seed: int = 0) -> dict[str, np.ndarray]:
  """Random float32 weights of the reference's names and shapes, scaled so that every mixer
  does something visible (unit-variance projections, norms near 1)."""
  rng = np.random.default_rng(seed)
  out = {}
  for name, shape in reference_shapes(hf).items():
    if name.endswith("norm1.weight") or name.endswith("norm2.weight") or "ln_f" in name:
      value = 1 + 0.2 * rng.standard_normal(shape)
    elif name.endswith(".bias"):
      value = 0.1 * rng.standard_normal(shape)
    elif "conv.conv" in name:
      value = 0.5 * rng.standard_normal(shape)
    elif "embeddings" in name or name == "lm_head.weight":
      value = rng.standard_normal(shape)
    else:
      value = rng.standard_normal(shape) / math.sqrt(shape[-1])
    out[name] = value.astype(np.float32)
  out["lm_head.weight"] = out["transformer.embeddings.word_embeddings.weight"]
  return out


def as_released_file(state_dict: dict, *, prefix: str = "model.", decay_heads: int = 0) -> dict:
  """What a released file holds: a `model.` prefix, training counters, the decay buffer."""
  out = {prefix + k: v for k, v in state_dict.items()}
  out.update({m: np.array(1234, np.int64) for m in METRICS})
  if decay_heads:
    out[prefix + keys.DECAY_BUFFER] = np.log(1 - 2.0 ** (-3 - np.arange(decay_heads)))
  return out


def write_model_dir(directory, hf: dict, state_dict: dict, fmt: str = "safetensors") -> str:
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, "config.json"), "w") as f:
    json.dump(hf, f)
  if fmt == "safetensors":
    save_file({k: np.ascontiguousarray(v) for k, v in state_dict.items()},
              os.path.join(directory, "model.safetensors"))
  elif fmt == "bin":
    torch_zip.save(os.path.join(directory, "pytorch_model.bin"), state_dict)
  return str(directory)  # fmt "none": the caller writes the weights


@functools.partial(jax.jit, static_argnums=(0, 1))
def init(config, seed=0):
  """based_jax.init_params, compiled once (eager initialisation dispatches op by op)."""
  return based_jax.init_params(config, seed)


def tree_equal(a, b) -> bool:
  same = jax.tree.map(lambda x, y: x.dtype == y.dtype and bool(jnp.array_equal(x, y)), a, b)
  return jax.tree.structure(a) == jax.tree.structure(b) and all(jax.tree.leaves(same))


# ----------------------------------------------------------------------------- configs


@pytest.mark.parametrize("name,preset", [("based-360m", "based_360m"), ("based-1b", "based_1b"),
                                         ("based-1b-50b", "based_1b")])
def test_released_configs_give_the_presets(name, preset):
  assert hf_config.from_hf_config(released_config(name)) == based_jax.get_config(preset)


@pytest.mark.parametrize("name,params_m", [("based-360m", 363), ("based-1b", 1349),
                                           ("based-1b-50b", 1349)])
def test_full_size_keys_and_shapes(name, params_m):
  """Every released name and shape at full size, consumed and filled: shapes only."""
  hf = released_config(name)
  config = hf_config.from_hf_config(hf)
  want = reference_shapes(hf)
  assert keys.state_dict_shapes(config) == want
  prefix = "model." if name.endswith("50b") else ""  # as the based-1b-50b files have it
  released = {prefix + k: jax.ShapeDtypeStruct(s, jnp.float32) for k, s in want.items()}
  released.update({m: jax.ShapeDtypeStruct((), jnp.int32) for m in METRICS})
  if hf.get("fixed_decay"):
    released[keys.DECAY_BUFFER] = jax.ShapeDtypeStruct((hf["n_head"],), jnp.float32)
  loaded = jax.eval_shape(lambda sd: keys.import_state_dict(config, sd), released)
  initial = jax.eval_shape(lambda: based_jax.init_params(config))
  assert jax.tree.structure(loaded) == jax.tree.structure(initial)
  assert jax.tree.leaves(jax.tree.map(lambda a, b: a.shape == b.shape, loaded, initial)) == [
      True] * len(jax.tree.leaves(initial))
  # 363M and 1.35B with tied embeddings (the paper's counts); the state dict names the
  # embedding twice.
  assert round(based_jax.count_params(config) / 1e6) == params_m
  assert sum(math.prod(s) for k, s in want.items() if k != keys.LM_HEAD) == \
      based_jax.count_params(config)


def test_attention_baselines():
  """The released Transformer++ baselines rotate half of each head: attn-360m is our preset
  with rotary_dims 32 of 64 (and the vocabulary padded to 16); attn-1b's 35 of 70 is odd and
  refused, naming the field."""
  config = hf_config.from_hf_config(released_config("attn-360m"), mlp_inner=2816)
  assert config == based_jax.get_config("transformer_pp_360m", vocab_size=50272, rotary_dims=32)
  assert hf_config.from_hf_config(hf_config.to_hf_config(config), mlp_inner=2816) == config
  hf = released_config("attn-1b")
  with pytest.raises(ValueError, match=r"rotary_emb_fraction=0.5.*rotates int\(fraction \* "
                                       r"head_dim\) = 35"):
    hf_config.from_hf_config(hf, mlp_inner=4480)
  config = hf_config.from_hf_config({**hf, "rotary_emb_fraction": 1.0}, mlp_inner=4480)
  assert config == based_jax.get_config("transformer_pp_1b", vocab_size=50272)
  with pytest.raises(ValueError, match="pass mlp_inner"):  # n_inner null: 4480 or 4608
    hf_config.from_hf_config({**hf, "rotary_emb_fraction": 1.0})


def test_partial_rotary_turns_only_the_leading_dims_by_relative_position():
  """rotary_dims = R: the first R dims of q and k turn (q.k over them depends only on the
  distance), the others carry no position (unchanged)."""
  from based_jax.layers import apply_rotary  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  q, k = (rng.normal(size=(1, 1, 2, 16)).astype(np.float32) for _ in range(2))
  at = lambda x, p: np.asarray(apply_rotary(np.repeat(x, 1, 1), np.array([[p]]), 100.0, 8))
  for shift in (0, 5):
    a, b = at(q, 3 + shift), at(k, 1 + shift)
    np.testing.assert_array_equal(a[..., 8:], q[..., 8:])
    np.testing.assert_allclose((a[..., :8] * b[..., :8]).sum(-1),
                               (at(q, 3)[..., :8] * at(k, 1)[..., :8]).sum(-1), rtol=1e-5)
  full = np.asarray(apply_rotary(q, np.array([[3]]), 100.0))
  np.testing.assert_array_equal(full, np.asarray(apply_rotary(q, np.array([[3]]), 100.0, 16)))
  assert not np.allclose(at(q, 3)[..., :8], q[..., :8])
  with pytest.raises(ValueError, match="rotary_dims must be an even number in .0, head dim 16"):
    based_jax.get_config("transformer_pp_tiny", rotary_dims=7)


def _with(hf, path, value):
  hf = copy.deepcopy(hf)
  node = hf
  for key in path[:-1]:
    node = node[key]
  if value is _DROP:
    del node[path[-1]]
  else:
    node[path[-1]] = value
  return hf


_DROP = object()


@pytest.mark.parametrize("path,value,message", [
    (("rms_norm",), False, "rms_norm"),
    (("activation_function",), "gelu", "activation_function"),
    (("mlp_fc1_bias",), _DROP, "mlp_fc1_bias"),  # the reference's default: a bias
    (("qkv_proj_bias",), True, "qkv_proj_bias"),
    (("rotary_emb_fraction",), _DROP, "rotary_emb_fraction"),  # default 0: no rotary
    (("rotary_emb_interleaved",), True, "rotary_emb_interleaved"),
    (("tie_word_embeddings",), False, "tie_word_embeddings"),
    (("mixer", "_target_"), "based.models.mixers.convolution.ShortConv", "_target_"),
    (("mixer", "expand_proj"), 2, "expand_proj"),
    (("alt_mixer", "parallel_implementation"), "tk", "tk"),
    (("alt_mixer", "feature_map", "_target_"), "x.PosELU", "feature_map"),
    (("alt_mixer_layers",), [1, 99], "outside"),
])
def test_unsupported_settings_are_named(path, value, message):
  with pytest.raises(ValueError, match=message):
    hf_config.from_hf_config(_with(small_config(), path, value))


def test_config_conventions():
  config = hf_config.from_hf_config(small_config())
  assert (config.window, config.vocab_size, config.la_eps) == (8, 504, 1e-6)  # halved, padded
  hf = small_config(n_head=8, layer_norm_epsilon=1e-6, rotary_emb_base=500.0)
  hf["alt_mixer"]["eps"] = 1e-12
  hf["alt_mixer_2"]["window_size"] = 101
  config = hf_config.from_hf_config(hf)
  assert (config.attn_heads, config.norm_eps, config.rope_base, config.la_eps, config.window) \
      == (8, 1e-6, 500.0, 1e-12, 50)
  with pytest.raises(ValueError, match="come from the checkpoint"):
    hf_config.from_hf_config(small_config(), window=64)
  assert hf_config.from_hf_config(small_config(), dtype="bfloat16").dtype == "bfloat16"


@pytest.mark.parametrize("config,message", [
    (based_jax.get_config("mqar_based"), "mlp_inner=0"),
    (based_jax.get_config("based_tiny", mlp_inner=192), "mlp_inner=192"),
    (based_jax.get_config("based_tiny", mlp_inner=256, la_feature_map="relu"), "la_feature_map"),
    (based_jax.get_config("based_tiny", mlp_inner=256, linear_attention_layers=(),
                          sliding_window_layers=(), layer_mixers="base_conv,mamba,base_conv,gla"),
     "mamba"),
    (based_jax.get_config("based_tiny", mlp_inner=256, n_layers=5, attention_layers=(4,)),
     "three mixer slots"),
])
def test_export_refuses_what_the_reference_cannot_build(config, message):
  with pytest.raises(ValueError, match=message):
    hf_config.to_hf_config(config)


# ----------------------------------------------------------------------------- state dicts


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_released_layout_loads(tmp_path, fmt):
  """A file of the released names (prefix, counters, decay buffer) loads; every name is
  consumed and every parameter filled: exporting the result gives the same state dict."""
  hf = small_config(fixed_decay=True)
  state = random_state_dict(hf)
  directory = write_model_dir(tmp_path / "m", hf, as_released_file(state, decay_heads=4), fmt)
  config, params = from_pretrained(directory)
  assert config == hf_config.from_hf_config(hf)
  exported = keys.export_state_dict(config, params)
  assert exported.keys() == state.keys()
  assert all(np.array_equal(exported[k], state[k]) for k in state)
  # The layouts, spelled out once each: linear weights transpose, the conv tap axis moves
  # last -> first, fc1's rows are [y; gate] in our kernel's columns too.
  layer0, layer2 = params["params"]["layers_0"], params["params"]["layers_2"]
  w = state["transformer.layers.0.mixer.conv.conv.weight"]
  assert np.array_equal(layer0["mixer"]["conv_kernel"][1, 5], w[5, 0, 1])
  assert np.array_equal(layer0["mlp"]["fc1"]["kernel"], state["transformer.layers.0.mlp.fc1.weight"].T)
  assert np.array_equal(layer2["mixer"]["Wqkv"]["kernel"],
                        state["transformer.layers.2.mixer.Wqkv.weight"].T)


def test_lm_head_only_and_untied(tmp_path):
  hf = small_config()
  state = random_state_dict(hf)
  head_only = {k: v for k, v in state.items() if k != keys.EMBEDDING}
  _, params = from_pretrained(write_model_dir(tmp_path / "a", hf, head_only))
  assert np.array_equal(params["params"]["embed"]["embedding"], state[keys.LM_HEAD])
  untied = {**state, keys.LM_HEAD: state[keys.LM_HEAD] + 1}
  with pytest.raises(ValueError, match="ties its output head"):
    from_pretrained(write_model_dir(tmp_path / "b", hf, untied))


def test_mismatches_are_listed_together():
  hf = small_config()
  config = hf_config.from_hf_config(hf)
  state = random_state_dict(hf)
  del state["transformer.layers.0.mlp.fc2.weight"]
  state["transformer.layers.0.mixer.conv.conv.bias"] = np.zeros(128, np.float32)
  state["transformer.embeddings.position_embeddings.weight"] = np.zeros((2048, 64), np.float32)
  state["transformer.layers.2.mixer.Wqkv.weight"] = np.zeros((64, 64), np.float32)
  with pytest.raises(ValueError) as error:
    keys.import_state_dict(config, state)
  text = str(error.value)
  for piece in ("1 missing: transformer.layers.0.mlp.fc2.weight",
                "2 unknown:", "transformer.layers.0.mixer.conv.conv.bias",
                "transformer.embeddings.position_embeddings.weight",
                "transformer.layers.2.mixer.Wqkv.weight (64, 64) (expected (192, 64))",
                "hint: absolute position embeddings", "hint: biases"):
    assert piece in text, text
  with pytest.raises(ValueError, match="not the rotary frequencies"):
    keys.import_state_dict(config, {**random_state_dict(hf), "transformer.layers.2.mixer."
                                    "rotary_emb.inv_freq": np.ones(8, np.float32)})
  half = np.arange(8) / 8
  freq = {"transformer.layers.2.mixer.rotary_emb.inv_freq": (10000.0 ** -half).astype(np.float32)}
  keys.import_state_dict(config, {**random_state_dict(hf), **freq})  # the right ones: ignored


def test_params_must_match_config_on_export():
  config = based_jax.get_config("based_tiny", mlp_inner=256)
  params = init(config)
  params["params"]["layers_0"]["mixer"].pop("conv_kernel")
  with pytest.raises(ValueError, match="1 missing: layers_0/mixer/conv_kernel"):
    keys.export_state_dict(config, params)


# ----------------------------------------------------------------------------- round trips


def _logits(config, params):
  tokens = jnp.asarray(np.random.default_rng(3).integers(0, config.vocab_size, (2, 20)))
  return jax.jit(LanguageModel(config).apply)(params, tokens)[0]


@pytest.mark.parametrize("config", [
    based_jax.get_config("based_tiny", mlp_inner=256),
    based_jax.get_config("based_tiny", mlp_inner=256, param_dtype="bfloat16"),
    based_jax.get_config("transformer_pp_tiny", mlp_inner=256),
    based_jax.get_config("transformer_pp_tiny", mlp_inner=256, rotary_dims=8),  # as attn-360m
    # BaseConv with full attention: the attention takes the free sliding-window slot.
    based_jax.get_config("based_tiny", mlp_inner=256, sliding_window_layers=(),
                         attention_layers=(2,), window=128),  # window: unused, the default
], ids=["based", "based_bf16", "transformer_pp", "half_rotary", "conv_attention"])
def test_export_then_import_is_identity(tmp_path, config):
  params = init(config, 5)
  export_pretrained(config, params, str(tmp_path / "hf"))
  back_config, back = from_pretrained(str(tmp_path / "hf"), param_dtype=config.param_dtype)
  assert back_config == config
  assert tree_equal(params, back)
  assert jnp.array_equal(_logits(config, params), _logits(back_config, back))
  with pytest.raises(ValueError, match="already holds"):
    export_pretrained(config, params, str(tmp_path / "hf"))


def test_converted_directory_loads_as_a_checkpoint(tmp_path):
  """Import to a model-only Orbax checkpoint that load_checkpoint reads, and export back."""
  hf = small_config()
  source = write_model_dir(tmp_path / "hf", hf, as_released_file(random_state_dict(hf)))
  config = convert_checkpoint.convert_import(source, str(tmp_path / "converted"))
  loaded_config, loaded = based_jax.load_checkpoint(str(tmp_path / "converted"))
  want_config, want = from_pretrained(source)
  assert loaded_config == config == want_config and tree_equal(loaded, want)
  with pytest.raises(ValueError, match="model-only checkpoint"):
    based_jax.load_checkpoint(str(tmp_path / "converted"), step=3)
  with pytest.raises(ValueError, match="no run config"):
    checkpointing.load_run_config(str(tmp_path / "converted"))
  with pytest.raises(ValueError, match="not empty"):
    checkpointing.save_model_only(str(tmp_path / "converted"), config, loaded, source="x")
  convert_checkpoint.convert_export(str(tmp_path / "converted"), str(tmp_path / "back"))
  assert tree_equal(from_pretrained(str(tmp_path / "back"))[1], want)


def test_convert_script(tmp_path):
  config = based_jax.get_config("based_tiny", mlp_inner=256)
  export_pretrained(config, init(config), str(tmp_path / "hf"))
  run = subprocess.run(
      [sys.executable, "-m", "experiments.convert_checkpoint", f"--source={tmp_path / 'hf'}",
       f"--output={tmp_path / 'out'}"], cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert run.returncode == 0, run.stderr[-2000:]
  assert "logits read back identical" in run.stdout
  assert checkpointing.is_model_only(str(tmp_path / "out"))


# ----------------------------------------------------------------------------- .bin files


def test_handmade_bin_layouts(tmp_path):
  """Strided views, offsets, a storage shared by two tensors, bfloat16 and ints."""
  base = np.arange(24, dtype=np.float32)
  tensors = {"dense": np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32),
             "transposed": torch_zip.Strided(base, 0, (4, 6), (1, 4)),
             "offset": torch_zip.Strided(base, 5, (2, 3), (3, 1)),
             "shared": torch_zip.Strided(base, 0, (24,), (1,)),
             "bf16": np.arange(6, dtype=np.float32).astype(jnp.bfloat16).reshape(2, 3),
             "count": np.array(7, np.int64)}
  path = str(tmp_path / "x.bin")
  torch_zip.save(path, tensors)
  loaded = torch_pickle.load_state_dict(path)
  assert np.array_equal(loaded["dense"], tensors["dense"])
  assert np.array_equal(loaded["transposed"], base[:24].reshape(6, 4).T)
  assert np.array_equal(loaded["offset"], base[5:11].reshape(2, 3))
  assert np.array_equal(loaded["shared"], base)
  assert loaded["bf16"].dtype == jnp.bfloat16 and np.array_equal(loaded["bf16"], tensors["bf16"])
  assert loaded["count"].dtype == np.int64 and loaded["count"] == 7


class _Evil:
  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (os.system, (f"touch {self.marker}",))


def _global_call(module: str, name: str) -> bytes:
  """A protocol-2 pickle calling module.name() (GLOBAL, EMPTY_TUPLE, REDUCE, STOP)."""
  return b"\x80\x02c" + f"{module}\n{name}\n".encode() + b")R."


@pytest.mark.parametrize("data_pkl,message", [
    (_global_call("builtins", "eval"), "refusing to load builtins.eval"),
    (_global_call("torch", "load"), "refusing to load torch.load"),
    (_global_call("torch._utils", "_rebuild_device_tensor_from_numpy"), "refusing to load"),
    # BUILD (set attributes) on an allowed function.
    (b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n}b.", "refusing to set state"),
    # A persistent id that is not a storage.
    (b"\x80\x02X\x04\x00\x00\x00evilQ.", "refusing persistent id"),
])
def test_pickles_of_anything_but_tensors_are_refused(tmp_path, data_pkl, message):
  path = str(tmp_path / "evil.bin")
  torch_zip.write_raw(path, data_pkl)
  with pytest.raises(ValueError, match=message):
    torch_pickle.load(path)


def test_os_system_never_runs(tmp_path):
  marker = tmp_path / "ran"
  path = str(tmp_path / "evil.bin")
  torch_zip.write_raw(path, pickle.dumps({"weight": _Evil(marker)}, protocol=2))
  directory = write_model_dir(tmp_path / "m", small_config(), {}, fmt="none")
  os.replace(path, os.path.join(directory, "pytorch_model.bin"))
  with pytest.raises(ValueError, match=r"refusing to load (posix|os|nt)\.system"):
    from_pretrained(directory)
  assert not marker.exists()


def test_malformed_archives_are_refused(tmp_path):
  plain = tmp_path / "plain.bin"
  plain.write_bytes(pickle.dumps({"a": 1}))
  with pytest.raises(ValueError, match="not a zip-format"):
    torch_pickle.load(str(plain))
  path = str(tmp_path / "oob.bin")
  torch_zip.save(path, {"w": torch_zip.Strided(np.zeros(4, np.float32), 2, (4,), (1,))})
  with pytest.raises(ValueError, match="past the end of storage"):
    torch_pickle.load(path)
  torch_zip.write_raw(path, pickle.dumps([1, 2], protocol=2))
  with pytest.raises(ValueError, match="not a state dict"):
    torch_pickle.load_state_dict(path)


# ----------------------------------------------------------------------------- the Hub


def test_hub_offline_is_a_clear_error(tmp_path):
  with pytest.raises(ValueError, match="cannot get 'hazyresearch/based-360m'.*Without network"):
    from_pretrained("hazyresearch/based-360m", local_files_only=True, cache_dir=str(tmp_path))
  with pytest.raises(ValueError, match="neither a model directory nor a Hub id"):
    from_pretrained(str(tmp_path / "no" / "such" / "dir"))


def test_hub_download_picks_the_weights_the_repo_has(tmp_path, monkeypatch):
  """A simulated Hub repository with config.json and pytorch_model.bin only."""
  import huggingface_hub
  from huggingface_hub import errors
  hf = small_config()
  repo = write_model_dir(tmp_path / "repo", hf, as_released_file(random_state_dict(hf)), "bin")
  asked = []

  def fake_download(repo_id, filename, **kwargs):
    asked.append((repo_id, filename, kwargs.get("revision")))
    if not os.path.exists(os.path.join(repo, filename)):
      raise errors.EntryNotFoundError(f"{filename} not in {repo_id}")
    return os.path.join(repo, filename)

  monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
  config, params = from_pretrained("hazyresearch/based-tiny", revision="refs/pr/1")
  assert [a[1] for a in asked] == ["config.json", "model.safetensors",
                                   "model.safetensors.index.json", "pytorch_model.bin"]
  assert {a[2] for a in asked} == {"refs/pr/1"}
  assert tree_equal(params, from_pretrained(repo)[1]) and config.n_layers == 6


# ----------------------------------------------------------------------------- numerics


@functools.lru_cache(maxsize=1)
def _torch_reference():
  """A plain-PyTorch rendering of the reference model, from its math and module names."""
  torch = pytest.importorskip("torch", reason="needs PyTorch (not a dependency of based-jax)")
  nn, F = torch.nn, torch.nn.functional

  class RMSNorm(nn.Module):
    def __init__(self, d, eps):
      super().__init__()
      self.weight, self.eps = nn.Parameter(torch.ones(d)), eps

    def forward(self, x):
      return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight

  class ShortConvolution(nn.Module):  # mixers/convolution.py: a padded depthwise Conv1d
    def __init__(self, d, k):
      super().__init__()
      self.conv = nn.Conv1d(d, d, k, groups=d, padding=k - 1, bias=False)

    def forward(self, x):
      return self.conv(x.transpose(1, 2))[..., :x.shape[1]].transpose(1, 2)

  class BaseConv(nn.Module):
    def __init__(self, d, k):
      super().__init__()
      self.d_inner = 2 * d
      self.in_proj, self.out_proj = nn.Linear(d, 4 * d), nn.Linear(2 * d, d)
      self.conv = ShortConvolution(2 * d, k)

    def forward(self, u):
      u1, u2 = torch.split(self.in_proj(u), self.d_inner, dim=-1)
      return self.out_proj(F.silu(self.conv(u1)) * u2)

  def taylor(x):  # TaylorExp: [1, x / d'^(1/4), vec(x x^T) / (sqrt(2) sqrt(d'))]
    rd = math.sqrt(x.shape[-1])
    x2 = (x.unsqueeze(-1) * x.unsqueeze(-2)).flatten(start_dim=-2) / math.sqrt(2)
    return torch.cat([x[..., :1] ** 0, x / math.sqrt(rd), x2 / rd], dim=-1)

  class LinearAttention(nn.Module):  # the reference's "quadratic" parallel form
    def __init__(self, d, heads, feature_dim, eps):
      super().__init__()
      self.h, self.f, self.eps = heads, feature_dim, eps
      self.proj_q = nn.Linear(d, heads * feature_dim, bias=False)
      self.proj_k = nn.Linear(d, heads * feature_dim, bias=False)
      self.proj_v, self.out_proj = nn.Linear(d, d, bias=False), nn.Linear(d, d, bias=False)

    def forward(self, x):
      b, l, d = x.shape
      q = self.proj_q(x).view(b, l, self.h, self.f).transpose(1, 2)
      k = self.proj_k(x).view(b, l, self.h, self.f).transpose(1, 2)
      v = self.proj_v(x).view(b, l, self.h, d // self.h).transpose(1, 2)
      q, k = taylor(q), taylor(k)
      y = torch.einsum("bhnm,bhme->bhne", torch.tril(torch.einsum("bhnd,bhmd->bhnm", q, k)), v)
      y = y / (torch.einsum("bhld,bhld->bhl", q, k.cumsum(2)) + self.eps)[..., None]
      return self.out_proj(y.transpose(1, 2).reshape(b, l, d))

  class SlidingAttention(nn.Module):  # flash window (window_size // 2, 0), rotary on all dims
    def __init__(self, d, heads, window_size, base):
      super().__init__()
      self.h, self.lookback, self.base = heads, window_size // 2, base
      self.Wqkv = nn.Linear(d, 3 * d, bias=False)
      self.out_proj = nn.Linear(d, d, bias=False)

    def rotary(self, x):  # flash-attention's RotaryEmbedding, interleaved=False
      l, hd = x.shape[1], x.shape[-1]
      inv_freq = 1.0 / self.base ** (torch.arange(0, hd, 2, dtype=x.dtype) / hd)
      freqs = torch.outer(torch.arange(l, dtype=x.dtype), inv_freq)
      cos, sin = [torch.cat([f, f], -1)[None, :, None] for f in (freqs.cos(), freqs.sin())]
      x1, x2 = x.chunk(2, dim=-1)
      return x * cos + torch.cat([-x2, x1], -1) * sin

    def forward(self, x):
      b, l, d = x.shape
      qkv = self.Wqkv(x).view(b, l, 3, self.h, d // self.h)  # "(three h d)"
      q, k, v = self.rotary(qkv[:, :, 0]), self.rotary(qkv[:, :, 1]), qkv[:, :, 2]
      scores = torch.einsum("bihd,bjhd->bhij", q, k) * (d // self.h) ** -0.5
      i, j = torch.arange(l)[:, None], torch.arange(l)[None, :]
      scores = scores.masked_fill(~((j <= i) & (j >= i - self.lookback)), float("-inf"))
      out = torch.einsum("bhij,bjhd->bihd", scores.softmax(-1), v)
      return self.out_proj(out.reshape(b, l, d))

  class GatedMlp(nn.Module):
    def __init__(self, d, inner):
      super().__init__()
      self.fc1, self.fc2 = nn.Linear(d, 2 * inner, bias=False), nn.Linear(inner, d, bias=False)

    def forward(self, x):
      y, gate = self.fc1(x).chunk(2, dim=-1)
      return self.fc2(y * F.silu(gate))

  class Block(nn.Module):
    def __init__(self, d, mixer, inner, eps):
      super().__init__()
      self.mixer, self.mlp = mixer, GatedMlp(d, inner)
      self.norm1, self.norm2 = RMSNorm(d, eps), RMSNorm(d, eps)

    def forward(self, x):
      x = x + self.mixer(self.norm1(x))
      return x + self.mlp(self.norm2(x))

  class Embeddings(nn.Module):
    def __init__(self, vocab, d):
      super().__init__()
      self.word_embeddings = nn.Embedding(vocab, d)

  class Transformer(nn.Module):
    def __init__(self, hf):
      super().__init__()
      d, eps = hf["n_embd"], hf["layer_norm_epsilon"]
      pad = hf["pad_vocab_size_multiple"]
      self.embeddings = Embeddings(math.ceil(hf["vocab_size"] / pad) * pad, d)
      la, sw = hf["alt_mixer"], hf["alt_mixer_2"]
      mixers = [SlidingAttention(d, hf["n_head"], sw["window_size"], 10000.0)
                if i in hf["alt_mixer_2_layers"] else
                LinearAttention(d, la["num_heads"], la["feature_dim"], la.get("eps", 1e-6))
                if i in hf["alt_mixer_layers"] else BaseConv(d, 3) for i in range(hf["n_layer"])]
      self.layers = nn.ModuleList(Block(d, m, hf["n_inner"], eps) for m in mixers)
      self.ln_f = RMSNorm(d, eps)

  class LMHeadModel(nn.Module):
    def __init__(self, hf):
      super().__init__()
      self.transformer = Transformer(hf)
      self.lm_head = nn.Linear(hf["n_embd"], self.transformer.embeddings.word_embeddings
                               .num_embeddings, bias=False)
      self.lm_head.weight = self.transformer.embeddings.word_embeddings.weight  # tied

    def forward(self, tokens):
      x = self.transformer.embeddings.word_embeddings(tokens)
      for layer in self.transformer.layers:
        x = layer(x)
      return self.lm_head(self.transformer.ln_f(x))

  return torch, LMHeadModel


def _torch_model(hf, state, dtype="float64"):
  torch, model_class = _torch_reference()
  model = model_class(hf).to(getattr(torch, dtype))
  model.load_state_dict({k: torch.from_numpy(v).to(getattr(torch, dtype))
                         for k, v in state.items()}, strict=True)  # the names match exactly
  return torch, model


def test_numerics_match_pytorch_reference():
  """Each mixer, the SwiGLU MLP and the whole model's logits, ours (float32) against the
  PyTorch rendering (float64) fed the same random weights and inputs."""
  hf = small_config()
  state = random_state_dict(hf, seed=1)
  torch, model = _torch_model(hf, state)
  config = hf_config.from_hf_config(hf)
  params = keys.import_state_dict(config, state)["params"]
  x = np.random.default_rng(2).standard_normal((2, 24, 64)).astype(np.float32)  # T > window
  positions = jnp.broadcast_to(jnp.arange(24), (2, 24))
  for i, kind in enumerate(config.layer_kinds[:3]):  # BaseConv, linear attention, window
    ours, _ = jax.jit(make_mixer(config, kind, "mixer").apply)(
        {"params": params[f"layers_{i}"]["mixer"]}, jnp.asarray(x), positions, None, None)
    with torch.no_grad():
      want = model.transformer.layers[i].mixer(torch.from_numpy(x).double()).numpy()
    np.testing.assert_allclose(ours, want, rtol=1e-4, atol=1e-4 * np.abs(want).max(),
                               err_msg=str(kind))
  ours = jax.jit(SwiGLU(config).apply)({"params": params["layers_0"]["mlp"]}, jnp.asarray(x))
  with torch.no_grad():
    want = model.transformer.layers[0].mlp(torch.from_numpy(x).double()).numpy()
  np.testing.assert_allclose(ours, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
  tokens = np.random.default_rng(4).integers(0, 500, (2, 24))
  ours = jax.jit(LanguageModel(config).apply)({"params": params}, jnp.asarray(tokens))[0]
  with torch.no_grad():
    want = model(torch.from_numpy(tokens)).numpy()
  np.testing.assert_allclose(ours, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_torch_saved_bin_loads(tmp_path):
  """torch.save of the reference model's state dict (the tied head shares one storage) loads
  without PyTorch's unpickler, to the same parameters; torch reads our handmade files too."""
  hf = small_config()
  state = random_state_dict(hf, seed=6)
  torch, model = _torch_model(hf, state, "float32")
  directory = tmp_path / "m"
  write_model_dir(directory, hf, {}, fmt="none")
  torch.save({"model." + k: v for k, v in model.state_dict().items()},
             str(directory / "pytorch_model.bin"))
  _, params = from_pretrained(str(directory))
  assert tree_equal(params, keys.import_state_dict(hf_config.from_hf_config(hf), state))
  torch_zip.save(str(tmp_path / "ours.bin"), {"w": torch_zip.Strided(
      np.arange(12, dtype=np.float32), 1, (3, 2), (1, 3))})
  read = torch.load(str(tmp_path / "ours.bin"), weights_only=True)["w"]
  assert read.stride() == (1, 3) and read.tolist() == [[1, 4], [2, 5], [3, 6]]
