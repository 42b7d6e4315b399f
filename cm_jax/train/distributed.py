"""Multi-process start-up: `jax.distributed.initialize` from flags or the environment.

One process per host (TPU VM, GPU node) runs the same command. Where JAX can
detect the cluster (Cloud TPU pods, SLURM, Open MPI, Kubernetes) a plain
`jax.distributed.initialize()` finds the coordinator, the process count and
this process's id by itself: pass `--distributed` to train.py. Elsewhere give
them explicitly, as flags

  python train.py ... --coordinator_address=10.0.0.1:1234 --num_processes=2 --process_id=0

or as environment variables JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and
JAX_PROCESS_ID. Must run before anything touches a JAX device.

On CPU, cross-process collectives use gloo (JAX's default CPU collectives;
set here explicitly so an older default cannot silently break them).
"""
from __future__ import annotations

import os
from typing import Optional

import jax

ENV_ADDRESS = "JAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"


def _env_int(name: str) -> Optional[int]:
  value = os.environ.get(name, "").strip()
  return int(value) if value else None


def initialize(coordinator_address: Optional[str] = None, num_processes: Optional[int] = None,
               process_id: Optional[int] = None, *, auto: bool = False,
               timeout_s: int = 300) -> bool:
  """Joins the multi-process run the arguments (or environment) describe.

  Returns False, doing nothing, when nothing asks for a multi-process run
  (no address, count or id given, `auto` False): a single-process run.
  With `auto` and nothing given, JAX detects the cluster (TPU pods, SLURM, ...).
  """
  address = coordinator_address or os.environ.get(ENV_ADDRESS) or None
  count = num_processes if num_processes is not None else _env_int(ENV_NUM_PROCESSES)
  index = process_id if process_id is not None else _env_int(ENV_PROCESS_ID)
  if not auto and address is None and count is None and index is None:
    return False
  if count == 1 and not auto:
    return False
  try:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  except (AttributeError, ValueError):  # option renamed or gone: JAX's own default then
    pass
  jax.distributed.initialize(coordinator_address=address, num_processes=count,
                             process_id=index, initialization_timeout=int(timeout_s))
  return True


def describe() -> str:
  return (f"process {jax.process_index()} of {jax.process_count()}: "
          f"{jax.local_device_count()} local / {jax.device_count()} global "
          f"{jax.devices()[0].platform} devices")
