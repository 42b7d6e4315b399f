"""Exponential moving averages of the parameters, at fixed rates or EDM's half-life.

Two forms, both in common use:
- a fixed decay r per step (Song et al.'s consistency models: 0.9999, 0.999943);
- EDM's half-life (Karras et al. 2022, training loop of the reference code):
  beta = 0.5 ** (batch / max(h, 1e-8)) with h = halflife_kimg * 1000 images,
  ramped up as h = min(h, images_seen * rampup_ratio) so early averages do not
  remember the random init.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

# The copies' names are read by cm_jax.runs too (below the trainer): defined there.
from cm_jax.runs import HALFLIFE, ema_names, rate_name  # noqa: F401


def ema_decays(ema_cfg, step: jax.Array, batch_size: int) -> dict[str, jax.Array]:
  """Decay of every EMA for the update made at `step` (0-based, before increment)."""
  decays = {rate_name(r): jnp.asarray(r, jnp.float32) for r in ema_cfg.rates}
  if ema_cfg.halflife_kimg > 0:
    halflife = jnp.asarray(ema_cfg.halflife_kimg * 1000.0, jnp.float32)
    if ema_cfg.rampup_ratio and ema_cfg.rampup_ratio > 0:
      images_seen = step.astype(jnp.float32) * batch_size
      halflife = jnp.minimum(halflife, images_seen * ema_cfg.rampup_ratio)
    decays[HALFLIFE] = 0.5 ** (batch_size / jnp.maximum(halflife, 1e-8))
  return decays


def ema_update(average, params, decay):
  """average <- decay * average + (1 - decay) * params, leaf by leaf."""
  return jax.tree.map(lambda a, p: a * decay + p.astype(a.dtype) * (1.0 - decay), average, params)
