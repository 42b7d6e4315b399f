"""cm_jax.diffusion.grids: the Karras et al. 2022 eq. 5 grid."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cm_jax.diffusion.grids import append_zero, karras_sigmas


def _np_karras(n, smin=0.002, smax=80.0, rho=7.0):
  i = np.arange(n, dtype=np.float64)
  return (smax ** (1 / rho) + i / (n - 1) * (smin ** (1 / rho) - smax ** (1 / rho))) ** rho


@pytest.mark.parametrize("n", [2, 5, 18, 40])
def test_matches_numpy(n):
  s = karras_sigmas(n)
  assert s.dtype == jnp.float32 and s.shape == (n,)
  np.testing.assert_allclose(np.asarray(s), _np_karras(n), rtol=1e-6)


def test_endpoints_length_order():
  s = np.asarray(karras_sigmas(18))
  assert len(s) == 18
  assert s[0] == np.float32(80.0)
  assert s[-1] == np.float32(0.002)
  assert np.all(np.diff(s) < 0)
  # Hand-checked second level: (80^(1/7) - (80^(1/7) - 0.002^(1/7))/17)^7 = 57.5859...
  assert abs(s[1] - 57.58598) < 1e-3


def test_custom_range_and_single_level():
  s = np.asarray(karras_sigmas(7, sigma_min=0.01, sigma_max=10.0, rho=3.0))
  np.testing.assert_allclose(s, _np_karras(7, 0.01, 10.0, 3.0), rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(karras_sigmas(1)), np.float32([80.0]))
  with pytest.raises(ValueError):
    karras_sigmas(0)


def test_traced_hyperparameters():
  f = jax.jit(lambda smax: karras_sigmas(10, sigma_max=smax))
  np.testing.assert_allclose(np.asarray(f(80.0)), _np_karras(10), rtol=2e-5)


def test_append_zero():
  g = append_zero(karras_sigmas(18))
  assert g.shape == (19,) and g.dtype == jnp.float32
  assert float(g[-1]) == 0.0 and float(g[0]) == 80.0
