"""The discrete-time pieces of latent consistency models (Luo et al. 2023, "Latent
Consistency Models"): the skipping-step grid LCD trains on, the one-step teacher solvers
that cross k timesteps, and the multistep sampler of diffusers' `LCMScheduler`.

Timesteps are the integer timesteps 0..T-1 of a discrete DDPM schedule (T = 1000 for
Stable Diffusion), with abar_t = alphas_cumprod[t], alpha_t = sqrt(abar_t),
sigma_t = sqrt(1 - abar_t).

* Skipping-step grid (LCM Sec. 4.3; diffusers' `DDIMSolver` in
  `train_lcm_distill_sd_wds.py`): N = original_steps = 50 points t_i = (i + 1) * (T // N) - 1,
  i.e. 19, 39, ..., 999, and the teacher crosses k = T // N = 20 timesteps: from
  t_{n+k} = t_i to t_n = max(t_i - k, 0).
* LCMScheduler's timesteps for S steps: that grid reversed, at the floor of
  linspace(0, N, S, endpoint=False): 1 -> [999], 2 -> [999, 499],
  4 -> [999, 759, 499, 259].
* Multistep sampling (LCM Algorithm 3 / LCMScheduler.step): at each timestep the
  consistency function f = c_skip(t) z + c_out(t) x0(z, t) with LCM's boundary scalings
  (`parameterization.lcm_boundary_scalings`, timestep scaling 10); unless it is the last
  step, z = alpha_{t'} f + sigma_{t'} eps' at the next timestep t' with fresh noise eps'.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from cm_jax.diffusion import parameterization as param_lib

_F32 = jnp.float32


def skipping_grid(num_train_timesteps: int = 1000, original_steps: int = 50) -> np.ndarray:
  """The N ascending timesteps (i + 1) * (T // N) - 1 LCD draws t_{n+k} from."""
  T, n = int(num_train_timesteps), int(original_steps)
  if not 1 <= n <= T:
    raise ValueError(f"the skipping-step grid needs 1 <= original_steps <= {T}, got {n}")
  return np.arange(1, n + 1, dtype=np.int64) * (T // n) - 1


def skip(num_train_timesteps: int = 1000, original_steps: int = 50) -> int:
  """k, the number of timesteps the teacher crosses in one solver step (T // N)."""
  return int(num_train_timesteps) // int(original_steps)


def inference_timesteps(num_steps: int, num_train_timesteps: int = 1000,
                        original_steps: int = 50) -> np.ndarray:
  """The descending timesteps of LCMScheduler.set_timesteps(num_steps) (strength 1)."""
  grid = skipping_grid(num_train_timesteps, original_steps)[::-1]
  s = int(num_steps)
  if not 1 <= s <= len(grid):
    raise ValueError(f"an LCM samples with 1 to {len(grid)} steps (its {len(grid)}-point "
                     f"training grid), got {s}")
  index = np.floor(np.linspace(0, len(grid), num=s, endpoint=False)).astype(np.int64)
  return grid[index]


def _abar(t, alphas_cumprod):
  return jnp.asarray(alphas_cumprod, _F32)[jnp.asarray(t, jnp.int32)]


def _col(v, like):
  v = jnp.asarray(v, _F32)
  return v.reshape(v.shape + (1,) * (like.ndim - v.ndim)) if v.ndim else v


def consistency_output(z, x0, t, timestep_scaling: float = 10.0):
  """f(z, t) = c_skip(t) z + c_out(t) x0 (LCM eq. 9 with diffusers' discrete scalings)."""
  c_skip, c_out = param_lib.lcm_boundary_scalings(t, timestep_scaling)
  z = jnp.asarray(z, _F32)
  return _col(c_skip, z) * z + _col(c_out, z) * jnp.asarray(x0, _F32)


def ddim_teacher_step(x0, eps, t_next, alphas_cumprod):
  """The DDIM step (Song et al. 2021, eq. 12, eta = 0) to t_next from the guided
  predictions: z' = alpha_{t_next} x0 + sigma_{t_next} eps (the reference's
  `DDIMSolver.ddim_step`, which takes x0 and eps as predicted, both guided)."""
  abar = _col(_abar(t_next, alphas_cumprod), x0)
  return jnp.sqrt(abar) * x0 + jnp.sqrt(1.0 - abar) * eps


def dpm_solver_2_step(eps_fn: Callable, z, eps_t, t, t_next, schedule):
  """DPM-Solver-2 (Lu et al. 2022, Algorithm 1 with r1 = 1/2) from t to t_next < t.

  With lambda = log(alpha/sigma) and h = lambda_next - lambda_t, the intermediate point s1
  has lambda_{s1} = lambda_t + h/2:
    u   = (alpha_{s1}/alpha_t) z - sigma_{s1} (e^{h/2} - 1) eps(z, t)
    z'  = (alpha_next/alpha_t) z - sigma_next (e^h - 1) eps(u, s1).
  s1 falls between integer timesteps: it is found, and its alpha read, on the schedule's
  piecewise-linear interpolation of log(sigma/alpha) in t (`DiscreteDDPM.t_from_ve_sigma`),
  and the network is shown the fractional timestep. `eps_fn(u, s1)` gives the (guided)
  noise prediction; `eps_t` is the one already made at (z, t).
  """
  ac = schedule.alphas_cumprod
  abar_t, abar_n = _abar(t, ac), _abar(t_next, ac)
  ve_t = jnp.sqrt((1.0 - abar_t) / abar_t)   # sigma/alpha = exp(-lambda)
  ve_n = jnp.sqrt((1.0 - abar_n) / abar_n)
  h = jnp.log(ve_t) - jnp.log(ve_n)           # lambda_next - lambda_t > 0
  ve_s1 = jnp.sqrt(ve_t * ve_n)               # lambda at the midpoint
  s1 = schedule.t_from_ve_sigma(ve_s1)
  alpha_s1 = 1.0 / jnp.sqrt(1.0 + ve_s1 ** 2)
  sigma_s1 = ve_s1 * alpha_s1
  alpha_t, alpha_n = jnp.sqrt(abar_t), jnp.sqrt(abar_n)
  sigma_n = jnp.sqrt(1.0 - abar_n)
  c = lambda v: _col(v, z)
  u = c(alpha_s1 / alpha_t) * z - c(sigma_s1 * jnp.expm1(h / 2)) * eps_t
  eps_s1 = eps_fn(u, s1)
  return c(alpha_n / alpha_t) * z - c(sigma_n * jnp.expm1(h)) * eps_s1


def multistep_sample(x0_fn: Callable, z_T, timesteps, alphas_cumprod, noises,
                     timestep_scaling: float = 10.0):
  """LCM multistep sampling (LCMScheduler.step at each of `timesteps`): the final
  consistency output, float32.

  x0_fn(z, t) -> the network's x0 prediction at the int32 timestep t (a scalar);
  noises: (S, *z_T.shape) unit noise, row i re-noising after step i (the last row is unused:
  diffusers adds no noise after the last step). One network trace inside lax.scan.
  """
  ts = np.asarray(timesteps, np.int64)
  nxt = np.append(ts[1:], ts[-1])  # the last step's "next" is never used
  last = np.arange(len(ts)) == len(ts) - 1

  def step(z, inputs):
    t, t_next, eps, is_last = inputs
    f = consistency_output(z, x0_fn(z, t), t, timestep_scaling)
    abar = _abar(t_next, alphas_cumprod)
    renoised = jnp.sqrt(abar) * f + jnp.sqrt(1.0 - abar) * eps
    return jnp.where(is_last, f, renoised), None

  inputs = (jnp.asarray(ts, jnp.int32), jnp.asarray(nxt, jnp.int32),
            jnp.asarray(noises, _F32), jnp.asarray(last))
  z, _ = jax.lax.scan(step, jnp.asarray(z_T, _F32), inputs)
  return z


def pseudo_huber(a, b, c: float):
  """mean(sqrt((a - b)^2 + c^2) - c), elementwise (the reference script's 'huber' loss;
  iCT's pseudo-Huber, Song & Dhariwal 2023, on each element rather than the norm)."""
  d = jnp.asarray(a, _F32) - jnp.asarray(b, _F32)
  return jnp.mean(jnp.sqrt(d * d + c * c) - c)
