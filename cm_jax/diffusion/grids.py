"""Noise-level grids for sampling and for discretised training objectives.

Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative
Models" (EDM), eq. 5:

  sigma_i = (sigma_max^(1/rho) + i/(N-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho,
  i = 0 .. N-1,   and sigma_N = 0.

`karras_sigmas` returns the N non-zero levels; `append_zero` adds sigma_N = 0,
which is the form every sampler in `samplers.py` takes.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def _is_concrete(*values) -> bool:
  return not any(isinstance(v, jax.core.Tracer) for v in values)


def karras_sigmas(num: int, sigma_min: float = 0.002, sigma_max: float = 80.0,
                  rho: float = 7.0) -> jnp.ndarray:
  """EDM eq. 5: `num` noise levels, descending from sigma_max to sigma_min.

  Returns a float32 array of length `num` whose first entry is sigma_max and
  last is sigma_min (no trailing zero; see `append_zero`). With `num == 1` the
  grid is just [sigma_max]. The levels are evaluated in float64 (when the
  arguments are concrete) and rounded once to float32, so the endpoints are
  float32(sigma_max) and float32(sigma_min) exactly.
  """
  num = int(num)
  if num < 1:
    raise ValueError(f"karras_sigmas needs num >= 1, got {num}")
  if num == 1:
    return jnp.full((1,), sigma_max, dtype=jnp.float32)
  if _is_concrete(sigma_min, sigma_max, rho):
    i = np.arange(num, dtype=np.float64)
    lo = float(sigma_min) ** (1.0 / float(rho))
    hi = float(sigma_max) ** (1.0 / float(rho))
    sig = (hi + i / (num - 1) * (lo - hi)) ** float(rho)
    return jnp.asarray(sig.astype(np.float32))
  # Traced hyper-parameters (e.g. a curriculum inside jit): same formula in float32.
  i = jnp.arange(num, dtype=jnp.float32)
  lo = jnp.asarray(sigma_min, jnp.float32) ** (1.0 / rho)
  hi = jnp.asarray(sigma_max, jnp.float32) ** (1.0 / rho)
  return ((hi + i / (num - 1) * (lo - hi)) ** rho).astype(jnp.float32)


def append_zero(sigmas) -> jnp.ndarray:
  """Appends the final level sigma_N = 0 of EDM eq. 5 (same dtype as `sigmas`)."""
  sigmas = jnp.asarray(sigmas)
  return jnp.concatenate([sigmas, jnp.zeros((1,), dtype=sigmas.dtype)])


def karras_sigma_at(u, sigma_min: float = 0.002, sigma_max: float = 80.0,
                    rho: float = 7.0) -> jnp.ndarray:
  """EDM eq. 5 at a fraction u = i/(N-1) of the way down the grid (float32):

    sigma(u) = (sigma_max^(1/rho) + u (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho,

  so u = 0 -> sigma_max and u = 1 -> sigma_min; u may be any (traced) array.
  The endpoints are exact: sigma(0) == float32(sigma_max) and sigma(1) ==
  float32(sigma_min) bit for bit (the boundary condition of a consistency
  function at sigma_min relies on this). Between them the float32 value
  differs from `karras_sigmas`' float64-then-rounded one by a few ulp.
  """
  u = jnp.asarray(u, jnp.float32)
  if _is_concrete(sigma_min, sigma_max, rho):
    lo = float(sigma_min) ** (1.0 / float(rho))
    hi = float(sigma_max) ** (1.0 / float(rho))
  else:
    lo = jnp.asarray(sigma_min, jnp.float32) ** (1.0 / rho)
    hi = jnp.asarray(sigma_max, jnp.float32) ** (1.0 / rho)
  lo = jnp.asarray(lo, jnp.float32)
  hi = jnp.asarray(hi, jnp.float32)
  sig = (hi + u * (lo - hi)) ** jnp.asarray(rho, jnp.float32)
  smin = jnp.asarray(sigma_min, jnp.float32)
  smax = jnp.asarray(sigma_max, jnp.float32)
  sig = jnp.where(u == 0, smax, jnp.where(u == 1, smin, sig))
  return sig.astype(jnp.float32)
