"""Converts checkpoints between the released PyTorch (Hugging Face) layout and based-jax.

  python -m experiments.convert_checkpoint --source=hazyresearch/based-360m --output=runs/based-360m
  python -m experiments.convert_checkpoint --source=downloads/based-1b --output=runs/based-1b
  python -m experiments.convert_checkpoint --direction=export --source=runs/my_run \
      --output=exported/my_run

Import (the default): reads an HF model directory or Hub id with `from_pretrained` (no
PyTorch needed) and writes a model-only Orbax checkpoint to --output, which
`based_jax.load_checkpoint(output)` loads like a training run's workdir (generation,
evaluation, fine-tuning from it). Export: reads a training workdir (or a converted directory)
with `load_checkpoint` (--step picks a checkpoint) and writes config.json and
model.safetensors in the released layout, which the reference PyTorch model loads. Either way
the written checkpoint is read back and its logits on a probe sequence are compared with the
source's: the script fails unless they are identical.
"""

import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging

from based_jax import count_params, load_checkpoint
from based_jax.config import ModelConfig
from based_jax.model import LanguageModel
from based_jax.pretrained import export_pretrained, from_pretrained
from based_jax.pretrained.hf_config import OVERRIDABLE_FIELDS, to_hf_config
from based_jax.training.checkpointing import save_model_only

_DIRECTION = flags.DEFINE_enum("direction", "import", ["import", "export"],
                               "import: HF layout -> based-jax; export: based-jax -> HF layout.")
_SOURCE = flags.DEFINE_string("source", None, "Import: an HF model directory or Hub id. "
                              "Export: a training workdir or a converted directory.",
                              required=True)
_OUTPUT = flags.DEFINE_string("output", None, "A new (or empty) directory to write.",
                              required=True)
_STEP = flags.DEFINE_integer("step", None, "Export: the checkpoint step; default the newest.")
_REVISION = flags.DEFINE_string("revision", None, "Import from the Hub: branch, tag or commit.")
_PARAM_DTYPE = flags.DEFINE_enum("param_dtype", "float32", ["float32", "bfloat16"],
                                 "Import: storage dtype of the converted parameters.")
_PROBE_TOKENS = 16  # tokens of the read-back check


def _logits(config: ModelConfig, params) -> np.ndarray:
  tokens = jnp.arange(_PROBE_TOKENS, dtype=jnp.int32)[None] % config.vocab_size
  return np.asarray(jax.jit(LanguageModel(config).apply)(params, tokens)[0])


def convert_import(source: str, output: str, *, revision=None,
                   param_dtype: str = "float32") -> ModelConfig:
  """HF directory / Hub id -> model-only checkpoint at `output`; returns the config."""
  config, params = from_pretrained(source, revision=revision, param_dtype=param_dtype)
  save_model_only(output, config, params, source=source)
  loaded_config, loaded = load_checkpoint(output)
  if loaded_config != config or not np.array_equal(_logits(config, params),
                                                    _logits(loaded_config, loaded)):
    raise RuntimeError(f"{output} does not read back to the converted model")
  return config


def convert_export(source: str, output: str, *, step=None) -> ModelConfig:
  """Workdir / converted directory -> HF directory at `output`; returns the config."""
  config, params = load_checkpoint(source, step)
  export_pretrained(config, params, output)
  back_config, back = from_pretrained(
      output, **{f: getattr(config, f) for f in OVERRIDABLE_FIELDS})
  # The same architecture (the layer kinds may come back as index fields) and logits.
  if to_hf_config(back_config) != to_hf_config(config) or not np.array_equal(
      _logits(config, params), _logits(back_config, back)):
    raise RuntimeError(f"{output} does not read back to the exported model")
  return config


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:  # keep Orbax's INFO lines out of the output
    logging.set_verbosity(logging.WARNING)
  start = time.time()
  try:
    if _DIRECTION.value == "import":
      config = convert_import(_SOURCE.value, _OUTPUT.value, revision=_REVISION.value,
                              param_dtype=_PARAM_DTYPE.value)
    else:
      config = convert_export(_SOURCE.value, _OUTPUT.value, step=_STEP.value)
  except ValueError as e:
    raise SystemExit(f"error: {e}") from e
  kinds = {}
  for kind in config.layer_kinds:
    kinds[str(kind)] = kinds.get(str(kind), 0) + 1
  print(f"{_DIRECTION.value}ed {_SOURCE.value} -> {_OUTPUT.value} in {time.time() - start:.1f} s: "
        f"{count_params(config):,} parameters, {config.n_layers} layers "
        f"({', '.join(f'{n} {k}' for k, n in kinds.items())}), d_model {config.d_model}, "
        f"vocab {config.vocab_size}; logits read back identical on {jax.default_backend()}")


if __name__ == "__main__":
  app.run(main)
