"""cm_jax.diffusion.preconditioning: EDM Table 1 and Consistency Models App. C scalings."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cm_jax.diffusion.preconditioning import (consistency_scalings, edm_scalings,
                                              make_denoiser, noise_conditioning)

SIGMAS = np.array([0.002, 0.01, 0.3, 0.5, 1.0, 7.3, 80.0])


@pytest.mark.parametrize("sd", [0.5, 1.0])
def test_edm_scalings_vs_numpy(sd):
  s = SIGMAS
  c_skip, c_out, c_in, c_noise = map(np.asarray, edm_scalings(jnp.asarray(s), sd))
  np.testing.assert_allclose(c_skip, sd**2 / (s**2 + sd**2), rtol=1e-6)
  np.testing.assert_allclose(c_out, s * sd / np.sqrt(s**2 + sd**2), rtol=1e-6)
  np.testing.assert_allclose(c_in, 1 / np.sqrt(s**2 + sd**2), rtol=1e-6)
  np.testing.assert_allclose(c_noise, np.log(s) / 4, rtol=1e-6, atol=1e-7)
  assert all(c.dtype == jnp.float32 for c in edm_scalings(jnp.asarray(s, jnp.bfloat16)))


@pytest.mark.parametrize("sd,smin", [(0.5, 0.002), (1.0, 0.01)])
def test_consistency_scalings_vs_numpy(sd, smin):
  s = SIGMAS[SIGMAS >= smin]
  c_skip, c_out, c_in = map(np.asarray, consistency_scalings(jnp.asarray(s), sd, smin))
  np.testing.assert_allclose(c_skip, sd**2 / ((s - smin)**2 + sd**2), rtol=1e-6)
  np.testing.assert_allclose(c_out, sd * (s - smin) / np.sqrt(s**2 + sd**2),
                             rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(c_in, 1 / np.sqrt(s**2 + sd**2), rtol=1e-6)


def test_boundary_condition_exact():
  c_skip, c_out, _ = consistency_scalings(0.002)
  assert float(c_skip) == 1.0 and float(c_out) == 0.0
  c_skip, c_out, _ = consistency_scalings(jnp.float32(0.01), 0.5, 0.01)
  assert float(c_skip) == 1.0 and float(c_out) == 0.0
  # f(x, sigma_min) = x bit-exactly even for a wild network output.
  f = make_denoiser(lambda x, c, l, k: 1e6 * jnp.ones_like(x) + x,
                    parameterization="consistency")
  x = jax.random.normal(jax.random.key(0), (3, 4, 4, 2))
  np.testing.assert_array_equal(np.asarray(f(x, 0.002)), np.asarray(x))
  assert float(jnp.max(jnp.abs(f(x, 0.5) - x))) > 1.0


def test_noise_conditioning():
  s = jnp.asarray([0.002, 1.0, 80.0])
  np.testing.assert_allclose(np.asarray(noise_conditioning(s, "edm")),
                             np.log([0.002, 1.0, 80.0]) / 4, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(noise_conditioning(s, "openai")),
                             1000 * 0.25 * np.log([0.002, 1.0, 80.0]), rtol=1e-6)
  assert abs(float(noise_conditioning(80.0, "openai")) - 1095.512) < 1e-2
  with pytest.raises(ValueError):
    noise_conditioning(s, "ddpm")
  with pytest.raises(ValueError):
    make_denoiser(lambda *a: a[0], c_noise="nope")
  with pytest.raises(ValueError):
    make_denoiser(lambda *a: a[0], parameterization="v")


@pytest.mark.parametrize("param", ["edm", "consistency"])
def test_make_denoiser_matches_formula(param):
  sd, smin = 0.5, 0.002
  seen = {}

  def net(x_in, c_noise, labels, cond):
    seen.update(x_in=x_in, c_noise=c_noise, labels=labels, cond=cond)
    return (jnp.tanh(x_in) * 2.0 + labels[:, None, None, None]).astype(jnp.bfloat16)

  den = make_denoiser(net, parameterization=param, c_noise="openai")
  x = np.asarray(jax.random.normal(jax.random.key(1), (3, 2, 2, 3)))
  s = np.array([0.002, 0.7, 40.0], np.float32)
  labels = jnp.asarray([0.0, 1.0, 2.0])
  out = den(jnp.asarray(x), jnp.asarray(s), labels, cond="c")
  assert out.dtype == jnp.float32 and out.shape == x.shape
  sb = s[:, None, None, None].astype(np.float64)
  c_in = 1 / np.sqrt(sb**2 + sd**2)
  if param == "edm":
    c_skip, c_out = sd**2 / (sb**2 + sd**2), sb * sd / np.sqrt(sb**2 + sd**2)
  else:
    c_skip = sd**2 / ((sb - smin)**2 + sd**2)
    c_out = sd * (sb - smin) / np.sqrt(sb**2 + sd**2)
  np.testing.assert_allclose(np.asarray(seen["x_in"]), c_in * x, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(seen["c_noise"]), 250 * np.log(s), rtol=1e-5)
  assert seen["cond"] == "c"
  F = np.asarray(net(jnp.asarray(c_in * x, jnp.float32), None, labels, None)).astype(np.float64)
  np.testing.assert_allclose(np.asarray(out), c_skip * x + c_out * F, rtol=2e-3, atol=1e-4)


def test_make_denoiser_scalar_sigma_broadcasts():
  den = make_denoiser(lambda x, c, l, k: x * c[:, None, None, None])
  x = jax.random.normal(jax.random.key(2), (4, 3, 3, 1))
  np.testing.assert_allclose(np.asarray(den(x, 1.3)),
                             np.asarray(den(x, jnp.full((4,), 1.3))), rtol=1e-6)
  # Zero network output gives c_skip x, the ideal denoiser for N(0, sd^2) data.
  den0 = make_denoiser(lambda x, c, l, k: jnp.zeros_like(x))
  np.testing.assert_allclose(np.asarray(den0(x, 2.0)), np.asarray(x) * 0.25 / 4.25, rtol=1e-6)
