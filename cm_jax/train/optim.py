"""Optimizers from the config: Adam / AdamW / RAdam, linear warm-up, clipping."""
from __future__ import annotations

import optax


def learning_rate_schedule(optim_cfg):
  """Constant rate after a linear warm-up from 0 (EDM's lr ramp, in steps)."""
  if optim_cfg.warmup_steps > 0:
    return optax.linear_schedule(0.0, optim_cfg.lr, optim_cfg.warmup_steps)
  return optax.constant_schedule(optim_cfg.lr)


def build_optimizer(optim_cfg) -> optax.GradientTransformation:
  lr = learning_rate_schedule(optim_cfg)
  name = optim_cfg.name
  if name == "adam":
    opt = optax.adam(lr, b1=optim_cfg.b1, b2=optim_cfg.b2, eps=optim_cfg.eps)
  elif name == "adamw":
    opt = optax.adamw(lr, b1=optim_cfg.b1, b2=optim_cfg.b2, eps=optim_cfg.eps,
                      weight_decay=optim_cfg.weight_decay)
  elif name == "radam":
    opt = optax.radam(lr, b1=optim_cfg.b1, b2=optim_cfg.b2, eps=optim_cfg.eps)
  else:
    raise ValueError(f"unknown optimizer {name!r}; choose adam, adamw or radam")
  if optim_cfg.grad_clip > 0:
    opt = optax.chain(optax.clip_by_global_norm(optim_cfg.grad_clip), opt)
  return opt
