"""Sampling from a consistency function f(x, sigma) (Song et al. 2023, "Consistency Models").

* One step (Sec. 3): x = f(sigma_max z, sigma_max), z ~ N(0, I).
* Multistep, CM Algorithm 1, on noise levels tau_1 > tau_2 > ... (the references'
  `stochastic_iterative_sampler`):
    x <- tau_1 z
    for each level tau_i:  x0 = clip(f(x, tau_i), -1, 1)
                           x  = x0 + sqrt(tau_{i+1}^2 - sigma_min^2) z_i
  with tau_{i+1} clipped to [sigma_min, sigma_max]; the last level is normally sigma_min,
  so the last update adds no noise. len(levels) - 1 network evaluations.
* Levels are usually given as indices into a Karras grid of `grid_points` levels, like
  the references' `--ts 0,22,39 --steps 40` (ImageNet 64 CD) or `ts = [0, 11, 17]` on
  the 18-point CIFAR-10 grid (consistency_models_cifar10 notebook).
* `ternary_search`: the references' search for the best intermediate index of a
  two-step sampler (scripts/ternary_search.py) by a quality metric (lower is better).

Every z_i comes from the image's own key (per_image_normal(keys, .., step=i)), so an
image does not depend on the batch it is drawn in.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cm_jax.diffusion.noise import per_image_normal

_F32 = jnp.float32


def karras_levels(indices: Sequence[int], grid_points: int, sigma_min: float = 0.002,
                  sigma_max: float = 80.0, rho: float = 7.0) -> np.ndarray:
  """EDM eq. 5 levels at integer `indices` of a `grid_points`-level descending grid (float64)."""
  idx = np.asarray(indices, np.float64)
  if grid_points < 2:
    raise ValueError(f"grid_points must be >= 2, got {grid_points}")
  if np.any(idx < 0) or np.any(idx > grid_points - 1):
    raise ValueError(f"ts indices {list(indices)} must lie in [0, {grid_points - 1}]")
  hi, lo = sigma_max ** (1.0 / rho), sigma_min ** (1.0 / rho)
  return (hi + idx / (grid_points - 1) * (lo - hi)) ** rho


def check_ts(ts: Sequence[int], grid_points: int) -> tuple[int, ...]:
  ts = tuple(int(t) for t in ts)
  if len(ts) < 2:
    raise ValueError(f"ts needs at least two indices (one step), got {ts}")
  if any(b <= a for a, b in zip(ts, ts[1:])):
    raise ValueError(f"ts indices must increase strictly (decreasing noise), got {ts}")
  if ts[0] < 0 or ts[-1] > grid_points - 1:
    raise ValueError(f"ts {ts} must lie in [0, {grid_points - 1}] for a {grid_points}-point grid")
  return ts


def even_ts(num_steps: int, grid_points: int) -> tuple[int, ...]:
  """num_steps + 1 indices spread evenly over [0, grid_points - 1] (ends included)."""
  if num_steps < 1 or num_steps > grid_points - 1:
    raise ValueError(f"num_steps must be in [1, {grid_points - 1}] for a {grid_points}-point "
                     f"grid, got {num_steps}")
  return tuple(int(round(v)) for v in np.linspace(0, grid_points - 1, num_steps + 1))


def sample_onestep(f: Callable, noise, sigma_max: float, labels=None, cond=None):
  """x = f(sigma_max z, sigma_max), clipped to [-1, 1] (CM Sec. 3, one network evaluation)."""
  z = jnp.asarray(noise, _F32)
  return jnp.clip(f(sigma_max * z, jnp.full((z.shape[0],), sigma_max, _F32), labels, cond),
                  -1.0, 1.0)


def sample_multistep(f: Callable, noise, levels, keys, labels=None, cond=None, *,
                     sigma_min: float = 0.002, sigma_max: float = 80.0, clip: bool = True):
  """CM Algorithm 1 on descending `levels` (len >= 2): len(levels) - 1 evaluations of f.

  Starts from levels[0] * noise (= sigma_max z when levels[0] is the first grid level,
  as in the references). `keys` are per-image PRNG keys (B,); step i draws its fresh
  noise with per_image_normal(keys, .., step=i). A `lax.scan` keeps one compiled f.
  """
  lv = jnp.asarray(levels, _F32)
  if lv.ndim != 1 or lv.shape[0] < 2:
    raise ValueError(f"levels must be 1-D with at least 2 entries, got shape {lv.shape}")
  z = jnp.asarray(noise, _F32)
  b = z.shape[0]

  def body(x, inp):
    i, t, t_next = inp
    x0 = f(x, jnp.full((b,), t, _F32), labels, cond)
    if clip:
      x0 = jnp.clip(x0, -1.0, 1.0)
    t_next = jnp.clip(t_next, sigma_min, sigma_max)
    std = jnp.sqrt(jnp.maximum(t_next * t_next - sigma_min * sigma_min, 0.0))
    return x0 + std * per_image_normal(keys, x.shape[1:], step=i), None

  steps = jnp.arange(lv.shape[0] - 1, dtype=jnp.int32)
  x, _ = jax.lax.scan(body, lv[0] * z, (steps, lv[:-1], lv[1:]))
  return jnp.clip(x, -1.0, 1.0)


def ternary_search(evaluate: Callable[[int], float], lo: int, hi: int,
                   log: Optional[Callable[[str], None]] = print):
  """Integer p in [lo, hi] minimising `evaluate(p)` (assumed unimodal), as the references'
  scripts/ternary_search.py does for the middle index of a two-step sampler.

  Shrinks [lo, hi] by thirds while it spans >= 3, then evaluates what is left and takes
  the best (the reference's final cases, without its m1/m2 slip). Each p is evaluated
  at most once. Returns (best p, its value, {p: value}).
  """
  lo, hi = int(lo), int(hi)
  if hi < lo:
    raise ValueError(f"empty search interval [{lo}, {hi}]")
  cache: dict[int, float] = {}

  def value(p: int) -> float:
    if p not in cache:
      cache[p] = float(evaluate(p))
      if log:
        log(f"index {p}: {cache[p]:.6g}")
    return cache[p]

  left, right = lo, hi
  while right - left >= 3:
    m1 = int(left + (right - left) / 3.0)
    m2 = int(right - (right - left) / 3.0)
    if value(m1) < value(m2):
      right = m2
    else:
      left = m1
    if log:
      log(f"interval [{left}, {right}]")
  best = min(range(left, right + 1), key=value)
  return best, cache[best], dict(sorted(cache.items()))


def frechet_distance(mu1, cov1, mu2, cov2) -> float:
  """||mu1 - mu2||^2 + Tr(C1 + C2 - 2 (C1 C2)^(1/2)) (Heusel et al. 2017), in float64 numpy."""
  import warnings  # pylint: disable=g-import-not-at-top
  from scipy import linalg  # pylint: disable=g-import-not-at-top
  mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
  cov1, cov2 = np.atleast_2d(cov1).astype(np.float64), np.atleast_2d(cov2).astype(np.float64)
  with warnings.catch_warnings():  # singular covariances (few samples) are expected here
    warnings.simplefilter("ignore", linalg.LinAlgWarning)
    covmean = linalg.sqrtm(cov1 @ cov2)
    if not np.isfinite(covmean).all():
      eps = 1e-6 * np.eye(cov1.shape[0])
      covmean = linalg.sqrtm((cov1 + eps) @ (cov2 + eps))
  covmean = np.real(covmean)
  diff = mu1 - mu2
  return float(diff @ diff + np.trace(cov1) + np.trace(cov2) - 2.0 * np.trace(covmean))


def pixel_frechet_distance(reference_uint8) -> Callable[[np.ndarray], float]:
  """FALLBACK metric: Frechet distance between Gaussians fitted to raw PIXELS (uint8 NHWC
  -> flattened [0, 1] vectors) of generated and reference images. Not FID (no Inception
  features); only meaningful for comparing samplers of one model on tiny images."""
  ref = np.asarray(reference_uint8, np.float64).reshape(len(reference_uint8), -1) / 255.0
  mu_r, cov_r = ref.mean(0), np.cov(ref, rowvar=False)

  def metric(images_uint8) -> float:
    x = np.asarray(images_uint8, np.float64).reshape(len(images_uint8), -1) / 255.0
    return frechet_distance(x.mean(0), np.cov(x, rowvar=False), mu_r, cov_r)

  return metric


def nfe(ts: Sequence[int]) -> int:
  """Network evaluations of Algorithm 1 on `ts`: len(ts) - 1."""
  return max(len(tuple(ts)) - 1, 0)


__all__ = ["karras_levels", "check_ts", "even_ts", "sample_onestep", "sample_multistep",
           "ternary_search", "frechet_distance", "pixel_frechet_distance", "nfe"]
