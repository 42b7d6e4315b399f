"""Device mesh, shardings and the compiled train step.

The step is compiled once by `jax.jit` over a `Mesh` with named shardings:
the batch is split along the `data` axis, the state is replicated (FSDP and
the pmap path plug in here later without touching the step). Global batches
are assembled from each process's local rows with
`jax.make_array_from_process_local_data`, which is also right for one process.
"""
from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def make_mesh(mesh_cfg=None) -> Mesh:
  """A 1-D mesh over all devices (mesh_cfg.data = -1) or the first `data` of them."""
  devices = jax.devices()
  size = len(devices)
  if mesh_cfg is not None and mesh_cfg.get("data", -1) not in (-1, None):
    size = int(mesh_cfg.data)
    if size > len(devices):
      raise ValueError(f"mesh.data={size} but only {len(devices)} devices are visible")
  return Mesh(np.asarray(devices[:size]), (DATA_AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def check_batch_size(global_batch_size: int, mesh: Mesh) -> None:
  n = mesh.shape[DATA_AXIS]
  if global_batch_size % n:
    raise ValueError(f"batch size {global_batch_size} is not divisible by the {n} devices "
                     f"of the data axis")


def global_batch(local_batch: dict, mesh: Mesh) -> dict:
  """Per-process numpy rows -> one global jax.Array per key, sharded on `data`."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in local_batch.items()}


def compile_train_step(train_step, mesh: Mesh):
  """jit with the state replicated and donated, the batch split on `data`."""
  rep = replicated(mesh)
  return jax.jit(train_step,
                 in_shardings=(rep, batch_sharding(mesh), rep, rep),
                 out_shardings=(rep, rep),
                 donate_argnums=(0,))
