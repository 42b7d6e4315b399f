"""Distances d(x, y) >= 0 of the consistency losses (CM paper Sec. 3 / eq. 7; iCT Sec. 3.3).

All return one value per example, shape (B,), in float32:

* 'l2'   mean over pixels of (x - y)^2, i.e. the squared l2 distance of the CM paper
          divided by d = H W C (the references' `mean_flat`; a constant factor).
* 'l1'   mean over pixels of |x - y| (references' `mean_flat(abs)`).
* 'pseudo_huber'  iCT eq. (Sec. 3.3): sqrt(||x - y||_2^2 + c^2) - c, where the norm runs
          over the WHOLE image and c = 0.00054 sqrt(d), d = H W C (c = 0.03 on CIFAR-10).
* 'lpips' LPIPS-VGG (Zhang et al. 2018) of `cm_jax.nets.lpips`, on images upsampled
          bilinearly to 224 as both references do; needs the converted weights.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import jax.numpy as jnp

_F32 = jnp.float32

METRICS = ("l2", "l1", "pseudo_huber", "lpips")

# iCT Sec. 3.3: c = 0.00054 sqrt(d).
PSEUDO_HUBER_C_PER_SQRT_DIM = 0.00054


def pseudo_huber_c(image_shape) -> float:
  """iCT's c = 0.00054 sqrt(d) for one image of shape (H, W, C) (d = H W C)."""
  return PSEUDO_HUBER_C_PER_SQRT_DIM * math.sqrt(float(math.prod(image_shape)))


def _flat(x):
  return jnp.reshape(jnp.asarray(x, _F32), (x.shape[0], -1))


def l2(x, y):
  return jnp.mean(jnp.square(_flat(x) - _flat(y)), axis=-1)


def l1(x, y):
  return jnp.mean(jnp.abs(_flat(x) - _flat(y)), axis=-1)


def pseudo_huber(x, y, c: Optional[float] = None):
  """sqrt(||x - y||^2 + c^2) - c over the whole image (iCT Sec. 3.3); c default 0.00054 sqrt(d)."""
  if c is None:
    c = pseudo_huber_c(x.shape[1:])
  sq = jnp.sum(jnp.square(_flat(x) - _flat(y)), axis=-1)
  return jnp.sqrt(sq + c * c) - c


def distance(x, y, metric: str, *, huber_c: Optional[float] = None,
             lpips_fn: Optional[Callable] = None):
  """d(x, y) per example for `metric` in METRICS (see the module docstring)."""
  if metric == "l2":
    return l2(x, y)
  if metric == "l1":
    return l1(x, y)
  if metric == "pseudo_huber":
    return pseudo_huber(x, y, huber_c)
  if metric == "lpips":
    if lpips_fn is None:
      raise ValueError("metric 'lpips' needs the LPIPS network (config.method.lpips_weights)")
    return jnp.asarray(lpips_fn(x, y), _F32).reshape((x.shape[0],))
  raise ValueError(f"unknown metric {metric!r}; choose from {METRICS}")
