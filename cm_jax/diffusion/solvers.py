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
  return (x - denoise(x, _for_denoiser(s, x), labels, cond)) / s


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
