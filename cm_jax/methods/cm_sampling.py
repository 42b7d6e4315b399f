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
  two-step sampler (scripts/ternary_search.py) by a quality metric (lower is better);
  its command line is cm_jax.cli.cm_search, the pixel metric cm_jax.eval.fid.

Every z_i comes from the image's own key (per_image_normal(keys, .., step=i)), so an
image does not depend on the batch it is drawn in.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cm_jax.diffusion.grids import karras_sigmas
from cm_jax.diffusion.noise import per_image_normal

_F32 = jnp.float32


def check_ts(ts: Sequence[int], grid_points: int, *, min_len: int = 2) -> tuple[int, ...]:
  """The one check of grid indices `ts` (sampling, editing, karras_levels): at least
  `min_len` of them (2 = one sampling step), each in [0, grid_points - 1], strictly
  increasing (decreasing noise). Returns them as a tuple of ints; ValueError otherwise."""
  ts = tuple(int(t) for t in ts)
  if int(grid_points) < 2:
    raise ValueError(f"grid_points must be >= 2, got {grid_points}")
  if len(ts) < min_len:
    raise ValueError(f"ts needs at least two indices (one step), got {ts}" if min_len >= 2
                     else "ts is empty")
  if any(t < 0 or t > grid_points - 1 for t in ts):
    raise ValueError(f"ts {ts} must lie in [0, {grid_points - 1}] for a {grid_points}-point grid")
  if any(b <= a for a, b in zip(ts, ts[1:])):
    raise ValueError(f"ts indices must increase strictly (decreasing noise), got {ts}")
  return ts


def karras_levels(indices: Sequence[int], grid_points: int, sigma_min: float = 0.002,
                  sigma_max: float = 80.0, rho: float = 7.0) -> np.ndarray:
  """EDM eq. 5 levels at integer `indices` (checked by check_ts) of a `grid_points`-level
  descending grid: grids.karras_sigmas (evaluated in float64, rounded once to float32),
  returned as float64 NumPy."""
  idx = check_ts(indices, grid_points, min_len=1)
  with jax.ensure_compile_time_eval():  # host values even when called while tracing a jit
    grid = np.asarray(karras_sigmas(int(grid_points), sigma_min, sigma_max, rho), np.float64)
  return grid[list(idx)]


def evaluated_levels(ts: Sequence[int], grid_points: int, sigma_min: float = 0.002,
                     sigma_max: float = 80.0, rho: float = 7.0) -> np.ndarray:
  """The levels CM Algorithm 1 evaluates f at for grid indices `ts`: every one, clipped to
  [sigma_min, sigma_max], except a trailing index grid_points - 1 (sigma_min), where
  f(x, sigma_min) = x and the references draw no noise. Sampling and editing both use
  this (one convention). With ts[-1] = N - 1, as in every published setting, it is the
  references' count, len(ts) - 1; the references would return a still-noisy image for
  another ts[-1], Algorithm 1 (and cm_jax) evaluates f there too. float32 numpy."""
  n = int(grid_points)
  ts = check_ts(ts, n, min_len=1)
  sig = np.clip(karras_levels(ts, n, sigma_min, sigma_max, rho), sigma_min, sigma_max)
  if len(ts) > 1 and ts[-1] == n - 1:
    sig = sig[:-1]
  return sig.astype(np.float32)


def ts_evaluations(ts: Sequence[int], grid_points: int) -> int:
  """Network evaluations of CM Algorithm 1 on `ts` (see evaluated_levels)."""
  return len(evaluated_levels(ts, grid_points))


def even_ts(num_steps: int, grid_points: int) -> tuple[int, ...]:
  """num_steps + 1 indices spread evenly over [0, grid_points - 1] (ends included),
  round(linspace(0, grid_points - 1, num_steps + 1)).

  num_steps must be in [1, grid_points - 1] (else ValueError): then the spacing is >= 1
  and the rounded indices are distinct and increasing, so the result always has
  num_steps + 1 entries (the one behaviour for sampling and editing's --steps)."""
  if num_steps < 1 or num_steps > grid_points - 1:
    raise ValueError(f"num_steps must be in [1, {grid_points - 1}] for a {grid_points}-point "
                     f"grid, got {num_steps}")
  return tuple(int(round(v)) for v in np.linspace(0, grid_points - 1, num_steps + 1))


def sample_onestep(f: Callable, noise, sigma_max: float, labels=None, cond=None):
  """x = f(sigma_max z, sigma_max), clipped to [-1, 1] (CM Sec. 3, one network evaluation)."""
  z = jnp.asarray(noise, _F32)
  return jnp.clip(f(sigma_max * z, jnp.full((z.shape[0],), sigma_max, _F32), labels, cond),
                  -1.0, 1.0)


def multistep_loop(f: Callable, x, keys, levels, *, labels=None, cond=None, project=None,
                   sigma_min: float = 0.002, sigma_max: float = float("inf"),
                   clip: bool = True, first_noise_step: int = 0):
  """The loop of CM Algorithm 1 (sampling) and Algorithm 4 (editing), one `lax.scan` over
  the pairs (levels[i], levels[i+1]) of descending `levels` (len >= 2), with x at levels[0]:

    x0 = project(clip(f(x, levels[i])))
    x  = x0 + sqrt(t^2 - sigma_min^2) z_i,   t = levels[i+1] clipped to [sigma_min, sigma_max]

  z_i = per_image_normal(keys, .., step=first_noise_step + i). Returns the last x:
  len(levels) - 1 evaluations of f; a last level of sigma_min adds no noise (x = x0).
  `project` (default none) is editing's replacement of the known part.
  """
  lv = jnp.asarray(levels, _F32)
  if lv.ndim != 1 or lv.shape[0] < 2:
    raise ValueError(f"levels must be 1-D with at least 2 entries, got shape {lv.shape}")
  x = jnp.asarray(x, _F32)
  b = x.shape[0]

  def body(x, inp):
    i, t, t_next = inp
    t_b = jnp.full((b,), t, _F32)
    x0 = jnp.asarray(f(x, t_b, labels) if cond is None else f(x, t_b, labels, cond), _F32)
    if clip:
      x0 = jnp.clip(x0, -1.0, 1.0)
    if project is not None:
      x0 = project(x0)
    # eps in float32 like the levels: a last level of sigma_min adds exactly no noise.
    eps = jnp.asarray(sigma_min, _F32)
    t_next = jnp.clip(t_next, eps, sigma_max)
    std = jnp.sqrt(jnp.maximum(t_next * t_next - eps * eps, 0.0))
    return x0 + std * per_image_normal(keys, x.shape[1:], step=i + first_noise_step), None

  steps = jnp.arange(lv.shape[0] - 1, dtype=jnp.int32)
  x, _ = jax.lax.scan(body, x, (steps, lv[:-1], lv[1:]))
  return x


def sample_multistep(f: Callable, noise, levels, keys, labels=None, cond=None, *,
                     sigma_min: float = 0.002, sigma_max: float = 80.0, clip: bool = True):
  """CM Algorithm 1 on descending `levels` (len >= 2): len(levels) - 1 evaluations of f.

  Starts from levels[0] * noise (= sigma_max z when levels[0] is the first grid level,
  as in the references). `keys` are per-image PRNG keys (B,); step i draws its fresh
  noise with per_image_normal(keys, .., step=i). One `multistep_loop` (a `lax.scan`
  keeps one compiled f); the result is clipped to [-1, 1].
  """
  lv = jnp.asarray(levels, _F32)
  z = jnp.asarray(noise, _F32)
  x = multistep_loop(f, lv[0] * z, keys, lv, labels=labels, cond=cond, sigma_min=sigma_min,
                     sigma_max=sigma_max, clip=clip)
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


def nfe(ts: Sequence[int]) -> int:
  """Network evaluations of Algorithm 1 on `ts`: len(ts) - 1."""
  return max(len(tuple(ts)) - 1, 0)


__all__ = ["karras_levels", "check_ts", "even_ts", "sample_onestep", "multistep_loop",
           "sample_multistep", "ternary_search", "nfe"]
