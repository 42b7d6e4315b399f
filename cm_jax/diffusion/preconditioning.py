"""Preconditioning: turning a raw network F into a denoiser D or a consistency function f.

Networks in `cm_jax.nets` know no noise schedule (see DESIGN.md): they map
(scaled input, noise conditioning, labels, extra conditioning) to a raw output
F. This module wraps them with

* the EDM preconditioning, Karras et al. 2022 eq. 7 with the "Ours" column of
  Table 1:
    D(x; s) = c_skip(s) x + c_out(s) F(c_in(s) x; c_noise(s)),
    c_skip = sd^2/(s^2+sd^2), c_out = s sd/sqrt(s^2+sd^2),
    c_in = 1/sqrt(s^2+sd^2), c_noise = ln(s)/4;
* the consistency-model parameterisation, Song et al. 2023 "Consistency Models"
  eq. 5 with the scalings of its Appendix C, which satisfy the boundary
  condition f(x, sigma_min) = x (c_skip(sigma_min) = 1, c_out(sigma_min) = 0):
    c_skip = sd^2/((s-smin)^2+sd^2), c_out = sd (s-smin)/sqrt(s^2+sd^2),
    c_in = 1/sqrt(s^2+sd^2).

All scalings are computed in float32 whatever the input dtype.
"""
from __future__ import annotations

from typing import Callable, Optional, Union

import jax.numpy as jnp

from cm_jax.diffusion.parameterization import consistency_boundary_scalings

_F32 = jnp.float32


def edm_scalings(sigma, sigma_data: float = 0.5):
  """EDM Table 1 ("Ours", preconditioning rows) / eq. 7: (c_skip, c_out, c_in, c_noise).

  c_skip = sd^2/(s^2+sd^2), c_out = s sd/sqrt(s^2+sd^2), c_in = 1/sqrt(s^2+sd^2),
  c_noise = ln(s)/4. Each has the shape of `sigma`, dtype float32.
  """
  s = jnp.asarray(sigma, _F32)
  sd = jnp.asarray(sigma_data, _F32)
  var = s * s + sd * sd
  c_skip = sd * sd / var
  c_out = s * sd / jnp.sqrt(var)
  c_in = 1.0 / jnp.sqrt(var)
  c_noise = jnp.log(s) / 4.0
  return c_skip, c_out, c_in, c_noise


def consistency_scalings(sigma, sigma_data: float = 0.5, sigma_min: float = 0.002):
  """Consistency Models (Song et al. 2023) eq. 5 + Appendix C: (c_skip, c_out, c_in).

  c_skip = sd^2/((s-smin)^2+sd^2), c_out = sd (s-smin)/sqrt(s^2+sd^2),
  c_in = 1/sqrt(s^2+sd^2) (c_in as in EDM Table 1). At s == sigma_min (both
  rounded to float32) the difference s - smin is exactly 0, so c_skip == 1 and
  c_out == 0 exactly: the boundary condition f(x, sigma_min) = x holds bit-exactly.
  """
  s = jnp.asarray(sigma, _F32)
  sd = jnp.asarray(sigma_data, _F32)
  # The boundary at sigma_min of the per-example form multistep CMs use (one formula).
  c_skip, c_out = consistency_boundary_scalings(s, sigma_min, sigma_data)
  c_in = 1.0 / jnp.sqrt(s * s + sd * sd)
  return c_skip, c_out, c_in


def noise_conditioning(sigma, kind: str):
  """The scalar noise input c_noise(sigma) handed to the network.

  'edm':    ln(sigma)/4, EDM Table 1 ("Ours").
  'openai': 250 ln(sigma + 1e-44), the `rescaled_t = 1000 * 0.25 * log(sigma + 1e-44)`
            of openai/consistency_models (i.e. 1000 x the EDM value, as its ADM
            nets expect timesteps on a 0..1000-like scale).
  """
  s = jnp.asarray(sigma, _F32)
  if kind == "edm":
    return jnp.log(s) / 4.0
  if kind == "openai":
    return 250.0 * jnp.log(s + 1e-44)
  raise ValueError(f"unknown noise conditioning kind {kind!r}; expected 'edm' or 'openai'")


def _batch_sigma(sigma, batch: int):
  """sigma as a float32 (B,) vector: a scalar broadcasts, (B,1,..,1) is flattened."""
  s = jnp.asarray(sigma, _F32)
  if s.ndim > 1:
    s = jnp.reshape(s, (-1,))
  return jnp.broadcast_to(s, (batch,))


def _expand(v, ndim: int):
  """(B,) -> (B, 1, ..., 1) so a per-example scaling broadcasts over NHWC (or any rank)."""
  return jnp.reshape(v, v.shape + (1,) * (ndim - 1))


def make_denoiser(net_fn: Callable, *, parameterization: str = "edm",
                  sigma_data: float = 0.5, sigma_min: float = 0.002,
                  c_noise: Union[str, Callable] = "edm"):
  """Wraps a raw network into D(x; sigma) (EDM eq. 7) or f(x, sigma) (CM eq. 5).

  Args:
    net_fn: `net_fn(x_in, c_noise, labels, cond) -> F`, with x_in = c_in x of
      the shape of x, c_noise of shape (B,). F may come back in a low
      precision (e.g. bfloat16); it is cast to float32.
    parameterization: 'edm' (EDM Table 1 scalings; D is the denoiser) or
      'consistency' (Song et al. 2023 Appendix C scalings; f(x, sigma_min) = x).
    sigma_data: data standard deviation sd.
    sigma_min: epsilon of the consistency boundary condition (unused by 'edm').
    c_noise: 'edm' | 'openai' (see `noise_conditioning`) or a callable
      sigma (B,) -> c_noise (B,).

  Returns:
    `denoise(x, sigma, labels=None, cond=None) -> float32 array of x's shape`,
    where sigma is (B,) or a scalar that broadcasts to the batch.
  """
  if parameterization not in ("edm", "consistency"):
    raise ValueError(f"unknown parameterization {parameterization!r}; "
                     "expected 'edm' or 'consistency'")
  if callable(c_noise):
    noise_fn = c_noise
  else:
    noise_conditioning(1.0, c_noise)  # fail fast on an unknown kind
    kind = c_noise
    noise_fn = lambda s: noise_conditioning(s, kind)

  def denoise(x, sigma, labels=None, cond=None):
    x32 = jnp.asarray(x).astype(_F32)
    s = _batch_sigma(sigma, x32.shape[0])
    if parameterization == "edm":
      c_skip, c_out, c_in, _ = edm_scalings(s, sigma_data)
    else:
      c_skip, c_out, c_in = consistency_scalings(s, sigma_data, sigma_min)
    c_n = jnp.asarray(noise_fn(s), _F32)
    nd = x32.ndim
    f = net_fn(_expand(c_in, nd) * x32, c_n, labels, cond)
    f = jnp.asarray(f).astype(_F32)
    return _expand(c_skip, nd) * x32 + _expand(c_out, nd) * f

  return denoise
