"""The one train step every method shares: loss -> grads -> optimizer -> EMAs -> target.

A pure function of (state, batch, rng, teacher_params); parallelism is added
around it (cm_jax.train.parallel), never inside it. Two options change how the
gradient is computed, not what it estimates:

- `grad_accum_steps = k`: the batch is split into k microbatches, scanned with
  `lax.scan`, and the gradients (and metrics) are averaged. Microbatch j holds
  rows j, j+k, j+2k, ... so a batch sharded over devices stays where it is
  (every device holds 1/k of each microbatch; no resharding).
- `axis_name`: set by the pmap wrapper. Gradients and metrics are averaged
  over the devices with `lax.pmean`, and each device draws its loss
  randomness from `fold_in(step key, device index)` (independent noise per
  device, as each sees a different slice of the batch).

Parameters stay in their own dtype (float32 master weights) whatever
`config.model.dtype` the network computes in; the loss is cast to float32
before differentiation, so gradients and optimizer moments are float32.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import optax
from jax import lax

from cm_jax.methods.base import LossContext
from cm_jax.train import ema as ema_lib
from cm_jax.train import rounds
from cm_jax.train.state import TrainState


def split_microbatches(batch, k: int):
  """(B, ...) -> (k, B/k, ...) with microbatch j = rows j, j+k, j+2k, ..."""
  def split(x):
    if x.shape[0] % k:
      raise ValueError(f"batch of {x.shape[0]} rows does not split into {k} microbatches")
    return jnp.swapaxes(x.reshape((x.shape[0] // k, k) + x.shape[1:]), 0, 1)
  return jax.tree.map(split, batch)


def make_train_step(method, optimizer: optax.GradientTransformation, ema_cfg,
                    global_batch_size: int, grad_accum_steps: int = 1,
                    axis_name: Optional[str] = None):
  """Builds `train_step(state, batch, rng, teacher_params) -> (state, metrics)`.

  `rng` is the run's base key; the step folds in its own index, so a resumed
  run draws exactly the noise an uninterrupted one would. A step whose loss or
  gradient is not finite leaves the state untouched and reports finite = 0, so
  the loop can stop with the last good parameters intact.
  """
  k = int(grad_accum_steps)
  if k < 1:
    raise ValueError(f"grad_accum_steps must be >= 1, got {k}")

  def loss_f32(params, batch, rng, ctx):
    loss, metrics = method.loss(params, batch, rng, ctx)
    return loss.astype(jnp.float32), metrics

  grad_fn = jax.value_and_grad(loss_f32, has_aux=True)

  def loss_and_grads(params, batch, rng, ctx):
    if k == 1:
      (loss, metrics), grads = grad_fn(params, batch, rng, ctx)
      return loss, metrics, grads
    micro = split_microbatches(batch, k)

    def body(acc, inputs):
      mb, j = inputs
      (loss, metrics), grads = grad_fn(params, mb, jax.random.fold_in(rng, j), ctx)
      return jax.tree.map(jnp.add, acc, (loss, metrics, grads)), None

    first = jax.tree.map(lambda x: x[0], micro)
    shapes = jax.eval_shape(lambda: grad_fn(params, first, rng, ctx))
    (loss_s, metrics_s), grads_s = shapes
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (loss_s, metrics_s, grads_s))
    total, _ = lax.scan(body, zeros, (micro, jnp.arange(k)))
    return jax.tree.map(lambda x: x / k, total)

  def train_step(state: TrainState, batch, rng, teacher_params=None):
    step_rng = jax.random.fold_in(rng, state.step)
    if axis_name is not None:
      step_rng = jax.random.fold_in(step_rng, lax.axis_index(axis_name))
    ctx = LossContext(step=state.step, target_params=state.target_params,
                      teacher_params=rounds.teachers_for_loss(teacher_params,
                                                              state.round_teacher),
                      round=state.round)
    loss, metrics, grads = loss_and_grads(state.params, batch, step_rng, ctx)
    if axis_name is not None:
      loss, metrics, grads = lax.pmean((loss, metrics, grads), axis_name)
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)

    decays = ema_lib.ema_decays(ema_cfg, state.step, global_batch_size)
    ema = {name: ema_lib.ema_update(state.ema[name], params, decays[name]) for name in state.ema}
    target = state.target_params
    if target is not None:
      target = ema_lib.ema_update(target, jax.lax.stop_gradient(params),
                                  method.target_decay(state.step))
    # replace keeps the round and its teacher, which only the loop changes (rounds.py).
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                              ema=ema, target_params=target)

    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    kept = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, state)
    metrics = dict(metrics, grad_norm=grad_norm, finite=finite.astype(jnp.float32))
    return kept, metrics

  return train_step
