"""Orbax checkpoints of a run: train state, data iterator position and config.

One `CheckpointManager` per workdir (`<workdir>/checkpoints`), saving
asynchronously so training continues while arrays are written; train.py,
sample.py and evaluate.py all read the same directory.
"""
from __future__ import annotations

import json
from typing import Any, Optional

import jax
import ml_collections
import orbax.checkpoint as ocp

# The directory layout and the config reader live below cm_jax.methods (cm_jax.runs), so
# the CD teacher and sample.py read runs without importing the trainer; re-exported here.
from cm_jax.runs import (CHECKPOINT_SUBDIR, checkpoint_dir, config_from_json, is_remote,  # noqa: F401
                         load_config, with_default_sharding)


class RunCheckpoints:
  """Save / restore (state, data position, config) by step in a workdir."""

  def __init__(self, workdir: str, max_to_keep: Optional[int] = 3, async_save: bool = True,
               read_only: bool = False, keep_period: Optional[int] = None):
    """keep_period: steps that are multiples of it are never deleted (a method with rounds
    keeps the checkpoint that ends each round: that round's finished student)."""
    self.directory = checkpoint_dir(workdir)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, enable_async_checkpointing=async_save,
        create=not read_only, read_only=read_only, keep_period=keep_period)
    self.manager = ocp.CheckpointManager(
        self.directory, options=options, item_names=("state", "data", "config"))

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def save(self, step: int, state, data_state: dict, config: ml_collections.ConfigDict,
           wait: bool = False) -> None:
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=ocp.args.JsonSave(data_state),
        config=ocp.args.JsonSave(json.loads(config.to_json()))))
    if wait:
      self.manager.wait_until_finished()

  def restore(self, abstract_state, step: Optional[int] = None) -> tuple[Any, dict, int]:
    """(state, data position, step) of `step` (default: the latest)."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(with_default_sharding(abstract_state)),
        data=ocp.args.JsonRestore()))
    return restored.state, restored.data, step

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def process_data_states(states: list) -> dict:
  """The checkpoint's data item: every process's iterator state, by process index.

  Each process reads its own shard of the data, so a multi-process run has one
  iterator state per process; the loop gathers them (a collective) and the
  primary process writes them as one JSON item.
  """
  return {"process_count": len(states), "processes": list(states)}


def data_state_for_process(data: dict, process_index: int, process_count: int) -> dict:
  """This process's iterator state from a checkpoint's data item (see process_data_states).

  A checkpoint written before per-process states holds one iterator state as is;
  one made by `python -m cm_jax.interop import` holds none (None: start the data afresh).
  """
  if data.get("imported"):
    return None
  if "processes" not in data:
    if process_count != 1:
      raise ValueError("this checkpoint holds one data iterator state (a single-process run); "
                       f"it cannot resume {process_count} processes exactly")
    return data
  saved = int(data["process_count"])
  if saved != process_count:
    raise ValueError(f"the checkpoint was written by {saved} process(es), this run has "
                     f"{process_count}: each process's data position cannot be resumed exactly "
                     f"(start a new workdir, or run with {saved} processes)")
  return data["processes"][process_index]


def abstract_like(tree):
  """ShapeDtypeStructs (with shardings where known) to restore into."""
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), tree)
