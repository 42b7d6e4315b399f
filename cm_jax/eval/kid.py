"""Kernel Inception Distance (Binkowski, Sutherland, Arbel, Gretton 2018).

The unbiased estimate of the squared MMD between the two feature sets under the
polynomial kernel k(x, y) = (x.y / d + 1)^3, averaged over `num_subsets` random subsets
of `subset_size` points from each set, as in the paper's code and StyleGAN2-ADA's kid50k
(100 subsets of at most 1000). Can be slightly negative when the sets match.
"""
from __future__ import annotations

import numpy as np


def kernel_inception_distance(real: np.ndarray, fake: np.ndarray, *, num_subsets: int = 100,
                              subset_size: int = 1000, seed: int = 0) -> float:
  real = np.asarray(real, np.float32)
  fake = np.asarray(fake, np.float32)
  d = real.shape[1]
  m = min(real.shape[0], fake.shape[0], subset_size)
  if m < 2:
    raise ValueError(f"KID needs at least 2 points per set, have {real.shape[0]} and "
                     f"{fake.shape[0]}")
  rng = np.random.default_rng(seed)
  t = 0.0
  for _ in range(num_subsets):
    x = fake[rng.choice(fake.shape[0], m, replace=False)]
    y = real[rng.choice(real.shape[0], m, replace=False)]
    a = (x @ x.T / d + 1).astype(np.float64) ** 3 + (y @ y.T / d + 1).astype(np.float64) ** 3
    b = (x @ y.T / d + 1).astype(np.float64) ** 3
    t += (a.sum() - np.diag(a).sum()) / (m - 1) - b.sum() * 2 / m
  return float(t / num_subsets / m)
