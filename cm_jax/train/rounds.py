"""Training in rounds: progressive distillation (Salimans & Ho 2022, Algorithm 2).

Algorithm 2 repeats: the student starts from the teacher, is trained, then
becomes the next round's teacher while the number of sampling steps halves.
The trainer's side of it:

- a method says it has rounds with `rounds() -> (num_rounds, steps_per_round)`
  and may choose each round's starting student and teacher with
  `start_round(round_index, params, teacher)` (cm_jax.methods.base documents both);
- the train state carries `round` and `round_teacher` (None without rounds, so
  such runs and their checkpoints are unchanged);
- at the start of the step that opens round r >= 1 (step r * steps_per_round)
  the loop calls `next_round`: the hook, then a fresh optimizer state and EMA /
  target copies of the new student (step-dependent rates, EDM's half-life ramp
  and target_decay(step), keep reading the run's step, not the round's).

The switch happens before the first step of the new round, not after the last
step of the old one: a checkpoint written at a round boundary holds the
finished round's student (what sampling that checkpoint should see), and a
resumed run makes the same switch at the same step as an uninterrupted one.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from cm_jax.train.state import TrainState

TEACHER_KEY = "teacher"


def round_plan(method) -> Optional[tuple[int, int]]:
  """(num_rounds, steps_per_round) of a method with rounds, else None."""
  hook = getattr(method, "rounds", None)
  if hook is None:
    return None
  num_rounds, steps_per_round = (int(v) for v in hook())
  if num_rounds < 1 or steps_per_round < 1:
    raise ValueError(f"method {getattr(method, 'name', method)!r} asks for {num_rounds} "
                     f"round(s) of {steps_per_round} step(s); both must be >= 1")
  return num_rounds, steps_per_round


def total_steps(plan: tuple[int, int]) -> int:
  return plan[0] * plan[1]


def round_of_step(step: int, plan: tuple[int, int]) -> int:
  """The round the step with 0-based index `step` belongs to."""
  num_rounds, steps_per_round = plan
  return min(int(step) // steps_per_round, num_rounds - 1)


def host_round(state: TrainState) -> int:
  return int(np.asarray(jax.device_get(state.round)))


def start_round(method, round_index: int, params, teacher):
  """(student, teacher) for round `round_index` from the method's hook or Algorithm 2."""
  hook = getattr(method, "start_round", None)
  if hook is None:
    return params, params
  student, new_teacher = hook(round_index, params, teacher)
  _check_like(params, student, f"start_round({round_index})'s student")
  _check_like(params, new_teacher, f"start_round({round_index})'s teacher")
  return student, new_teacher


def _check_like(reference, tree, what: str) -> None:
  # The compiled step was built for the params' shapes; anything else would recompile
  # or fail deep inside XLA, so say which hook broke the contract.
  same = jax.tree.structure(reference) == jax.tree.structure(tree) and all(
      tuple(a.shape) == tuple(b.shape) and a.dtype == b.dtype
      for a, b in zip(jax.tree.leaves(reference), jax.tree.leaves(tree)))
  if not same:
    raise ValueError(f"{what} must have the tree, shapes and dtypes of the params")


def teachers_for_loss(teacher_params, round_teacher):
  """ctx.teacher_params: load_teacher()'s networks plus the round's teacher under 'teacher'."""
  if round_teacher is None:
    return teacher_params
  if teacher_params is None:
    return {TEACHER_KEY: round_teacher}
  if not isinstance(teacher_params, dict) or TEACHER_KEY in teacher_params:
    raise ValueError("a method with rounds must return from load_teacher() a dict of named "
                     f"networks without a {TEACHER_KEY!r} key (that one is the round's teacher)")
  return dict(teacher_params, **{TEACHER_KEY: round_teacher})


def _round_state(state: TrainState, student, teacher, round_index, optimizer):
  copy = lambda tree: jax.tree.map(jnp.array, tree)
  return state.replace(
      params=student,
      # A fresh optimizer state restarts optax's step count, so a schedule annealed over
      # steps_per_round anneals again in every round (Algorithm 2 trains each student anew).
      opt_state=optimizer.init(student),
      # An average over the previous round's students is not an average of this round's.
      ema={name: copy(student) for name in state.ema},
      target_params=None if state.target_params is None else copy(student),
      round=jnp.asarray(round_index, jnp.int32),
      round_teacher=copy(teacher))


_round_state_jit = jax.jit(_round_state, static_argnums=(4,))


def next_round(method, optimizer: optax.GradientTransformation, state: TrainState,
               round_index: int) -> TrainState:
  """The host-form state that opens round `round_index` >= 1 (Algorithm 2's outer step)."""
  if state.round is None:
    raise ValueError("this train state has no round: it was not built for a method with rounds")
  student, teacher = start_round(method, round_index, state.params, state.round_teacher)
  # jit, not eager ops: the arrays may span several processes.
  return _round_state_jit(state, student, teacher, np.int32(round_index), optimizer)
