"""The seam between a paper's method and the one trainer.

A method owns its loss, the rule for its target network (if any) and its
sampler. The trainer owns everything else: optimizer, EMA copies, sharding,
checkpoints, logging. Methods see parameters only as explicit pytrees, so the
online, EMA, target and teacher networks are one `apply` with other weights.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional, Protocol

import jax

Params = Any


@dataclasses.dataclass(frozen=True)
class LossContext:
  """What a loss may read besides the online parameters and the batch.

  Registered as a pytree so it can cross `jax.jit`; `step` is traced.
  """
  step: jax.Array
  target_params: Optional[Params] = None
  teacher_params: Optional[Params] = None


jax.tree_util.register_dataclass(
    LossContext, data_fields=["step", "target_params", "teacher_params"], meta_fields=[])


class Method(Protocol):
  """What every method module provides to the trainer and to sample.py."""

  name: str

  def loss(self, params: Params, batch: dict, rng: jax.Array,
           ctx: LossContext) -> tuple[jax.Array, dict]:
    """Scalar loss to minimise and a dict of scalar metrics."""

  def uses_target(self) -> bool:
    """Whether the train state must carry target parameters."""

  def target_decay(self, step: jax.Array) -> jax.Array:
    """EMA rate mu of the target network at `step` (0 = copy of the online net)."""

  # Optional hooks, looked up with hasattr by the trainer:
  #   load_teacher(self) -> Params
  #       the frozen teacher's parameters (distillation); raise a clear error
  #       when the teacher checkpoint is missing or does not match.
  #   initial_params(self, params, teacher_params) -> Params
  #       the starting weights (e.g. the teacher's); teacher_params is None
  #       when only shapes are being traced.

  def sample(self, params: Params, noise: jax.Array, keys: jax.Array,
             labels: Optional[jax.Array], num_steps: int, **options) -> jax.Array:
    """Images in [-1, 1] from unit-variance `noise`; `keys` are per-image PRNG keys."""


def network_fn(net, params: Params, *, train: bool = False,
               dropout_rng: Optional[jax.Array] = None) -> Callable:
  """Binds a Flax network to parameters: (x, noise_cond, labels, cond) -> output."""

  def apply(x, noise_cond, labels=None, cond=None):
    rngs = {"dropout": dropout_rng} if (train and dropout_rng is not None) else None
    return net.apply({"params": params}, x, noise_cond, labels, cond, train=train, rngs=rngs)

  return apply
