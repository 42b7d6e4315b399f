"""Reading a run directory for inference: its config and ONE copy of its weights.

`load_run(workdir, which=None, step=None) -> Run` is what every reader that only needs
parameters uses (sample.py, evaluate.py, the CD teacher, cm_search, interop export, the
benchmarks). It restores only the chosen subtree of the checkpoint's train state
(`params` or `ema/<name>`), never the optimizer state, the other EMA copies or the
target, with Orbax's partial restore, as arrays replicated over this machine's devices.
Resuming training needs the whole state: that is cm_jax.train.restore.

Damage (cm_jax.train.checkpoint saves a checksum item with every step): without a step
number, readers take the newest checkpoint that reads and whose arrays match their saved
checksums, with one warning line per step passed over; a step asked for by number fails
in one line instead (UnreadableCheckpointError).

This module sits below cm_jax.methods and must not import cm_jax.train or
cm_jax.methods (tests/test_layering.py); cm_jax.train.checkpoint and cm_jax.train.ema
re-export what they share with it (checkpoint_dir, load_config, ema_names, ...).
"""
from __future__ import annotations

import dataclasses
import os
import sys
from typing import Any, Optional

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from cm_jax.utils import checksums

CHECKPOINT_SUBDIR = "checkpoints"
ITEM_NAMES = ("state", "data", "config", "checksums")
CHECKSUM_VERSION = 1  # the checksums item: {"version", "sums": {path: [s1, s2]}}
HALFLIFE = "halflife"  # the name of EDM's half-life EMA copy
FITTED_KIND = "fitted"  # config.method.kind of a run written by cm_jax.train.fit
KINDS = ("trained", "imported", FITTED_KIND)


# ----------------------------------------------------------------------------- EMA copy names


def rate_name(rate: float) -> str:
  return f"ema_{rate:g}"


def ema_names(ema_cfg) -> tuple[str, ...]:
  """Names of the EMA copies a config asks for, in a stable order."""
  names = [rate_name(r) for r in ema_cfg.rates]
  if ema_cfg.halflife_kimg > 0:
    names.append(HALFLIFE)
  return tuple(names)


def choose_copy(which: str, names) -> str:
  """The parameter copy `which` names: 'online' -> 'online' (the trained params);
  'ema' -> the half-life EMA if the run keeps one, else its first fixed-rate EMA (or
  'online' when it keeps none); anything else must be one of `names` (the run's EMAs).
  An unknown name is a one-line ValueError listing the available ones."""
  names = tuple(names)
  if which == "online" or (which == "ema" and not names):
    return "online"
  if which == "ema":
    return HALFLIFE if HALFLIFE in names else names[0]
  if which not in names:
    raise ValueError(f"no EMA named {which!r} in this run; it has {sorted(names)} "
                     f"(or use 'online' / 'ema')")
  return which


# ----------------------------------------------------------------------------- directories


def is_remote(path) -> bool:
  """gs://, s3://, ...: paths that go through etils.epath rather than the OS."""
  return "://" in str(path)


def checkpoint_dir(workdir: str) -> str:
  if is_remote(workdir):  # e.g. gs://bucket/runs/x on a TPU pod: Orbax writes it directly
    return str(workdir).rstrip("/") + "/" + CHECKPOINT_SUBDIR
  return os.path.join(os.path.abspath(workdir), CHECKPOINT_SUBDIR)


def _reader(workdir: str) -> ocp.CheckpointManager:
  directory = checkpoint_dir(workdir)
  if not epath.Path(directory).is_dir():
    raise FileNotFoundError(f"{workdir!r} has no checkpoints/ directory: train a model there "
                            f"first (python train.py --config ... --workdir {workdir})")
  handlers = {"state": ocp.PyTreeCheckpointHandler(), "data": ocp.JsonCheckpointHandler(),
              "config": ocp.JsonCheckpointHandler(), "checksums": ocp.JsonCheckpointHandler()}
  return ocp.CheckpointManager(directory, item_handlers=handlers,
                               options=ocp.CheckpointManagerOptions(read_only=True, create=False))


class UnreadableCheckpointError(FileNotFoundError):
  """No checkpoint that was asked for (or, for the latest, none at all) could be read."""


class ChecksumMismatchError(ValueError):
  """Arrays read back differ from what was saved (bytes changed on disk)."""


class RunRequestError(ValueError):
  """The checkpoint was read but holds no such copy: the request is wrong, not the file."""


_WARNED = set()  # (directory, step, what became of it) already reported, once per process


def describe_failure(e: BaseException) -> str:
  """One short line for a failed read (Orbax raises a bare Exception with TensorStore's
  multi-line details for a damaged data file)."""
  text = (str(e).strip().splitlines() or [""])[0].split(" See full TensorStore")[0]
  text = text if len(text) <= 160 else text[:157] + "..."
  return f"{type(e).__name__}: {text}" if text else type(e).__name__


def warn_skipped(directory: str, step: int, reason: str, used: int,
                 kept: str = "left in place") -> None:
  """The loud line for a checkpoint passed over as unreadable (printed once)."""
  if (directory, step, kept) not in _WARNED:
    _WARNED.add((directory, step, kept))
    print(f"warning: checkpoint step {step} in {directory} is unreadable ({reason}); "
          f"using step {used}; the broken step is {kept}", file=sys.stderr, flush=True)


def read_newest_readable(manager, workdir: str, step: Optional[int], read, set_aside=None):
  """(read(manager, s), s) for `step`, or when it is None for the newest step that reads:
  newer unreadable ones are reported (warn_skipped) and passed over, left in place or,
  with `set_aside(step) -> where`, moved there first. One-line UnreadableCheckpointError
  when the step asked for, or every step, fails."""
  directory = checkpoint_dir(workdir)
  if step is not None:
    steps = [_resolve_step(manager, workdir, step)]
  else:
    steps = sorted(manager.all_steps(), reverse=True)
    if not steps:
      raise FileNotFoundError(f"no checkpoint saved yet in {directory}")
  failures = []
  for s in steps:
    try:
      result = read(manager, s)
    except RunRequestError:
      raise
    except Exception as e:  # pylint: disable=broad-except  (Orbax: bare Exception, KeyError)
      failures.append((s, describe_failure(e)))
      continue
    for bad, reason in failures:
      kept = f"moved to {set_aside(bad)}" if set_aside is not None else "left in place"
      warn_skipped(directory, bad, reason, s, kept)
    return result, s
  if step is not None:
    raise UnreadableCheckpointError(f"checkpoint step {step} in {directory} is unreadable "
                                    f"({failures[0][1]})")
  raise UnreadableCheckpointError(f"no checkpoint in {directory} could be read (" + "; ".join(
      f"step {bad}: {reason}" for bad, reason in failures) + ")")


def saved_checksums(manager, step: int) -> Optional[dict]:
  """The checksums saved with checkpoint `step`, or None (written before checksums)."""
  try:
    item = manager.restore(step, args=ocp.args.Composite(
        checksums=ocp.args.JsonRestore())).checksums
  except KeyError:  # Orbax: 'Item "checksums" was not found in the checkpoint'
    return None
  return item.get("sums") if isinstance(item, dict) else None


def verify_restored(manager, step: int, tree, prefix: str, what: str) -> None:
  """Raises ChecksumMismatchError (the checkpoint counts as unreadable) when `tree`, read
  from checkpoint `step` at `prefix` of its train state, differs from what was saved;
  reports NaN/inf in it in one line (the weights read back as saved, but are not usable)."""
  sums, nonfinite = checksums.tree_stats(tree, prefix)
  saved = saved_checksums(manager, step)
  if saved is not None:
    bad = checksums.mismatches(saved, sums)
    if bad:
      raise ChecksumMismatchError(f"checksum mismatch in {len(bad)} of {len(sums)} arrays, "
                                  f"e.g. {bad[0]}: the bytes on disk changed after saving")
  if nonfinite:
    print(f"warning: {what} in {manager.directory} holds NaN/inf in {len(nonfinite)} "
          f"arrays, e.g. {nonfinite[0]}", file=sys.stderr, flush=True)


def _resolve_step(manager, workdir: str, step: Optional[int]) -> int:
  step = manager.latest_step() if step is None else int(step)
  if step is None:
    raise FileNotFoundError(f"no checkpoint saved yet in {checkpoint_dir(workdir)}")
  saved = sorted(manager.all_steps())
  if step not in saved:
    raise FileNotFoundError(f"no checkpoint at step {step} in {checkpoint_dir(workdir)} "
                            f"(it has steps {saved}; a run with rounds writes a round's "
                            f"student when the round ends)")
  return step


def config_from_json(raw: dict) -> ml_collections.ConfigDict:
  """JSON turned tuples into lists; networks want hashable tuples back."""

  def fix(value):
    if isinstance(value, dict):
      return ml_collections.ConfigDict({k: fix(v) for k, v in value.items()})
    if isinstance(value, list):
      return tuple(fix(v) for v in value)
    return value

  return fix(raw)


def load_config(workdir: str, step: Optional[int] = None) -> ml_collections.ConfigDict:
  """The config a run was trained with, read back from its checkpoint `step` (default latest)."""
  manager = _reader(workdir)
  try:
    raw, _ = read_newest_readable(manager, workdir, step, lambda m, s: m.restore(
        s, args=ocp.args.Composite(config=ocp.args.JsonRestore())).config)
  finally:
    manager.close()
  return config_from_json(raw)


def replicated_sharding():
  """Every array whole on every local device (a 1-D mesh over jax.devices())."""
  from jax.sharding import Mesh, NamedSharding, PartitionSpec  # pylint: disable=g-import-not-at-top
  return NamedSharding(Mesh(np.asarray(jax.devices()), ("all",)), PartitionSpec())


def with_default_sharding(abstract_tree):
  """Leaves without a sharding restore replicated over every device.

  Orbax would otherwise reuse the sharding recorded at save time, which names
  devices of the training topology (an FSDP mesh of 8 devices, a pod) that
  sample.py or evaluate.py on another machine do not have.
  """
  default = None

  def fill(x):
    nonlocal default
    if not isinstance(x, jax.ShapeDtypeStruct) or getattr(x, "sharding", None) is not None:
      return x
    if default is None:
      default = replicated_sharding()
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=default)

  return jax.tree.map(fill, abstract_tree)


# ----------------------------------------------------------------------------- load_run


@dataclasses.dataclass(frozen=True)
class Run:
  """One parameter copy of a run and what it came from."""
  config: ml_collections.ConfigDict
  params: Any          # pytree of jax arrays, replicated on the local devices
  step: int
  which: str           # 'online' or the EMA's name
  kind: str            # 'trained' | 'imported' | 'fitted'


def run_kind(config, data_item: Optional[dict]) -> str:
  """'imported' (python -m cm_jax.interop import wrote it), 'fitted' (the config's method
  declares a fit: config.method.kind == 'fitted'), else 'trained'."""
  if isinstance(data_item, dict) and data_item.get("imported"):
    return "imported"
  method = config.get("method") if hasattr(config, "get") else None
  if method is not None and method.get("kind", "") == FITTED_KIND:
    return FITTED_KIND
  return "trained"


def load_run(workdir: str, which: Optional[str] = None, step: Optional[int] = None) -> Run:
  """The config and the `which` weights of `workdir`'s checkpoint `step` (default: the latest).

  `which`: 'online', 'ema' (the half-life EMA if the run keeps one, else its first
  fixed-rate EMA) or an EMA's name (see `choose_copy`); default: config.sample.params,
  else 'ema'. Only that subtree of the train state is read.
  """
  manager = _reader(workdir)
  try:
    (config, params, name, data), step = read_newest_readable(
        manager, workdir, step, lambda m, s: _read_copy(m, workdir, s, which))
  finally:
    manager.close()
  return Run(config=config, params=params, step=int(step), which=name,
             kind=run_kind(config, data))


def _read_copy(manager, workdir: str, step: int, which: Optional[str]):
  """(config, the `which` weights, their name, the data item) of checkpoint `step`."""
  head = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
  config = config_from_json(head.config)
  which = which or config.get("sample", {}).get("params", "ema")
  try:
    name = choose_copy(which, ema_names(config.ema))
  except ValueError as e:
    raise RunRequestError(str(e)) from None
  path = ("params",) if name == "online" else ("ema", name)
  saved = manager.item_metadata(step)["state"]
  saved = getattr(saved, "tree", saved)
  node = saved
  for key in path:
    if not isinstance(node, dict) or key not in node:
      raise RunRequestError(f"{checkpoint_dir(workdir)} step {step} holds no "
                            f"{'/'.join(path)} copy (its config asks for it; was the "
                            f"checkpoint written by another version?)")
    node = node[key]
  sharding = replicated_sharding()
  abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype,
                                                         sharding=sharding), node)
  for key in reversed(path):
    abstract = {key: abstract}
  restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
      item=abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
      partial_restore=True)))
  params = restored.state
  for key in path:
    params = params[key]
  copy = "/".join(path)
  verify_restored(manager, step, params, copy, f"the {copy} weights of step {step}")
  return config, params, name, _data_item_or_none(manager, step)


def read_data_position(manager, step: int) -> dict:
  """The data item of checkpoint `step` (the data position; whether the run was imported),
  read on its own so that a damaged one is named by its file: one-line ValueError."""
  try:
    data = manager.restore(step, args=ocp.args.Composite(data=ocp.args.JsonRestore())).data
  except Exception as e:  # pylint: disable=broad-except  (Orbax: bare Exception, KeyError)
    # The step directory is named by the caller's warning; the file is named here.
    raise ValueError(f"data position {step}/data/metadata: {describe_failure(e)}") from None
  if not isinstance(data, dict):
    raise ValueError(f"data position {step}/data/metadata holds {type(data).__name__}, "
                     f"not a JSON object")
  return data


def _data_item_or_none(manager, step: int) -> Optional[dict]:
  """The data item, or None when it does not read: a reader never needs the data position,
  so its damage must not block sampling."""
  try:
    return read_data_position(manager, step)
  except ValueError:
    return None
