"""The train state: one pytree holding everything a step reads and writes."""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp
import optax


@dataclasses.dataclass(frozen=True)
class TrainState:
  """Online params, optimizer state, EMA copies by name, and a method's target net.

  `ema` maps an EMA's name (see cm_jax.train.ema) to its parameter copy;
  `target_params` is None unless the method trains against a target network
  (consistency distillation / training). `round` (int32 scalar) and
  `round_teacher` (the current round's teacher parameters) are None unless the
  method runs in rounds (cm_jax.train.rounds).
  """
  step: jax.Array
  params: Any
  opt_state: Any
  ema: dict
  target_params: Optional[Any] = None
  round: Optional[jax.Array] = None
  round_teacher: Optional[Any] = None

  def replace(self, **changes) -> "TrainState":
    return dataclasses.replace(self, **changes)


_FIELDS = ("step", "params", "opt_state", "ema", "target_params")
_OPTIONAL_FIELDS = ("round", "round_teacher")


# A hand-written registration rather than flax.struct: the optional fields are pytree
# children only when set, so a state without rounds has exactly the five children (and
# key paths) of the checkpoints written before rounds existed, and Orbax restores those
# into it; a checkpoint whose tree differs from the abstract state is refused.
# A state rebuilt from its tree remembers which optional fields it had: tree maps that
# turn leaves into None (Orbax's save arguments, shardings) must keep the structure.
def _present(state) -> tuple[str, ...]:
  kept = getattr(state, "_present", None)
  if kept is not None:
    return kept
  return tuple(f for f in _OPTIONAL_FIELDS if getattr(state, f) is not None)


def _flatten_with_keys(state):
  present = _present(state)
  return [(jax.tree_util.GetAttrKey(f), getattr(state, f)) for f in _FIELDS + present], present


def _flatten(state):
  present = _present(state)
  return [getattr(state, f) for f in _FIELDS + present], present


def _unflatten(present, children):
  state = TrainState(**dict(zip(_FIELDS + present, children)))
  object.__setattr__(state, "_present", present)
  return state


jax.tree_util.register_pytree_with_keys(TrainState, _flatten_with_keys, _unflatten, _flatten)


def create_train_state(params, optimizer: optax.GradientTransformation,
                       ema_names: tuple[str, ...], with_target: bool,
                       round_teacher=None) -> TrainState:
  """A fresh state; every EMA copy and the target start equal to the online params.

  Given `round_teacher` (a method with rounds), the state is in round 0 with that teacher.
  """
  copy = lambda: jax.tree.map(jnp.array, params)
  with_round = round_teacher is not None
  return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      opt_state=optimizer.init(params),
      ema={name: copy() for name in ema_names},
      target_params=copy() if with_target else None,
      round=jnp.zeros((), jnp.int32) if with_round else None,
      round_teacher=jax.tree.map(jnp.array, round_teacher) if with_round else None)


def fitted_train_state(params, step=0) -> TrainState:
  """The state of a fitted run (cm_jax.train.fit): the fitted pytree and nothing to train."""
  return TrainState(step=jnp.asarray(step, jnp.int32), params=params, opt_state=(), ema={})


def count_params(params) -> int:
  return int(sum(x.size for x in jax.tree.leaves(params)))


def tree_bytes(tree) -> int:
  return int(sum(x.size * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))
