"""The run directory train.py is given: checked before anything is built, and not left
behind empty when the run is refused before it wrote anything."""
from __future__ import annotations

import os
import shutil

from cm_jax.runs import is_remote


def check_usable(workdir: str) -> bool:
  """ValueError (one line) when `workdir` cannot hold a run: it is a file, it or the
  directory it would be made in is not writable, or a parent is a file. Returns whether
  it exists already. Remote paths (gs://...) are left to the storage layer."""
  if is_remote(workdir):
    return True
  path = os.path.abspath(workdir)
  if os.path.exists(path):
    if not os.path.isdir(path):
      raise ValueError(f"--workdir {workdir!r} is a file, not a directory: give a directory "
                       f"for the run (new or one train.py wrote)")
    if not os.access(path, os.W_OK | os.X_OK):
      raise ValueError(f"--workdir {workdir!r} is not writable by this user")
    return True
  parent = os.path.dirname(path)
  while not os.path.exists(parent):
    parent = os.path.dirname(parent)
  if not os.path.isdir(parent):
    raise ValueError(f"--workdir {workdir!r} cannot be made: {parent!r} is a file")
  if not os.access(parent, os.W_OK | os.X_OK):
    raise ValueError(f"--workdir {workdir!r} cannot be made: {parent!r} is not writable "
                     f"by this user")
  return False


def remove_if_empty(workdir: str) -> None:
  """Deletes `workdir` when it holds directories only (what a refused run makes before its
  first checkpoint); anything with a file in it stays."""
  if is_remote(workdir) or not os.path.isdir(workdir):
    return
  for _, _, files in os.walk(workdir):
    if files:
      return
  shutil.rmtree(workdir, ignore_errors=True)
