"""Single steps of the probability-flow ODE solvers of EDM (Karras et al. 2022).

With sigma(t) = t and s(t) = 1 (EDM's choice), the PF ODE (eq. 1) with the score
written through the denoiser (eq. 3) is

  dx/dsigma = (x - D(x; sigma)) / sigma.

`euler_step` is the first-order step of EDM Algorithm 1 (lines 4-5: slope d_i at
t_i, Euler step to t_{i+1}); `heun_step` adds the second-order correction of
Algorithm 1 (lines 6-8: slope d'_i at t_{i+1}, trapezoidal average), skipped
when t_{i+1} = 0, where the slope is undefined and the step falls back to Euler.

sigma_cur / sigma_next may be Python floats, traced scalars, or (B,) arrays
(one level per example, e.g. a teacher step in consistency distillation);
they broadcast over the non-batch axes of x. The sigma_next == 0 test uses
`jnp.where`, so the steps work under `jit` with traced sigmas.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

_F32 = jnp.float32


def _as_sigma(sigma, x):
  """sigma as float32, either a scalar or (B,) -> (B, 1, ..., 1)."""
  s = jnp.asarray(sigma, _F32)
  if s.ndim == 0:
    return s
  return jnp.reshape(s, (x.shape[0],) + (1,) * (x.ndim - 1))


def _for_denoiser(sigma_b, x):
  """The (B,) sigma vector handed to `denoise`."""
  return jnp.broadcast_to(jnp.reshape(sigma_b, (-1,)) if sigma_b.ndim else sigma_b,
                          (x.shape[0],))


def ode_slope(denoise, x, sigma, labels=None, cond=None):
  """dx/dsigma = (x - D(x; sigma)) / sigma  (EDM eq. 1 with eq. 3, sigma(t) = t)."""
  x = jnp.asarray(x).astype(_F32)
  s = _as_sigma(sigma, x)
  sig = _for_denoiser(s, x)
  # `labels` may be a whole Conditioning; the legacy extra vector only when one is given,
  # so denoisers of the one signature denoise(x, sigma, cond) work here too.
  d = denoise(x, sig, labels) if cond is None else denoise(x, sig, labels, cond)
  return (x - d) / s


def _euler(denoise, x, sigma_cur, sigma_next, labels, cond):
  """Euler step (EDM Alg. 1 lines 4-5); also returns the slope d_i for Heun."""
  x = jnp.asarray(x).astype(_F32)
  sc = _as_sigma(sigma_cur, x)
  sn = _as_sigma(sigma_next, x)
  d = ode_slope(denoise, x, sc, labels, cond)
  return x + (sn - sc) * d, d


def _heun_correction(denoise, x, x_euler, d, sigma_cur, sigma_next, labels, cond):
  """Second-order correction (EDM Alg. 1 lines 7-8) assuming sigma_next > 0."""
  x = jnp.asarray(x).astype(_F32)
  sc = _as_sigma(sigma_cur, x)
  sn = _as_sigma(sigma_next, x)
  d_next = ode_slope(denoise, x_euler, sn, labels, cond)
  return x + (sn - sc) * (0.5 * d + 0.5 * d_next)


def euler_step(denoise, x, sigma_cur, sigma_next, labels=None, cond=None):
  """One Euler step of the PF ODE from sigma_cur to sigma_next (EDM Alg. 1, lines 4-5):

    d = (x - D(x; sigma_cur)) / sigma_cur;   x_next = x + (sigma_next - sigma_cur) d.
  """
  return _euler(denoise, x, sigma_cur, sigma_next, labels, cond)[0]


def heun_step(denoise, x, sigma_cur, sigma_next, labels=None, cond=None):
  """One Heun (2nd-order) step from sigma_cur to sigma_next (EDM Alg. 1, lines 4-8).

    d  = (x - D(x; sigma_cur)) / sigma_cur,      x_e = x + (sigma_next - sigma_cur) d,
    d' = (x_e - D(x_e; sigma_next)) / sigma_next, x_next = x + (sigma_next - sigma_cur)(d + d')/2,

  and x_next = x_e where sigma_next == 0 (per example if sigma_next is (B,)).
  Both branches are evaluated (jnp.where); the correction uses sigma_next = 1
  where sigma_next == 0 so no inf/nan is produced, not even in gradients.
  """
  x = jnp.asarray(x).astype(_F32)
  sn = _as_sigma(sigma_next, x)
  x_e, d = _euler(denoise, x, sigma_cur, sn, labels, cond)
  nonzero = sn != 0
  sn_safe = jnp.where(nonzero, sn, jnp.ones_like(sn))
  # With sn_safe = 1 the correction is computed from a harmless point; it is discarded.
  x_e_safe = jnp.where(nonzero, x_e, x)
  x_h = _heun_correction(denoise, x, x_e_safe, d, sigma_cur, sn_safe, labels, cond)
  return jnp.where(nonzero, x_h, x_e)


# ---------------------------------------------------------------------------
# Steps on a general schedule z = alpha x + sigma eps (VP or VE). alpha_* and
# sigma_* may be Python floats, traced scalars or (B,) arrays (one level per
# example); they broadcast over the non-batch axes of z. All math in float32.
# ---------------------------------------------------------------------------


def ddim_step(x_hat, z_t, alpha_t, sigma_t, alpha_s, sigma_s):
  """Deterministic DDIM step t -> s given the data estimate x_hat at t.

  Song et al. 2021 ("DDIM") eq. 12 with eta = 0, in the form of Heek et al. 2024
  ("Multistep Consistency Models") eq. 4:
    eps_hat = (z_t - alpha_t x_hat)/sigma_t;   z_s = alpha_s x_hat + sigma_s eps_hat.
  """
  z_t = jnp.asarray(z_t).astype(_F32)
  x_hat = jnp.asarray(x_hat).astype(_F32)
  a_t, s_t = _as_sigma(alpha_t, z_t), _as_sigma(sigma_t, z_t)
  a_s, s_s = _as_sigma(alpha_s, z_t), _as_sigma(sigma_s, z_t)
  eps_hat = (z_t - a_t * x_hat) / s_t
  return a_s * x_hat + s_s * eps_hat


def inverse_ddim(z_s, z_t, alpha_t, sigma_t, alpha_s, sigma_s):
  """The x_hat for which ddim_step(x_hat, z_t, ...) == z_s (Heek et al. 2024 eq. 5):

    x_hat = (z_s - (sigma_s/sigma_t) z_t) / (alpha_s - alpha_t sigma_s/sigma_t).

  This is also the progressive-distillation target of Salimans & Ho 2022
  (x~ = (z'' - (s''/s_t) z_t)/(a'' - (s''/s_t) a_t)); see `inverse_ddim_logsnr`
  for the log-space ratio diffusion_distillation uses.
  """
  z_t = jnp.asarray(z_t).astype(_F32)
  z_s = jnp.asarray(z_s).astype(_F32)
  a_t, s_t = _as_sigma(alpha_t, z_t), _as_sigma(sigma_t, z_t)
  a_s, s_s = _as_sigma(alpha_s, z_t), _as_sigma(sigma_s, z_t)
  ratio = s_s / s_t
  return (z_s - ratio * z_t) / (a_s - ratio * a_t)


def inverse_ddim_logsnr(z_s, z_t, logsnr_t, logsnr_s):
  """`inverse_ddim` on a VP schedule given by logsnr, as diffusion_distillation dpm.py
  computes the progressive distillation target (`training_losses`):

    alpha = sqrt(sigmoid(logsnr)),
    sigma_s/sigma_t = exp((softplus(logsnr_t) - softplus(logsnr_s))/2)

  (sigma^2 = sigmoid(-l) = exp(-softplus(l))), which avoids dividing two small
  sigmas when both logsnr are large.
  """
  z_t = jnp.asarray(z_t).astype(_F32)
  l_t = _as_sigma(logsnr_t, z_t)
  l_s = _as_sigma(logsnr_s, z_t)
  a_t = jnp.sqrt(jax.nn.sigmoid(l_t))
  a_s = jnp.sqrt(jax.nn.sigmoid(l_s))
  ratio = jnp.exp(0.5 * (jax.nn.softplus(l_t) - jax.nn.softplus(l_s)))
  return (jnp.asarray(z_s).astype(_F32) - ratio * z_t) / (a_s - ratio * a_t)


def addim_step(x_hat, z_t, alpha_t, sigma_t, alpha_s, sigma_s, x_var):
  """Adjusted DDIM (aDDIM) step t -> s, Heek et al. 2024 Algorithm 3.

    eps_hat = (z_t - alpha_t x_hat)/sigma_t
    z_var   = (alpha_s - alpha_t sigma_s/sigma_t)^2 x_var
    z_s     = alpha_s x_hat + sqrt(sigma_s^2 + (d/||eps_hat||^2) z_var) eps_hat,

  d = number of elements per example, ||.|| per example. x_var is a scalar or
  (B,) (the variance of x_hat per element). With x_var = 0 this is `ddim_step`.
  """
  z_t = jnp.asarray(z_t).astype(_F32)
  x_hat = jnp.asarray(x_hat).astype(_F32)
  a_t, s_t = _as_sigma(alpha_t, z_t), _as_sigma(sigma_t, z_t)
  a_s, s_s = _as_sigma(alpha_s, z_t), _as_sigma(sigma_s, z_t)
  var = _as_sigma(x_var, z_t)
  eps_hat = (z_t - a_t * x_hat) / s_t
  z_var = jnp.square(a_s - a_t * s_s / s_t) * var
  axes = tuple(range(1, z_t.ndim))
  d = 1
  for n in z_t.shape[1:]:
    d *= int(n)
  norm2 = jnp.sum(jnp.square(eps_hat), axis=axes, keepdims=True)
  norm2 = jnp.maximum(norm2, jnp.finfo(_F32).tiny)
  scale = jnp.sqrt(s_s * s_s + (d / norm2) * z_var)
  return a_s * x_hat + scale * eps_hat


def addim_sampling_x_var(alpha_t, sigma_t):
  """Heek et al. 2024's x_var for aDDIM sampling: 0.1 / (2 + alpha_t^2/sigma_t^2)."""
  a = jnp.asarray(alpha_t, _F32)
  s = jnp.asarray(sigma_t, _F32)
  return 0.1 / (2.0 + a * a / (s * s))


def discrete_alpha_sigma(t, alphas_cumprod, final_alpha_cumprod: float = 1.0):
  """(alpha, sigma) = (sqrt(abar_t), sqrt(1 - abar_t)) at integer timesteps t of a
  discrete schedule; t < 0 means "final" and uses abar = final_alpha_cumprod
  (diffusers' DDIMScheduler: `final_alpha_cumprod` = 1 with set_alpha_to_one=True,
  else alphas_cumprod[0]; LCMScheduler's final step is the former)."""
  abar = _discrete_abar(t, alphas_cumprod, final_alpha_cumprod)
  return jnp.sqrt(abar), jnp.sqrt(1.0 - abar)


def _discrete_abar(t, alphas_cumprod, final_alpha_cumprod: float):
  """alphas_cumprod[t] (float32), final_alpha_cumprod where t < 0."""
  ac = jnp.asarray(alphas_cumprod, _F32)
  t = jnp.asarray(t, jnp.int32)
  return jnp.where(t >= 0, ac[jnp.maximum(t, 0)], jnp.asarray(final_alpha_cumprod, _F32))


def ddim_discrete_step(eps_hat, z, t, s, alphas_cumprod, final_alpha_cumprod: float = 1.0):
  """DDIM (eta = 0) between integer timesteps t -> s of a discrete schedule, from an
  eps prediction, in the operation order of diffusers' DDIMScheduler.step:

    x0  = (z - sqrt(1 - abar_t) eps_hat)/sqrt(abar_t)          (DDIM eq. 12, "predicted x_0")
    z_s = sqrt(abar_s) x0 + sqrt(1 - abar_s) eps_hat,

  abar_s = final_alpha_cumprod where s < 0 (see `discrete_alpha_sigma`). t and s
  are ints or (B,) int arrays; e.g. LCM's skipping-step teacher uses s = t - k.
  For an x-prediction use `ddim_step` with `discrete_alpha_sigma`.
  """
  z = jnp.asarray(z).astype(_F32)
  eps_hat = jnp.asarray(eps_hat).astype(_F32)
  abar_t = _as_sigma(jnp.asarray(alphas_cumprod, _F32)[jnp.asarray(t, jnp.int32)], z)
  abar_s = _as_sigma(_discrete_abar(s, alphas_cumprod, final_alpha_cumprod), z)
  x0 = (z - jnp.sqrt(1.0 - abar_t) * eps_hat) / jnp.sqrt(abar_t)
  return jnp.sqrt(abar_s) * x0 + jnp.sqrt(1.0 - abar_s) * eps_hat
