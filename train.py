"""Trains any cm_jax method from a config file.

  python train.py --config configs/digits_edm.py --workdir runs/digits_edm
  python train.py --config configs/digits_edm.py:tiny --workdir runs/t --steps 10
  python train.py --config configs/imagenet64_edm.py --dry_run
  python train.py --config configs/cifar10_edm.py --workdir runs/c --config.optim.lr=5e-4

A method with fit() instead of a loss (cm_jax.train.fit) is fitted once into an
empty --workdir and saved as a run that sample.py reads.

Runs resume from the newest checkpoint in --workdir automatically. SIGTERM or
SIGINT (preemption, Ctrl-C) finishes the current step, saves a checkpoint and
exits 0; rerunning the same command continues exactly.

Several processes (one per host) run the same command:
  python train.py ... --distributed          # TPU pods, SLURM, Open MPI, k8s: auto-detected
  python train.py ... --coordinator_address=HOST:PORT --num_processes=N --process_id=I
(or JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID in the environment).
"""
import sys

import jax
import jax.numpy as jnp
from absl import app, flags, logging
from ml_collections import config_flags

from cm_jax.cli.flag_errors import parse_flags_or_exit
from cm_jax.train import builders, checkpoint, distributed, fit, loop, parallel
from cm_jax.train import workdir as workdir_lib
from cm_jax.train.state import count_params, tree_bytes

_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/<data>_<method>.py[:variant]")
_WORKDIR = flags.DEFINE_string("workdir", None, "run directory: checkpoints, metrics, grids")
_STEPS = flags.DEFINE_integer("steps", None, "total train steps (overrides config.training.num_steps)")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "build the model abstractly, print its size, exit")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "multi-process run: jax.distributed.initialize() detects the cluster "
    "(TPU pods, SLURM, Open MPI, Kubernetes); implied by the three flags below")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "HOST:PORT of process 0 (env JAX_COORDINATOR_ADDRESS)")
_NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", None, "number of processes (env JAX_NUM_PROCESSES)")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "this process's index (env JAX_PROCESS_ID)")


def dry_run(config) -> None:
  parts = builders.build_parts(config)
  state = builders.abstract_train_state(parts, config)
  n = count_params(state.params)
  gib = tree_bytes(state) / 2**30
  print(f"network: {type(parts.net).__name__}  method: {config.method.name}  "
        f"data: {parts.image_shape} x {config.data.num_classes} classes")
  print(f"params: {n}")
  print(f"train state memory: {gib:.2f} GiB (params, optimizer moments, "
        f"{len(state.ema)} EMA, {'a' if state.target_params is not None else 'no'} target); "
        f"activations come on top and grow with batch size")
  frozen_shapes = getattr(parts.method, "abstract_frozen", None)
  frozen = frozen_shapes() if frozen_shapes is not None else {}
  for name, tree in frozen.items():
    print(f"frozen {name} params: {count_params(tree)}")
  fsdp = int(config.mesh.get("fsdp", 1) or 1)
  if fsdp > 1:
    min_size = config.mesh.get("fsdp_min_size", parallel.DEFAULT_FSDP_MIN_SIZE)
    per_device = sum(_bytes_per_device(t, fsdp, min_size) for t in [state, *frozen.values()])
    print(f"per device under FSDP over {fsdp} devices: {per_device / 2**30:.2f} GiB of train "
          f"state and frozen networks (compute dtype {config.model.get('dtype', 'float32')}; "
          f"weights and optimizer state stay float32), plus activations")


def _bytes_per_device(tree, fsdp: int, min_size: int) -> int:
  """Bytes one device holds of `tree` when each array is sharded by the FSDP rule
  (cm_jax.train.parallel.fsdp_spec: split along one dimension, or replicated)."""
  total = 0
  for x in jax.tree.leaves(tree):
    nbytes = x.size * jnp.dtype(x.dtype).itemsize
    sharded = any(a is not None for a in parallel.fsdp_spec(x.shape, fsdp, min_size))
    total += nbytes // fsdp if sharded else nbytes
  return total


def main(argv):
  del argv
  logging.set_verbosity(logging.ERROR)  # Orbax logs every file it writes
  config = _CONFIG.value
  if config is None:
    sys.exit("train.py: --config is required, e.g. --config configs/digits_edm.py")
  if _DRY_RUN.value:
    dry_run(config)
    return
  if not _WORKDIR.value:
    sys.exit("train.py: --workdir is required (where checkpoints and samples go)")
  try:
    existed = workdir_lib.check_usable(_WORKDIR.value)
  except ValueError as e:
    sys.exit(f"train.py: {e}")
  if distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                            auto=_DISTRIBUTED.value):
    print(distributed.describe(), flush=True)
  result = None
  try:
    if fit.is_fitted(builders.build_parts(config).method):  # no loss: fitted, not trained
      fit.fit_run(config, _WORKDIR.value)
    else:
      result = loop.run(config, _WORKDIR.value, num_steps=_STEPS.value)
  except (FileNotFoundError, ValueError, loop.NonFiniteLossError,
          checkpoint.CheckpointSaveError) as e:
    # Set-up errors (missing teacher or data, config mismatch) and a NaN stop are the
    # user's to fix: one line, not a traceback.
    sys.exit(f"train.py: {e}")
  finally:
    if not existed:  # a run refused before its first checkpoint leaves nothing behind
      workdir_lib.remove_if_empty(_WORKDIR.value)
  if result is not None and result.stopped_by and result.step < result.total:
    return  # the loop said where it stopped and how to continue; it is not done
  print(f"done: checkpoints in {_WORKDIR.value}/checkpoints; sample with "
        f"python sample.py --workdir {_WORKDIR.value} --num 64 --out {_WORKDIR.value}/samples.npz")


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags_or_exit)
