"""Hugging Face model directories: `from_pretrained` reads one (from disk or the Hub) into a
ModelConfig and our parameters; `export_pretrained` writes one in the released layout.

A directory holds `config.json` and the weights as `model.safetensors` (read with
safetensors' numpy API), `pytorch_model.bin` (read by `torch_pickle`, without PyTorch) or a
sharded `*.index.json` of either; safetensors is preferred when both exist. A Hub id
(`hazyresearch/based-360m`) is fetched with `huggingface_hub` into its cache, config first,
then the first weights file the repository has in that order of preference.
"""

import json
import os
from typing import Any, Optional

import numpy as np

from based_jax.config import ModelConfig
from based_jax.pretrained import hf_config, keys, torch_pickle

CONFIG_FILE = "config.json"
SAFETENSORS_FILE = "model.safetensors"
BIN_FILE = "pytorch_model.bin"
WEIGHT_FILES = (SAFETENSORS_FILE, SAFETENSORS_FILE + ".index.json", BIN_FILE,
                BIN_FILE + ".index.json")  # in order of preference


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
  """Its tensors as numpy arrays (bfloat16 ones need the numpy dtype that jax's ml_dtypes
  registers, imported with based_jax)."""
  from safetensors import safe_open  # pylint: disable=g-import-not-at-top
  try:
    with safe_open(path, framework="numpy") as f:
      return {name: f.get_tensor(name) for name in f.keys()}
  except Exception as e:  # the Rust reader raises its own error types
    raise ValueError(f"{path} is not a readable safetensors file: {e}") from e


def _read_weights_file(path: str) -> dict[str, np.ndarray]:
  return _read_safetensors(path) if path.endswith(".safetensors") \
      else torch_pickle.load_state_dict(path)


def read_state_dict(directory: str) -> dict[str, np.ndarray]:
  """The weights of an HF model directory, name -> numpy array, as stored (names raw)."""
  for name in WEIGHT_FILES:
    path = os.path.join(directory, name)
    if not os.path.isfile(path):
      continue
    if not name.endswith(".index.json"):
      return _read_weights_file(path)
    with open(path) as f:
      weight_map = json.load(f).get("weight_map")
    if not isinstance(weight_map, dict):
      raise ValueError(f"{path} has no 'weight_map' object")
    state: dict[str, np.ndarray] = {}
    for shard in sorted(set(weight_map.values())):
      part = _read_weights_file(os.path.join(directory, shard))
      listed = {k for k, v in weight_map.items() if v == shard}
      if set(part) != listed or set(part) & set(state):
        raise ValueError(f"{shard} does not hold exactly the tensors {path} lists for it")
      state.update(part)
    return state
  raise ValueError(f"{directory} has none of {list(WEIGHT_FILES)} (it holds "
                   f"{sorted(os.listdir(directory))})")


def _download(repo_id: str, revision: Optional[str], cache_dir: Optional[str],
              local_files_only: bool) -> str:
  """The local snapshot directory of `repo_id` holding its config and weights."""
  import huggingface_hub  # pylint: disable=g-import-not-at-top
  from huggingface_hub import errors  # pylint: disable=g-import-not-at-top

  def fetch(filename: str) -> str:
    return huggingface_hub.hf_hub_download(repo_id, filename, revision=revision,
                                           cache_dir=cache_dir,
                                           local_files_only=local_files_only)

  unavailable = None  # why a weights file could not be had (offline and not cached)
  try:
    directory = os.path.dirname(fetch(CONFIG_FILE))
    for name in WEIGHT_FILES:
      try:
        path = fetch(name)
      except errors.LocalEntryNotFoundError as e:
        unavailable = e  # not cached, no network: a later format may be cached
        continue
      except errors.EntryNotFoundError:
        continue  # the repository has no such file: try the next format
      if name.endswith(".index.json"):
        with open(path) as f:
          for shard in sorted(set(json.load(f).get("weight_map", {}).values())):
            fetch(shard)
      return directory
    if unavailable is not None:
      raise unavailable
  except errors.RepositoryNotFoundError as e:
    raise ValueError(f"no model {repo_id!r} on the Hugging Face Hub (or it is private)") from e
  except Exception as e:  # offline, not cached, a network or server error
    raise ValueError(
        f"cannot get {repo_id!r} from the Hugging Face Hub ({type(e).__name__}: "
        f"{str(e).splitlines()[0] if str(e) else ''}). Without network, download "
        f"{CONFIG_FILE} and {SAFETENSORS_FILE} (or {BIN_FILE}) on another machine and pass "
        "their directory instead") from e
  raise ValueError(f"{repo_id!r} on the Hub has {CONFIG_FILE} but none of {list(WEIGHT_FILES)}")


def resolve(path_or_hub_id: str, *, revision: Optional[str] = None,
            cache_dir: Optional[str] = None, local_files_only: bool = False) -> str:
  """The local directory for a model directory path or a Hub id (downloaded if needed)."""
  if not isinstance(path_or_hub_id, str) or not path_or_hub_id:
    raise ValueError(f"expected a model directory or a Hub id, got {path_or_hub_id!r}")
  if os.path.isdir(path_or_hub_id):
    return path_or_hub_id
  parts = path_or_hub_id.split("/")
  if os.path.exists(path_or_hub_id) or len(parts) != 2 or not all(parts) \
      or path_or_hub_id.startswith((".", "~")):
    raise ValueError(f"{path_or_hub_id!r} is neither a model directory nor a Hub id "
                     "('owner/name')")
  return _download(path_or_hub_id, revision, cache_dir, local_files_only)


def read_config(directory: str) -> dict:
  path = os.path.join(directory, CONFIG_FILE)
  try:
    with open(path) as f:
      return json.load(f)
  except OSError as e:
    raise ValueError(f"{directory} has no readable {CONFIG_FILE} ({e})") from e
  except json.JSONDecodeError as e:
    raise ValueError(f"{path} is not valid JSON: {e}") from e


def from_pretrained(path_or_hub_id: str, *, revision: Optional[str] = None,
                    cache_dir: Optional[str] = None, local_files_only: bool = False,
                    **overrides) -> tuple[ModelConfig, Any]:
  """A released (or exported) checkpoint as `(config, params)`.

  Args:
    path_or_hub_id: an HF model directory (config.json and weights), or a Hub id such as
      "hazyresearch/based-360m", "hazyresearch/based-1b", "hazyresearch/based-1b-50b".
    revision, cache_dir, local_files_only: passed to huggingface_hub for a Hub id.
    **overrides: ModelConfig fields that choose how we compute (`hf_config.OVERRIDABLE_FIELDS`:
      dtype="bfloat16", param_dtype, the implementations).

  Returns:
    The ModelConfig and parameters (`{"params": ...}`, in config.param_dtype, on the default
    device), ready for `LanguageModel(config).apply` or `generate`.

  Raises:
    ValueError: no such directory, offline without a cached copy, a config this port does not
      compute the same way (naming the field), weights that do not match it (listing unknown,
      missing and mis-shaped names), or a pickle holding anything but tensors.
  """
  directory = resolve(path_or_hub_id, revision=revision, cache_dir=cache_dir,
                      local_files_only=local_files_only)
  hf = read_config(directory)
  state_dict = keys.normalize_names(read_state_dict(directory))
  config = hf_config.from_hf_config(hf, mlp_inner=keys.mlp_width(state_dict), **overrides)
  return config, keys.import_state_dict(config, state_dict)


def export_pretrained(config: ModelConfig, params: Any, directory: str) -> None:
  """Writes `directory/config.json` and `directory/model.safetensors` in the released layout
  (the parameters' dtype; `lm_head.weight` stored beside the embedding it equals, so that a
  strict PyTorch `load_state_dict` finds both). `from_pretrained(directory)` reads them back
  to the same config (runtime fields aside) and parameters.

  Raises:
    ValueError if the reference cannot express the model (`hf_config.to_hf_config`), the
    params do not match the config, or the directory already holds a model.
  """
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  hf = hf_config.to_hf_config(config)
  state_dict = keys.export_state_dict(config, params)
  existing = [n for n in (CONFIG_FILE,) + WEIGHT_FILES
              if os.path.exists(os.path.join(directory, n))]
  if existing:
    raise ValueError(f"{directory} already holds {existing}; choose a new directory")
  os.makedirs(directory, exist_ok=True)
  tmp = os.path.join(directory, SAFETENSORS_FILE + ".tmp")
  save_file(state_dict, tmp, metadata={"format": "pt"})
  os.replace(tmp, os.path.join(directory, SAFETENSORS_FILE))
  tmp = os.path.join(directory, CONFIG_FILE + ".tmp")
  with open(tmp, "w") as f:
    json.dump(hf, f, indent=2, sort_keys=True)
  os.replace(tmp, os.path.join(directory, CONFIG_FILE))
