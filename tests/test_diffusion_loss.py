"""cm_jax.diffusion.edm_loss: EDM eq. 8 with the Table 1 weighting and sigma distribution."""
import jax
import jax.numpy as jnp
import numpy as np

from cm_jax.diffusion.edm_loss import edm_loss, edm_loss_weight, sample_lognormal_sigma
from cm_jax.diffusion.preconditioning import edm_scalings, make_denoiser


def test_loss_weight():
  s = np.array([0.002, 0.5, 1.0, 80.0])
  np.testing.assert_allclose(np.asarray(edm_loss_weight(jnp.asarray(s))),
                             (s**2 + 0.25) / (s * 0.5)**2, rtol=1e-6)
  assert abs(float(edm_loss_weight(0.5)) - 8.0) < 1e-6
  # lambda = 1 / c_out^2 (EDM Table 1).
  _, c_out, _, _ = edm_scalings(jnp.asarray(s))
  np.testing.assert_allclose(np.asarray(edm_loss_weight(jnp.asarray(s))),
                             1 / np.asarray(c_out)**2, rtol=1e-5)


def test_lognormal_sigma_statistics():
  s = sample_lognormal_sigma(jax.random.key(0), (20000,))
  assert s.shape == (20000,) and s.dtype == jnp.float32 and bool(jnp.all(s > 0))
  ls = np.log(np.asarray(s))
  assert abs(ls.mean() + 1.2) < 0.05 and abs(ls.std() - 1.2) < 0.05


def test_zero_for_perfect_denoiser_on_point_mass():
  c = 0.37
  x0 = jnp.full((8, 4, 4, 3), c)
  perfect = lambda x, sigma, labels=None, cond=None: jnp.full_like(x, c)
  loss = edm_loss(perfect, x0, jax.random.key(1))
  assert loss.shape == (8,)
  np.testing.assert_array_equal(np.asarray(loss), 0.0)


def test_unit_expected_loss_for_ideal_gaussian_denoiser():
  # For data ~ N(0, sd^2) the ideal denoiser is c_skip x, i.e. a zero network
  # under the EDM preconditioning; its posterior variance is (s sd)^2/(s^2+sd^2)
  # = 1/lambda, so the weighted per-pixel loss has expectation exactly 1.
  sd = 0.5
  den = make_denoiser(lambda x, c, l, k: jnp.zeros_like(x))
  x0 = sd * jax.random.normal(jax.random.key(2), (512, 4, 4, 2))
  loss = jax.jit(lambda x, k: edm_loss(den, x, k))(x0, jax.random.key(3))
  assert loss.shape == (512,) and loss.dtype == jnp.float32
  assert abs(float(loss.mean()) - 1.0) < 0.05
  # A worse denoiser (identity) has a larger loss.
  worse = edm_loss(lambda x, s, l=None, c=None: x, x0, jax.random.key(3))
  assert float(worse.mean()) > 1.5


def test_loss_is_mean_over_pixels():
  x0 = jnp.zeros((4, 2, 2, 1))
  den = lambda x, s, l=None, c=None: jnp.ones_like(x)  # error 1 at every pixel
  k = jax.random.key(4)
  loss = edm_loss(den, x0, k)
  sigma = sample_lognormal_sigma(jax.random.split(k)[0], (4,))
  np.testing.assert_allclose(np.asarray(loss), np.asarray(edm_loss_weight(sigma)), rtol=1e-6)
