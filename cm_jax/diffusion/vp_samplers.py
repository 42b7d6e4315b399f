"""Multistep solvers for the diffusion ODE, written in VE coordinates.

DPM-Solver++(2M), Lu et al. 2022 ("DPM-Solver++: Fast Solver for Guided Sampling
of Diffusion Probabilistic Models"), Algorithm 2 (data prediction, multistep,
second order). With lambda = log(alpha/sigma) = -log sigma_ve and h_i =
lambda_{i+1} - lambda_i, the update of z = alpha x,

  z_{i+1} = (sigma_{i+1}/sigma_i) z_i - alpha_{i+1} (e^{-h_i} - 1) D_i,

divided by alpha_{i+1} becomes the same update of x = z/alpha in VE coordinates
(sigma_ve_{i+1}/sigma_ve_i = e^{-h_i}):

  x_{i+1} = e^{-h_i} x_i + (1 - e^{-h_i}) D_i,     D_i = D(x_i; sigma_i),

with D_i replaced by the second-order combination
(1 + 1/(2 r_i)) D_i - 1/(2 r_i) D_{i-1}, r_i = h_{i-1}/h_i, from the second step
on. So the sampler is schedule-free: any VP schedule enters only through the VE
levels of the grid (sigma_ve = sigma/alpha) and the denoiser (see
`parameterization.make_schedule_denoiser`). This is the form of k-diffusion's
`sample_dpmpp_2m`.

Conventions: the first step is first order (no history, Alg. 2), and a step to
sigma = 0 is first order as well, which gives x = D exactly (diffusers'
DPMSolverMultistepScheduler `lower_order_final`, used there for < 15 steps,
and `final_sigmas_type='zero'`; k-diffusion does the same for any number of
steps).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from cm_jax.diffusion.noise import per_image_normal

_F32 = jnp.float32


def sample_dpmpp_2m(denoise, x_T, grid, rng=None, cond=None, callback=None):
  """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2) on a descending VE-sigma grid.

  Args:
    denoise: `denoise(x, sigma (B,), cond) -> x_hat` in VE coordinates.
    x_T: the initial x at grid[0] (x_T = grid[0] * standard normal for VE, or
      z_T / alpha_T for a VP model).
    grid: sigma_0 > sigma_1 > ... > sigma_N, normally with sigma_N = 0;
      N = len(grid) - 1 steps and N network evaluations.
    rng: unused (the sampler is deterministic).
    cond: passed to `denoise` unchanged.
    callback: when given, `callback(i, x_i, D_i, sigma_i)` via jax.debug.callback
      after each denoiser evaluation (x_i is the state the denoiser saw).

  Returns:
    x_N, float32, the shape of x_T.
  """
  del rng
  g = jnp.asarray(grid, _F32)
  if g.ndim != 1 or g.shape[0] < 2:
    raise ValueError(f"grid must be 1-D with at least 2 levels, got shape {g.shape}")
  x_T = jnp.asarray(x_T).astype(_F32)
  batch = x_T.shape[0]

  def body(carry, inp):
    x, d_old, h_old = carry
    i, s_cur, s_next = inp
    d = jnp.asarray(denoise(x, jnp.full((batch,), s_cur, _F32), cond)).astype(_F32)
    if callback is not None:
      # ordered: steps reach the host in order, as the other samplers' callbacks do.
      jax.debug.callback(callback, i, x, d, s_cur, ordered=True)
    final = s_next == 0
    s_safe = jnp.where(final, 1.0, s_next)
    h = jnp.log(s_cur) - jnp.log(s_safe)          # lambda_{i+1} - lambda_i
    decay = jnp.where(final, 0.0, s_next / s_cur)  # e^{-h}
    weight = jnp.where(final, 1.0, -jnp.expm1(-h))  # 1 - e^{-h}
    second = (i > 0) & jnp.logical_not(final)
    r = h_old / jnp.where(second, h, 1.0)
    c = jnp.where(second, 0.5 / jnp.where(second, r, 1.0), 0.0)
    d_eff = (1.0 + c) * d - c * d_old
    x_next = decay * x + weight * d_eff
    return (x_next, d, h), None

  n = g.shape[0] - 1
  steps = jnp.arange(n, dtype=jnp.int32)
  init = (x_T, jnp.zeros_like(x_T), jnp.asarray(1.0, _F32))
  (x, _, _), _ = jax.lax.scan(body, init, (steps, g[:-1], g[1:]))
  return x


def sample_meng_stochastic(denoise, x_T, grid, rng=None, cond=None, callback=None):
  """Meng et al. 2023 ("On Distillation of Guided Diffusion Models", Sec. 4.3) N-step
  stochastic sampler: from t_i, one deterministic DDIM step of twice the length to
  k = t_{i+2}, then a stochastic step back to s = t_{i+1}:

    z_s = (alpha_s / alpha_k) z_k + sigma_{s|k} eps,
    sigma^2_{s|k} = (1 - e^{lambda_s - lambda_k}) sigma_s^2       (lambda = log alpha^2/sigma^2),

  the forward process q(z_s | z_k). Divided by alpha_s (VE coordinates, e^{lambda} = 1/sigma_ve^2)
  the step back is x_s = x_k + sqrt(sigma_s^2 - sigma_k^2) eps: noise added to the VE level
  of s. The last step (t_{N-1} -> t_N = 0) is deterministic and returns x_hat. N = len(grid) - 1
  network evaluations; `rng` are per-image keys (B,), needed when N >= 2.
  """
  g = jnp.asarray(grid, _F32)
  if g.ndim != 1 or g.shape[0] < 2:
    raise ValueError(f"grid must be 1-D with at least 2 levels, got shape {g.shape}")
  n = g.shape[0] - 1
  if rng is None and n >= 2:
    raise ValueError("sample_meng_stochastic needs per-image keys rng (B,) for N >= 2 steps")
  # k_i = t_{i+2}; for the last step k = s = t_N (= 0): a plain deterministic step.
  g_k = jnp.concatenate([g[2:], g[-1:]])

  def body(x, inp):
    i, t_cur, s, k = inp
    x_hat = jnp.asarray(denoise(x, jnp.full((x.shape[0],), t_cur, _F32), cond)).astype(_F32)
    if callback is not None:
      jax.debug.callback(callback, i, x, x_hat, t_cur, ordered=True)
    x_k = x_hat + (k / t_cur) * (x - x_hat)  # DDIM from t to k (sample_ddim's form)
    std = jnp.sqrt(jnp.maximum(s * s - k * k, 0.0))
    if rng is None:
      return x_k, None
    return x_k + std * per_image_normal(rng, x.shape[1:], step=i), None

  steps = jnp.arange(n, dtype=jnp.int32)
  x, _ = jax.lax.scan(body, jnp.asarray(x_T).astype(_F32), (steps, g[:-1], g[1:], g_k))
  return x
