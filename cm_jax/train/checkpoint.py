"""Orbax checkpoints of a run: train state, data iterator position and config.

One `CheckpointManager` per workdir (`<workdir>/checkpoints`), saving
asynchronously so training continues while arrays are written; train.py,
sample.py and evaluate.py all read the same directory.
"""
from __future__ import annotations

import contextlib
import json
from typing import Any, Optional

import jax
import ml_collections
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

# The directory layout and the config reader live below cm_jax.methods (cm_jax.runs), so
# the CD teacher and sample.py read runs without importing the trainer; re-exported here.
from cm_jax.runs import (CHECKPOINT_SUBDIR, CHECKSUM_VERSION, ITEM_NAMES, checkpoint_dir,  # noqa: F401
                         config_from_json, describe_failure, is_remote, load_config,
                         read_data_position,
                         read_newest_readable, verify_restored, with_default_sharding)
from cm_jax.utils import checksums

UNREADABLE_SUFFIX = "_unreadable"  # <workdir>/checkpoints_unreadable/<step>: set aside


class CheckpointSaveError(RuntimeError):
  """A checkpoint could not be written (disk full, permissions, a lost bucket)."""


class RunCheckpoints:
  """Save / restore (state, data position, config) by step in a workdir."""

  def __init__(self, workdir: str, max_to_keep: Optional[int] = 3, async_save: bool = True,
               read_only: bool = False, keep_period: Optional[int] = None):
    """keep_period: steps that are multiples of it are never deleted (a method with rounds
    keeps the checkpoint that ends each round: that round's finished student)."""
    self.workdir, self.read_only = workdir, read_only
    self.directory = checkpoint_dir(workdir)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, enable_async_checkpointing=async_save,
        create=not read_only, read_only=read_only, keep_period=keep_period)
    self.manager = ocp.CheckpointManager(
        self.directory, options=options, item_names=ITEM_NAMES)

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def save(self, step: int, state, data_state: dict, config: ml_collections.ConfigDict,
           wait: bool = False) -> None:
    sums, _ = checksums.tree_stats(state)  # of what is written, before it is written
    with self._saving():
      self.manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state),
          data=ocp.args.JsonSave(data_state),
          config=ocp.args.JsonSave(json.loads(config.to_json())),
          checksums=ocp.args.JsonSave({"version": CHECKSUM_VERSION, "sums": sums})))
      if wait:
        self.manager.wait_until_finished()

  def check_saved(self) -> None:
    """CheckpointSaveError, in one line, as soon as an asynchronous save has failed (Orbax
    would only say so at the next save, inside hundreds of lines of tracebacks)."""
    with self._saving():
      self.manager.check_for_errors()

  @contextlib.contextmanager
  def _saving(self):
    """Any failure of a save (this one, or an earlier background one it raises) as one
    CheckpointSaveError line; the error names no step, since it may be an earlier one's."""
    try:
      yield
    except Exception as e:  # pylint: disable=broad-except  (OSError, Orbax's own wrappers)
      try:
        self.manager.reload()
        good = self.manager.latest_step()
      except Exception:  # pylint: disable=broad-except
        good = None
      raise CheckpointSaveError(
          f"a checkpoint save in {self.directory} failed ({describe_failure(e)}); the last good "
          f"checkpoint is {'step ' + str(good) if good is not None else 'none'}: free the "
          f"space and rerun the same command to continue from it") from None

  def restore(self, abstract_state, step: Optional[int] = None) -> tuple[Any, dict, int]:
    """(state, data position, step) of `step`, by default of the newest checkpoint that
    reads: newer unreadable ones (a truncated or zeroed file, an empty step directory)
    are reported in one loud line each and, unless read-only, moved to
    <workdir>/checkpoints_unreadable/ (never deleted: the run will save those step
    numbers again). One line when none reads."""
    state_args = ocp.args.Composite(
        state=ocp.args.StandardRestore(with_default_sharding(abstract_state)))
    def read(manager, s):
      restored = manager.restore(s, args=state_args)
      verify_restored(manager, s, restored.state, "", f"the train state of step {s}")
      return restored.state, read_data_position(manager, s)

    restored, step = read_newest_readable(
        self.manager, self.workdir, step, read,
        set_aside=None if self.read_only else self._set_aside)
    if not self.read_only:
      self.manager.reload()  # forget the steps moved aside
    return restored[0], restored[1], step

  def _set_aside(self, step: int) -> str:
    """Moves checkpoint `step` out of the manager's directory; returns where it went."""
    dest = epath.Path(self.directory + UNREADABLE_SUFFIX) / str(step)
    if jax.process_index() == 0:
      dest.parent.mkdir(parents=True, exist_ok=True)
      suffix = 0
      while dest.exists():  # an earlier run set the same step aside
        suffix += 1
        dest = dest.parent / f"{step}.{suffix}"
      (epath.Path(self.directory) / str(step)).rename(dest)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"cm_jax: checkpoint {step} set aside")
    return str(dest)

  def wait(self) -> None:
    with self._saving():
      self.manager.wait_until_finished()

  def close(self) -> None:
    try:
      self.wait()
    finally:
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
