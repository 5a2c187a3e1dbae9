"""Train state, the next-token loss at labelled positions, and the jitted train / eval steps.

Batches are dicts {"inputs": int32 [B, T], "labels": int32 [B, T]} with IGNORE where no
prediction is scored (`based_jax.data.batch`). MQAR batches label a few positions (Q per row),
and only those go through the LM head (`logits_at`): Q x V head products per row instead of
T x V. Language-modelling batches label every position and use the whole head.
"""

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from based_jax.data.batch import IGNORE
from based_jax.model import LanguageModel
from based_jax.training import sharding


class TrainState(NamedTuple):
  step: jnp.ndarray  # int32 scalar, optimizer steps taken.
  params: Any  # model parameters.
  opt_state: Any  # optax state.
  rng: jnp.ndarray  # uint32 PRNG key data, advanced every step.


def labelled_positions(labels: jnp.ndarray, max_labels: int) -> tuple[jnp.ndarray, jnp.ndarray]:
  """The first `max_labels` positions with a label, per row.

  Returns positions [B, Q] and their labels [B, Q] (IGNORE where a row has fewer).
  """
  order = jnp.argsort(labels == IGNORE, axis=1, stable=True)[:, :max_labels]
  return order.astype(jnp.int32), jnp.take_along_axis(labels, order, axis=1)


def loss_sums(model: LanguageModel, params, batch, max_labels: Optional[int],
              dropout_rng: Optional[jax.Array] = None):
  """Cross-entropy summed over labelled positions, with (correct, count) of the argmax.

  `max_labels` bounds the labelled positions per row (MQAR: only those go through the LM
  head); None scores every position that has a label (language modelling). `dropout_rng`
  makes it a training pass (the model's dropout on, drawn from this key); None evaluates.
  """
  train = {} if dropout_rng is None else {"train": True, "rngs": {"dropout": dropout_rng}}
  if max_labels is None:
    targets = batch["labels"]
    logits, _ = model.apply(params, batch["inputs"], **train)
  else:
    positions, targets = labelled_positions(batch["labels"], max_labels)
    logits, _ = model.apply(params, batch["inputs"], logits_at=positions, **train)
  valid = targets != IGNORE
  safe = jnp.where(valid, targets, 0)
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, safe)
  loss_sum = jnp.sum(jnp.where(valid, losses, 0.0))
  correct = jnp.sum(valid & (jnp.argmax(logits, -1) == safe))
  return loss_sum, (correct, jnp.sum(valid))


def init_state(model: LanguageModel, optimizer: optax.GradientTransformation, seed: int,
               example_inputs: jnp.ndarray, params=None, members: int = 0) -> TrainState:
  """Step 0: `params` (fine-tuning) or a fresh init, and the optimizer state for them;
  `members` > 0 stacks that many copies (`stack_members`, `RunConfig.lr_members`)."""
  rng, init_rng = jax.random.split(jax.random.key(seed))
  if params is None:
    params = model.init(init_rng, example_inputs)
  state = TrainState(jnp.int32(0), params, optimizer.init(params), jax.random.key_data(rng))
  return stack_members(state, members) if members else state


# The axes of a stacked state (`stack_members`): one step count, the rest per member.
MEMBER_AXES = TrainState(step=None, params=0, opt_state=0, rng=0)


def stack_members(state: TrainState, members: int) -> TrainState:
  """`members` identical copies of `state`'s params, optimizer state and key on a new leading
  axis (`RunConfig.lr_members`; the step count stays one scalar): the same init and the same
  dropout keys, so member m trains as a run of its rate alone."""
  stack = lambda tree: jax.tree.map(lambda x: jnp.broadcast_to(x, (members, *x.shape)), tree)
  return TrainState(state.step, stack(state.params), stack(state.opt_state), stack(state.rng))


def member(tree, m: int):
  """Member m of a stacked pytree (`stack_members`)."""
  return jax.tree.map(lambda x: x[m], tree)


def state_shardings(mesh: Mesh, abstract_state: TrainState) -> TrainState:
  """FSDP shardings for params and optimizer state; step and rng replicated."""
  return TrainState(step=sharding.replicated(mesh),
                    params=sharding.tree_shardings(mesh, abstract_state.params),
                    opt_state=sharding.tree_shardings(mesh, abstract_state.opt_state),
                    rng=sharding.replicated(mesh))


def make_train_step(model: LanguageModel, optimizer: optax.GradientTransformation,
                    mesh: Mesh, shardings: TrainState, grad_accum_steps: int = 1,
                    lr_members: tuple[float, ...] = ()):
  """A jitted (state, batch, max_labels) -> (state, metrics), the state donated.

  With `lr_members` the state is stacked (`stack_members`), `optimizer` is at unit rate
  (`make_optimizer(..., unit_rate=True)`), and the step is vmapped over the members: each
  gets the same batch and its updates times its rate; every metric is then [members].

  The batch [B, T] is the global batch of one optimizer step; with `grad_accum_steps` A it is
  run as A micro-batches of B / A rows (row r in micro-batch r mod A, so each device splits
  its own rows) whose gradient sums are accumulated, then divided by the total label count:
  the same update as one batch of B. `max_labels` (static): see `loss_sums`. The state's key
  is split every step: one half becomes the next state's key, the other draws the step's
  dropout masks (micro-batch i folds in i).
  """
  grad_fn = jax.value_and_grad(loss_sums, argnums=1, has_aux=True)

  def train_step(state: TrainState, batch, max_labels: Optional[int],
                 rate: Optional[jnp.ndarray] = None):
    micro = jax.tree.map(
        lambda x: x.reshape(x.shape[0] // grad_accum_steps, grad_accum_steps, *x.shape[1:])
        .swapaxes(0, 1), batch)

    next_rng, step_rng = jax.random.split(jax.random.wrap_key_data(state.rng))

    def accumulate(carry, indexed):
      grads, (loss_sum, correct, count) = carry
      i, micro_batch = indexed
      (loss, (c, n)), g = grad_fn(model, state.params, micro_batch, max_labels,
                                  jax.random.fold_in(step_rng, i))
      return (jax.tree.map(jnp.add, grads, g), (loss_sum + loss, correct + c, count + n)), None

    zeros = jax.tree.map(jnp.zeros_like, state.params)
    (grads, (loss_sum, correct, count)), _ = jax.lax.scan(
        accumulate, (zeros, (jnp.float32(0), jnp.int32(0), jnp.int32(0))),
        (jnp.arange(grad_accum_steps), micro))
    denominator = jnp.maximum(count, 1)
    grads = jax.tree.map(lambda g: g / denominator.astype(g.dtype), grads)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    if rate is not None:
      updates = jax.tree.map(lambda u: u * rate.astype(u.dtype), updates)
    params = optax.apply_updates(state.params, updates)
    rng = jax.random.key_data(next_rng)
    metrics = {"loss": loss_sum / denominator, "accuracy": correct / denominator,
               "grad_norm": optax.tree.norm(grads)}
    return TrainState(state.step + 1, params, opt_state, rng), metrics

  step = train_step
  if lr_members:
    rates = jnp.asarray(lr_members, jnp.float32)

    def step(state: TrainState, batch, max_labels: Optional[int]):
      return jax.vmap(lambda s, r: train_step(s, batch, max_labels, r),
                      in_axes=(MEMBER_AXES, 0), out_axes=(MEMBER_AXES, 0))(state, rates)

  batch_sharding = sharding.batch_sharding(mesh)
  return jax.jit(step, in_shardings=(shardings, batch_sharding),
                 out_shardings=(shardings, sharding.replicated(mesh)), donate_argnums=0,
                 static_argnums=2)


def make_eval_step(model: LanguageModel, mesh: Mesh, param_shardings):
  """A jitted (params, batch, max_labels) -> (loss sum, correct, count) over labelled
  positions (`loss_sums`)."""

  def eval_step(params, batch, max_labels: Optional[int]):
    loss_sum, (correct, count) = loss_sums(model, params, batch, max_labels)
    return loss_sum, correct, count

  return jax.jit(eval_step, in_shardings=(param_shardings, sharding.batch_sharding(mesh)),
                 out_shardings=sharding.replicated(mesh), static_argnums=2)
