"""Feature mean and covariance, accumulated over batches in float64 on the host.

    stats = FeatureStats()
    for batch in ...:
      stats.update(features)          # (B, D) numpy or jax.Array (sharded or not)
    mu, sigma = stats.mean(), stats.cov()

Per batch we add the sum and the outer-product sum of the features, as EDM's and
StyleGAN's FeatureStats do, in float64. Sums are taken about a fixed shift (the first
batch's mean) so the covariance does not lose digits to cancellation when the mean is far
from zero. The covariance is the unbiased one (divides by n - 1), i.e. np.cov(rowvar=False),
which is what pytorch-fid, clean-fid and EDM use. Batch order and batch sizes do not
matter, and two accumulators can be merged (per-process statistics, then all together).

Reference statistics live in EDM's format: an .npz with `mu` (D,) and `sigma` (D, D).
"""
from __future__ import annotations

import os
from typing import Optional

import numpy as np


def to_host(x) -> np.ndarray:
  """A (possibly sharded, possibly multi-host) array as one numpy array on this host."""
  import jax  # pylint: disable=g-import-not-at-top
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(jax.device_get(x))


class FeatureStats:
  """Running float64 sums for mean/covariance; optionally keeps the features themselves
  (precision/recall and KID need them) up to `max_keep` rows."""

  def __init__(self, keep_features: bool = False, max_keep: Optional[int] = None):
    self.n = 0
    self.shift: Optional[np.ndarray] = None
    self.s1: Optional[np.ndarray] = None
    self.s2: Optional[np.ndarray] = None
    self.keep_features = keep_features
    self.max_keep = max_keep
    self._kept: list[np.ndarray] = []
    self._num_kept = 0

  @property
  def dim(self) -> Optional[int]:
    return None if self.shift is None else self.shift.shape[0]

  def update(self, features) -> None:
    x = to_host(features)
    if x.ndim != 2:
      raise ValueError(f"features must be (batch, dim), got {x.shape}")
    if x.shape[0] == 0:
      return
    if self.keep_features and (self.max_keep is None or self._num_kept < self.max_keep):
      room = x.shape[0] if self.max_keep is None else self.max_keep - self._num_kept
      self._kept.append(np.array(x[:room], np.float32))
      self._num_kept += min(room, x.shape[0])
    x = x.astype(np.float64)
    if self.shift is None:
      d = x.shape[1]
      self.shift = x.mean(axis=0)
      self.s1, self.s2 = np.zeros(d), np.zeros((d, d))
    elif x.shape[1] != self.dim:
      raise ValueError(f"feature dim changed from {self.dim} to {x.shape[1]}")
    xc = x - self.shift
    self.s1 += xc.sum(axis=0)
    self.s2 += xc.T @ xc
    self.n += x.shape[0]

  def merge(self, other: "FeatureStats") -> "FeatureStats":
    """Adds another accumulator's data into this one (in place; returns self)."""
    if other.n == 0:
      return self
    if self.n == 0:
      self.shift, self.s1, self.s2 = other.shift.copy(), other.s1.copy(), other.s2.copy()
    else:
      # Re-centre the other's sums on this shift: x - a = (x - b) + d, d = b - a.
      d = other.shift - self.shift
      self.s1 += other.s1 + other.n * d
      self.s2 += (other.s2 + np.outer(other.s1, d) + np.outer(d, other.s1)
                  + other.n * np.outer(d, d))
    self.n += other.n
    if self.keep_features:
      self._kept.extend(other._kept)
      self._num_kept += other._num_kept
    return self

  def mean(self) -> np.ndarray:
    self._need(1)
    return self.shift + self.s1 / self.n

  def cov(self) -> np.ndarray:
    self._need(2)
    m = self.s1 / self.n
    return (self.s2 - self.n * np.outer(m, m)) / (self.n - 1)

  def mu_sigma(self) -> tuple[np.ndarray, np.ndarray]:
    return self.mean(), self.cov()

  def features(self) -> np.ndarray:
    if not self.keep_features:
      raise ValueError("this FeatureStats was made with keep_features=False")
    if not self._kept:
      return np.zeros((0, self.dim or 0), np.float32)
    return np.concatenate(self._kept)

  def _need(self, n: int) -> None:
    if self.n < n:
      raise ValueError(f"need at least {n} feature vectors, have {self.n}")


def save_stats(path: str, mu: np.ndarray, sigma: np.ndarray, **meta) -> None:
  """EDM-format reference statistics (`mu`, `sigma`), plus string metadata (e.g. detector)."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  extra = {f"meta_{k}": np.asarray(str(v)) for k, v in meta.items()}
  np.savez(path, mu=np.asarray(mu, np.float64), sigma=np.asarray(sigma, np.float64), **extra)


def load_stats(path: str) -> tuple[np.ndarray, np.ndarray, dict]:
  """(mu, sigma, metadata) from an .npz with `mu` and `sigma` (EDM / ADM reference batches)."""
  with np.load(path, allow_pickle=False) as f:
    if "mu" not in f.files or "sigma" not in f.files:
      raise ValueError(f"{path!r} has no 'mu'/'sigma' arrays (keys: {f.files})")
    meta = {k[5:]: str(f[k]) for k in f.files if k.startswith("meta_")}
    return np.asarray(f["mu"], np.float64), np.asarray(f["sigma"], np.float64), meta
