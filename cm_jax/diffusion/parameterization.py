"""What a network predicts (x, eps, v, both), boundary scalings, and schedule adapters.

With z = alpha x + sigma eps (any schedule; alpha = 1 for VE):

* conversions: x = (z - sigma eps)/alpha, eps = (z - alpha x)/sigma, and the
  velocity v = alpha eps - sigma x of Salimans & Ho 2022 ("Progressive
  Distillation", Sec. 4 and App. D), inverted by x = (alpha z - sigma v)/(alpha^2 +
  sigma^2), eps = (sigma z + alpha v)/(alpha^2 + sigma^2); for a VP schedule the
  denominator is 1 and these are the paper's x = alpha z - sigma v,
  eps = sigma z + alpha v.
* parameterizations as objects (`XPrediction`, `EpsPrediction`, `VPrediction`,
  `BothPrediction`) with `to_x`, `to_eps`, `target`. 'both' is
  diffusion_distillation `dpm.py` `Model._run_model` with mean_type='both': the
  output is split in two along the last (channel) axis, (x_part, eps_part), and
  x = sigma^2 x_part + (1 - sigma^2) x(eps_part), i.e. the weight on the direct
  x prediction is sigmoid(-logsnr) (Salimans & Ho 2022 Sec. 4, "predicting x and
  eps separately ... smoothly interpolate").
* boundary scalings: `consistency_boundary_scalings`, Song et al. 2023
  ("Consistency Models") eq. 5 with the Appendix C c_skip/c_out, the boundary
  sigma_min generalised to a per-example sigma_boundary (as multistep CMs need);
  `lcm_boundary_scalings`, Luo et al. 2023 ("Latent Consistency Models") as in
  diffusers' `LCMScheduler.get_scalings_for_boundary_condition_discrete`.
* adapters (k-diffusion style): `make_schedule_denoiser` turns a network on any
  schedule into a denoiser D(x; sigma_ve) in VE coordinates x = z/alpha;
  `vp_time_input` is diffusion_distillation's 'inv_cos' time input.

All math in float32. alpha/sigma may be scalars, arrays broadcastable to z, or
(B,) vectors (reshaped to (B, 1, ..., 1)).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, ClassVar, Union

import jax.numpy as jnp

from cm_jax.diffusion.schedules import vp_alpha_sigma

_F32 = jnp.float32


def _arr(v):
  return jnp.asarray(v).astype(_F32)


def _b(v, like):
  """float32 `v`; a (B,) vector against a rank>1 `like` becomes (B, 1, ..., 1)."""
  v = _arr(v)
  nd = jnp.ndim(like)
  if v.ndim == 1 and nd > 1:
    v = jnp.reshape(v, (v.shape[0],) + (1,) * (nd - 1))
  return v


def x_from_eps(z, eps, alpha, sigma):
  """x = (z - sigma eps)/alpha (z = alpha x + sigma eps solved for x)."""
  z = _arr(z)
  return (z - _b(sigma, z) * _arr(eps)) / _b(alpha, z)


def eps_from_x(z, x, alpha, sigma):
  """eps = (z - alpha x)/sigma."""
  z = _arr(z)
  return (z - _b(alpha, z) * _arr(x)) / _b(sigma, z)


def v_from_x_eps(x, eps, alpha, sigma):
  """v = alpha eps - sigma x (Salimans & Ho 2022 Sec. 4 / App. D)."""
  x = _arr(x)
  return _b(alpha, x) * _arr(eps) - _b(sigma, x) * x


def x_from_v(z, v, alpha, sigma):
  """x = (alpha z - sigma v)/(alpha^2 + sigma^2); = alpha z - sigma v for VP (App. D)."""
  z = _arr(z)
  a, s = _b(alpha, z), _b(sigma, z)
  return (a * z - s * _arr(v)) / (a * a + s * s)


def eps_from_v(z, v, alpha, sigma):
  """eps = (sigma z + alpha v)/(alpha^2 + sigma^2); = sigma z + alpha v for VP."""
  z = _arr(z)
  a, s = _b(alpha, z), _b(sigma, z)
  return (s * z + a * _arr(v)) / (a * a + s * s)


@dataclasses.dataclass(frozen=True)
class XPrediction:
  """The network predicts x directly."""
  name: ClassVar[str] = "x"
  out_channels_factor: ClassVar[int] = 1

  def to_x(self, out, z, alpha, sigma):
    return _arr(out)

  def to_eps(self, out, z, alpha, sigma):
    return eps_from_x(z, self.to_x(out, z, alpha, sigma), alpha, sigma)

  def target(self, x, eps, alpha, sigma):
    return _arr(x)


@dataclasses.dataclass(frozen=True)
class EpsPrediction:
  """The network predicts eps (Ho et al. 2020); x = (z - sigma eps)/alpha."""
  name: ClassVar[str] = "eps"
  out_channels_factor: ClassVar[int] = 1

  def to_x(self, out, z, alpha, sigma):
    return x_from_eps(z, out, alpha, sigma)

  def to_eps(self, out, z, alpha, sigma):
    return _arr(out)

  def target(self, x, eps, alpha, sigma):
    return _arr(eps)


@dataclasses.dataclass(frozen=True)
class VPrediction:
  """The network predicts v = alpha eps - sigma x (Salimans & Ho 2022 Sec. 4)."""
  name: ClassVar[str] = "v"
  out_channels_factor: ClassVar[int] = 1

  def to_x(self, out, z, alpha, sigma):
    return x_from_v(z, out, alpha, sigma)

  def to_eps(self, out, z, alpha, sigma):
    return eps_from_v(z, out, alpha, sigma)

  def target(self, x, eps, alpha, sigma):
    return v_from_x_eps(x, eps, alpha, sigma)


@dataclasses.dataclass(frozen=True)
class BothPrediction:
  """diffusion_distillation's mean_type='both' (dpm.py `_run_model`).

  The raw output has 2C channels: out = concat([x_part, eps_part], axis=-1).
  x = w x_part + (1 - w) (z - sigma eps_part)/alpha with w = sigmoid(-logsnr) =
  sigma^2/(alpha^2 + sigma^2) (= sigma^2 for VP); eps is then derived from that
  x, as dpm.py does. `target` is concat([x, eps], -1), for which to_x returns x.
  """
  name: ClassVar[str] = "both"
  out_channels_factor: ClassVar[int] = 2

  def to_x(self, out, z, alpha, sigma):
    z = _arr(z)
    x_part, eps_part = jnp.split(_arr(out), 2, axis=-1)
    a, s = _b(alpha, z), _b(sigma, z)
    w = s * s / (a * a + s * s)
    return w * x_part + (1.0 - w) * x_from_eps(z, eps_part, a, s)

  def to_eps(self, out, z, alpha, sigma):
    return eps_from_x(z, self.to_x(out, z, alpha, sigma), alpha, sigma)

  def target(self, x, eps, alpha, sigma):
    return jnp.concatenate([_arr(x), _arr(eps)], axis=-1)


PARAMETERIZATIONS = {
    "x": XPrediction(),
    "eps": EpsPrediction(),
    "v": VPrediction(),
    "both": BothPrediction(),
}


def get_parameterization(name):
  """The parameterization object for `name` (an object passes through)."""
  if not isinstance(name, str):
    return name
  if name not in PARAMETERIZATIONS:
    raise ValueError(f"unknown parameterization {name!r}; "
                     f"known: {sorted(PARAMETERIZATIONS)}")
  return PARAMETERIZATIONS[name]


def consistency_boundary_scalings(sigma, sigma_boundary, sigma_data: float = 0.5):
  """(c_skip, c_out) of Consistency Models eq. 5 / App. C with a per-example boundary.

  c_skip = sd^2/((s - sb)^2 + sd^2), c_out = sd (s - sb)/sqrt(s^2 + sd^2).
  With sb = sigma_min these are exactly `preconditioning.consistency_scalings`
  (same float32 operations); at s == sb, c_skip == 1 and c_out == 0 exactly, so
  f(x, sb) = x. sigma and sigma_boundary broadcast against each other.
  """
  s = _arr(sigma)
  sd = jnp.asarray(sigma_data, _F32)
  sb = _arr(sigma_boundary)
  ds = s - sb
  c_skip = sd * sd / (ds * ds + sd * sd)
  c_out = sd * ds / jnp.sqrt(s * s + sd * sd)
  return c_skip, c_out


def lcm_boundary_scalings(timestep, timestep_scaling: float = 10.0,
                          sigma_data: float = 0.5):
  """(c_skip, c_out) of diffusers' LCMScheduler.get_scalings_for_boundary_condition_discrete.

  With u = timestep * timestep_scaling (the integer DDPM timestep, scaling 10):
  c_skip = sd^2/(u^2 + sd^2), c_out = u/sqrt(u^2 + sd^2) (no sd factor in c_out,
  unlike the CM App. C form). At timestep 0: c_skip = 1, c_out = 0.
  """
  u = _arr(timestep) * jnp.asarray(timestep_scaling, _F32)
  sd = jnp.asarray(sigma_data, _F32)
  c_skip = sd * sd / (u * u + sd * sd)
  c_out = u / jnp.sqrt(u * u + sd * sd)
  return c_skip, c_out


def vp_time_input(logsnr, scale: float = 1000.0):
  """diffusion_distillation's 'inv_cos' time input, on a guided-diffusion-like scale.

  Their UNet (`unet.py`) computes arctan(exp(-clip(logsnr, -20, 20)/2)) / (pi/2),
  which is in [0, 1] and equals t for the cosine schedule with logsnr range
  +-inf, then feeds it to `get_timestep_embedding(..., max_time=1.)`, which
  multiplies by 1000 before the sinusoids. This returns `scale` times the
  [0, 1] value (default 1000, what that embedding actually sees), so it can be
  handed to our ADM UNet's guided-diffusion embedding (timesteps ~0..1000).
  Pass scale=1.0 for the raw [0, 1] value. Note their embedding orders
  [sin, cos] with frequencies 10000^(-i/(half-1)), ours [cos, sin] with
  10000^(-i/half): weights do not transfer, the time scale does.
  """
  l = jnp.clip(_arr(logsnr), -20.0, 20.0)
  return (scale * jnp.arctan(jnp.exp(-0.5 * l)) / (0.5 * math.pi)).astype(_F32)


def make_schedule_denoiser(net_fn: Callable, schedule, parameterization,
                           noise_cond_fn: Callable, time_input: str = "t"):
  """A network on `schedule` as a VE denoiser `denoise(x, sigma_ve, cond=None) -> x_hat`.

  Args:
    net_fn: `net_fn(z, noise_cond (B,), cond) -> raw output` (cast to float32).
    schedule: a `schedules` object (kind 've' or 'vp').
    parameterization: an object of this module or its name ('x', 'eps', 'v', 'both').
    noise_cond_fn: `noise_cond_fn(t (B,)) -> (B,)`, the network's time input.
    time_input: 't' (noise_cond_fn gets t) or 'logsnr' (VP schedules: it gets the logsnr
      of sigma_ve itself, e.g. `vp_time_input`, with no round trip through t).

  The denoiser takes the VE-scaled x = z/alpha and sigma_ve = sigma/alpha ((B,) or
  scalar): t = schedule.t_from_ve_sigma(sigma_ve); alpha, sigma from sigma_ve
  directly (VP: logsnr = -2 log sigma_ve, alpha = sqrt(sigmoid(logsnr)),
  sigma = sqrt(sigmoid(-logsnr)), no round trip through t; VE: alpha = 1,
  sigma = sigma_ve); z = alpha x; returns parameterization.to_x(out, z, alpha, sigma),
  the estimate of the clean data, which is the same in VE and VP coordinates.
  """
  param = get_parameterization(parameterization)
  vp = getattr(schedule, "kind", "vp") == "vp"
  if time_input not in ("t", "logsnr") or (time_input == "logsnr" and not vp):
    raise ValueError(f"time_input must be 't' or, for a VP schedule, 'logsnr'; got "
                     f"{time_input!r} for a {getattr(schedule, 'kind', 'vp')} schedule")

  def denoise(x, sigma_ve, cond=None):
    x32 = _arr(x)
    batch = x32.shape[0]
    s = jnp.broadcast_to(jnp.reshape(_arr(sigma_ve), (-1,)) if jnp.ndim(sigma_ve) else
                         _arr(sigma_ve), (batch,))
    if vp:
      logsnr = -2.0 * jnp.log(s)
      alpha, sigma = vp_alpha_sigma(logsnr)
    else:
      alpha = jnp.ones_like(s)
      sigma = s
    time = logsnr if time_input == "logsnr" else schedule.t_from_ve_sigma(s)
    z = _b(alpha, x32) * x32
    out = _arr(net_fn(z, _arr(noise_cond_fn(time)), cond))
    return param.to_x(out, z, alpha, sigma)

  return denoise
