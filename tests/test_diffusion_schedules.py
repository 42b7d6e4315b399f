"""Noise schedules (cm_jax.diffusion.schedules) against independent re-derivations."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cm_jax.diffusion import schedules as S
from cm_jax.diffusion.grids import karras_sigmas


def _np_cosine_logsnr(t, lmin, lmax):
  """diffusion_distillation schedules.py cosine, re-derived in float64."""
  b = np.arctan(np.exp(-0.5 * lmax))
  a = np.arctan(np.exp(-0.5 * lmin)) - b
  return -2.0 * np.log(np.tan(a * np.asarray(t, np.float64) + b))


ALL = [S.KarrasVE(), S.VPCosine(), S.ShiftedCosine(64, 256),
       S.ShiftedCosine(32, 512, interpolated=True, high_base_resolution=256),
       S.DiscreteDDPM(), S.DiscreteDDPM("scaled_linear")]


def test_vp_cosine_endpoints_and_formula():
  sc = S.VPCosine()
  assert abs(float(sc.logsnr(0.0)) - 20.0) < 1e-4
  assert abs(float(sc.logsnr(1.0)) + 20.0) < 1e-4
  t = np.linspace(0.0, 1.0, 101)
  np.testing.assert_allclose(np.asarray(sc.logsnr(t)), _np_cosine_logsnr(t, -20.0, 20.0),
                             rtol=1e-5, atol=2e-5)
  np.testing.assert_allclose(np.asarray(sc.ve_sigma(t)),
                             np.exp(-0.5 * _np_cosine_logsnr(t, -20.0, 20.0)), rtol=2e-5)
  assert sc.logsnr(jnp.zeros((2, 3))).dtype == jnp.float32


@pytest.mark.parametrize("sc", ALL, ids=lambda s: s.name)
def test_round_trips(sc):
  t = np.linspace(sc.t_min, sc.t_max, 37).astype(np.float32)
  span = sc.t_max - sc.t_min
  back = np.asarray(jax.jit(lambda u: sc.t_from_logsnr(sc.logsnr(u)))(t))
  np.testing.assert_allclose(back, t, atol=2e-5 * span)
  back = np.asarray(sc.t_from_ve_sigma(sc.ve_sigma(t)))
  np.testing.assert_allclose(back, t, atol=2e-5 * span)
  # ve_sigma = sigma/alpha = exp(-logsnr/2)
  np.testing.assert_allclose(np.asarray(sc.ve_sigma(t)),
                             np.asarray(sc.sigma(t) / sc.alpha(t)), rtol=3e-5)
  np.testing.assert_allclose(np.asarray(sc.ve_sigma(t)),
                             np.exp(-0.5 * np.asarray(sc.logsnr(t), np.float64)), rtol=3e-5)
  # noise grows with t
  assert np.all(np.diff(np.asarray(sc.logsnr(t))) < 0)


@pytest.mark.parametrize("sc", [s for s in ALL if s.kind == "vp"], ids=lambda s: s.name)
def test_vp_unit_variance(sc):
  t = np.linspace(sc.t_min, sc.t_max, 41)
  a, s = np.asarray(sc.alpha(t), np.float64), np.asarray(sc.sigma(t), np.float64)
  np.testing.assert_allclose(a * a + s * s, 1.0, atol=1e-6)


def test_karras_ve_matches_grid():
  sc = S.KarrasVE()
  n = 18
  u = np.arange(n) / (n - 1)
  np.testing.assert_allclose(np.asarray(sc.sigma(1.0 - u)), np.asarray(karras_sigmas(n)),
                             rtol=1e-5)
  assert float(sc.sigma(0.0)) == np.float32(0.002)
  assert float(sc.sigma(1.0)) == np.float32(80.0)
  assert np.all(np.asarray(sc.alpha(jnp.ones(3))) == 1.0)


def test_shifted_cosine_formula():
  t = np.linspace(0.0, 1.0, 21)
  base = _np_cosine_logsnr(t, -15.0, 15.0)
  sc = S.ShiftedCosine(64, 256)
  np.testing.assert_allclose(np.asarray(sc.logsnr(t)), base + 2 * np.log(64 / 256),
                             rtol=1e-5, atol=2e-5)
  si = S.ShiftedCosine(32, 512, interpolated=True, high_base_resolution=256)
  want = t * (base + 2 * np.log(32 / 512)) + (1 - t) * (base + 2 * np.log(256 / 512))
  np.testing.assert_allclose(np.asarray(si.logsnr(t)), want, rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("kind", ["linear", "scaled_linear"])
def test_ddpm_alphas_cumprod_match_diffusers(kind):
  diffusers = pytest.importorskip("diffusers")
  ref = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule=kind,
                                beta_start={"linear": 1e-4, "scaled_linear": 0.00085}[kind],
                                beta_end={"linear": 0.02, "scaled_linear": 0.012}[kind])
  sc = S.DiscreteDDPM(kind)
  assert sc.alphas_cumprod.dtype == np.float64
  np.testing.assert_array_equal(sc.betas, ref.betas.numpy())
  np.testing.assert_array_equal(sc.alphas_cumprod.astype(np.float32),
                                ref.alphas_cumprod.numpy())


def test_ddpm_integer_and_fractional_t():
  sc = S.DiscreteDDPM()
  ac = sc.alphas_cumprod
  ks = np.array([0, 1, 17, 500, 999])
  np.testing.assert_allclose(np.asarray(sc.ve_sigma(ks)), np.sqrt((1 - ac[ks]) / ac[ks]),
                             rtol=1e-5)
  np.testing.assert_allclose(np.asarray(sc.alpha(ks)), np.sqrt(ac[ks]), rtol=1e-5)
  # fractional t: linear interpolation of log ve_sigma (k-diffusion DiscreteSchedule)
  ls = 0.5 * np.log((1 - ac) / ac)
  want = np.exp(0.75 * ls[10] + 0.25 * ls[11])
  np.testing.assert_allclose(float(sc.ve_sigma(10.25)), want, rtol=1e-5)
  np.testing.assert_allclose(float(sc.t_from_ve_sigma(want)), 10.25, atol=1e-3)
  assert sc.t_max == 999.0


def test_build_schedule():
  assert set(S.SCHEDULES) == {"karras_ve", "vp_cosine", "shifted_cosine", "ddpm"}
  assert S.build_schedule({"name": "karras_ve", "sigma_max": 10.0}) == S.KarrasVE(sigma_max=10.0)
  assert S.build_schedule({"name": "vp_cosine"}) == S.VPCosine()
  sc = S.build_schedule({"name": "shifted_cosine", "base_resolution": 64,
                         "image_resolution": 128, "interpolated": False})
  assert sc == S.ShiftedCosine(64, 128)
  assert S.build_schedule({"name": "ddpm", "beta_schedule": "scaled_linear"}).beta_schedule \
      == "scaled_linear"
  with pytest.raises(ValueError, match="sigma_maximum"):
    S.build_schedule({"name": "karras_ve", "sigma_maximum": 10.0})
  with pytest.raises(ValueError, match="cosine_xyz"):
    S.build_schedule({"name": "cosine_xyz"})
  ml_collections = pytest.importorskip("ml_collections")
  cfg = ml_collections.ConfigDict({"name": "vp_cosine", "logsnr_min": -10.0})
  assert S.build_schedule(cfg) == S.VPCosine(logsnr_min=-10.0)
  assert math.isclose(float(S.build_schedule(cfg).logsnr(1.0)), -10.0, abs_tol=1e-4)
