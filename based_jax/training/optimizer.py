"""AdamW with linear warm-up then cosine decay, gradient clipping, and no weight decay on
norms, biases and embeddings (the BASED paper's recipe), or decay on every parameter
(zoology's AdamW, which trained the paper's MQAR models)."""

import dataclasses

import jax
import optax

# Which parameters weight decay reaches (`OptimizerConfig.decay`).
DECAY_SETS = ("matrices", "all")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """AdamW + warm-up/cosine schedule."""
  learning_rate: float = 1e-3  # peak learning rate, reached after warm-up.
  warmup_steps: int = 100  # linear warm-up from 0.
  total_steps: int = 10_000  # cosine decay ends here.
  end_lr_ratio: float = 0.1  # final lr = end_lr_ratio * learning_rate.
  b1: float = 0.9  # Adam beta1.
  b2: float = 0.95  # Adam beta2.
  weight_decay: float = 0.1  # decoupled weight decay, on the parameters `decay` names.
  grad_clip: float = 1.0  # global-norm clipping threshold; 0 disables.
  # DECAY_SETS: "matrices" (Dense and conv kernels: the BASED recipe) or "all" (every
  # parameter, norms, biases and the tied embedding too: torch AdamW as zoology uses it).
  decay: str = "matrices"
  # The learning rate moves every this many steps and is held in between (the schedule read
  # at the last multiple): 1 follows it every step; an epoch's length steps it once an epoch,
  # as zoology's torch CosineAnnealingLR, stepped after each epoch, does.
  lr_hold_steps: int = 1

  def __post_init__(self):
    if not self.learning_rate > 0:
      raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
    if self.warmup_steps < 0 or self.total_steps < 1:
      raise ValueError(f"warmup_steps must be >= 0 and total_steps >= 1, got "
                       f"{self.warmup_steps}, {self.total_steps}")
    if self.warmup_steps > self.total_steps:
      raise ValueError(f"warmup_steps={self.warmup_steps} exceeds total_steps={self.total_steps}")
    for name in ("end_lr_ratio", "b1", "b2"):
      if not 0 <= getattr(self, name) < 1 + (name == "end_lr_ratio"):
        raise ValueError(f"{name} out of range: {getattr(self, name)}")
    if self.lr_hold_steps < 1:
      raise ValueError(f"lr_hold_steps must be >= 1, got {self.lr_hold_steps}")
    if self.decay not in DECAY_SETS:
      raise ValueError(f"decay must be one of {DECAY_SETS}, got {self.decay!r}")
    if self.weight_decay < 0 or self.grad_clip < 0:
      raise ValueError(f"weight_decay and grad_clip must be >= 0, got {self.weight_decay}, "
                       f"{self.grad_clip}")


def schedule(config: OptimizerConfig) -> optax.Schedule:
  """Linear warm-up from 0, then cosine to end_lr_ratio x the peak at total_steps, read every
  lr_hold_steps steps."""
  smooth = optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=config.learning_rate, warmup_steps=config.warmup_steps,
      decay_steps=config.total_steps, end_value=config.learning_rate * config.end_lr_ratio)
  if config.lr_hold_steps == 1:
    return smooth
  return lambda step: smooth(step // config.lr_hold_steps * config.lr_hold_steps)


def decay_mask(params):
  """True for weights that get weight decay: Dense kernels and conv kernels, nothing else."""
  def decays(path, leaf):
    name = getattr(path[-1], "key", str(path[-1]))
    return name in ("kernel", "conv_kernel") and leaf.ndim >= 2
  return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(config: OptimizerConfig,
                   unit_rate: bool = False) -> optax.GradientTransformation:
  """The optimizer of `config`; `unit_rate`: at peak learning rate 1, for a caller that
  multiplies the updates by a rate of its own (`RunConfig.lr_members`). AdamW's update,
  decoupled weight decay included, is linear in the learning rate, so that is the same
  optimizer at that rate."""
  if unit_rate:
    config = dataclasses.replace(config, learning_rate=1.0)
  adamw = optax.adamw(schedule(config), b1=config.b1, b2=config.b2,
                      weight_decay=config.weight_decay,
                      mask=decay_mask if config.decay == "matrices" else None)
  if config.grad_clip:
    return optax.chain(optax.clip_by_global_norm(config.grad_clip), adamw)
  return adamw
