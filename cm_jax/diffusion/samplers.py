"""Diffusion samplers with one k-diffusion-style signature:

  sample_<name>(denoise, x_T, grid, rng=None, cond=None, callback=None, **options) -> x_0

* `grid` holds the noise levels t_0 > t_1 > ... > t_N, normally with the
  trailing zero t_N = 0 of EDM eq. 5 (e.g. `append_zero(karras_sigmas(18))`):
  N = len(grid) - 1 steps.
* `x_T` is already scaled by grid[0] (x_T = grid[0] * standard normal).
* `denoise(x, sigma (B,), cond) -> D(x; sigma)` (see `make_denoiser`), `cond` a
  `cm_jax.conditioning.Conditioning` (or the labels, or None), passed through unopened.
* `callback`, when given, is called as callback(step, x, denoised, t) after each step's
  first denoiser evaluation, through `jax.debug.callback`, so it works under `jit` (OLSS
  records trajectories with it; progress bars can use it).
* Every grid is in VE coordinates (x = z / alpha, sigma = sigma_t / alpha_t), so a VP,
  discrete or latent teacher samples here through its adapter
  (`cm_jax.diffusion.parameterization.make_schedule_denoiser`).
* `rng`, when used, is an array of per-image keys (B,) (see `noise.py`), so a
  sample never depends on the batch it was drawn in.

The step loop is a `jax.lax.scan`, so the compiled program (and compile time)
does not grow with the number of steps. Inside the loop the Heun correction is
behind `lax.cond(t_{i+1} != 0, ...)`: under `jit` the final step to t_N = 0
really costs one network evaluation, matching `sampler_nfe`.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from cm_jax.diffusion.noise import per_image_normal
from cm_jax.diffusion.solvers import _euler, _heun_correction

_F32 = jnp.float32


def _grid(grid):
  g = jnp.asarray(grid, _F32)
  if g.ndim != 1 or g.shape[0] < 2:
    raise ValueError(f"grid must be 1-D with at least 2 levels, got shape {g.shape}")
  return g


def _heun_after_euler(denoise, x, x_e, d, t_cur, t_next, cond):
  """EDM Alg. 1 lines 6-8 for scalar levels; the correction runs only if t_next != 0."""
  # If the sampler is vmapped, cond becomes a select that runs both branches:
  # a dummy t_next = 1 keeps the discarded correction free of inf/nan.
  t_safe = jnp.where(t_next != 0, t_next, 1.0)
  return jax.lax.cond(
      t_next != 0,
      lambda: _heun_correction(denoise, x, x_e, d, t_cur, t_safe, cond, None),
      lambda: x_e)


def _report(callback, i, x, d, t_cur):
  """callback(step, x, denoised, t): the denoised estimate is x - t d (d = the step's slope)."""
  if callback is not None:
    jax.debug.callback(callback, i, x, x - t_cur * d, t_cur, ordered=True)


def sample_euler(denoise, x_T, grid, rng=None, cond=None, callback=None):
  """Deterministic Euler sampler: EDM Algorithm 1 without its 2nd-order correction
  (lines 4-5 only). N = len(grid) - 1 network evaluations. `rng` is unused."""
  del rng
  g = _grid(grid)

  def body(x, inp):
    i, t_cur, t_next = inp
    x_e, d = _euler(denoise, x, t_cur, t_next, cond, None)
    _report(callback, i, x, d, t_cur)
    return x_e, None

  steps = jnp.arange(g.shape[0] - 1, dtype=jnp.int32)
  x, _ = jax.lax.scan(body, jnp.asarray(x_T).astype(_F32), (steps, g[:-1], g[1:]))
  return x


def sample_ddim(denoise, x_T, grid, rng=None, cond=None, callback=None):
  """DDIM (Song, Meng, Ermon 2021, eq. 12 with eta = 0) in VE coordinates:

    x_s = x_hat + (sigma_s / sigma_t) (x_t - x_hat),   x_hat = D(x_t; sigma_t),

  which is z_s = alpha_s x_hat + sigma_s eps_hat divided by alpha_s. It is the Euler step
  of the PF ODE in these coordinates (Karras et al. 2022, Sec. 3 / k-diffusion), written
  as DDIM so that a last level of 0 returns x_hat, the final `i == 0` step of
  diffusion_distillation's `ddim_step`. N = len(grid) - 1 network evaluations.
  """
  return sample_euler(denoise, x_T, grid, rng, cond, callback)


def sample_heun(denoise, x_T, grid, rng=None, cond=None, callback=None):
  """Deterministic Heun sampler, EDM Algorithm 1 (sigma(t) = t, s(t) = 1).

  2N - 1 network evaluations when grid[-1] == 0 (2N otherwise). `rng` is unused.
  """
  del rng
  return sample_edm_stochastic(denoise, x_T, grid, None, cond, callback)


def sample_edm_stochastic(denoise, x_T, grid, rng=None, cond=None, callback=None,
                          s_churn: float = 0.0, s_min: float = 0.0,
                          s_max: float = float("inf"), s_noise: float = 1.0):
  """EDM Algorithm 2: stochastic sampler with "churn" (sigma(t) = t, s(t) = 1).

  For i = 0 .. N-1:
    gamma_i = min(S_churn / N, sqrt(2) - 1) if S_min <= t_i <= S_max else 0
    eps_i ~ N(0, S_noise^2 I)                       (per image, step i folded in)
    t_hat = t_i + gamma_i t_i;  x_hat = x_i + sqrt(t_hat^2 - t_i^2) eps_i
    then a Heun step (Alg. 1 lines 4-8) from (x_hat, t_hat) to t_{i+1}.

  `rng` are per-image keys (B,); eps_i = per_image_normal(rng, x.shape[1:], step=i).
  With s_churn == 0 this is exactly `sample_heun` (and rng may then be None).
  2N - 1 network evaluations when grid[-1] == 0.
  """
  g = _grid(grid)
  n = g.shape[0] - 1
  no_churn = isinstance(s_churn, (int, float)) and s_churn == 0
  if rng is None and not no_churn:
    raise ValueError("sample_edm_stochastic needs per-image keys rng (B,) when s_churn > 0")
  gamma_max = jnp.minimum(jnp.asarray(s_churn, _F32) / n, math.sqrt(2.0) - 1.0)
  x_T = jnp.asarray(x_T).astype(_F32)

  def body(x, inp):
    i, t_cur, t_next = inp
    inside = (t_cur >= s_min) & (t_cur <= s_max)
    gamma = jnp.where(inside, gamma_max, 0.0)
    t_hat = t_cur + gamma * t_cur
    if rng is not None:
      eps = s_noise * per_image_normal(rng, x.shape[1:], step=i)
      # sqrt(t_hat^2 - t_i^2) = t_i sqrt(gamma (2 + gamma)), without cancellation.
      x_hat = x + t_cur * jnp.sqrt(gamma * (2.0 + gamma)) * eps
    else:
      x_hat = x
    x_e, d = _euler(denoise, x_hat, t_hat, t_next, cond, None)
    _report(callback, i, x_hat, d, t_hat)
    return _heun_after_euler(denoise, x_hat, x_e, d, t_hat, t_next, cond), None

  steps = jnp.arange(n, dtype=jnp.int32)
  x, _ = jax.lax.scan(body, x_T, (steps, g[:-1], g[1:]))
  return x


# DPM-Solver++(2M) lives in its own module; imported here so every sampler has one registry.
from cm_jax.diffusion.vp_samplers import sample_dpmpp_2m, sample_meng_stochastic  # noqa: E402  pylint: disable=g-import-not-at-top
from cm_jax.diffusion.addim_sampler import sample_addim  # noqa: E402  pylint: disable=g-import-not-at-top

SAMPLERS = {
    "addim": sample_addim,
    "ddim": sample_ddim,
    "dpmpp_2m": sample_dpmpp_2m,
    "euler": sample_euler,
    "heun": sample_heun,
    "edm_stochastic": sample_edm_stochastic,
    "meng_stochastic": sample_meng_stochastic,
}


def sampler_nfe(name: str, num_steps: int) -> int:
  """Network evaluations of sampler `name` on `num_steps` non-zero levels N,
  i.e. grid = append_zero(karras_sigmas(N)): Euler N; Heun and EDM-stochastic
  2N - 1 (no correction on the last step, to sigma = 0). E.g. Heun, N=18: 35."""
  if name not in SAMPLERS:
    raise ValueError(f"unknown sampler {name!r}; known: {sorted(SAMPLERS)}")
  if num_steps < 1:
    raise ValueError(f"num_steps must be >= 1, got {num_steps}")
  if name in ("euler", "ddim", "addim", "dpmpp_2m", "meng_stochastic"):
    return int(num_steps)
  return 2 * int(num_steps) - 1
