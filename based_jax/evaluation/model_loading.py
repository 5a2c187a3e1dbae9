"""A model to evaluate: a checkpoint's config and parameters, checked against each other."""

from typing import Any, Optional

import jax
import numpy as np

from based_jax.config import ModelConfig
from based_jax.model import init_params
from based_jax.training.checkpointing import load_checkpoint


def check_params(config: ModelConfig, params: Any, source: str = "params") -> None:
  """ValueError unless `params` has exactly the tree and the shapes `init_params(config)`
  makes (dtypes may differ); the message names the first differing leaves."""
  expected = jax.eval_shape(lambda: init_params(config))
  want = {jax.tree_util.keystr(k): tuple(v.shape)
          for k, v in jax.tree_util.tree_leaves_with_path(expected)}
  try:
    have = {jax.tree_util.keystr(k): tuple(np.shape(v))
            for k, v in jax.tree_util.tree_leaves_with_path(params)}
  except Exception as e:  # noqa: BLE001 - not a pytree of arrays
    raise ValueError(f"{source} is not a parameter tree: {e}") from e
  problems = [f"{k} missing" for k in want if k not in have]
  problems += [f"{k} unexpected" for k in have if k not in want]
  problems += [f"{k} has shape {have[k]}, the config needs {want[k]}"
               for k in want if k in have and have[k] != want[k]]
  if problems:
    shown = "; ".join(problems[:4]) + (f"; and {len(problems) - 4} more" if len(problems) > 4
                                       else "")
    raise ValueError(f"{source} do not match the model config ({len(problems)} leaves "
                     f"differ): {shown}")


def load_model(checkpoint: str, step: Optional[int] = None,
               dtype: Optional[str] = None) -> tuple[ModelConfig, Any]:
  """(config, params) of `checkpoint` (a training workdir, or a directory `load_checkpoint`
  reads), with the parameters checked against the config; `dtype` overrides the compute
  dtype ("bfloat16" to evaluate a float32 run faster)."""
  config, params = load_checkpoint(checkpoint) if step is None else \
      load_checkpoint(checkpoint, step)
  check_params(config, params, f"the parameters of {checkpoint!r}")
  if dtype is not None:
    config = config.replace(dtype=dtype)
  return config, params
