"""Variance-preserving diffusion teacher: continuous-time cosine logSNR schedule, x / eps /
v / 'both' prediction (Salimans & Ho 2022, "Progressive Distillation for Fast Sampling of
Diffusion Models"; google-research/diffusion_distillation `dpm.py`), with label dropout
for classifier-free guidance (Ho & Salimans 2022).

The teacher of progressive / guided distillation (Salimans & Ho; Meng et al. 2023) and of
multistep consistency models (Heek et al. 2024).

Training (diffusion_distillation `Model.training_losses`, continuous time):
  u ~ U[0, 1], logSNR = schedule(u), z = alpha x + sigma eps,
  x_hat = parameterization.to_x(F(z, c_noise(logSNR), cond), z, alpha, sigma),
  loss = w(logSNR) ||x_hat - x||^2 / d, with the `mean_loss_weight_type`s of dpm.py:
    constant   w = 1
    snr        w = SNR                (= the eps-MSE, since eps_hat - eps = (alpha/sigma)(x - x_hat))
    snr_trunc  w = max(SNR, 1)        (= max(x-MSE, eps-MSE), dpm.py's default)
    v_mse      w = 1 + SNR            (= the v-MSE, since v_hat - v = (x - x_hat)/sigma)
  The weights are applied to the x-MSE rather than recomputing eps / v errors: the same
  value, without dividing by sigma near logSNR = 20.

Sampling: DDIM on u_i = i/N (dpm.py `ddim_step`: the last step returns x_hat), or any
sampler of cm_jax.diffusion.samplers, through the adapter that turns the network into a
VE-coordinate denoiser D(x; sigma) (cm_jax.diffusion.parameterization). Guidance:
x_hat^w = (1 + w) x_hat_c - w x_hat_u (cm_jax.conditioning).
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from cm_jax import conditioning as cond_lib
from cm_jax.diffusion import parameterization as param_lib
from cm_jax.diffusion import samplers, schedules
from cm_jax.methods.base import LossContext, network_fn
from cm_jax.methods.guidance import check_guidance_setup, sampling_denoiser

LOSS_WEIGHTS = ("constant", "snr", "snr_trunc", "v_mse")


def loss_weight(kind: str, logsnr):
  """dpm.py's mean_loss_weight_type as a weight on the per-example x-MSE (see module doc)."""
  snr = jnp.exp(jnp.asarray(logsnr, jnp.float32))
  if kind == "constant":
    return jnp.ones_like(snr)
  if kind == "snr":
    return snr
  if kind == "snr_trunc":
    return jnp.maximum(snr, 1.0)
  if kind == "v_mse":
    return 1.0 + snr
  raise ValueError(f"unknown loss_weight {kind!r}; choose from {LOSS_WEIGHTS}")


class VPDiffusion:
  """A VP diffusion model trained on continuous t, sampled with DDIM (or any sampler)."""

  name = "vp"

  def __init__(self, net, config):
    self.net = net
    self.cfg = config.method
    self.sample_cfg = config.sample
    self.schedule = schedules.build_schedule(config.schedule)
    self.param = param_lib.get_parameterization(self.cfg.prediction)
    if self.cfg.loss_weight not in LOSS_WEIGHTS:
      raise ValueError(f"unknown method.loss_weight {self.cfg.loss_weight!r}; "
                       f"choose from {LOSS_WEIGHTS}")
    self.conditional = config.data.num_classes > 0
    self.null_class = check_guidance_setup(config)
    self.label_dropout = float(self.cfg.get("label_dropout", 0.0) or 0.0)

  # -- the network on the schedule -------------------------------------------------------------

  def noise_cond(self, logsnr):
    """What the network sees as its time input: diffusion_distillation's 'inv_cos' input."""
    return param_lib.vp_time_input(logsnr)

  def prediction(self, params, z, logsnr, cond, *, train=False, dropout_rng=None):
    """(x_hat, eps_hat) at z_t in VP coordinates (float32), each derived from the network's
    output as dpm.py's `_run_model` derives model_x and model_eps (eps from v directly for
    v-prediction, not by dividing z - alpha x_hat by a small sigma)."""
    apply = network_fn(self.net, params, train=train, dropout_rng=dropout_rng)
    logsnr = jnp.broadcast_to(jnp.asarray(logsnr, jnp.float32), (z.shape[0],))
    alpha, sigma = schedules.vp_alpha_sigma(logsnr)
    out = apply(z, self.noise_cond(logsnr), cond).astype(jnp.float32)
    return self.param.to_x(out, z, alpha, sigma), self.param.to_eps(out, z, alpha, sigma)

  def x_prediction(self, params, z, logsnr, cond, *, train=False, dropout_rng=None):
    """x_hat(z_t) in VP coordinates (float32): the training loss's view."""
    return self.prediction(params, z, logsnr, cond, train=train, dropout_rng=dropout_rng)[0]

  def denoiser(self, params):
    """D(x; sigma) in VE coordinates (x = z / alpha, sigma = sigma_t / alpha_t): what every
    sampler and every distillation method of cm_jax consumes; the schedule adapter, with
    the network's time input taken from logSNR = -2 log sigma directly."""
    return param_lib.make_schedule_denoiser(network_fn(self.net, params), self.schedule,
                                            self.param, self.noise_cond, time_input="logsnr")

  # -- training --------------------------------------------------------------------------------

  def loss(self, params, batch, rng, ctx: LossContext):
    x = jnp.asarray(batch["image"], jnp.float32)
    b = x.shape[0]
    k_u, k_eps, k_drop, k_label = jax.random.split(rng, 4)
    u = jax.random.uniform(k_u, (b,), jnp.float32)
    z, logsnr, _, _ = self.noised(x, u, k_eps)
    cond = cond_lib.Conditioning(labels=batch["label"] if self.conditional else None)
    cond = cond_lib.drop_labels(cond, k_label, self.label_dropout, self.null_class)
    x_hat = self.x_prediction(params, z, logsnr, cond, train=True, dropout_rng=k_drop)
    loss, x_mse = self.weighted_x_loss(x_hat, x, logsnr)
    return loss, {"loss": loss, "x_mse": jnp.mean(x_mse)}

  def noised(self, x, u, rng):
    """(z_u = alpha_u x + sigma_u eps, logsnr (B,), alpha, sigma) at times u (B,), eps drawn
    from `rng`; alpha and sigma shaped to broadcast over x. The distillation methods that
    build on this one noise their data the same way."""
    logsnr = self.schedule.logsnr(u)
    eps = jax.random.normal(rng, x.shape, jnp.float32)
    bshape = (x.shape[0],) + (1,) * (x.ndim - 1)
    alpha, sigma = (v.reshape(bshape) for v in schedules.vp_alpha_sigma(logsnr))
    return alpha * x + sigma * eps, logsnr, alpha, sigma

  def weighted_x_loss(self, x_hat, target, logsnr):
    """(mean_b w(logsnr_b) ||x_hat_b - target_b||^2 / d, the per-example x-MSE) with the
    configured method.loss_weight (see the module doc)."""
    x_mse = jnp.mean(jnp.square(x_hat - target), axis=tuple(range(1, x_hat.ndim)))
    return jnp.mean(loss_weight(self.cfg.loss_weight, logsnr) * x_mse), x_mse

  def uses_target(self) -> bool:
    return False

  def target_decay(self, step):
    return jnp.zeros((), jnp.float32)

  # -- sampling --------------------------------------------------------------------------------

  def sampling_grid(self, num_steps: int):
    """VE sigmas of u_i = i/N, i = N .. 1, then 0 (dpm.py's DDIM grid; the last step
    returns x_hat, its `i == 0` branch)."""
    u = jnp.linspace(1.0, 0.0, int(num_steps) + 1)[:-1]
    return jnp.concatenate([self.schedule.ve_sigma(u).astype(jnp.float32),
                            jnp.zeros((1,), jnp.float32)])

  # Classifier-free guidance: w costs a second (unconditional) evaluation per step.
  guidance_kind = "classifier_free"

  def guided_sampling_denoiser(self, params, guidance: float, clip: bool):
    """The denoiser the sampler runs with guidance strength w = `guidance`."""
    return sampling_denoiser(self.denoiser(params), guidance, self.null_class, clip)

  def sampling_setup(self, params, noise, num_steps: int, guidance: float = 0.0,
                     clip_denoised=None):
    """(denoise, x_T, grid) of sample(): the guided denoiser, clipped as dpm.py's
    eval_clip_denoised (x_hat clipped at every step, eps re-derived from it) unless
    `clip_denoised` says otherwise, z_T = `noise` in VE coordinates, and the DDIM grid.
    OLSS runs the teacher's own sampler through this (cm_jax.methods.olss)."""
    clip = self.sample_cfg.get("clip_denoised", True) if clip_denoised is None else clip_denoised
    denoise = self.guided_sampling_denoiser(params, guidance, bool(clip))
    # z_T ~ N(0, I) at u = 1 is x_T = z_T / alpha_1 in VE coordinates.
    alpha_1 = self.schedule.alpha(jnp.ones(()))
    return denoise, noise / alpha_1, self.sampling_grid(num_steps)

  def sample(self, params, noise, keys, labels: Optional[jax.Array], num_steps: int,
             sampler: Optional[str] = None, guidance: float = 0.0, clip_denoised=None,
             callback=None, **options):
    """Images in [-1, 1] from unit `noise` (z_T ~ N(0, I)), `num_steps` denoiser steps."""
    sampler = sampler or self.sample_cfg.sampler
    if sampler not in samplers.SAMPLERS:
      raise ValueError(f"unknown sampler {sampler!r}; choose from {sorted(samplers.SAMPLERS)}")
    cond = cond_lib.Conditioning(labels=labels if self.conditional else None)
    denoise, x_T, grid = self.sampling_setup(params, noise, num_steps, guidance, clip_denoised)
    if sampler == "edm_stochastic":
      for key in ("s_churn", "s_min", "s_max", "s_noise"):
        options.setdefault(key, self.sample_cfg.get(key))
    x0 = samplers.SAMPLERS[sampler](denoise, x_T, grid, keys, cond, callback, **options)
    return jnp.clip(x0, -1.0, 1.0)
