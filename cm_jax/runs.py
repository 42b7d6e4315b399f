"""Reading a run directory for inference: its config and ONE copy of its weights.

`load_run(workdir, which=None, step=None) -> Run` is what every reader that only needs
parameters uses (sample.py, evaluate.py, the CD teacher, cm_search, interop export, the
benchmarks). It restores only the chosen subtree of the checkpoint's train state
(`params` or `ema/<name>`), never the optimizer state, the other EMA copies or the
target, with Orbax's partial restore, as arrays replicated over this machine's devices.
Resuming training needs the whole state: that is cm_jax.train.restore.

This module sits below cm_jax.methods and must not import cm_jax.train or
cm_jax.methods (tests/test_layering.py); cm_jax.train.checkpoint and cm_jax.train.ema
re-export what they share with it (checkpoint_dir, load_config, ema_names, ...).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Optional

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

CHECKPOINT_SUBDIR = "checkpoints"
ITEM_NAMES = ("state", "data", "config")
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
              "config": ocp.JsonCheckpointHandler()}
  return ocp.CheckpointManager(directory, item_handlers=handlers,
                               options=ocp.CheckpointManagerOptions(read_only=True, create=False))


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
    step = _resolve_step(manager, workdir, step)
    raw = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore())).config
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
    step = _resolve_step(manager, workdir, step)
    head = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore(),
                                                         data=ocp.args.JsonRestore()))
    config = config_from_json(head.config)
    which = which or config.get("sample", {}).get("params", "ema")
    name = choose_copy(which, ema_names(config.ema))
    path = ("params",) if name == "online" else ("ema", name)
    saved = manager.item_metadata(step)["state"]
    saved = getattr(saved, "tree", saved)
    node = saved
    for key in path:
      if not isinstance(node, dict) or key not in node:
        raise ValueError(f"{checkpoint_dir(workdir)} step {step} holds no {'/'.join(path)} "
                         f"copy (its config asks for it; was the checkpoint written by "
                         f"another version?)")
      node = node[key]
    sharding = replicated_sharding()
    abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype,
                                                           sharding=sharding), node)
    for key in reversed(path):
      abstract = {key: abstract}
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        item=abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
        partial_restore=True)))
  finally:
    manager.close()
  params = restored.state
  for key in path:
    params = params[key]
  return Run(config=config, params=params, step=int(step), which=name,
             kind=run_kind(config, head.data))
