"""Optimizers from the config: Adam / AdamW / RAdam, linear warm-up and anneal, clipping."""
from __future__ import annotations

import optax

ANNEALS = ("none", "linear")


def learning_rate_schedule(optim_cfg):
  """A linear warm-up from 0 over warmup_steps (EDM's lr ramp), then the rate held
  (anneal 'none') or brought linearly to 0 over anneal_steps (anneal 'linear', as
  diffusion_distillation anneals each distillation round: learning_rate_anneal_type
  'linear' over learning_rate_anneal_steps = the round's length). Steps count from the
  optimizer's init, so a method with rounds restarts the schedule in every round."""
  lr, warmup = float(optim_cfg.lr), int(optim_cfg.warmup_steps)
  anneal = optim_cfg.get("anneal", "none")
  if anneal not in ANNEALS:
    raise ValueError(f"unknown optim.anneal {anneal!r}; choose from {ANNEALS}")
  after = optax.constant_schedule(lr)
  if anneal == "linear":
    steps = int(optim_cfg.get("anneal_steps", 0) or 0)
    if steps < 1:
      raise ValueError("optim.anneal='linear' needs optim.anneal_steps >= 1")
    after = optax.linear_schedule(lr, 0.0, steps)
  if warmup > 0:
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), after], [warmup])
  return after


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
