"""Atomic, resumable checkpoints through Orbax, and loading a trained model from its workdir.

Each checkpoint (a directory `<workdir>/checkpoints/<step>`) holds five items:

  state     the TrainState (params, optimizer state, step, RNG);
  data      the grain iterator's position;
  config    the run config the checkpoint must agree with to be resumed (`RunConfig.to_json`);
  model     the complete ModelConfig of the run (what `load_checkpoint` rebuilds);
  progress  the last evaluation and whether the run finished (so completion survives a crash
            between the checkpoint and the results file).

Checkpoints written before the `model` and `progress` items existed still resume and load.

A model-only checkpoint (`save_model_only`: pretrained weights converted by
experiments/convert_checkpoint.py) is a directory with `params/` (one Orbax PyTree, no
optimizer state or step) and `model_only.json` (the ModelConfig and where the weights came
from), written last so that its presence means the directory is complete. `load_checkpoint`
reads it like a workdir; it is not a run, so there is nothing to resume.

Orbax writes a step into a temporary directory and renames it when complete, so a run killed
mid-save leaves the earlier checkpoints intact. A checkpoint that cannot be read is reported
by step and path and moved aside to `<step>.unreadable` (never deleted); the newest readable
one is used instead.

Multi-host: every process saves and restores (Orbax writes each process's shards into the same
directory, on a filesystem all processes share); whether a checkpoint is readable is agreed by
all processes (`multihost.all_true`) and only process 0 moves an unreadable one aside. The
data item holds one iterator state per process (grain's `process_<i>-of-<n>.json`): a run
with another process count resumes it only when the states are global (`restore`'s
`global_data_state`: the text pipeline's count of global batches read, equal on every process
and meaning the same position for any process count at the same global batch); otherwise it
is refused with an error naming both counts, and nothing is moved.
"""

import dataclasses
import glob
import json
import os
import re
import warnings
from typing import Any, NamedTuple, Optional

import jax
import orbax.checkpoint as ocp

from based_jax.config import ModelConfig
from based_jax.training import multihost, step as step_lib
from based_jax.training.step import TrainState
from based_jax.training.workdir import check_writable

UNREADABLE_SUFFIX = ".unreadable"
MODEL_ONLY_FILE = "model_only.json"  # a model-only checkpoint's config, written last
MODEL_ONLY_PARAMS = "params"  # its parameters (an Orbax PyTree)
MODEL_ONLY_FORMAT = "based_jax.model_only.v1"


class ProcessCountChanged(ValueError):
  """A checkpoint's data iterator was saved by another number of processes and cannot be
  resumed by this many."""


class Restored(NamedTuple):
  state: TrainState
  progress: dict  # {"results": last evaluation metrics, "results_step": its step, "finished"}


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), "checkpoints")


def _first_line(error: BaseException) -> str:
  lines = [line.strip() for line in str(error).splitlines() if line.strip()]
  return f"{type(error).__name__}: {lines[0][:300] if lines else ''}"


class Checkpointer:
  """Keeps the last `keep` checkpoints of a run under `directory`."""

  def __init__(self, directory: str, keep: int):
    if keep < 1:
      raise ValueError(f"keep_checkpoints must be >= 1, got {keep}")
    check_writable(directory)
    self._directory = os.path.abspath(directory)
    self._manager = ocp.CheckpointManager(
        self._directory, options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))

  def _set_aside(self, step: int, error: Optional[BaseException]) -> None:
    """Reports an unreadable checkpoint and moves it out of the manager's sight (process 0
    moves it; `error` is None on a process that could read it when another could not)."""
    if multihost.is_lead():
      path = os.path.join(self._directory, str(step))
      target = path + UNREADABLE_SUFFIX
      n = 1
      while os.path.exists(target):
        target, n = f"{path}{UNREADABLE_SUFFIX}.{n}", n + 1
      os.rename(path, target)
      reason = _first_line(error) if error is not None else "another process could not read it"
      warnings.warn(f"checkpoint step {step} at {path} cannot be read ({reason}); "
                    f"moved to {target}, trying the previous checkpoint")
    multihost.barrier(f"checkpoint_set_aside_{step}")
    self._manager.reload()

  def _newest_readable(self, read):
    """`read(step)` of the newest step it succeeds on (on every process), setting aside the
    ones it fails on; None when there are no (readable) checkpoints. ProcessCountChanged is
    raised, not set aside: the checkpoint is sound."""
    for step in sorted(self._manager.all_steps(), reverse=True):
      result, error = None, None
      try:
        result = read(step)
      except ProcessCountChanged:
        raise
      except Exception as e:  # noqa: BLE001 - any unreadable checkpoint is set aside
        error = e
      if multihost.all_true(error is None):
        return result
      self._set_aside(step, error)
    return None

  def check_compatible(self, run_json: dict, defaults: dict) -> None:
    """Refuses to resume from checkpoints written with a different run config. A key the
    checkpoint lacks (a field added since) counts as its value in `defaults` if it has one."""
    saved = self._newest_readable(lambda step: self._manager.restore(
        step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"])
    if saved is None:
      return
    saved, current = json.loads(json.dumps(saved)), json.loads(json.dumps(run_json))
    saved = {**{k: v for k, v in defaults.items() if k not in saved}, **saved}
    # Keys only the checkpoint has (fields since dropped from the comparison) do not matter.
    diffs = sorted(k for k in current if saved.get(k) != current[k])
    if diffs:
      detail = ", ".join(f"{k}: saved {saved.get(k)!r} vs now {current.get(k)!r}" for k in diffs)
      raise ValueError(f"checkpoints in {self._directory} come from an incompatible "
                       f"config ({detail}); use another --workdir or the same settings. "
                       "Nothing was changed.")

  def save(self, state: TrainState, data_iterator: Any, run_json: dict,
           model_config: ModelConfig, progress: dict) -> None:
    import grain  # pylint: disable=g-import-not-at-top - only training needs grain
    self._manager.save(int(state.step), args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=grain.checkpoint.CheckpointSave(data_iterator),
        config=ocp.args.JsonSave(run_json),
        model=ocp.args.JsonSave(dataclasses.asdict(model_config)),
        progress=ocp.args.JsonSave(progress)))

  def restore(self, abstract_state: TrainState, data_iterator: Any,
              global_data_state: bool = False) -> Optional[Restored]:
    """The newest readable checkpoint (state with the shardings of `abstract_state`, so on
    any number of devices; the iterator restored in place), or None if there is none.

    `global_data_state`: the iterator's state is the same on every process and means the same
    position for any process count (see the module docstring), so a checkpoint saved by
    another number of processes resumes; without it, that raises ProcessCountChanged.
    """
    import grain  # pylint: disable=g-import-not-at-top

    def read(step):
      items = dict(state=ocp.args.StandardRestore(abstract_state))
      data_state = self._foreign_data_state(step, global_data_state)
      if data_state is None:
        items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
      if "progress" in self._manager.item_metadata(step).keys():
        items["progress"] = ocp.args.JsonRestore()
      restored = self._manager.restore(step, args=ocp.args.Composite(**items))
      if data_state is not None:
        data_iterator.set_state(data_state)
      return Restored(restored["state"], restored.get("progress") or {})
    return self._newest_readable(read)

  def _foreign_data_state(self, step: int, global_data_state: bool) -> Optional[dict]:
    """None when step's iterator states were saved by this many processes (or cannot be
    told apart: the usual restore reports what is wrong); else the state to resume from, the
    one that every saving process recorded."""
    files = glob.glob(os.path.join(self._directory, str(step), "data", "process_*-of-*.json"))
    counts = {int(m.group(1)) for m in (re.search(r"-of-(\d+)\.json$", f) for f in files) if m}
    if len(counts) != 1 or counts == {jax.process_count()}:
      return None
    (saved,) = counts
    where = os.path.join(self._directory, str(step))
    if not global_data_state:
      raise ProcessCountChanged(
          f"checkpoint step {step} at {where} was written by {saved} processes and this run "
          f"has {jax.process_count()}: its data iterator's position is per process, so it "
          f"resumes only with {saved} processes (nothing was changed)")
    states = []
    for f in sorted(files):
      with open(f) as handle:
        states.append(json.load(handle))
    if len(states) != saved or any(s != states[0] for s in states):
      found = (f"{len(states)} of the {saved} processes' data positions" if len(states) != saved
               else f"different data positions for its {saved} processes")
      raise ProcessCountChanged(
          f"checkpoint step {step} at {where} holds {found}, so it resumes only with {saved} "
          f"processes, not {jax.process_count()} (nothing was changed)")
    return states[0]

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()


def abstract_like(state_shapes: TrainState, shardings: TrainState) -> TrainState:
  """ShapeDtypeStructs carrying shardings, the restore target."""
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                      state_shapes, shardings)


class MemberError(ValueError):
  """`load_checkpoint`'s `member` does not fit the run (not a checkpoint that cannot be read)."""


def load_checkpoint(workdir: str, step: Optional[int] = None,
                    member: Optional[int] = None) -> tuple[ModelConfig, Any]:
  """The model config and parameters of a training run, from its workdir.

  Args:
    workdir: the run's --workdir (or its `checkpoints/` directory), or a model-only
      checkpoint's directory (`save_model_only`).
    step: which checkpoint; None for the newest readable one (a model-only checkpoint has
      one, and takes None).
    member: of a run with `lr_members`, which model (its index in lr_members); required
      there, refused elsewhere.

  Returns:
    (config, params): the run's exact `ModelConfig` and its parameters (a pytree of arrays on
    the default device), ready for `LanguageModel(config).apply` or `generate`. Only the
    parameters are read, not the optimizer state.
  """
  if is_model_only(workdir):
    if step is not None or member is not None:
      raise ValueError(f"{workdir!r} is a model-only checkpoint (one set of weights, no "
                       f"steps); load it with step=None and member=None")
    return _load_model_only(workdir)
  return _read_checkpoint(workdir, step,
                          lambda manager, s: _load_step(manager, s, workdir, member))


def is_model_only(directory: str) -> bool:
  """Whether `directory` holds a complete model-only checkpoint."""
  return os.path.isfile(os.path.join(directory, MODEL_ONLY_FILE))


def save_model_only(directory: str, config: ModelConfig, params: Any, source: str) -> None:
  """Writes `params` (`{"params": ...}`) and `config` as a model-only checkpoint that
  `load_checkpoint(directory)` reads; `source` says where the weights came from. The
  directory must not exist or be empty."""
  directory = os.path.abspath(directory)
  if os.path.isdir(directory) and os.listdir(directory):
    raise ValueError(f"{directory} is not empty; choose a new directory (nothing was written)")
  os.makedirs(directory, exist_ok=True)
  check_writable(directory)
  ocp.PyTreeCheckpointer().save(os.path.join(directory, MODEL_ONLY_PARAMS), params)
  record = {"format": MODEL_ONLY_FORMAT, "source": source,
            "model": dataclasses.asdict(config)}
  tmp = os.path.join(directory, MODEL_ONLY_FILE + ".tmp")
  with open(tmp, "w") as f:
    json.dump(record, f, indent=1)
  os.replace(tmp, os.path.join(directory, MODEL_ONLY_FILE))


def _load_model_only(directory: str) -> tuple[ModelConfig, Any]:
  path = os.path.join(directory, MODEL_ONLY_FILE)
  try:
    with open(path) as f:
      record = json.load(f)
    if record.get("format") != MODEL_ONLY_FORMAT:
      raise ValueError(f"format {record.get('format')!r}, expected {MODEL_ONLY_FORMAT!r}")
    config = ModelConfig(**record["model"])
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise ValueError(f"model-only checkpoint {path} cannot be read: {_first_line(e)}") from e
  checkpointer = ocp.PyTreeCheckpointer()
  params_dir = os.path.join(os.path.abspath(directory), MODEL_ONLY_PARAMS)
  try:
    tree = checkpointer.metadata(params_dir).item_metadata.tree
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device),
                          tree)
    params = checkpointer.restore(params_dir, args=ocp.args.PyTreeRestore(
        item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target)))
  except Exception as e:  # noqa: BLE001 - any unreadable parameter store is reported
    raise ValueError(f"model-only checkpoint {params_dir} cannot be read: "
                     f"{_first_line(e)}") from e
  return config, params


def load_run_config(workdir: str, step: Optional[int] = None) -> dict:
  """The run config a checkpoint was written with (`RunConfig.to_json`: data, batch, seed and
  optimizer fields, the model's as `model.<field>`); step None: the newest readable one."""
  if is_model_only(workdir):
    raise ValueError(f"{workdir!r} is a model-only checkpoint (converted weights): it has no "
                     "run config")
  return _read_checkpoint(workdir, step, lambda manager, s: manager.restore(
      s, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"])


def _read_checkpoint(workdir: str, step: Optional[int], read):
  """`read(manager, step)` of the given step, or of the newest step it succeeds on (the
  others reported); nothing is moved or written (the run may be live)."""
  directory = workdir if os.path.basename(os.path.normpath(workdir)) == "checkpoints" \
      else checkpoint_dir(workdir)
  if not os.path.isdir(directory):
    raise ValueError(f"no checkpoints in {workdir!r} (no directory {directory})")
  manager = ocp.CheckpointManager(directory, item_handlers={
      "state": ocp.PyTreeCheckpointHandler(), "model": ocp.JsonCheckpointHandler(),
      "config": ocp.JsonCheckpointHandler(), "progress": ocp.JsonCheckpointHandler(),
      # Not read here; named so that Orbax does not warn about an unknown item.
      "data": ocp.JsonCheckpointHandler()})
  steps = sorted(manager.all_steps(), reverse=True)
  if step is not None:
    if step not in steps:
      raise ValueError(f"no checkpoint of step {step} in {directory}; steps: {sorted(steps)}")
    steps = [step]
  errors = []
  for s in steps:
    try:
      return read(manager, s)
    except MemberError:
      raise
    except Exception as e:  # noqa: BLE001 - reported, then the next older one is tried
      errors.append(f"step {s} at {os.path.join(directory, str(s))}: {_first_line(e)}")
      if step is None:
        warnings.warn(f"checkpoint {errors[-1]} cannot be read; trying the previous one")
  if not steps:
    raise ValueError(f"no checkpoints in {directory}")
  raise ValueError("no readable checkpoint: " + "; ".join(errors))


def _load_step(manager: ocp.CheckpointManager, step: int, workdir: str,
               member: Optional[int]) -> tuple[ModelConfig, Any]:
  items = manager.item_metadata(step).keys()
  run = (manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
         if "config" in items else {})
  members = run.get("lr_members") or []
  if members and (member is None or not 0 <= member < len(members)):
    raise MemberError(f"{workdir!r} trained {len(members)} models side by side (lr_members "
                      f"{members}): pass member=0..{len(members) - 1}, got {member}")
  if member is not None and not members:
    raise MemberError(f"{workdir!r} trained one model (no lr_members): pass member=None")
  if "model" in items:
    config = ModelConfig(**manager.restore(step, args=ocp.args.Composite(
        model=ocp.args.JsonRestore()))["model"])
  else:  # checkpoints written before the model item: the run config's model.* fields
    config = ModelConfig(**{k[len("model."):]: v for k, v in run.items()
                            if k.startswith("model.")})
  meta = manager.item_metadata(step)["state"].tree
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = {"params": jax.tree.map(
      lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), meta["params"])}
  restored = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.PyTreeRestore(item=target, partial_restore=True,
                                   restore_args=ocp.checkpoint_utils.construct_restore_args(
                                       target))))
  params = restored["state"]["params"]
  return config, params if member is None else step_lib.member(params, member)
