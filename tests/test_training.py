"""Training: resume == uninterrupted, sharded == single device, clear errors for bad runs."""

import dataclasses
import math
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from based_jax.config import get_config
from based_jax.data import mqar, pipeline
from based_jax.model import LanguageModel
from based_jax.training import step as step_lib, trainer
from based_jax.training.optimizer import OptimizerConfig, decay_mask, make_optimizer, schedule
from based_jax.training.run_config import RUN_PRESETS, ZOOLOGY_EPOCH_BATCHES, RunConfig
from based_jax.training.checkpointing import load_checkpoint
from based_jax.training.trainer import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY_RUN = RunConfig(train_mix="tiny_train", test_mix="tiny_test", batch_size=16, eval_every=5,
                     log_every=5, checkpoint_every=6, keep_checkpoints=2,
                     optimizer=OptimizerConfig(learning_rate=3e-3, warmup_steps=3,
                                               total_steps=14))
TINY_MODEL = get_config("mqar_based", d_model=32, la_feature_dim=4)


def test_resumed_run_equals_uninterrupted_run(tmp_path):
  model = TINY_MODEL.replace(embed_dropout=0.1)  # the dropout key is part of the state too
  # The "epochs" order with partial batches (256 rows a slice by 24) and a held rate; the
  # fault tests (test_faults.py) resume the default order after kill -9.
  run = TINY_RUN.replace(data_order="epochs", batch_size=24, optimizer=dataclasses.replace(
      TINY_RUN.optimizer, lr_hold_steps=4))
  whole, whole_state = train(run, model, str(tmp_path / "whole"))
  first, _ = train(run, model, str(tmp_path / "split"), steps_this_run=8)
  assert first["step"] == 8
  resumed, resumed_state = train(run, model, str(tmp_path / "split"))
  assert resumed["step"] == whole["step"] == 14
  for a, b in zip(jax.tree.leaves(whole_state.params), jax.tree.leaves(resumed_state.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
  assert {k: v for k, v in resumed.items()} == {k: v for k, v in whole.items()}
  assert sorted(os.listdir(tmp_path / "split" / "checkpoints")) == ["12", "14"]  # keep 2


def test_rerun_after_the_target_is_complete_and_runtime_choices_may_change(tmp_path):
  run = TINY_RUN.replace(target_accuracy=0.0)  # stops at the first evaluation, step 5
  first, first_state = train(run, TINY_MODEL, str(tmp_path))
  assert first["step"] == 5
  again, again_state = train(run, TINY_MODEL, str(tmp_path))
  assert again == first
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["5"]
  for a, b in zip(jax.tree.leaves(first_state.params), jax.tree.leaves(again_state.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # A higher target continues the run, here with other implementation / state-storage choices.
  other = TINY_MODEL.replace(linear_attention_impl="xla", la_state_dtype="bfloat16")
  resumed, _ = train(run.replace(target_accuracy=1.01), other, str(tmp_path))
  assert resumed["step"] == 14


def test_incompatible_checkpoint_is_refused_and_left_alone(tmp_path):
  train(TINY_RUN, TINY_MODEL, str(tmp_path), steps_this_run=6)
  before = sorted(os.listdir(tmp_path / "checkpoints"))
  with pytest.raises(ValueError, match="incompatible config.*model.d_model"):
    train(TINY_RUN, TINY_MODEL.replace(d_model=64), str(tmp_path))
  assert sorted(os.listdir(tmp_path / "checkpoints")) == before


def test_unwritable_checkpoint_dir(tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("not a directory")
  with pytest.raises(ValueError, match="not writable"):
    train(TINY_RUN, TINY_MODEL, str(blocker / "run"))


def test_weight_decay_skips_norms_biases_and_embeddings():
  from based_jax.model import init_params
  mask = decay_mask(init_params(get_config("based_tiny")))
  flat = {"/".join(str(getattr(k, "key", k)) for k in path): v
          for path, v in jax.tree_util.tree_flatten_with_path(mask)[0]}
  assert flat["params/layers_0/mixer/in_proj/kernel"]
  assert not flat["params/layers_0/mixer/in_proj/bias"]
  assert not flat["params/embed/embedding"]
  assert not flat["params/layers_0/norm1/scale"]


@pytest.mark.parametrize("decay", ["matrices", "all"])
def test_weight_decay_reaches_the_parameters_decay_names(decay):
  """With zero gradients an AdamW step only decays: p -> p (1 - lr wd) where decay applies."""
  from based_jax.model import init_params
  params = init_params(get_config("based_tiny"))
  config = OptimizerConfig(learning_rate=0.5, warmup_steps=0, total_steps=1, end_lr_ratio=1.0,
                           weight_decay=0.1, decay=decay)
  opt = make_optimizer(config)
  step = jax.jit(lambda p: optax.apply_updates(p, opt.update(
      jax.tree.map(jnp.zeros_like, p), opt.init(p), p)[0]))  # one program, not op by op
  stepped = step(params)
  mask = decay_mask(params)
  for p, q, matrix in zip(*(jax.tree.leaves(t) for t in (params, stepped, mask))):
    factor = 1 - 0.5 * 0.1 if decay == "all" or matrix else 1.0
    np.testing.assert_allclose(q, p * factor, rtol=1e-6)
  with pytest.raises(ValueError, match="decay must be one of"):
    OptimizerConfig(decay="norms")


def test_lr_hold_steps_moves_the_rate_once_a_hold_as_zoologys_per_epoch_cosine():
  config = OptimizerConfig(learning_rate=1e-2, warmup_steps=0, total_steps=32 * 10,
                           end_lr_ratio=0.0, lr_hold_steps=10)
  for step in (0, 5, 9, 10, 15, 155, 319):  # torch CosineAnnealingLR(T_max=32) of epoch e
    epoch = step // 10
    want = 1e-2 * (1 + math.cos(math.pi * epoch / 32)) / 2
    assert schedule(config)(step) == pytest.approx(want, rel=1e-5)  # float32 arithmetic
  assert schedule(dataclasses.replace(config, lr_hold_steps=1))(15) < schedule(config)(15)
  with pytest.raises(ValueError, match="lr_hold_steps must be >= 1"):
    OptimizerConfig(lr_hold_steps=0)


def test_zoology_epochs_preset_holds_the_rate_for_one_epoch_of_its_mix():
  run = RUN_PRESETS["mqar_zoology_epochs"]
  epoch = sum(math.ceil(s.num_examples / run.batch_size) for s in mqar.get_mix(run.train_mix))
  assert epoch == ZOOLOGY_EPOCH_BATCHES == run.optimizer.lr_hold_steps
  assert run.optimizer.total_steps == 32 * epoch and run.data_order == "epochs"
  with pytest.raises(ValueError, match="data_order must be one of"):
    RunConfig(data_order="sorted")
  with pytest.raises(ValueError, match="is an MQAR order"):
    RunConfig(task="text", data_order="epochs")


def test_a_partial_batch_padded_with_ignored_rows_trains_as_the_partial_batch():
  model = LanguageModel(TINY_MODEL)
  data = mqar.generate_mqar(5, 32, 4, seed=3)
  padded = pipeline.make_train_iterator([data], batch_size=8, seed=0, order="epochs")
  params = jax.jit(model.init)(jax.random.key(0), data.inputs)
  sums = jax.jit(jax.value_and_grad(lambda p, b: step_lib.loss_sums(model, p, b, 4),
                                    has_aux=True))
  ((loss_a, (correct_a, count_a)), grads_a), ((loss_b, (correct_b, count_b)), grads_b) = (
      sums(params, b) for b in (next(padded), {"inputs": data.inputs, "labels": data.labels}))
  assert (count_a, correct_a) == (count_b, correct_b) and count_a == 5 * 4
  np.testing.assert_allclose(loss_a, loss_b, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(grads_a), jax.tree.leaves(grads_b)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_every_step_program_is_compiled_once_before_the_loop(tmp_path, monkeypatch):
  # jit's cache must serve the loop: a train or eval step compiled after compile_ahead would
  # be a shape it missed, or one compiled twice.
  compiled = []

  def listen(event, duration, fun_name="", **kwargs):
    del duration, kwargs
    if event == "/jax/core/compile/backend_compile_duration":
      compiled.append(fun_name)

  ahead = {}

  def compile_ahead(*args, **kwargs):
    ahead["start"] = len(compiled)
    ahead["count"] = real(*args, **kwargs)
    ahead["end"] = len(compiled)
    return ahead["count"]

  real = trainer.compile_ahead
  monkeypatch.setattr(trainer, "compile_ahead", compile_ahead)
  jax.monitoring.register_event_duration_secs_listener(listen)
  try:
    train(TINY_RUN, TINY_MODEL, str(tmp_path))
  finally:
    jax.monitoring.unregister_event_duration_listener(listen)
  steps = lambda names: sorted(n for n in names if n in ("jit(train_step)", "jit(eval_step)"))
  # tiny_train: 16 and 32 tokens; tiny_test: (16 tokens, 2 pairs), (32, 4): two of each.
  assert ahead["count"] == 4
  assert steps(compiled[ahead["start"]:ahead["end"]]) == ["jit(eval_step)"] * 2 + [
      "jit(train_step)"] * 2
  assert steps(compiled[ahead["end"]:]) == []


def run_cli(*args):
  return subprocess.run([sys.executable, "-m", "experiments.train", *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("args, message", [
    (["--run=nope"], "mqar_paper"),
    (["--model=nope"], "--model=nope: value should be one of <"),
    (["--learning_rate=-1"], "learning_rate must be > 0"),
    (["--model_set=window=0", "--model=mqar_sliding_window"], "window must be >= 1"),
    (["--model_set=colour=3"], "bad override"),
    (["--lr_members=1e-3,fast"], "--lr_members must be learning rates"),
    (["--lr_members=1e-3,1e-3"], "lr_members repeats a learning rate"),
    (["--lr_members=1e-3,2e-3", "--learning_rate=1e-3"], "no effect with --lr_members"),
])
def test_bad_flags_give_clear_errors(args, message, tmp_path):
  result = run_cli(*args, f"--workdir={tmp_path}")
  assert result.returncode != 0
  assert message in result.stderr + result.stdout
  assert "Traceback" not in result.stderr


def test_kv_pairs_that_do_not_fit(tmp_path, monkeypatch):
  from based_jax.data import mqar
  monkeypatch.setitem(mqar.MIXES, "bad", (mqar.MqarSlice(32, 9, 100),))
  with pytest.raises(ValueError, match="does not fit seq_len"):
    train(dataclasses.replace(TINY_RUN, train_mix="bad"), TINY_MODEL, str(tmp_path))


SHARDED_SCRIPT = textwrap.dedent("""
    import os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    import jax, jax.numpy as jnp, numpy as np, optax
    from based_jax.config import get_config
    from based_jax.model import LanguageModel
    from based_jax.training import sharding, step as step_lib
    from based_jax.data import mqar

    assert jax.device_count() == 8
    model = LanguageModel(get_config("mqar_based", d_model=64, la_feature_dim=8))
    # SGD with momentum: the update is linear in the gradient, so the sharded reductions'
    # other summation order shows up at float32 rounding level. (Adam divides by sqrt(v) and
    # turns a rounding-level difference in a near-zero gradient into an lr-sized step.)
    opt = optax.sgd(1e-2, momentum=0.9)
    data = mqar.generate_mqar(16, 32, 4, seed=0)
    batch = {"inputs": data.inputs, "labels": data.labels}
    finals = []
    for devices in (jax.devices()[:1], jax.devices()):
      mesh = sharding.make_mesh(devices)
      init = lambda: step_lib.init_state(model, opt, 0, jnp.zeros((1, 8), jnp.int32))
      shardings = step_lib.state_shardings(mesh, jax.eval_shape(init))
      state = jax.jit(init, out_shardings=shardings)()
      step = step_lib.make_train_step(model, opt, mesh, shardings)
      for _ in range(3):
        state, metrics = step(state, jax.device_put(batch, sharding.batch_sharding(mesh)), 4)
      finals.append(state)
    kernel = finals[1].params["params"]["layers_0"]["mixer"]["in_proj"]["kernel"]
    assert len(kernel.sharding.device_set) == 8 and not kernel.sharding.is_fully_replicated
    for a, b in zip(jax.tree.leaves(finals[0].params), jax.tree.leaves(finals[1].params)):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
    print("SHARDED_OK")
""")


def test_sharded_step_on_8_devices_equals_single_device():
  result = subprocess.run([sys.executable, "-c", SHARDED_SCRIPT], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
  assert "SHARDED_OK" in result.stdout, result.stderr[-3000:]


def test_lr_members_train_as_separate_runs_of_their_rates(tmp_path):
  """Each member of an lr_members run equals a run of its rate alone (same init, data and
  dropout keys), in parameters and in every evaluation; a paused members run resumes."""
  model = TINY_MODEL.replace(embed_dropout=0.1)
  rates = (1e-3, 1e-2)
  run = TINY_RUN.replace(lr_members=rates)
  summary, state = train(run, model, str(tmp_path / "members"), steps_this_run=8)
  summary, state = train(run, model, str(tmp_path / "members"))  # resumed at step 8
  assert summary["step"] == 14 and [m["lr"] for m in summary["members"]] == list(rates)
  for m, lr in enumerate(rates):
    alone, alone_state = train(
        TINY_RUN.replace(optimizer=dataclasses.replace(TINY_RUN.optimizer, learning_rate=lr)),
        model, str(tmp_path / f"lr{lr}"))
    for a, b in zip(jax.tree.leaves(alone_state.params), jax.tree.leaves(state.params)):
      np.testing.assert_allclose(np.asarray(b[m]), np.asarray(a), rtol=2e-5, atol=2e-6)
    got = summary["members"][m]
    assert got.keys() >= {k for k in alone if k.startswith("test/")}
    for key in (k for k in alone if k.startswith("test/")):
      assert got[key] == pytest.approx(alone[key], abs=1e-9)
  kernel = np.asarray(jax.tree.leaves(state.params)[-1])
  assert not np.allclose(kernel[0], kernel[-1])  # the rates made different models
  with pytest.raises(ValueError, match=r"2 models side by side .* pass member=0..1"):
    load_checkpoint(str(tmp_path / "members"))
  _, loaded = load_checkpoint(str(tmp_path / "members"), member=1)
  for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(state.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b[1]))
  with pytest.raises(ValueError, match="no lr_members"):
    load_checkpoint(str(tmp_path / "lr0.001"), member=0)


def test_lr_members_are_checked():
  with pytest.raises(ValueError, match="lr_members must be learning rates > 0"):
    TINY_RUN.replace(lr_members=(1e-3, 0.0))
  with pytest.raises(ValueError, match="repeats"):
    TINY_RUN.replace(lr_members=(1e-3, 1e-3))
