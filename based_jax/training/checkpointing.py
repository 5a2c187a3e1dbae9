"""Atomic, resumable checkpoints through Orbax: train state, data iterator and run config.

Orbax writes each step into a temporary directory and renames it when complete, so a run
killed mid-save leaves the previous checkpoints intact. The run config is stored beside the
state; resuming with an incompatible config is refused before anything is written.
"""

import json
import os
import tempfile
from typing import Any, Optional

import grain
import jax
import orbax.checkpoint as ocp

from based_jax.training.step import TrainState


def check_writable(directory: str) -> None:
  """Fails early, with a clear message, if checkpoints cannot be written to `directory`."""
  try:
    os.makedirs(directory, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=directory):
      pass
  except OSError as e:
    raise ValueError(f"checkpoint directory {directory!r} is not writable: {e}") from e


class Checkpointer:
  """Keeps the last `keep` checkpoints of a run under `directory`."""

  def __init__(self, directory: str, keep: int):
    if keep < 1:
      raise ValueError(f"keep_checkpoints must be >= 1, got {keep}")
    check_writable(directory)
    self._manager = ocp.CheckpointManager(
        os.path.abspath(directory),
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))

  def latest_step(self) -> Optional[int]:
    return self._manager.latest_step()

  def saved_config(self) -> Optional[dict]:
    """The run config stored with the latest checkpoint, or None if there is none."""
    step = self.latest_step()
    if step is None:
      return None
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
    except Exception as e:  # corrupt or foreign directory
      raise ValueError(f"checkpoint {step} in {self._manager.directory} cannot be read: {e}") from e
    return restored["config"]

  def check_compatible(self, config: dict) -> None:
    """Refuses to resume from a checkpoint written with a different run config."""
    saved = self.saved_config()
    if saved is None:
      return
    saved, current = json.loads(json.dumps(saved)), json.loads(json.dumps(config))
    # Keys only the checkpoint has (fields since dropped from the comparison) do not matter.
    diffs = sorted(k for k in current if saved.get(k) != current[k])
    if diffs:
      detail = ", ".join(f"{k}: saved {saved.get(k)!r} vs now {current.get(k)!r}" for k in diffs)
      raise ValueError(f"checkpoints in {self._manager.directory} come from an incompatible "
                       f"config ({detail}); use another --workdir or the same settings. "
                       "Nothing was changed.")

  def save(self, state: TrainState, data_iterator: Any, config: dict) -> None:
    self._manager.save(int(state.step), args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=grain.checkpoint.CheckpointSave(data_iterator),
        config=ocp.args.JsonSave(config)))

  def restore(self, abstract_state: TrainState, data_iterator: Any) -> TrainState:
    """Restores the latest state (with the shardings of `abstract_state`) and the iterator."""
    step = self.latest_step()
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state),
        data=grain.checkpoint.CheckpointRestore(data_iterator)))
    return restored["state"]

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()


def abstract_like(state_shapes: TrainState, shardings: TrainState) -> TrainState:
  """ShapeDtypeStructs carrying shardings, the restore target."""
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                      state_shapes, shardings)
