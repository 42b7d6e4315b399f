"""Shared helpers of the consistency-model tests.

Most tests run the methods on `TinyNet`, a two-convolution network that compiles in about a
second: the losses, schedules and samplers do not depend on the architecture (DESIGN.md:
networks know no noise schedule). The trainer's own ADM path is exercised by the CD teacher
tests (restore only) and by the sample.py test on a `micro` ADM run.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from cm_jax import data as data_lib
from cm_jax.train import builders, ema as ema_lib
from cm_jax.train.checkpoint import RunCheckpoints
from cm_jax.train.state import create_train_state
from cm_jax.train.step import make_train_step

BATCH = 8


class TinyNet(nn.Module):
  """(x, noise_cond, labels, cond) -> output of x's shape; dropout when training."""
  channels: int = 1
  num_classes: int = 10
  dropout: float = 0.0

  @nn.compact
  def __call__(self, x, noise_cond, labels=None, cond=None, train=False):
    h = nn.Conv(16, (3, 3))(x)
    c = jnp.stack([noise_cond, jnp.sin(noise_cond), jnp.cos(noise_cond)], axis=-1)
    emb = nn.Dense(16)(c)
    if labels is not None and self.num_classes:
      emb = emb + nn.Embed(self.num_classes, 16)(labels)
    h = nn.silu(h + emb[:, None, None, :])
    h = nn.Dropout(self.dropout, deterministic=not train)(h)
    return nn.Conv(self.channels, (3, 3))(h)


def tiny_method(cls, config, dropout=0.0):
  return cls(TinyNet(num_classes=config.data.num_classes, dropout=dropout), config)


def tiny_params(method, seed=0):
  x = jnp.zeros((1, 8, 8, 1))
  return method.net.init(jax.random.key(seed), x, jnp.zeros((1,)), jnp.zeros((1,), jnp.int32))[
      "params"]


def micro(config):
  """The :tiny config with a still smaller ADM (one level, no attention), for run dirs."""
  config.model.update(model_channels=8, channel_mult=(1,), num_res_blocks=1,
                      attention_resolutions=(), num_head_channels=8, num_groups=4, dropout=0.0)
  config.training.update(batch_size=BATCH)
  config.sample.update(batch_size=BATCH, grid_size=BATCH)
  return config


class FixedKey:
  """The method with one fixed loss key, so successive steps see the same noise and pairs."""

  def __init__(self, method):
    self._m = method

  def __getattr__(self, name):
    return getattr(self._m, name)

  def loss(self, params, batch, rng, ctx):
    return self._m.loss(params, batch, jax.random.key(42), ctx)


def fixed_batch(config, n=BATCH):
  it = data_lib.build_train_iterator(config.data, global_batch_size=n, seed=0)
  return {k: jnp.asarray(v) for k, v in next(it).items()}, it


def run_steps(method, config, params, teacher=None, steps=8, lr=2e-3):
  """`steps` Adam updates of the one train step on one batch with one loss key."""
  opt = optax.adam(lr)
  state = create_train_state(params, opt, ema_lib.ema_names(config.ema), method.uses_target())
  step_fn = jax.jit(make_train_step(FixedKey(method), opt, config.ema, BATCH))
  batch, _ = fixed_batch(config)
  losses, metrics = [], None
  for _ in range(steps):
    state, metrics = step_fn(state, batch, jax.random.key(0), teacher)
    assert float(metrics["finite"]) == 1.0
    losses.append(float(metrics["loss"]))
  return state, losses, metrics


def save_run(workdir, config, seed=0):
  """A freshly initialised run directory (checkpoint + config) that sample.py can read."""
  parts = builders.build_parts(config)
  state = builders.new_train_state(parts, config, jax.random.key(seed))
  _, it = fixed_batch(config)
  ckpts = RunCheckpoints(workdir, async_save=False)
  ckpts.save(0, state, it.get_state(), config, wait=True)
  ckpts.close()
  return workdir, state
