"""Training metrics to `<workdir>/metrics.jsonl`, and to TensorBoard where installed.

Local workdirs get the file appended line by line. Remote ones (gs://...,
where objects cannot be appended to) get the whole file rewritten through
etils.epath at each write: a few hundred bytes per logged step.

A run resumed from step S replays the steps after S, so the log opened with
`resume_step=S` first drops the rows after S (logged after the checkpoint a
kill -9 left behind) and a torn last line: each step is in the file once.
"""
from __future__ import annotations

import json
import os
from typing import Optional

from etils import epath


def _is_remote(path: str) -> bool:
  return "://" in str(path)


def _rows_up_to(lines, step: int) -> list[str]:
  """The complete lines whose step is <= `step` (a line cut short by a kill is dropped)."""
  kept = []
  for line in lines:
    try:
      row = json.loads(line)
    except ValueError:
      continue
    if line.endswith("\n") and isinstance(row, dict) and int(row.get("step", -1)) <= step:
      kept.append(line)
  return kept


class MetricsLog:
  def __init__(self, workdir: str, enabled: bool = True, resume_step: Optional[int] = None):
    self.enabled = enabled
    self.remote = _is_remote(workdir)
    self.path = (str(workdir).rstrip("/") + "/metrics.jsonl" if self.remote
                 else os.path.join(workdir, "metrics.jsonl"))
    self._lines = None
    self._tb = None
    if enabled and self.remote:
      p = epath.Path(self.path)
      self._lines = p.read_text().splitlines(keepends=True) if p.exists() else []
      if resume_step is not None:
        self._lines = _rows_up_to(self._lines, resume_step)
        p.write_text("".join(self._lines))
    elif enabled and resume_step is not None and os.path.exists(self.path):
      with open(self.path) as f:
        lines = f.read().splitlines(keepends=True)
      kept = _rows_up_to(lines, resume_step)
      if kept != lines:  # rewritten whole and renamed over, so a kill here loses nothing
        with open(self.path + ".tmp", "w") as f:
          f.write("".join(kept))
        os.replace(self.path + ".tmp", self.path)
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
