"""The math on arrays: noise grids, preconditioning, losses, ODE solver steps, samplers.

Pure JAX functions, no Flax (see DESIGN.md). Each function's docstring names the
equation or algorithm of Karras et al. 2022 (EDM) or Song et al. 2023
(Consistency Models) that it implements.
"""
from cm_jax.diffusion.edm_loss import edm_loss, edm_loss_weight, sample_lognormal_sigma
from cm_jax.diffusion.grids import append_zero, karras_sigmas
from cm_jax.diffusion.noise import per_image_keys, per_image_normal
from cm_jax.diffusion.preconditioning import (consistency_scalings, edm_scalings,
                                              make_denoiser, noise_conditioning)
from cm_jax.diffusion.samplers import (SAMPLERS, sample_edm_stochastic, sample_euler,
                                       sample_heun, sampler_nfe)
from cm_jax.diffusion.solvers import euler_step, heun_step, ode_slope
