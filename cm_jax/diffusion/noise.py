"""Per-image randomness: image i's noise depends only on its own key, never on the
batch it sits in, so samples are reproducible across batch sizes and device counts
(what the stochastic sampler of EDM Algorithm 2 needs for its per-step eps_i)."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def as_typed_keys(keys):
  """Accepts new-style typed keys (B,) (from `jax.random.key`) or raw uint32 key
  data (B, 2) (from `jax.random.PRNGKey`) and returns typed keys (B,)."""
  keys = jnp.asarray(keys) if not hasattr(keys, "dtype") else keys
  if jax.dtypes.issubdtype(keys.dtype, jax.dtypes.prng_key):
    if keys.ndim != 1:
      raise ValueError(f"expected a (B,) array of keys, got shape {keys.shape}")
    return keys
  if keys.dtype != jnp.uint32 or keys.ndim != 2:
    raise ValueError("expected typed keys (B,) or raw uint32 key data (B, 2); "
                     f"got dtype {keys.dtype} shape {keys.shape}")
  return jax.random.wrap_key_data(keys)


def per_image_keys(rng, indices):
  """Keys (B,) for images with the given global indices: fold_in(rng, index).

  Sampling image k with key per_image_keys(rng, [k]) gives the same image
  whatever the batch it is drawn in."""
  rng = jnp.asarray(rng) if not hasattr(rng, "dtype") else rng
  rng = as_typed_keys(rng[None])[0]  # one typed key, or raw uint32 (2,) key data
  indices = jnp.asarray(indices, jnp.uint32)
  return jax.vmap(lambda i: jax.random.fold_in(rng, i))(indices)


def per_image_normal(keys, shape, step=None, dtype=jnp.float32):
  """Standard normals of shape (B, *shape), row b drawn from keys[b] alone.

  `step` (an int or a traced int scalar), when given, is folded into every key
  first (fold_in(key_b, step)), so each sampler step gets fresh, reproducible
  noise. Implemented with vmap over the keys.
  """
  keys = as_typed_keys(keys)
  shape = (shape,) if isinstance(shape, int) else tuple(shape)

  def one(k):
    if step is not None:
      k = jax.random.fold_in(k, step)
    return jax.random.normal(k, shape, dtype)

  return jax.vmap(one)(keys)
