"""Train state, the next-token loss at labelled positions, and the jitted train / eval steps.

Batches are dicts {"inputs": int32 [B, T], "labels": int32 [B, T]} with IGNORE where no
prediction is scored (`based_jax.data.batch`). Only labelled positions are sent through the LM head (`logits_at`), so a
batch with Q labels per row costs Q x V head products per row instead of T x V.
"""

from typing import Any, NamedTuple

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


def loss_and_counts(model: LanguageModel, params, batch, max_labels: int):
  """Mean cross entropy over labelled positions, and (loss sum, correct, count)."""
  positions, targets = labelled_positions(batch["labels"], max_labels)
  logits, _ = model.apply(params, batch["inputs"], logits_at=positions)
  valid = targets != IGNORE
  safe = jnp.where(valid, targets, 0)
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, safe)
  count = jnp.sum(valid)
  loss_sum = jnp.sum(jnp.where(valid, losses, 0.0))
  correct = jnp.sum(valid & (jnp.argmax(logits, -1) == safe))
  return loss_sum / jnp.maximum(count, 1), (loss_sum, correct, count)


def init_state(model: LanguageModel, optimizer: optax.GradientTransformation, seed: int,
               example_inputs: jnp.ndarray) -> TrainState:
  rng, init_rng = jax.random.split(jax.random.key(seed))
  params = model.init(init_rng, example_inputs)
  return TrainState(jnp.int32(0), params, optimizer.init(params), jax.random.key_data(rng))


def state_shardings(mesh: Mesh, abstract_state: TrainState) -> TrainState:
  """FSDP shardings for params and optimizer state; step and rng replicated."""
  return TrainState(step=sharding.replicated(mesh),
                    params=sharding.tree_shardings(mesh, abstract_state.params),
                    opt_state=sharding.tree_shardings(mesh, abstract_state.opt_state),
                    rng=sharding.replicated(mesh))


def make_train_step(model: LanguageModel, optimizer: optax.GradientTransformation,
                    mesh: Mesh, shardings: TrainState):
  """A jitted (state, batch, max_labels) -> (state, metrics), the state donated.

  `max_labels` (static) bounds the labelled positions per row of the batch.
  """

  def train_step(state: TrainState, batch, max_labels: int):
    grad_fn = jax.value_and_grad(loss_and_counts, argnums=1, has_aux=True)
    (loss, (_, correct, count)), grads = grad_fn(model, state.params, batch, max_labels)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    rng = jax.random.key_data(jax.random.split(jax.random.wrap_key_data(state.rng))[0])
    metrics = {"loss": loss, "accuracy": correct / jnp.maximum(count, 1),
               "grad_norm": optax.tree.norm(grads)}
    return TrainState(state.step + 1, params, opt_state, rng), metrics

  batch_sharding = sharding.batch_sharding(mesh)
  return jax.jit(train_step, in_shardings=(shardings, batch_sharding),
                 out_shardings=(shardings, sharding.replicated(mesh)), donate_argnums=0,
                 static_argnums=2)


def make_eval_step(model: LanguageModel, mesh: Mesh, param_shardings):
  """A jitted (params, batch, max_labels) -> (correct, count) over labelled positions."""

  def eval_step(params, batch, max_labels: int):
    _, (_, correct, count) = loss_and_counts(model, params, batch, max_labels)
    return correct, count

  return jax.jit(eval_step, in_shardings=(param_shardings, sharding.batch_sharding(mesh)),
                 out_shardings=sharding.replicated(mesh), static_argnums=2)
