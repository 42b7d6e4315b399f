"""EDM diffusion training and sampling (Karras, Aittala, Aila, Laine 2022).

The teacher every distillation method in cm_jax starts from. Loss: EDM eq. 2
with the Table 1 preconditioning, log-normal sigma and lambda(sigma) weight
(cm_jax.diffusion.edm_loss). Sampling: Algorithm 1 (Heun, deterministic) by
default, Algorithm 2 (stochastic) or Euler on request, on the Karras grid of
eq. 5 (cm_jax.diffusion.grids).
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from cm_jax import conditioning as cond_lib
from cm_jax.diffusion import grids, preconditioning, samplers
from cm_jax.diffusion.edm_loss import edm_loss
from cm_jax.methods.base import LossContext, network_fn
from cm_jax.methods.guidance import check_guidance_setup, sampling_denoiser


class EDM:
  """EDM denoiser training: D(x; sigma) = c_skip x + c_out F(c_in x, c_noise)."""

  name = "edm"

  def __init__(self, net, config):
    self.net = net
    self.precond = config.precond
    self.cfg = config.method
    self.sample_cfg = config.sample
    self.conditional = config.data.num_classes > 0
    self.null_class = check_guidance_setup(config)  # label dropout for classifier-free guidance
    self.label_dropout = float(self.cfg.get("label_dropout", 0.0) or 0.0)

  def denoiser(self, params, *, train=False, dropout_rng=None):
    return preconditioning.make_denoiser(
        network_fn(self.net, params, train=train, dropout_rng=dropout_rng),
        parameterization="edm",
        sigma_data=self.precond.sigma_data,
        sigma_min=self.precond.sigma_min,
        c_noise=self.precond.c_noise)

  def loss(self, params, batch, rng, ctx: LossContext):
    noise_rng, dropout_rng = jax.random.split(rng)
    denoise = self.denoiser(params, train=True, dropout_rng=dropout_rng)
    labels = batch["label"] if self.conditional else None
    if self.label_dropout:
      # A key of its own, so runs without label dropout keep their noise and dropout keys.
      cond = cond_lib.drop_labels(cond_lib.Conditioning(labels=labels),
                                  jax.random.fold_in(rng, 7), self.label_dropout,
                                  self.null_class)
      labels = cond
    per_example = edm_loss(
        denoise, batch["image"], noise_rng, labels=labels,
        p_mean=self.cfg.p_mean, p_std=self.cfg.p_std,
        sigma_data=self.precond.sigma_data)
    loss = jnp.mean(per_example)
    return loss, {"loss": loss}

  def uses_target(self) -> bool:
    return False

  def target_decay(self, step):
    return jnp.zeros((), jnp.float32)

  # Classifier-free guidance: w costs a second (unconditional) evaluation per step.
  guidance_kind = "classifier_free"

  def sampling_setup(self, params, noise, num_steps: int, guidance: float = 0.0,
                     clip_denoised=None):
    """(denoise, x_T, grid) of sample(): the guided, optionally clipped denoiser, unit
    `noise` scaled to sigma_max, and the Karras grid of `num_steps` levels plus 0 (EDM
    eq. 5). OLSS runs the teacher's own sampler through this (cm_jax.methods.olss)."""
    grid = grids.append_zero(grids.karras_sigmas(
        num_steps, self.precond.sigma_min, self.precond.sigma_max, self.precond.rho))
    clip = (bool(self.sample_cfg.get("clip_denoised", False)) if clip_denoised is None
            else bool(clip_denoised))
    denoise = sampling_denoiser(self.denoiser(params), guidance, self.null_class, clip)
    return denoise, noise * grid[0], grid

  def sample(self, params, noise, keys, labels: Optional[jax.Array], num_steps: int,
             sampler: Optional[str] = None, guidance: float = 0.0, callback=None, **options):
    """EDM sampling from unit `noise` scaled to sigma_max on an `num_steps`-point grid."""
    sampler = sampler or self.sample_cfg.sampler
    if sampler not in samplers.SAMPLERS:
      raise ValueError(f"unknown EDM sampler {sampler!r}; choose from {sorted(samplers.SAMPLERS)}")
    denoise, x_T, grid = self.sampling_setup(params, noise, num_steps, guidance)
    if sampler == "edm_stochastic":
      for key in ("s_churn", "s_min", "s_max", "s_noise"):
        options.setdefault(key, self.sample_cfg.get(key))
    cond = cond_lib.Conditioning(labels=labels if self.conditional else None)
    x0 = samplers.SAMPLERS[sampler](denoise, x_T, grid, keys, cond, callback, **options)
    return jnp.clip(x0, -1.0, 1.0)
