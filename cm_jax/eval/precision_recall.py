"""Improved precision and recall (Kynkaanniemi, Karras, Laine, Lehtinen, Aila 2019).

Each set of features approximates its manifold by the union of balls around its points,
the radius of a ball being the distance to the point's k-th nearest neighbour in its own
set (k = 3; the point itself is the 0-th). Precision = fraction of generated points inside
the real manifold; recall = fraction of real points inside the generated manifold.

As the reference implementations (the paper's code, StyleGAN2-ADA's pr50k3, ADM's
evaluator) do, distances are Euclidean in feature space and computed in row blocks; the
sets may be cut to a seeded random subset of `max_items` each (StyleGAN2-ADA: 50k
generated vs up to 200k real; the paper: 50k each) to bound the O(n^2) cost.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

_HIGHEST = jax.lax.Precision.HIGHEST


@jax.jit
def _sq_dists(rows: jax.Array, cols: jax.Array) -> jax.Array:
  r2 = jnp.sum(rows * rows, axis=1, keepdims=True)
  c2 = jnp.sum(cols * cols, axis=1)[None, :]
  d = r2 - 2.0 * jnp.dot(rows, cols.T, precision=_HIGHEST) + c2
  return jnp.maximum(d, 0.0)


def _row_blocks(x: np.ndarray, block: int):
  """Fixed-size row blocks (the last one zero-padded) so every block reuses one compile."""
  for start in range(0, x.shape[0], block):
    part = x[start:start + block]
    n = part.shape[0]
    if n < block and x.shape[0] > block:
      part = np.concatenate([part, np.zeros((block - n, x.shape[1]), x.dtype)])
    yield part, n


def knn_radii(features: np.ndarray, k: int = 3, block: int = 1000) -> np.ndarray:
  """Squared distance of every point to its k-th nearest neighbour in the same set."""
  if features.shape[0] <= k:
    raise ValueError(f"need more than k={k} points, have {features.shape[0]}")
  cols = jnp.asarray(features, jnp.float32)
  kth = jax.jit(lambda r: -jax.lax.top_k(-_sq_dists(r, cols), k + 1)[0][:, -1])
  out = [np.asarray(kth(jnp.asarray(part)))[:n] for part, n in _row_blocks(features, block)]
  return np.concatenate(out)


def inside_manifold(probes: np.ndarray, manifold: np.ndarray, radii: np.ndarray,
                    block: int = 1000) -> np.ndarray:
  """For each probe, whether it lies within some manifold point's k-NN ball."""
  cols = jnp.asarray(manifold, jnp.float32)
  r = jnp.asarray(radii, jnp.float32)[None, :]
  hit = jax.jit(lambda p: jnp.any(_sq_dists(p, cols) <= r, axis=1))
  out = [np.asarray(hit(jnp.asarray(part)))[:n] for part, n in _row_blocks(probes, block)]
  return np.concatenate(out)


def subset(features: np.ndarray, max_items: Optional[int], rng: np.random.Generator):
  if max_items is None or features.shape[0] <= max_items:
    return features
  return features[np.sort(rng.choice(features.shape[0], max_items, replace=False))]


def precision_recall(real: np.ndarray, fake: np.ndarray, *, k: int = 3,
                     max_items: Optional[int] = 10_000, seed: int = 0,
                     block: int = 1000) -> tuple[float, float]:
  """(precision, recall) of `fake` features against `real` features."""
  rng = np.random.default_rng(seed)
  real = np.asarray(subset(np.asarray(real, np.float32), max_items, rng))
  fake = np.asarray(subset(np.asarray(fake, np.float32), max_items, rng))
  precision = inside_manifold(fake, real, knn_radii(real, k, block), block).mean()
  recall = inside_manifold(real, fake, knn_radii(fake, k, block), block).mean()
  return float(precision), float(recall)
