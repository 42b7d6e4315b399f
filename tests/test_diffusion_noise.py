"""cm_jax.diffusion.noise: per-image randomness independent of batch composition."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cm_jax.diffusion.noise import per_image_keys, per_image_normal


def test_row_independent_of_batch():
  keys = jax.random.split(jax.random.key(0), 6)
  full = np.asarray(per_image_normal(keys, (4, 4, 3), step=2))
  assert full.shape == (6, 4, 4, 3)
  sub = np.asarray(per_image_normal(keys[jnp.array([4, 1])], (4, 4, 3), step=2))
  np.testing.assert_array_equal(sub[0], full[4])
  np.testing.assert_array_equal(sub[1], full[1])
  one = np.asarray(per_image_normal(keys[3:4], (4, 4, 3), step=2))
  np.testing.assert_array_equal(one[0], full[3])
  assert not np.allclose(full[0], full[1])


def test_step_folding():
  keys = jax.random.split(jax.random.key(1), 3)
  a0 = per_image_normal(keys, (5,), step=0)
  a1 = per_image_normal(keys, (5,), step=1)
  an = per_image_normal(keys, (5,))
  assert not np.allclose(a0, a1) and not np.allclose(a0, an)
  traced = jax.jit(lambda k, s: per_image_normal(k, (5,), step=s))(keys, 1)
  np.testing.assert_array_equal(np.asarray(traced), np.asarray(a1))
  np.testing.assert_array_equal(np.asarray(an[1]),
                                np.asarray(jax.random.normal(keys[1], (5,))))


def test_raw_uint32_keys():
  typed = jax.random.split(jax.random.key(7), 4)
  raw = jax.random.key_data(typed)
  assert raw.dtype == jnp.uint32 and raw.shape == (4, 2)
  np.testing.assert_array_equal(np.asarray(per_image_normal(raw, (3,), step=5)),
                                np.asarray(per_image_normal(typed, (3,), step=5)))
  with pytest.raises(ValueError):
    per_image_normal(jnp.zeros((4, 2), jnp.float32), (3,))


def test_per_image_keys_by_index():
  rng = jax.random.key(3)
  a = per_image_normal(per_image_keys(rng, jnp.arange(10)), (2,))
  b = per_image_normal(per_image_keys(rng, jnp.array([7, 2])), (2,))
  np.testing.assert_array_equal(np.asarray(b), np.asarray(a[jnp.array([7, 2])]))
  c = per_image_keys(jax.random.PRNGKey(3), jnp.array([7]))
  np.testing.assert_array_equal(np.asarray(per_image_normal(c, (2,))), np.asarray(a[7:8]))
