"""Metrics to a JSONL file (one object per log, flushed at once) and to TensorBoard event files
(flushed at every checkpoint and at exit, so a killed run loses no more TensorBoard history than
it loses training)."""

import json
import os
import time

from tensorboardX import SummaryWriter


class MetricWriter:
  """Appends to <workdir>/metrics.jsonl and <workdir>/tensorboard/ (resumed runs append)."""

  def __init__(self, workdir: str):
    os.makedirs(workdir, exist_ok=True)
    self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
    self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, metrics: dict[str, float]) -> None:
    record = {"step": step, "time": time.time(), **{k: float(v) for k, v in metrics.items()}}
    self._jsonl.write(json.dumps(record) + "\n")
    self._jsonl.flush()
    for name, value in metrics.items():
      self._tb.add_scalar(name, float(value), step)

  def flush(self) -> None:
    self._tb.flush()

  def close(self) -> None:
    self._jsonl.close()
    self._tb.close()
