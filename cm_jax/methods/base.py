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

from cm_jax.conditioning import as_conditioning, guidance_embedding

Params = Any


@dataclasses.dataclass(frozen=True)
class LossContext:
  """What a loss may read besides the online parameters and the batch.

  Registered as a pytree so it can cross `jax.jit`; `step` and `round` are traced.
  `round` is the index of the current round (int32 scalar) for a method with
  rounds, else None; `teacher_params` then holds the round's teacher under
  'teacher' (see the hooks below).
  """
  step: jax.Array
  target_params: Optional[Params] = None
  teacher_params: Optional[Params] = None
  round: Optional[jax.Array] = None


jax.tree_util.register_dataclass(
    LossContext, data_fields=["step", "target_params", "teacher_params", "round"],
    meta_fields=[])


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
  #
  # Rounds (progressive distillation, Salimans & Ho 2022 Algorithm 2; the trainer's
  # side is cm_jax.train.rounds):
  #   rounds(self) -> (num_rounds, steps_per_round)
  #       the method trains in rounds; the run is num_rounds * steps_per_round
  #       steps (config.training.num_steps is not used; --steps may stop it
  #       earlier). Round r covers steps [r * steps_per_round, (r+1) * steps_per_round).
  #       ctx.round is r, ctx.teacher_params['teacher'] the round's teacher, merged
  #       into load_teacher()'s result, which must then be a dict of named networks
  #       without a 'teacher' key (or None).
  #   start_round(self, round_index, params, teacher) -> (student, teacher)
  #       the student's starting weights and the teacher of round `round_index`.
  #       Round 0: `params` are the initial weights (after initial_params) and
  #       `teacher` is load_teacher()'s result (None when only shapes are traced),
  #       called inside jax.jit. Round r >= 1: `params` are the student at the end of
  #       round r-1 and `teacher` that round's teacher, called once on the host.
  #       Both results must have the shapes of `params`. Default (Algorithm 2):
  #       (params, params), the student continues and the teacher is the last student.
  #       At every round start the trainer also restarts the optimizer
  #       (optimizer.init: its step count, hence the learning-rate schedule, begins
  #       again) and resets every EMA copy and the target network to the new student.
  #       The checkpoint that ends each round is always kept.
  #   teacher_seeds_only = True (attribute)
  #       load_teacher()'s result only feeds initial_params / round 0: the trainer does not
  #       pass it to the steps (progressive distillation reads the round's teacher from the
  #       state; multistep CT only starts from a diffusion run's weights).
  #   step_frozen(self, frozen) -> dict
  #       the part of load_teacher()'s dict the steps read, when some of it only fed
  #       initial_params (LCF: the LCM its student starts from).
  #   checkpoint_step_for(config, num_steps) (classmethod)
  #       the checkpoint step readers sample `num_steps` from (a run that keeps one
  #       student per step count); a one-line ValueError when it has no such student.
  #
  # Guidance at sampling time (sample.py / evaluate.py --guidance w, cm_jax.sampling):
  #   guidance_kind: 'classifier_free' (two evaluations per step, needs a null class),
  #       'embedding' (w is a network input: guided-distillation students) or None.
  #   guidance_warning(w) -> Optional[str]: a one-line warning (w outside a trained range).
  #
  # Fitting instead of training (a method with no loss, e.g. OLSS; the trainer's
  # side is cm_jax.train.fit):
  #   fit(self, teacher_params, rng, data_iterator) -> Params
  #       the fitted parameter pytree (arrays); teacher_params is load_teacher()'s
  #       result or None; data_iterator yields training batches, built on first use.
  #   abstract_fit_params(self) -> Params
  #       the shapes of fit's result (jax.ShapeDtypeStruct leaves), so readers of
  #       the run (sample.py, evaluate.py) can restore it without fitting again.
  #   fitted_method_fields(self) -> dict
  #       config.method fields the fitted run's saved config records (OLSS: the teacher's
  #       step and identity, read again and checked at sampling).
  #   sampling_params(self, params) -> Params
  #       what sample() takes, built from the run's parameters before sampling
  #       (cm_jax.sampling.generate): OLSS adds the teacher's weights to its coefficients.
  #   steps_warning(self, num_steps) -> Optional[str]
  #       a one-line warning sample.py / evaluate.py print for a step count the method
  #       samples with but was not trained for (a multistep model at a divisor of its S).
  #   check_sample_options(self, num_steps, **sampler_options) -> None
  #       a one-line ValueError for a step count or sampler the method cannot sample
  #       with, raised by cm_jax.sampling.generate before anything is read or compiled.

  def sample(self, params: Params, noise: jax.Array, keys: jax.Array,
             labels: Optional[jax.Array], num_steps: int, **options) -> jax.Array:
    """Images in [-1, 1] from unit-variance `noise`; `keys` are per-image PRNG keys."""


def network_fn(net, params: Params, *, train: bool = False,
               dropout_rng: Optional[jax.Array] = None) -> Callable:
  """Binds a Flax network to parameters: (x, noise_cond, cond, vector) -> output.

  `cond` is a `Conditioning` (or, from older call sites, the labels array or None) and is
  opened here, the one place that knows how each field reaches the network: labels as
  labels, a guidance strength w as `guidance_embedding(w, net.cond_dim)` in the network's
  extra-conditioning vector (the zero-initialised `cond_emb` layer of the ADM UNet, so a
  student that gains w starts as its teacher), text context as `context` when the network
  takes one.
  """

  def apply(x, noise_cond, cond=None, vector=None):
    c = as_conditioning(cond, vector)
    extra = c.vector
    if c.w is not None:
      dim = int(getattr(net, "cond_dim", 0) or 0)
      if dim <= 0:
        raise ValueError("this network has no guidance-strength input (model.cond_dim = 0); "
                         "it cannot take Conditioning.w")
      if extra is not None:
        raise ValueError("Conditioning.w and Conditioning.vector both feed model.cond_dim; "
                         "pass one of them")
      extra = guidance_embedding(c.w, dim)
    kwargs = {}
    if c.context is not None:
      kwargs.update(context=c.context, context_mask=c.context_mask)
    rngs = {"dropout": dropout_rng} if (train and dropout_rng is not None) else None
    return net.apply({"params": params}, x, noise_cond, c.labels, extra, train=train,
                     rngs=rngs, **kwargs)

  return apply
