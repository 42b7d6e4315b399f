"""Adjusted DDIM as a sampler for a diffusion model (Heek, Hoogeboom & Salimans 2024,
"Multistep Consistency Models", Algorithm 3 and App. A: the paper's aDDIM baseline).

DDIM moves along the model's eps_hat with the noise level sigma_s of the next step. A
denoiser's x_hat is the mean of what the data could be, so DDIM's z_s has less variance
than the marginal at s: samples come out smooth. aDDIM inflates the eps part by the
variance x_hat leaves out, x_var per element,

  z_var = (alpha_s - alpha_t sigma_s / sigma_t)^2 x_var,
  z_s   = alpha_s x_hat + sqrt(sigma_s^2 + (d / ||eps_hat||^2) z_var) eps_hat,

and for sampling (no data to measure x_var against) the paper sets
x_var = 0.1 / (2 + alpha_t^2 / sigma_t^2).

In VE coordinates (x = z / alpha, sigma_ve = sigma / alpha; every sampler of
cm_jax.diffusion works there) the step divided by alpha_s reads

  eps_hat = (x_t - x_hat) / sigma_ve_t,
  x_s     = x_hat + sqrt(sigma_ve_s^2 + (d / ||eps_hat||^2) (1 - sigma_ve_s / sigma_ve_t)^2 x_var) eps_hat,
  x_var   = 0.1 / (2 + 1 / sigma_ve_t^2),

since alpha_t sigma_s / (sigma_t alpha_s) = sigma_ve_s / sigma_ve_t and alpha^2 / sigma^2 =
1 / sigma_ve^2. That is `solvers.addim_step` itself with alpha = 1 and sigma = sigma_ve (a VE
schedule), and `solvers.addim_sampling_x_var` at alpha = 1: only the VE levels enter, so it
samples VP and EDM teachers alike. With x_var = 0 it is `samplers.sample_ddim`; a last level
of 0 returns x_hat plus the inflation (1 - 0)^2 x_var, which is then 0.1 / (2 + 1/sigma_ve_t^2)
of eps_hat: not clean. The last step is therefore plain DDIM (x_0 = x_hat), as every DDIM
sampler of cm_jax ends.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from cm_jax.diffusion import solvers

_F32 = jnp.float32


def sample_addim(denoise, x_T, grid, rng=None, cond=None, callback=None):
  """aDDIM sampling (Heek et al. 2024 Alg. 3 with the sampling x_var) on a descending VE
  grid ending in 0; N = len(grid) - 1 network evaluations; deterministic (`rng` unused)."""
  del rng
  from cm_jax.diffusion.samplers import _grid  # pylint: disable=g-import-not-at-top  (cycle)
  g = _grid(grid)

  def body(x, inp):
    i, t_cur, t_next = inp
    x_hat = jnp.asarray(denoise(x, jnp.full((x.shape[0],), t_cur, _F32), cond), _F32)
    if callback is not None:
      jax.debug.callback(callback, i, x, x_hat, t_cur, ordered=True)
    # VE coordinates: the VP step with alpha = 1 and sigma = sigma_ve (module doc).
    stepped = solvers.addim_step(x_hat, x, 1.0, t_cur, 1.0, t_next,
                                 solvers.addim_sampling_x_var(1.0, t_cur))
    return jnp.where(t_next > 0, stepped, x_hat), None

  steps = jnp.arange(g.shape[0] - 1, dtype=jnp.int32)
  x, _ = jax.lax.scan(body, jnp.asarray(x_T, _F32), (steps, g[:-1], g[1:]))
  return x
