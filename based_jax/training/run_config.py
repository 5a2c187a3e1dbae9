"""The configuration of a training run, with named presets, and absl flags for every field."""

import dataclasses
import inspect
import json
import re
import typing
from typing import Any, Optional, Sequence

from absl import flags

from based_jax.config import ModelConfig
from based_jax.data.pipeline import DATA_ORDERS
from based_jax.training.optimizer import OptimizerConfig


TASKS = ("mqar", "text")


@dataclasses.dataclass(frozen=True)
class TextConfig:
  """Language modelling on text: where the tokens come from and how they are cut."""
  # Source spec (based_jax.data.text_sources): "bible" (embedded), .txt / .jsonl(.gz) /
  # .parquet files, directories, globs, hf:NAME[:CONFIG][@SPLIT], or one .bin / .npy token file.
  data: str = "bible"
  text_field: str = "text"  # field / column holding a document in .jsonl, parquet, hf sources.
  tokenizer: str = "gpt2"  # "gpt2" (offline), a tokenizer.json path, or an HF tokenizer name.
  seq_len: int = 2048  # tokens per training example (windows of seq_len + 1 tokens).
  val_fraction: float = 0.01  # share of the windows held out for validation (every k-th).
  eval_batches: int = 20  # validation batches per evaluation (fewer if the split has fewer).
  data_seed: int = 0  # seeds the window order: keep it equal across compared architectures.
  token_cache_dir: str = "data/tokens"  # where tokenized text is cached (reused across runs).

  def __post_init__(self):
    if self.seq_len < 1 or self.eval_batches < 1:
      raise ValueError(f"seq_len and eval_batches must be >= 1, got {self.seq_len}, "
                       f"{self.eval_batches}")
    if not 0 <= self.val_fraction < 1:
      raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")


@dataclasses.dataclass(frozen=True)
class RunConfig:
  """Everything that defines a run besides the model fields (see ModelConfig)."""
  model: str = "mqar_based"  # model preset name (based_jax.config.PRESETS).
  # Model field overrides "field=value" applied to the preset (flag --model_set adds more).
  model_set: tuple[str, ...] = ()
  task: str = "mqar"  # "mqar" (synthetic recall, the MQAR fields) or "text" (the text fields).
  train_mix: str = "small_train"  # MQAR training mix name (based_jax.data.mqar.MIXES).
  # MQAR batch order (based_jax.data.pipeline.DATA_ORDERS): "mixed" (slices drawn at random,
  # reshuffled every epoch) or "epochs" (zoology's: each epoch the slices in turn, unshuffled).
  data_order: str = "mixed"
  test_mix: str = "small_test"  # MQAR test mix name; its slices are evaluated separately.
  vocab_size: int = 8192  # MQAR vocabulary: keys [1, V/2), values [V/2, V).
  text: TextConfig = TextConfig()  # language modelling on text (task "text").
  batch_size: int = 64  # global batch (sequences per optimizer step), split over the devices.
  grad_accum_steps: int = 1  # micro-batches per optimizer step; each is batch_size / this.
  eval_every: int = 100  # steps between evaluations.
  log_every: int = 20  # steps between metric logs.
  checkpoint_every: int = 200  # steps between checkpoints.
  keep_checkpoints: int = 3  # most recent checkpoints kept.
  target_accuracy: float = 1.1  # MQAR: stop once the mean test accuracy reaches this (>1: never).
  seed: int = 0  # seeds init, and MQAR data generation and order.
  # Start from the parameters of this run or converted-model directory (fine-tuning) instead
  # of a random init; its model config must equal the run's.
  init_from: str = ""
  optimizer: OptimizerConfig = OptimizerConfig()  # AdamW + schedule.
  # Learning rates trained side by side in one program: one copy of the model per rate, from
  # the same init on the same batches, each with `optimizer` at its own peak rate (a
  # learning-rate sweep as one run; for small models cheaper on a GPU than separate runs).
  # () trains one model at optimizer.learning_rate.
  lr_members: tuple[float, ...] = ()

  def __post_init__(self):
    for name in ("batch_size", "eval_every", "log_every", "checkpoint_every", "vocab_size",
                 "grad_accum_steps"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
    if self.task not in TASKS:
      raise ValueError(f"task must be one of {TASKS}, got {self.task!r}")
    if self.data_order not in DATA_ORDERS:
      raise ValueError(f"data_order must be one of {DATA_ORDERS}, got {self.data_order!r}")
    if self.task == "text" and self.data_order != "mixed":
      raise ValueError(f"data_order={self.data_order!r} is an MQAR order; text runs read "
                       "their windows in one seeded order (leave data_order 'mixed')")
    if any(not lr > 0 for lr in self.lr_members):
      raise ValueError(f"lr_members must be learning rates > 0, got {self.lr_members}")
    if len({f"{lr:g}" for lr in self.lr_members}) != len(self.lr_members):  # names members
      raise ValueError(f"lr_members repeats a learning rate: {self.lr_members}")
    if self.batch_size % self.grad_accum_steps:
      raise ValueError(f"grad_accum_steps={self.grad_accum_steps} must divide "
                       f"batch_size={self.batch_size}")

  def replace(self, **changes) -> "RunConfig":
    return dataclasses.replace(self, **changes)

  def to_json(self, model_config: ModelConfig) -> dict:
    """What a checkpoint must agree with to be resumed: flat "section.field" keys (the
    schedule length, how often things happen, the micro-batching and the model's
    MODEL_RUNTIME_FIELDS may change)."""
    run = dataclasses.asdict(self)
    for transient in _TRANSIENT:
      run.pop(transient)
    for section, transient in (("optimizer", ("total_steps",)),
                               ("text", ("eval_batches", "token_cache_dir"))):
      values = run.pop(section)
      run.update({f"{section}.{k}": v for k, v in values.items() if k not in transient})
    model = {f"model.{k}": v for k, v in dataclasses.asdict(model_config).items()
             if k not in MODEL_RUNTIME_FIELDS}
    return {**run, **model}


_TRANSIENT = ("model_set", "eval_every", "log_every", "checkpoint_every", "keep_checkpoints",
              "target_accuracy", "grad_accum_steps", "init_from")


def json_defaults() -> dict:
  """The default of every `to_json` key that has one: a checkpoint written before a field
  existed agrees with a run that leaves the field at its default."""
  defaults = {}
  for prefix, cls in (("", RunConfig), ("optimizer.", OptimizerConfig), ("text.", TextConfig),
                      ("model.", ModelConfig)):
    for field in dataclasses.fields(cls):
      if field.default is not dataclasses.MISSING and field.name not in ("optimizer", "text"):
        defaults[prefix + field.name] = field.default
  return json.loads(json.dumps(defaults))


# Model fields that choose how the same function is computed, or how decoding stores its state:
# a checkpoint resumes under other values.
MODEL_RUNTIME_FIELDS = ("linear_attention_impl", "attention_impl", "attention_decode_impl",
                        "ssm_impl", "norm_impl", "gemv_impl", "la_state_dtype", "remat")


# The BASED paper's language-model recipe: 10B tokens in steps of 256 x 2048 (0.5M) tokens.
PAPER_TOKENS = 10_000_000_000
PAPER_BATCH, PAPER_SEQ_LEN = 256, 2048


def _paper_lm(model: str, grad_accum_steps: int, remat: str) -> RunConfig:
  """The paper's recipe for a model preset: AdamW lr 8e-4, betas (0.9, 0.95), wd 0.1 (not on
  norms, biases, embeddings), linear warm-up over 1% of the steps then cosine to 8e-5, clip
  1.0, bf16 compute with float32 parameters and residual; micro-batches of 256 / A sequences
  (A = grad_accum_steps) and the `remat` policy sized for one 80 GB GPU. `data` must be given
  (the corpus)."""
  steps = PAPER_TOKENS // (PAPER_BATCH * PAPER_SEQ_LEN)
  return RunConfig(
      model=model, model_set=("dtype=bfloat16", f"remat={remat}"), task="text", batch_size=PAPER_BATCH,
      grad_accum_steps=grad_accum_steps, eval_every=500, log_every=10, checkpoint_every=500,
      text=TextConfig(data="", seq_len=PAPER_SEQ_LEN, val_fraction=0.005, eval_batches=20),
      optimizer=OptimizerConfig(learning_rate=8e-4, warmup_steps=steps // 100,
                                total_steps=steps, end_lr_ratio=0.1, b1=0.9, b2=0.95,
                                weight_decay=0.1, grad_clip=1.0))


# Batches of one epoch of the paper's MQAR mix at batch 256 (paper_train: 100k examples of
# 64 tokens, then four slices of 20k; each slice's last batch partial): 391 + 4 x 79.
ZOOLOGY_EPOCH_BATCHES = 707
_ZOOLOGY = RunConfig(
    train_mix="paper_train", test_mix="paper_test", batch_size=256, eval_every=500,
    checkpoint_every=1000,
    optimizer=OptimizerConfig(learning_rate=3.2e-3, warmup_steps=0,
                              total_steps=32 * ZOOLOGY_EPOCH_BATCHES, end_lr_ratio=0.0,
                              b2=0.999, grad_clip=0.0, decay="all"))

RUN_PRESETS: dict[str, RunConfig] = {
    # The README default: BASED d_model 128, d' 64, init std 0.05 on the dense mix; stops at
    # 0.99 (step 400, about 2.5 minutes on 2 cores). Recipe search: docs/training.md.
    "mqar_small": RunConfig(
        model="mqar_based_cpu", train_mix="dense_train", batch_size=64, eval_every=200,
        checkpoint_every=200,
        optimizer=OptimizerConfig(learning_rate=2e-3, warmup_steps=20, total_steps=600,
                                  b2=0.99, weight_decay=0.0),
        target_accuracy=0.99),
    # The BASED paper's MQAR setting: its mix, batch 256, about 35 epochs of 180k examples,
    # with this project's AdamW recipe.
    "mqar_paper": RunConfig(
        train_mix="paper_train", test_mix="paper_test", batch_size=256, eval_every=500,
        checkpoint_every=1000,
        optimizer=OptimizerConfig(learning_rate=3.2e-3, warmup_steps=500, total_steps=25_000,
                                  end_lr_ratio=0.0)),
    # The same mix with zoology's trainer, which trained the paper's MQAR models: torch AdamW
    # defaults (b2 0.999, weight decay 0.1 on every parameter), no clipping, no warm-up, cosine
    # to 0 over 32 epochs of 707 batches (180k examples by 256, the last batch of each slice
    # partial there). Its model side is `--model_set=block_style=zoology
    # --model_set=embed_dropout=0.1` (docs/mixers.md).
    "mqar_zoology": _ZOOLOGY,
    # And zoology's data order and schedule steps too: each epoch the slices in turn,
    # unshuffled, and the learning rate moved once an epoch.
    "mqar_zoology_epochs": _ZOOLOGY.replace(
        data_order="epochs",
        optimizer=dataclasses.replace(_ZOOLOGY.optimizer, lr_hold_steps=ZOOLOGY_EPOCH_BATCHES)),
    # The README's text default: a small BASED on the embedded King James Bible (~1.0M GPT-2
    # tokens); validation perplexity falls from ~50,000 to a few hundred in a few CPU minutes.
    "text_small": RunConfig(
        model="based_text_cpu", task="text", batch_size=8, eval_every=50, log_every=10,
        checkpoint_every=100,
        text=TextConfig(data="bible", seq_len=256, val_fraction=0.02, eval_batches=9),
        optimizer=OptimizerConfig(learning_rate=3e-3, warmup_steps=20, total_steps=300)),
    **{f"lm_{name}": _paper_lm(name, grad_accum_steps, remat)
       for name, grad_accum_steps, remat in (
           ("based_360m", 32, "none"), ("transformer_pp_360m", 32, "none"),
           ("based_1b", 32, "block"), ("transformer_pp_1b", 32, "block"))},
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
