"""The two shardings every batched reader uses: rows split over the mesh's batch axes,
and parameters replicated. Below everything that compiles with a mesh (sampling,
evaluation, the trainer's cm_jax.train.parallel, which re-exports these)."""
from __future__ import annotations

import math

from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"
FSDP_AXIS = "fsdp"
BATCH_AXES = (DATA_AXIS, FSDP_AXIS)


def _batch_axes(mesh: Mesh) -> tuple[str, ...]:
  return tuple(a for a in BATCH_AXES if a in mesh.axis_names)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Rows split over every batch axis of the mesh (data, then fsdp)."""
  return NamedSharding(mesh, P(_batch_axes(mesh)))


def batch_divisor(mesh: Mesh) -> int:
  """How many ways `batch_sharding` splits the rows (a batch must be a multiple)."""
  return int(math.prod(mesh.shape[a] for a in _batch_axes(mesh)))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())
