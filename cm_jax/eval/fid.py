"""Frechet distance between two Gaussians (Heusel et al. 2017), as FID is computed.

  d^2 = |mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2))

with scipy.linalg.sqrtm, like the TTUR reference code, pytorch-fid, clean-fid and EDM.
pytorch-fid's safeguards are kept: if the product is singular enough that sqrtm returns
non-finite values, eps is added to both diagonals; a small imaginary part from numerical
error is dropped, a large one is an error.
"""
from __future__ import annotations

import numpy as np


def _sqrtm(a: np.ndarray) -> np.ndarray:
  import scipy.linalg  # pylint: disable=g-import-not-at-top
  out = scipy.linalg.sqrtm(a)
  return out[0] if isinstance(out, tuple) else out


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
  mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
  sigma1 = np.atleast_2d(np.asarray(sigma1, np.float64))
  sigma2 = np.atleast_2d(np.asarray(sigma2, np.float64))
  if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
    raise ValueError(f"statistics of different shapes: mu {mu1.shape} vs {mu2.shape}, "
                     f"sigma {sigma1.shape} vs {sigma2.shape} (different detectors?)")
  diff = mu1 - mu2
  covmean = _sqrtm(sigma1 @ sigma2)
  if not np.isfinite(covmean).all():
    offset = np.eye(sigma1.shape[0]) * eps
    covmean = _sqrtm((sigma1 + offset) @ (sigma2 + offset))
  if np.iscomplexobj(covmean):
    if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
      raise ValueError(f"sqrtm gave an imaginary component {np.max(np.abs(covmean.imag))}")
    covmean = covmean.real
  return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def fid_from_stats(stats_a, stats_b) -> float:
  """FID between two FeatureStats (or (mu, sigma) pairs)."""
  a = stats_a.mu_sigma() if hasattr(stats_a, "mu_sigma") else stats_a
  b = stats_b.mu_sigma() if hasattr(stats_b, "mu_sigma") else stats_b
  return frechet_distance(a[0], a[1], b[0], b[1])


def pixel_frechet_distance(reference_uint8):
  """FALLBACK metric: Frechet distance between Gaussians fitted to raw PIXELS (uint8 NHWC
  -> flattened [0, 1] vectors) of generated and reference images. Not FID (no Inception
  features); only meaningful for comparing samplers of one model on tiny images (what
  `python -m cm_jax.cli.cm_search --detector pixel` uses)."""
  ref = np.asarray(reference_uint8, np.float64).reshape(len(reference_uint8), -1) / 255.0
  mu_r, cov_r = ref.mean(0), np.cov(ref, rowvar=False)

  def metric(images_uint8) -> float:
    x = np.asarray(images_uint8, np.float64).reshape(len(images_uint8), -1) / 255.0
    return frechet_distance(x.mean(0), np.cov(x, rowvar=False), mu_r, cov_r)

  return metric
