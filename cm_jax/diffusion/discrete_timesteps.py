"""Inference timesteps of a discrete (DDPM-trained) model, as diffusers' schedulers pick
them, read as VE noise levels for cm_jax's samplers.

diffusers' `DDIMScheduler.set_timesteps` (the `timestep_spacing` options of Lin et al.
2024, "Common Diffusion Noise Schedules and Sample Steps are Flawed", Table 2):
  leading   step = T // n, t_i = i * step (i = n-1 .. 0) + steps_offset   (Stable Diffusion 1.x:
            steps_offset = 1, so 20 steps are 951, 901, ..., 1)
  trailing  t_i = round(T - i T/n) - 1                                      (999, ...)
  linspace  t_i = round(linspace(0, T - 1, n)) reversed
DDIM's last step lands on abar = final_alpha_cumprod: 1 with `set_alpha_to_one`, else
alphas_cumprod[0] (Stable Diffusion: False, so its images are decoded from
sqrt(abar_0) x_0 + sqrt(1 - abar_0) eps, not x_0 itself).

In VE coordinates x = z / alpha (sigma_ve = sqrt((1 - abar)/abar)) DDIM (eta = 0) is the
Euler step of the probability-flow ODE (Song et al. 2021 "DDIM", eq. 14), so the grid of
sigma_ve at those timesteps drives `samplers.sample_ddim`, `sample_euler`,
`sample_dpmpp_2m`, ... unchanged.
"""
from __future__ import annotations

from typing import Optional

import jax.numpy as jnp
import numpy as np

SPACINGS = ("leading", "trailing", "linspace")

# Stable Diffusion 1.x's DDIM settings: what a cm_jax-trained latent model samples with.
SD_SCHEDULER_SETTINGS = dict(timestep_spacing="leading", steps_offset=1, set_alpha_to_one=False)


def scheduler_settings(folder_config: Optional[dict], schedule) -> dict:
  """{num_train_timesteps, timestep_spacing, steps_offset, set_alpha_to_one} from a
  diffusers `scheduler_config.json` dict (missing keys take diffusers' defaults), or
  Stable Diffusion's settings when there is none."""
  base = dict(SD_SCHEDULER_SETTINGS) if folder_config is None else dict(
      timestep_spacing="leading", steps_offset=0, set_alpha_to_one=True)
  if folder_config is not None:
    base.update({k: folder_config[k] for k in base if k in folder_config})
  base["num_train_timesteps"] = int(schedule.num_train_timesteps)
  if base["timestep_spacing"] not in SPACINGS:
    raise ValueError(f"timestep_spacing {base['timestep_spacing']!r} is not supported; "
                     f"choose from {SPACINGS}")
  return base


def inference_timesteps(num_train_timesteps: int, num_steps: int, spacing: str = "leading",
                        steps_offset: int = 0) -> np.ndarray:
  """The `num_steps` integer timesteps, descending (diffusers' DDIMScheduler.set_timesteps)."""
  n, T = int(num_steps), int(num_train_timesteps)
  if not 1 <= n <= T:
    raise ValueError(f"the number of steps must be in [1, {T}], got {n}")
  if spacing == "leading":
    t = (np.arange(n) * (T // n)).round()[::-1] + int(steps_offset)
  elif spacing == "trailing":
    t = np.round(np.arange(T, 0, -T / n)) - 1
  elif spacing == "linspace":
    t = np.linspace(0, T - 1, n).round()[::-1]
  else:
    raise ValueError(f"unknown timestep_spacing {spacing!r}; choose from {SPACINGS}")
  return t.astype(np.int64)


def ve_grid(schedule, settings: dict, num_steps: int, final_zero: bool = False):
  """(sigma_ve at each inference timestep, then the final level) and alpha of that final
  level: the samplers' grid, and the factor that turns their last x into the latent z a
  diffusers pipeline decodes. `final_zero`: end at sigma = 0 (x_0 itself, what diffusers'
  Euler / DPM-Solver schedulers do) instead of DDIM's final_alpha_cumprod."""
  ts = inference_timesteps(settings["num_train_timesteps"], num_steps,
                           settings["timestep_spacing"], settings["steps_offset"])
  ac = np.asarray(schedule.alphas_cumprod, np.float64)
  final_abar = 1.0 if (final_zero or settings["set_alpha_to_one"]) else float(ac[0])
  abar = np.append(ac[ts], final_abar)
  grid = np.sqrt((1.0 - abar) / abar)
  return jnp.asarray(grid, jnp.float32), float(np.sqrt(final_abar))


def snap_to_integer(t, tol: float = 1e-3):
  """t rounded to the nearest integer timestep when within `tol` of it: the VE-sigma -> t
  round trip costs float32 rounding (950.99994 for 951), and a discrete model was only
  ever shown integer timesteps (its sinusoidal embedding turns 6e-5 into a visible change
  at the highest frequency). Fractional t between grid points pass through."""
  t = jnp.asarray(t, jnp.float32)
  r = jnp.round(t)
  return jnp.where(jnp.abs(t - r) < tol, r, t)
