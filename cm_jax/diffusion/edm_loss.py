"""The EDM training objective (Karras et al. 2022, Sec. 5, eq. 8 with Table 1 "Ours").

  L = E_{sigma, y, n} [ lambda(sigma) || D(y + n; sigma) - y ||^2 ],
  ln(sigma) ~ N(P_mean, P_std^2),  n ~ N(0, sigma^2 I),
  lambda(sigma) = (sigma^2 + sd^2) / (sigma sd)^2   (= 1 / c_out(sigma)^2).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

_F32 = jnp.float32


def sample_lognormal_sigma(rng, shape, p_mean: float = -1.2, p_std: float = 1.2):
  """EDM Table 1 training noise distribution: ln(sigma) ~ N(P_mean, P_std^2) (float32)."""
  z = jax.random.normal(rng, tuple(shape) if not isinstance(shape, int) else (shape,), _F32)
  return jnp.exp(p_mean + p_std * z)


def edm_loss_weight(sigma, sigma_data: float = 0.5):
  """EDM Table 1 loss weighting lambda(sigma) = (sigma^2 + sd^2)/(sigma sd)^2 (eq. 8)."""
  s = jnp.asarray(sigma, _F32)
  sd = jnp.asarray(sigma_data, _F32)
  return (s * s + sd * sd) / (s * sd) ** 2


def edm_loss(denoise, x0, rng, labels=None, cond=None, p_mean: float = -1.2,
             p_std: float = 1.2, sigma_data: float = 0.5):
  """Per-example EDM loss (eq. 8), shape (B,).

  loss_b = lambda(sigma_b) * MEAN over the non-batch axes of (D(x0 + sigma_b n; sigma_b) - x0)^2

  Mean, not sum, over pixels: NVlabs/edm sums the squared error over pixels
  and its trainer divides by the batch size only, so its loss scale grows with
  resolution x channels. Averaging per pixel keeps the loss (and logged values)
  comparable across 32x32, 64x64 and latent inputs, and with Adam it changes
  nothing but the constant scale of the gradient (Adam is invariant to it up to
  its epsilon). Average the returned vector over the batch for the scalar loss.

  Args:
    denoise: `denoise(x, sigma (B,), labels, cond) -> D` (see `make_denoiser`).
    x0: clean data batch (B, ...).
    rng: one PRNG key; split here into the sigma key and the noise key.
  """
  x0 = jnp.asarray(x0).astype(_F32)
  b = x0.shape[0]
  k_sigma, k_noise = jax.random.split(rng)
  sigma = sample_lognormal_sigma(k_sigma, (b,), p_mean, p_std)
  n = jax.random.normal(k_noise, x0.shape, _F32)
  s = sigma.reshape((b,) + (1,) * (x0.ndim - 1))
  d = denoise(x0 + s * n, sigma, labels, cond).astype(_F32)
  per_pixel = jnp.mean(jnp.square(d - x0), axis=tuple(range(1, x0.ndim)))
  return edm_loss_weight(sigma, sigma_data) * per_pixel
