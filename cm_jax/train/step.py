"""The one train step every method shares: loss -> grads -> optimizer -> EMAs -> target.

A pure function of (state, batch, rng, teacher_params); parallelism is added
around it (cm_jax.train.parallel), never inside it.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from cm_jax.methods.base import LossContext
from cm_jax.train import ema as ema_lib
from cm_jax.train.state import TrainState


def make_train_step(method, optimizer: optax.GradientTransformation, ema_cfg,
                    global_batch_size: int):
  """Builds `train_step(state, batch, rng, teacher_params) -> (state, metrics)`.

  `rng` is the run's base key; the step folds in its own index, so a resumed
  run draws exactly the noise an uninterrupted one would. A step whose loss or
  gradient is not finite leaves the state untouched and reports finite = 0, so
  the loop can stop with the last good parameters intact.
  """

  def train_step(state: TrainState, batch, rng, teacher_params=None):
    step_rng = jax.random.fold_in(rng, state.step)
    ctx = LossContext(step=state.step, target_params=state.target_params,
                      teacher_params=teacher_params)
    (loss, metrics), grads = jax.value_and_grad(method.loss, has_aux=True)(
        state.params, batch, step_rng, ctx)
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)

    decays = ema_lib.ema_decays(ema_cfg, state.step, global_batch_size)
    ema = {name: ema_lib.ema_update(state.ema[name], params, decays[name]) for name in state.ema}
    target = state.target_params
    if target is not None:
      target = ema_lib.ema_update(target, jax.lax.stop_gradient(params),
                                  method.target_decay(state.step))
    new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state,
                           ema=ema, target_params=target)

    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    kept = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, state)
    metrics = dict(metrics, grad_norm=grad_norm, finite=finite.astype(jnp.float32))
    return kept, metrics

  return train_step
