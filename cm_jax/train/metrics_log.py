"""Training metrics to `<workdir>/metrics.jsonl`, and to TensorBoard where installed.

Local workdirs get the file appended line by line. Remote ones (gs://...,
where objects cannot be appended to) get the whole file rewritten through
etils.epath at each write: a few hundred bytes per logged step.
"""
from __future__ import annotations

import json
import os

from etils import epath


def _is_remote(path: str) -> bool:
  return "://" in str(path)


class MetricsLog:
  def __init__(self, workdir: str, enabled: bool = True):
    self.enabled = enabled
    self.remote = _is_remote(workdir)
    self.path = (str(workdir).rstrip("/") + "/metrics.jsonl" if self.remote
                 else os.path.join(workdir, "metrics.jsonl"))
    self._lines = None
    self._tb = None
    if enabled and self.remote:
      p = epath.Path(self.path)
      self._lines = p.read_text().splitlines(keepends=True) if p.exists() else []
    if enabled and not self.remote:
      try:  # Optional: tensorboardX writes event files without TensorFlow.
        from tensorboardX import SummaryWriter
        self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
      except ImportError:
        pass

  def write(self, step: int, metrics: dict) -> None:
    if not self.enabled:
      return
    row = {"step": int(step), **{k: float(v) for k, v in metrics.items()}}
    line = json.dumps(row) + "\n"
    if self.remote:
      self._lines.append(line)
      epath.Path(self.path).write_text("".join(self._lines))
    else:
      with open(self.path, "a") as f:
        f.write(line)
    if self._tb is not None:
      for k, v in row.items():
        if k != "step":
          self._tb.add_scalar(k, v, step)
      self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
