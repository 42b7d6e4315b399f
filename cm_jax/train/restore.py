"""Reading a run back for inference: the one place sample.py, evaluate.py, the benchmarks,
the CD teacher and interop restore a checkpoint's train state."""
from __future__ import annotations

from typing import Optional

from cm_jax.train import builders
from cm_jax.train.checkpoint import RunCheckpoints


def restore_train_state(workdir: str, config, parts: Optional[builders.RunParts] = None,
                        step: Optional[int] = None):
  """(train state, step) of `workdir`'s checkpoint `step` (default: the latest), read-only,
  into the shapes `config` builds."""
  parts = parts or builders.build_parts(config)
  ckpts = RunCheckpoints(workdir, read_only=True, async_save=False)
  try:
    state, _, step = ckpts.restore(builders.abstract_train_state(parts, config), step)
  finally:
    ckpts.close()
  return state, step
