"""Device mesh, sharding rules and the two ways of compiling the one train step.

The train step (cm_jax.train.step) is one pure function. This module wraps it:

- `jit` (default, `config.parallel = 'jit'`): a `Mesh` with a `data` and an
  `fsdp` axis (`config.mesh.data = -1` takes every device left after
  `config.mesh.fsdp`). The batch is split over both axes; parameters, EMA
  copies, the target net, the optimizer state and the teacher are sharded by
  `fsdp_spec` (each array along its largest dimension divisible by the fsdp
  size; small arrays replicated) and replicated over `data`. The step is
  `jax.jit` with these named shardings and the state donated. With fsdp = 1
  this is plain data parallelism.
- `pmap` (`config.parallel = 'pmap'`, the legacy path): the same step body
  under `jax.pmap`, gradients and metrics averaged with `lax.pmean`, the state
  replicated with a leading device axis.

Both present one interface to the loop (`Parallel`): place the state, build
global batches from each process's local rows
(`jax.make_array_from_process_local_data`, right for one process too), compile
the step, and give back a plain "host form" of the state (no device axis) that
is what checkpoints, sampling and callers see.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

# The batch / replicated shardings are shared with sampling and evaluation (cm_jax.utils).
from cm_jax.utils.sharding import (BATCH_AXES, DATA_AXIS, FSDP_AXIS, _batch_axes,  # noqa: F401
                                   batch_divisor, batch_sharding, replicated)

PMAP_AXIS = "batch"
DEFAULT_FSDP_MIN_SIZE = 2**14
# A per-example int32 column the loop adds to every local batch: 1 where this process
# has been asked to stop (SIGTERM / SIGINT). The compiled wrapper takes the max over the
# global batch, so every process reads the same value one step later and all of them
# stop at the same step (see cm_jax.train.loop).
PREEMPT_KEY = "_preempt"


# ----------------------------------------------------------------------------- meshes


def mesh_shape(mesh_cfg, num_devices: int) -> tuple[int, int]:
  """(data, fsdp) sizes from config.mesh: data = -1 takes every device left over."""
  get = (lambda k, d: mesh_cfg.get(k, d)) if mesh_cfg is not None else (lambda k, d: d)
  fsdp = int(get("fsdp", 1) or 1)
  data = get("data", -1)
  data = -1 if data is None else int(data)
  if fsdp < 1:
    raise ValueError(f"mesh.fsdp must be >= 1, got {fsdp}")
  if data == -1:
    if num_devices % fsdp:
      raise ValueError(f"mesh.fsdp={fsdp} does not divide the {num_devices} visible devices")
    data = num_devices // fsdp
  if data < 1 or data * fsdp > num_devices:
    raise ValueError(f"mesh data={data} x fsdp={fsdp} needs {data * fsdp} devices but only "
                     f"{num_devices} are visible")
  return data, fsdp


def make_mesh(mesh_cfg=None, devices=None) -> Mesh:
  """A (data, fsdp) mesh over the first data*fsdp devices (all of them by default).

  Built with `jax.make_mesh`, which orders devices for the physical topology
  (TPU slices, multi-host GPU) and whose axes here are `Auto` (GSPMD
  propagation), so shardings are given at the jit boundary only.
  """
  devices = list(jax.devices() if devices is None else devices)
  data, fsdp = mesh_shape(mesh_cfg, len(devices))
  auto = (jax.sharding.AxisType.Auto,) * 2
  return jax.make_mesh((data, fsdp), BATCH_AXES, axis_types=auto,
                       devices=devices[:data * fsdp])


def check_batch_size(global_batch_size: int, mesh_or_ways, grad_accum_steps: int = 1) -> None:
  ways = mesh_or_ways if isinstance(mesh_or_ways, int) else batch_divisor(mesh_or_ways)
  k = int(grad_accum_steps)
  if global_batch_size % (ways * k):
    what = f"{ways} batch shards" + (f" x {k} microbatches" if k > 1 else "")
    raise ValueError(f"batch size {global_batch_size} is not divisible by the {what} "
                     f"(= {ways * k})")


# ----------------------------------------------------------------- the sharding rule


def fsdp_spec(shape, fsdp_size: int, min_size: int = DEFAULT_FSDP_MIN_SIZE) -> P:
  """PartitionSpec of one state array under FSDP.

  Sharded along its largest dimension that the fsdp size divides (the later
  one on ties, usually output features); replicated when fsdp is 1, when the
  array has fewer than `min_size` elements (biases, norms, scalars: the
  all-gathers would cost more than the memory saved) or when no dimension
  divides.
  """
  shape = tuple(shape)
  if fsdp_size <= 1 or math.prod(shape) < min_size:
    return P()
  best = None
  for dim, n in enumerate(shape):
    if n % fsdp_size == 0 and (best is None or n >= shape[best]):
      best = dim
  if best is None:
    return P()
  spec = [None] * len(shape)
  spec[best] = FSDP_AXIS
  return P(*spec)


def tree_shardings(tree, mesh: Mesh, min_size: int = DEFAULT_FSDP_MIN_SIZE):
  """NamedShardings by `fsdp_spec` for every array of `tree` (arrays or ShapeDtypeStructs)."""
  fsdp = mesh.shape[FSDP_AXIS] if FSDP_AXIS in mesh.axis_names else 1
  return jax.tree.map(lambda x: NamedSharding(mesh, fsdp_spec(x.shape, fsdp, min_size)), tree)


def global_batch(local_batch: dict, mesh: Mesh) -> dict:
  """Per-process numpy rows -> one global jax.Array per key, split over (data, fsdp)."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in local_batch.items()}


def with_preempt_flag(train_step: Callable, axis_name: Optional[str] = None) -> Callable:
  """Wraps the step: takes PREEMPT_KEY out of the batch, reports its global max."""

  def wrapped(state, batch, rng, teacher_params=None):
    batch = dict(batch)
    flag = batch.pop(PREEMPT_KEY, None)
    state, metrics = train_step(state, batch, rng, teacher_params)
    if flag is not None:
      f = jnp.max(flag).astype(jnp.float32)
      if axis_name is not None:
        f = lax.pmax(f, axis_name)
      metrics = dict(metrics, preempt=f)
    return state, metrics

  return wrapped


def compile_train_step(train_step, mesh: Mesh, state_shardings=None, teacher_shardings=None):
  """jit with named shardings: state (donated) and teacher by rule, batch split, rest replicated.

  Without shardings given, the state and teacher are replicated (fsdp = 1).
  """
  rep = replicated(mesh)
  state_shardings = rep if state_shardings is None else state_shardings
  teacher_shardings = rep if teacher_shardings is None else teacher_shardings
  return jax.jit(train_step,
                 in_shardings=(state_shardings, batch_sharding(mesh), rep, teacher_shardings),
                 out_shardings=(state_shardings, rep),
                 donate_argnums=(0,))


# ---------------------------------------------------------- the loop's two wrappers


class Parallel:
  """What the loop needs from a parallelism: placement, batches, compilation, host form."""

  kind: str
  axis_name: Optional[str]  # the step's collective axis (pmap); None under jit
  mesh: Mesh

  def batch_divisor(self) -> int:
    raise NotImplementedError

  def init_state(self, init_fn: Callable, *args):
    """Runs `init_fn(*args) -> TrainState` straight into the device layout."""
    raise NotImplementedError

  def place_teacher(self, teacher_params):
    raise NotImplementedError

  def compile(self, train_step: Callable, state, teacher_params) -> Callable:
    """`fn(state, global batch, rng, teacher) -> (state, metrics)` (metrics unreplicated)."""
    raise NotImplementedError

  def batch(self, local_batch: dict) -> dict:
    raise NotImplementedError

  def to_host(self, state):
    """The state without any device axis (checkpoints, sampling, callers)."""
    raise NotImplementedError

  def from_host(self, state):
    raise NotImplementedError

  def sampling_state(self, state):
    """The state without a device axis, on `self.mesh` (what the loop's grids sample from)."""
    return self.to_host(state)

  def host_abstract(self, state):
    """ShapeDtypeStructs (with shardings) to restore a checkpoint into."""
    from cm_jax.train.checkpoint import abstract_like
    return abstract_like(self.to_host(state))


class JitParallel(Parallel):
  """jax.jit over a (data, fsdp) mesh with named shardings (the default)."""

  kind = "jit"
  axis_name = None

  def __init__(self, mesh: Mesh, fsdp_min_size: int = DEFAULT_FSDP_MIN_SIZE):
    self.mesh = mesh
    self.fsdp_min_size = int(fsdp_min_size)

  def batch_divisor(self) -> int:
    return batch_divisor(self.mesh)

  def shardings(self, tree):
    return tree_shardings(tree, self.mesh, self.fsdp_min_size)

  def init_state(self, init_fn, *args):
    abstract = jax.eval_shape(init_fn, *args)
    return jax.jit(init_fn, out_shardings=self.shardings(abstract))(*args)

  def place_teacher(self, teacher_params):
    if teacher_params is None:
      return None
    return jax.device_put(teacher_params, self.shardings(teacher_params))

  def compile(self, train_step, state, teacher_params):
    fn = compile_train_step(with_preempt_flag(train_step), self.mesh,
                            self.shardings(state),
                            None if teacher_params is None else self.shardings(teacher_params))
    return fn

  def batch(self, local_batch):
    return global_batch(local_batch, self.mesh)

  def to_host(self, state):
    return state

  def from_host(self, state):
    return jax.device_put(state, self.shardings(state))


class PmapParallel(Parallel):
  """jax.pmap over this process's devices: state replicated with a leading device axis.

  The host form of the state is the same arrays replicated (no device axis) on
  a mesh of those devices, which is what Orbax saves (unreplicated) and what
  sampling reads. Each device's batch is its contiguous slice of this
  process's rows, so the global batch is the same as under jit.
  """

  kind = "pmap"
  axis_name = PMAP_AXIS

  def __init__(self, devices=None):
    self.devices = list(jax.local_devices() if devices is None else devices)
    self.n = len(self.devices)
    self.mesh = Mesh(np.asarray(self.devices), (PMAP_AXIS,))
    self._stacked = NamedSharding(self.mesh, P(PMAP_AXIS))
    self._rep = NamedSharding(self.mesh, P())
    self._replicate = jax.jit(
        lambda t: jax.tree.map(lambda x: jnp.broadcast_to(x[None], (self.n,) + x.shape), t),
        out_shardings=self._stacked)
    # With several processes the host form is one global array replicated over every
    # process's devices (what Orbax saves and restores across processes); alone, the
    # local mesh is the global one.
    self._multi = jax.process_count() > 1
    self._global_rep = NamedSharding(Mesh(np.asarray(jax.devices()), ("all",)), P())

  def batch_divisor(self) -> int:
    return self.n * jax.process_count()

  def init_state(self, init_fn, *args):
    return self.from_host(jax.jit(init_fn, out_shardings=self._rep)(*args))

  def place_teacher(self, teacher_params):
    if teacher_params is None:
      return None
    return self.from_host(teacher_params)

  def compile(self, train_step, state, teacher_params):
    # devices=None maps over every local device (every process's, in a multi-process run).
    devices = None if self.devices == list(jax.local_devices()) else self.devices
    pmapped = jax.pmap(with_preempt_flag(train_step, PMAP_AXIS), axis_name=PMAP_AXIS,
                       in_axes=(0, 0, None, 0), donate_argnums=(0,), devices=devices)

    def run(state, batch, rng, teacher):
      state, metrics = pmapped(state, batch, rng, teacher)
      return state, jax.tree.map(lambda m: m[0], metrics)  # pmean'd: equal on every device

    return run

  def batch(self, local_batch):
    def split(v):
      v = np.asarray(v)
      if v.shape[0] % self.n:
        raise ValueError(f"local batch of {v.shape[0]} rows does not split over {self.n} devices")
      return jax.device_put(v.reshape((self.n, v.shape[0] // self.n) + v.shape[1:]),
                            self._stacked)
    return {k: split(v) for k, v in local_batch.items()}

  def _unstack(self, x, sharding):
    # Each device's own copy, reassembled without computing anything across devices
    # (eager indexing of a per-process array can wait on the other processes).
    copies = [s.data.reshape(x.shape[1:]) for s in x.addressable_shards]
    return jax.make_array_from_single_device_arrays(x.shape[1:], sharding, copies)

  def sampling_state(self, state):
    return jax.tree.map(lambda x: self._unstack(x, self._rep), state)

  def to_host(self, state):
    sharding = self._global_rep if self._multi else self._rep
    return jax.tree.map(lambda x: self._unstack(x, sharding), state)

  def host_abstract(self, state):
    sharding = self._global_rep if self._multi else self._rep
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype, sharding=sharding),
                        state)

  def from_host(self, state):
    if self._multi and jax.tree.leaves(state):
      state = jax.tree.map(lambda x: jax.make_array_from_single_device_arrays(
          x.shape, self._rep, [s.data for s in x.addressable_shards])
          if x.sharding != self._rep else x, state)
    return self._replicate(jax.device_put(state, self._rep))


def build_parallel(config) -> Parallel:
  """The wrapper `config.parallel` names: 'jit' (mesh, FSDP) or 'pmap' (legacy)."""
  kind = config.get("parallel", "jit") or "jit"
  mesh_cfg = config.get("mesh")
  if kind == "jit":
    min_size = mesh_cfg.get("fsdp_min_size", DEFAULT_FSDP_MIN_SIZE) if mesh_cfg else None
    return JitParallel(make_mesh(mesh_cfg),
                       DEFAULT_FSDP_MIN_SIZE if min_size is None else min_size)
  if kind == "pmap":
    if mesh_cfg is not None and int(mesh_cfg.get("fsdp", 1) or 1) != 1:
      raise ValueError("config.parallel='pmap' replicates the state; it cannot shard it "
                       "(mesh.fsdp must be 1; use parallel='jit' for FSDP)")
    devices = jax.local_devices()
    data = mesh_cfg.get("data", -1) if mesh_cfg is not None else -1
    if data not in (-1, None):
      if jax.process_count() > 1:
        raise ValueError("mesh.data must be -1 for a multi-process pmap run")
      devices = devices[:int(data)]
    return PmapParallel(devices)
  raise ValueError(f"unknown config.parallel {kind!r}; choose 'jit' or 'pmap'")


def gather_process_states(state: Any) -> list:
  """Every process's JSON-serialisable `state`, in process order (a collective: call on all)."""
  import json
  if jax.process_count() == 1:
    return [state]
  from jax.experimental import multihost_utils
  raw = np.frombuffer(json.dumps(state).encode(), np.uint8)
  lengths = np.asarray(multihost_utils.process_allgather(np.int32(raw.size))).reshape(-1)
  padded = np.zeros((int(lengths.max()),), np.uint8)
  padded[:raw.size] = raw
  every = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(lengths), -1)
  return [json.loads(bytes(row[:n]).decode()) for row, n in zip(every, lengths)]
