"""Noise schedules: small frozen objects with one interface.

A schedule maps a time t (noise grows with t, t in [t_min, t_max]) to the
forward process z_t = alpha(t) x + sigma(t) eps. Every schedule offers, for t
a float or a (traced) array of any shape, float32 outputs:

  alpha(t), sigma(t)
  logsnr(t)    = 2 log(alpha/sigma)                       (Kingma et al. 2021 "VDM")
  ve_sigma(t)  = sigma/alpha = exp(-logsnr/2)             (the VE noise level of x = z/alpha)
  t_from_logsnr(l), t_from_ve_sigma(s)                    (inverses)
  t_min, t_max, name, kind ('ve' | 'vp')

Schedules:

* `KarrasVE`: alpha = 1, sigma(t) = EDM eq. 5 read as a continuous function of
  t = 1 - i/(N-1) (`grids.karras_sigma_at(1 - t)`), Karras et al. 2022.
* `VPCosine`: logsnr(t) = -2 log tan(a t + b), b = arctan(exp(-logsnr_max/2)),
  a = arctan(exp(-logsnr_min/2)) - b, so logsnr(0) = logsnr_max and logsnr(1) =
  logsnr_min; alpha^2 = sigmoid(logsnr), sigma^2 = sigmoid(-logsnr). This is
  `_logsnr_schedule_cosine` of google-research/diffusion_distillation
  `schedules.py` (Salimans & Ho 2022, "Progressive Distillation", Sec. 2 / App.),
  with a and b computed in float64 as there. That code does not clip logsnr in
  `dpm.py`: the schedule's own [logsnr_min, logsnr_max] is the only bound (its
  UNet clips its *input* logsnr to [-20, 20], see `parameterization.vp_time_input`).
* `ShiftedCosine`: Hoogeboom, Heek & Salimans 2023, "simple diffusion", Sec. 3.1:
  logsnr_shift(t) = logsnr_cosine(t) + 2 log(base/image) (more noise at every t
  when the image is larger than the base resolution), and the interpolated
  variant logsnr(t) = t logsnr_shift[low base](t) + (1 - t) logsnr_shift[high base](t).
  Checked against the paper's description and several public re-implementations
  (lucidrains' simple-diffusion ports: shift = 2 log(noise_d / image_d),
  interpolation weight t on the low-resolution shift); the cosine there is
  truncated to [-15, 15], which are our defaults. Used by Multistep Consistency
  Models (Heek et al. 2024).
* `DiscreteDDPM`: Ho et al. 2020 betas (linear 1e-4..0.02) or Stable Diffusion's
  scaled_linear (0.00085..0.012, betas = linspace(sqrt(start), sqrt(end), T)^2),
  alphas_cumprod computed as diffusers' DDPMScheduler does (see `DiscreteDDPM`).
  t is the integer timestep 0..T-1; fractional t interpolates log ve_sigma
  linearly between integer timesteps (k-diffusion's DiscreteSchedule).

`build_schedule(cfg)` builds one from a dict / ConfigDict with a `name` key.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import ClassVar, Optional

import jax
import jax.numpy as jnp
import numpy as np

from cm_jax.diffusion.grids import karras_sigma_at

_F32 = jnp.float32


def _f32(x):
  return jnp.asarray(x, _F32)


def vp_alpha_sigma(logsnr):
  """(alpha, sigma) = (sqrt(sigmoid(logsnr)), sqrt(sigmoid(-logsnr))) of a VP process, the
  shape of `logsnr` (diffusion_distillation `diffusion_forward`; alpha^2 + sigma^2 = 1)."""
  logsnr = jnp.asarray(logsnr, _F32)
  return jnp.sqrt(jax.nn.sigmoid(logsnr)), jnp.sqrt(jax.nn.sigmoid(-logsnr))


class _VP:
  """Shared VP pieces: everything follows from logsnr (alpha^2 + sigma^2 = 1)."""
  kind: ClassVar[str] = "vp"
  t_min: ClassVar[float] = 0.0
  t_max: ClassVar[float] = 1.0

  def alpha(self, t):
    """alpha = sqrt(sigmoid(logsnr)) (`vp_alpha_sigma`)."""
    return vp_alpha_sigma(self.logsnr(t))[0]

  def sigma(self, t):
    """sigma = sqrt(sigmoid(-logsnr)) (`vp_alpha_sigma`)."""
    return vp_alpha_sigma(self.logsnr(t))[1]

  def ve_sigma(self, t):
    """sigma/alpha = exp(-logsnr/2)."""
    return jnp.exp(-0.5 * self.logsnr(t))

  def t_from_ve_sigma(self, s):
    """Inverse of `ve_sigma`, through logsnr = -2 log s."""
    return self.t_from_logsnr(-2.0 * jnp.log(_f32(s)))


@dataclasses.dataclass(frozen=True)
class KarrasVE:
  """VE schedule with the EDM eq. 5 levels as a continuous function of t in [0, 1].

  sigma(t) = ve_sigma(t) = (smin^(1/rho) + t (smax^(1/rho) - smin^(1/rho)))^rho,
  i.e. `grids.karras_sigma_at(1 - t)` in float32: t = 0 -> sigma_min, t = 1 -> sigma_max
  (both exact, float32(sigma_min) / float32(sigma_max) bit for bit).
  alpha = 1; logsnr = -2 log sigma.
  """
  sigma_min: float = 0.002
  sigma_max: float = 80.0
  rho: float = 7.0
  name: ClassVar[str] = "karras_ve"
  kind: ClassVar[str] = "ve"
  t_min: ClassVar[float] = 0.0
  t_max: ClassVar[float] = 1.0

  def ve_sigma(self, t):
    t = _f32(t)
    sig = _f32(karras_sigma_at(1.0 - t, self.sigma_min, self.sigma_max, self.rho))
    # Exact endpoints, so a consistency boundary at sigma(0) == sigma_min holds bit-exactly.
    sig = jnp.where(t == 0, _f32(self.sigma_min), sig)
    return jnp.where(t == 1, _f32(self.sigma_max), sig)

  def sigma(self, t):
    return self.ve_sigma(t)

  def alpha(self, t):
    return jnp.ones_like(_f32(t))

  def logsnr(self, t):
    return -2.0 * jnp.log(self.ve_sigma(t))

  def t_from_ve_sigma(self, s):
    """t = (s^(1/rho) - smin^(1/rho)) / (smax^(1/rho) - smin^(1/rho)) (EDM eq. 5 inverted)."""
    lo = float(self.sigma_min) ** (1.0 / self.rho)
    hi = float(self.sigma_max) ** (1.0 / self.rho)
    return ((_f32(s) ** (1.0 / self.rho) - lo) / (hi - lo)).astype(_F32)

  def t_from_logsnr(self, l):
    return self.t_from_ve_sigma(jnp.exp(-0.5 * _f32(l)))


def _cosine_ab(logsnr_min: float, logsnr_max: float):
  """b = arctan(exp(-logsnr_max/2)), a = arctan(exp(-logsnr_min/2)) - b, in float64."""
  b = math.atan(math.exp(-0.5 * float(logsnr_max)))
  a = math.atan(math.exp(-0.5 * float(logsnr_min))) - b
  return a, b


def _cosine_log_ve(t, logsnr_min: float, logsnr_max: float):
  """log tan(a t + b) = -logsnr/2, accurate in float32 over all of [0, 1].

  Near t = 1 the angle a t + b approaches pi/2, where float32 tan loses digits;
  there tan(theta) = 1/tan(pi/2 - theta) with pi/2 - theta = a (1 - t) + b2,
  b2 = arctan(exp(logsnr_min/2)) (since arctan(x) + arctan(1/x) = pi/2).
  """
  t = _f32(t)
  a, b = _cosine_ab(logsnr_min, logsnr_max)
  b2 = math.atan(math.exp(0.5 * float(logsnr_min)))
  lo = jnp.log(jnp.tan(a * t + b))
  hi = -jnp.log(jnp.tan(a * (1.0 - t) + b2))
  return jnp.where(a * t + b <= 0.25 * math.pi, lo, hi).astype(_F32)


def _cosine_t_from_log_ve(log_s, logsnr_min: float, logsnr_max: float):
  """Inverse of `_cosine_log_ve`: t = (arctan(s) - b)/a, and for s > 1 the same as
  t = 1 - (arctan(1/s) - b2)/a, which keeps float32 precision for large s."""
  log_s = _f32(log_s)
  a, b = _cosine_ab(logsnr_min, logsnr_max)
  b2 = math.atan(math.exp(0.5 * float(logsnr_min)))
  small = log_s <= 0
  safe = jnp.where(small, log_s, -log_s)  # log of min(s, 1/s) <= 0: no overflow
  ang = jnp.arctan(jnp.exp(safe))
  return jnp.where(small, (ang - b) / a, 1.0 - (ang - b2) / a).astype(_F32)


@dataclasses.dataclass(frozen=True)
class VPCosine(_VP):
  """Cosine logSNR schedule of diffusion_distillation `schedules.py` (see module doc).

  logsnr(t) = -2 log tan(a t + b); ve_sigma(t) = tan(a t + b);
  t_from_logsnr(l) = (arctan(exp(-l/2)) - b) / a. Evaluated in float32 with the
  cotangent form near t = 1 (see `_cosine_log_ve`), so logsnr(1) = logsnr_min
  to float32 precision.
  """
  logsnr_min: float = -20.0
  logsnr_max: float = 20.0
  name: ClassVar[str] = "vp_cosine"

  def logsnr(self, t):
    return (-2.0 * _cosine_log_ve(t, self.logsnr_min, self.logsnr_max)).astype(_F32)

  def ve_sigma(self, t):
    return jnp.exp(_cosine_log_ve(t, self.logsnr_min, self.logsnr_max))

  def t_from_ve_sigma(self, s):
    return _cosine_t_from_log_ve(jnp.log(_f32(s)), self.logsnr_min, self.logsnr_max)

  def t_from_logsnr(self, l):
    return _cosine_t_from_log_ve(-0.5 * _f32(l), self.logsnr_min, self.logsnr_max)


@dataclasses.dataclass(frozen=True)
class ShiftedCosine(_VP):
  """simple diffusion's shifted (optionally interpolated) cosine schedule (module doc).

  Not interpolated: logsnr(t) = cos(t) + 2 log(base_resolution / image_resolution).
  Interpolated: logsnr(t) = cos(t) + t 2 log(base_resolution / image_resolution)
                            + (1 - t) 2 log(high_base_resolution / image_resolution),
  with `base_resolution` the low base (e.g. 32) and `high_base_resolution`
  (default: image_resolution, i.e. the unshifted cosine at t = 0). Here
  cos(t) = -2 log tan(a t + b) truncated to [logsnr_min, logsnr_max] as in
  `VPCosine`. The interpolated logsnr is strictly decreasing in t (when
  high >= low), and `t_from_logsnr` inverts it by 40 bisection steps.
  """
  base_resolution: int
  image_resolution: int
  interpolated: bool = False
  high_base_resolution: Optional[int] = None
  logsnr_min: float = -15.0
  logsnr_max: float = 15.0
  name: ClassVar[str] = "shifted_cosine"

  def _shifts(self):
    low = 2.0 * math.log(float(self.base_resolution) / float(self.image_resolution))
    high_res = self.image_resolution if self.high_base_resolution is None \
        else self.high_base_resolution
    high = 2.0 * math.log(float(high_res) / float(self.image_resolution))
    return low, high

  def logsnr(self, t):
    t = _f32(t)
    base = -2.0 * _cosine_log_ve(t, self.logsnr_min, self.logsnr_max)
    low, high = self._shifts()
    if not self.interpolated:
      return (base + low).astype(_F32)
    return (base + t * low + (1.0 - t) * high).astype(_F32)

  def t_from_logsnr(self, l):
    l = _f32(l)
    low, high = self._shifts()
    if not self.interpolated:
      return _cosine_t_from_log_ve(-0.5 * (l - low), self.logsnr_min, self.logsnr_max)

    def body(_, lohi):
      lo, hi = lohi
      mid = 0.5 * (lo + hi)
      above = self.logsnr(mid) > l  # logsnr decreases with t: the root is right of mid
      return jnp.where(above, mid, lo), jnp.where(above, hi, mid)

    lo0 = jnp.full(l.shape, self.t_min, _F32)
    hi0 = jnp.full(l.shape, self.t_max, _F32)
    lo, hi = jax.lax.fori_loop(0, 40, body, (lo0, hi0))
    return (0.5 * (lo + hi)).astype(_F32)


_DEFAULT_BETAS = {"linear": (1e-4, 0.02), "scaled_linear": (0.00085, 0.012)}


def _torch_linspace_f32(start: float, end: float, num: int) -> np.ndarray:
  """torch.linspace(start, end, num, dtype=float32) on CPU, reproduced in numpy.

  torch's kernel rounds start, end and step = (end - start)/(num - 1) to float32,
  fills the first half as start + step i and the second half as
  end - step (num - 1 - i), each with one rounding (a fused multiply-add); the
  float64 evaluation below rounds once to float32 in the same way.
  """
  if num == 1:
    return np.asarray([start], np.float32)
  s32, e32 = np.float32(start), np.float32(end)
  step = (e32 - s32) / np.float32(num - 1)
  i = np.arange(num)
  first = (np.float64(s32) + np.float64(step) * i).astype(np.float32)
  second = (np.float64(e32) - np.float64(step) * (num - 1 - i)).astype(np.float32)
  return np.where(i < num // 2, first, second)


@dataclasses.dataclass(frozen=True)
class DiscreteDDPM(_VP):
  """Discrete-time DDPM schedule (Ho et al. 2020) over integer timesteps 0..T-1.

  betas (float32, as diffusers' DDPMScheduler): 'linear' = linspace(start, end, T)
  (defaults 1e-4, 0.02, Ho et al. 2020); 'scaled_linear' = linspace(sqrt(start),
  sqrt(end), T)^2 (defaults 0.00085, 0.012, Stable Diffusion). alphas = 1 - betas
  (float32) and alphas_cumprod = torch.cumprod(alphas), which on CPU accumulates
  in float64 and rounds once to float32; `alphas_cumprod` is that float32 array
  held as numpy float64 (exactly the same values).

  ve_sigma at integer t is sqrt((1 - abar_t)/abar_t). For fractional t, log
  ve_sigma is interpolated linearly between the neighbouring integer timesteps
  and t_from_ve_sigma inverts that piecewise-linear map (k-diffusion's
  DiscreteSchedule `t_to_sigma` / `sigma_to_t`), clamped to [0, T-1].
  """
  beta_schedule: str = "linear"
  beta_start: Optional[float] = None
  beta_end: Optional[float] = None
  num_train_timesteps: int = 1000
  name: ClassVar[str] = "ddpm"

  def __post_init__(self):
    if self.beta_schedule not in _DEFAULT_BETAS:
      raise ValueError(f"unknown beta_schedule {self.beta_schedule!r}; "
                       f"expected one of {sorted(_DEFAULT_BETAS)}")
    if int(self.num_train_timesteps) < 2:
      raise ValueError(f"num_train_timesteps must be >= 2, got {self.num_train_timesteps}")

  @property
  def t_max(self) -> float:
    return float(self.num_train_timesteps - 1)

  @functools.cached_property
  def betas(self) -> np.ndarray:
    start, end = _DEFAULT_BETAS[self.beta_schedule]
    start = start if self.beta_start is None else float(self.beta_start)
    end = end if self.beta_end is None else float(self.beta_end)
    n = int(self.num_train_timesteps)
    if self.beta_schedule == "linear":
      return _torch_linspace_f32(start, end, n)
    root = _torch_linspace_f32(start ** 0.5, end ** 0.5, n)
    return (root * root).astype(np.float32)

  @functools.cached_property
  def alphas_cumprod(self) -> np.ndarray:
    alphas = (np.float32(1.0) - self.betas).astype(np.float32)
    return np.cumprod(alphas.astype(np.float64)).astype(np.float32).astype(np.float64)

  @functools.cached_property
  def _log_sigmas(self) -> np.ndarray:
    ac = self.alphas_cumprod
    return (0.5 * (np.log1p(-ac) - np.log(ac))).astype(np.float32)

  def ve_sigma(self, t):
    return jnp.exp(self._log_ve_sigma(t))

  def _log_ve_sigma(self, t):
    t = _f32(t)
    grid = jnp.arange(self.num_train_timesteps, dtype=_F32)
    return jnp.interp(t, grid, jnp.asarray(self._log_sigmas)).astype(_F32)

  def logsnr(self, t):
    return (-2.0 * self._log_ve_sigma(t)).astype(_F32)

  def t_from_ve_sigma(self, s):
    grid = jnp.arange(self.num_train_timesteps, dtype=_F32)
    return jnp.interp(jnp.log(_f32(s)), jnp.asarray(self._log_sigmas), grid).astype(_F32)

  def t_from_logsnr(self, l):
    grid = jnp.arange(self.num_train_timesteps, dtype=_F32)
    return jnp.interp(-0.5 * _f32(l), jnp.asarray(self._log_sigmas), grid).astype(_F32)


_BUILDERS = {
    "karras_ve": KarrasVE,
    "vp_cosine": VPCosine,
    "shifted_cosine": ShiftedCosine,
    "ddpm": DiscreteDDPM,
}
SCHEDULES = tuple(_BUILDERS)


def build_schedule(cfg):
  """A schedule from a dict / ml_collections ConfigDict: {'name': ..., <fields>}.

  `name` is one of SCHEDULES; the other keys are the constructor fields of that
  schedule. An unknown key raises ValueError naming it (nothing is ignored).
  """
  d = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
  name = d.pop("name", None)
  if name not in _BUILDERS:
    raise ValueError(f"unknown schedule name {name!r}; expected one of {SCHEDULES}")
  cls = _BUILDERS[name]
  fields = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(k for k in d if k not in fields)
  if unknown:
    raise ValueError(f"unknown key(s) {unknown} for schedule {name!r}; "
                     f"known: {sorted(fields)}")
  return cls(**d)
