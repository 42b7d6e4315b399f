"""The train state: one pytree holding everything a step reads and writes."""
from __future__ import annotations

from typing import Any, Optional

import flax.struct
import jax
import jax.numpy as jnp
import optax


@flax.struct.dataclass
class TrainState:
  """Online params, optimizer state, EMA copies by name, and a method's target net.

  `ema` maps an EMA's name (see cm_jax.train.ema) to its parameter copy;
  `target_params` is None unless the method trains against a target network
  (consistency distillation / training).
  """
  step: jax.Array
  params: Any
  opt_state: Any
  ema: dict
  target_params: Optional[Any] = None


def create_train_state(params, optimizer: optax.GradientTransformation,
                       ema_names: tuple[str, ...], with_target: bool) -> TrainState:
  """A fresh state; every EMA copy and the target start equal to the online params."""
  copy = lambda: jax.tree.map(jnp.array, params)
  return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      opt_state=optimizer.init(params),
      ema={name: copy() for name in ema_names},
      target_params=copy() if with_target else None)


def count_params(params) -> int:
  return int(sum(x.size for x in jax.tree.leaves(params)))


def tree_bytes(tree) -> int:
  return int(sum(x.size * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))
