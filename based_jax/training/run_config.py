"""The configuration of a training run, with named presets, and absl flags for every field."""

import dataclasses
import inspect
import re
import typing
from typing import Any, Optional, Sequence

from absl import flags

from based_jax.config import ModelConfig
from based_jax.training.optimizer import OptimizerConfig


@dataclasses.dataclass(frozen=True)
class RunConfig:
  """Everything that defines a run besides the model fields (see ModelConfig)."""
  model: str = "mqar_based"  # model preset name (based_jax.config.PRESETS).
  train_mix: str = "small_train"  # MQAR training mix name (based_jax.data.mqar.MIXES).
  test_mix: str = "small_test"  # MQAR test mix name; its slices are evaluated separately.
  vocab_size: int = 8192  # MQAR vocabulary: keys [1, V/2), values [V/2, V).
  batch_size: int = 64  # global batch, split over the devices.
  eval_every: int = 100  # steps between evaluations.
  log_every: int = 20  # steps between metric logs.
  checkpoint_every: int = 200  # steps between checkpoints.
  keep_checkpoints: int = 3  # most recent checkpoints kept.
  target_accuracy: float = 1.1  # stop once the mean test accuracy reaches this (>1: never).
  seed: int = 0  # seeds init, data order and data generation.
  optimizer: OptimizerConfig = OptimizerConfig()  # AdamW + schedule.

  def __post_init__(self):
    for name in ("batch_size", "eval_every", "log_every", "checkpoint_every", "vocab_size"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

  def replace(self, **changes) -> "RunConfig":
    return dataclasses.replace(self, **changes)

  def to_json(self, model_config: ModelConfig) -> dict:
    """What a checkpoint must agree with to be resumed (the schedule length may change, and
    the model's MODEL_RUNTIME_FIELDS)."""
    run = dataclasses.asdict(self)
    opt = run.pop("optimizer")
    for transient in ("eval_every", "log_every", "checkpoint_every", "keep_checkpoints",
                      "target_accuracy"):
      run.pop(transient)
    opt.pop("total_steps")
    model = {f"model.{k}": v for k, v in dataclasses.asdict(model_config).items()
             if k not in MODEL_RUNTIME_FIELDS}
    return {**run, **{f"optimizer.{k}": v for k, v in opt.items()}, **model}


# Model fields that choose how the same function is computed, or how decoding stores its state:
# a checkpoint resumes under other values.
MODEL_RUNTIME_FIELDS = ("linear_attention_impl", "attention_impl", "attention_decode_impl",
                        "la_state_dtype")


RUN_PRESETS: dict[str, RunConfig] = {
    # The README default: BASED d_model 128, d' 64, init std 0.05 on the dense mix; stops at
    # 0.99 (step 400, about 2.5 minutes on 2 cores). Recipe search: docs/training.md.
    "mqar_small": RunConfig(
        model="mqar_based_cpu", train_mix="dense_train", batch_size=64, eval_every=200,
        checkpoint_every=200,
        optimizer=OptimizerConfig(learning_rate=2e-3, warmup_steps=20, total_steps=600,
                                  b2=0.99, weight_decay=0.0),
        target_accuracy=0.99),
    # The BASED paper's MQAR setting: its mix, batch 256, 32 epochs of 200k examples.
    "mqar_paper": RunConfig(
        train_mix="paper_train", test_mix="paper_test", batch_size=256, eval_every=500,
        checkpoint_every=1000,
        optimizer=OptimizerConfig(learning_rate=3.2e-3, warmup_steps=500, total_steps=25_000,
                                  end_lr_ratio=0.0)),
}


def get_run_config(name: str) -> RunConfig:
  if name not in RUN_PRESETS:
    raise ValueError(f"unknown run preset {name!r}; known: {sorted(RUN_PRESETS)}")
  return RUN_PRESETS[name]


# --- absl flags: one optional flag per field, overriding the preset when given. ---

_SCALARS = (int, float, str, bool)


def _field_types(cls) -> dict[str, type]:
  hints = typing.get_type_hints(cls)
  return {f.name: hints[f.name] for f in dataclasses.fields(cls) if hints[f.name] in _SCALARS}


def field_comments(cls) -> dict[str, str]:
  """The comment of each field of a config dataclass: the text after `#` on the field's line,
  or the comment lines right above it (the dataclasses' one-comment-per-field convention)."""
  names = {f.name for f in dataclasses.fields(cls)}
  comments, above = {}, []
  for line in inspect.getsource(cls).splitlines():
    stripped = line.strip()
    field = re.match(r"(\w+)\s*:[^#]*?(?:#\s*(.*))?$", stripped)
    if stripped.startswith("#"):
      above.append(stripped.lstrip("# "))
    elif field and field.group(1) in names and field.group(1) not in comments:
      comments[field.group(1)] = field.group(2) or " ".join(above)
      above = []
    else:
      above = []
  return comments


def define_flags(cls, presets: dict[str, Any],
                 choices: Optional[dict[str, Sequence[str]]] = None) -> None:
  """Defines --<field> for each scalar field of `cls`, default None (= the --run preset's
  value); its help is the field's comment and each preset's value (`presets`: name -> `cls`
  instance); `choices` makes str fields enums. A script lists these flags in its --help with
  `flags.adopt_module_key_flags(run_config)`."""
  choices = choices or {}
  comments = field_comments(cls)
  for name, kind in _field_types(cls).items():
    values = ", ".join(f"{p} {getattr(c, name)!r}" for p, c in sorted(presets.items()))
    help_text = f"{comments.get(name, '')} Unset: the --run preset's value ({values})."
    if name in choices:
      flags.DEFINE_enum(name, None, list(choices[name]), help_text)
    else:
      definer = {int: flags.DEFINE_integer, float: flags.DEFINE_float,
                 str: flags.DEFINE_string, bool: flags.DEFINE_bool}[kind]
      definer(name, None, help_text)


def overrides_from_flags(cls) -> dict[str, Any]:
  """Field values given on the command line."""
  values = {}
  for name in _field_types(cls):
    value = flags.FLAGS[name].value
    if value is not None:
      values[name] = value
  return values


def parse_assignments(cls, assignments: list[str]) -> dict[str, Any]:
  """'field=value' strings -> typed values for the dataclass `cls` (tuples as 1,2,3)."""
  hints = typing.get_type_hints(cls)
  out = {}
  for item in assignments:
    name, sep, text = item.partition("=")
    if not sep or name not in hints:
      raise ValueError(f"bad override {item!r}: expected field=value with field one of "
                       f"{sorted(hints)}")
    kind = hints[name]
    try:
      if kind is bool:
        if text.lower() not in ("true", "false", "1", "0"):
          raise ValueError(text)
        out[name] = text.lower() in ("true", "1")
      elif typing.get_origin(kind) is tuple:
        out[name] = tuple(int(x) for x in text.split(",") if x.strip())
      else:
        out[name] = kind(text)
    except ValueError as e:
      raise ValueError(f"bad value for {name} ({kind}): {text!r}") from e
  return out
