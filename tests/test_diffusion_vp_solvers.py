"""DDIM / inverse DDIM / aDDIM steps (solvers.py) and DPM-Solver++(2M) (vp_samplers.py)."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cm_jax.diffusion import solvers
from cm_jax.diffusion.grids import append_zero, karras_sigmas
from cm_jax.diffusion.schedules import DiscreteDDPM
from cm_jax.diffusion.vp_samplers import sample_dpmpp_2m

MU, SD = 0.3, 0.7  # Gaussian toy data N(MU, SD^2) per element


def _gauss_x_hat_vp(z, a, s):
  """E[x | z] for z = a x + s eps, x ~ N(MU, SD^2): exact denoiser in VP coordinates."""
  return MU + a * SD ** 2 / (a * a * SD ** 2 + s * s) * (z - a * MU)


def _gauss_denoise_ve(x, sigma, cond=None):
  s = jnp.reshape(sigma, (-1,) + (1,) * (x.ndim - 1))
  return MU + SD ** 2 / (SD ** 2 + s * s) * (x - MU)


def _ddim_ref():
  diffusers = pytest.importorskip("diffusers")
  ref = diffusers.DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear",
                                beta_start=1e-4, beta_end=0.02, clip_sample=False,
                                set_alpha_to_one=True)
  ref.set_timesteps(10)
  return ref


def test_ddim_matches_diffusers():
  torch = pytest.importorskip("torch")
  ref = _ddim_ref()
  ac = DiscreteDDPM().alphas_cumprod
  r = np.random.RandomState(0)
  for t in [int(v) for v in ref.timesteps[[0, 4, 9]]]:  # 900, 500 and 0 (-> final)
    s = t - 100
    z = r.randn(2, 4, 4, 3).astype(np.float32)
    eps = r.randn(2, 4, 4, 3).astype(np.float32)
    want = ref.step(torch.from_numpy(eps), t, torch.from_numpy(z), eta=0.0).prev_sample.numpy()
    got = solvers.ddim_discrete_step(eps, z, t, s, ac)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
    # the same step through ddim_step with an x estimate
    a_t, s_t = solvers.discrete_alpha_sigma(t, ac)
    a_s, s_s = solvers.discrete_alpha_sigma(s, ac)
    x_hat = (z - s_t * eps) / a_t
    got = solvers.ddim_step(x_hat, z, a_t, s_t, a_s, s_s)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4)
  # per-example (B,) timesteps
  z = r.randn(2, 3).astype(np.float32)
  eps = r.randn(2, 3).astype(np.float32)
  got = solvers.ddim_discrete_step(eps, z, jnp.asarray([900, 20]), jnp.asarray([880, -1]), ac)
  for b, (t, s) in enumerate([(900, 880), (20, -1)]):
    one = solvers.ddim_discrete_step(eps[b:b + 1], z[b:b + 1], t, s, ac)
    np.testing.assert_allclose(np.asarray(got[b:b + 1]), np.asarray(one), rtol=1e-6)


def test_inverse_ddim_is_exact_inverse():
  r = np.random.RandomState(1)
  x = r.randn(3, 5, 2).astype(np.float32)
  z_t = r.randn(3, 5, 2).astype(np.float32)
  l_t = np.array([-2.0, 0.0, 3.0], np.float32)
  l_s = l_t + np.array([0.5, 1.0, 2.0], np.float32)
  a = lambda l: np.sqrt(1 / (1 + np.exp(-l))).astype(np.float32)
  s = lambda l: np.sqrt(1 / (1 + np.exp(l))).astype(np.float32)
  z_s = solvers.ddim_step(x, z_t, a(l_t), s(l_t), a(l_s), s(l_s))
  back = solvers.inverse_ddim(z_s, z_t, a(l_t), s(l_t), a(l_s), s(l_s))
  np.testing.assert_allclose(np.asarray(back), x, rtol=1e-4, atol=1e-4)
  back = solvers.inverse_ddim_logsnr(z_s, z_t, l_t, l_s)
  np.testing.assert_allclose(np.asarray(back), x, rtol=1e-4, atol=1e-4)
  # VE coordinates (alpha = 1) and scalar levels
  z_s = solvers.ddim_step(x, z_t, 1.0, 2.0, 1.0, 0.5)
  np.testing.assert_allclose(np.asarray(solvers.inverse_ddim(z_s, z_t, 1.0, 2.0, 1.0, 0.5)), x,
                             rtol=1e-5, atol=1e-5)


def test_addim():
  r = np.random.RandomState(2)
  x = r.randn(2, 3, 3).astype(np.float32)
  z = r.randn(2, 3, 3).astype(np.float32)
  args = (jnp.asarray([0.6, 0.9]), jnp.asarray([0.8, math.sqrt(0.19)]), 0.8, 0.6)
  np.testing.assert_allclose(np.asarray(solvers.addim_step(x, z, *args, 0.0)),
                             np.asarray(solvers.ddim_step(x, z, *args)), rtol=1e-6, atol=1e-6)
  # hand-worked: x_hat = [1, 0], eps_hat = [3, 4] (||eps||^2 = 25, d = 2), a_t, s_t = .6, .8,
  # a_s, s_s = .8, .6, x_var = .5: z_var = (.8 - .6 * .6 / .8)^2 * .5 = .06125,
  # z_s = .8 x_hat + sqrt(.36 + (2/25) .06125) eps_hat = .8 x_hat + sqrt(.3649) eps_hat.
  x1 = jnp.asarray([[1.0, 0.0]])
  z1 = 0.6 * x1 + 0.8 * jnp.asarray([[3.0, 4.0]])
  got = solvers.addim_step(x1, z1, 0.6, 0.8, 0.8, 0.6, jnp.asarray([0.5]))
  c = math.sqrt(0.3649)
  np.testing.assert_allclose(np.asarray(got), [[0.8 + 3 * c, 4 * c]], rtol=1e-5)
  np.testing.assert_allclose(float(solvers.addim_sampling_x_var(0.6, 0.8)), 0.1 / 2.5625,
                             rtol=1e-6)


def test_dpmpp_2m_matches_diffusers():
  torch = pytest.importorskip("torch")
  diffusers = pytest.importorskip("diffusers")
  ref = diffusers.DPMSolverMultistepScheduler(
      num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
      algorithm_type="dpmsolver++", solver_order=2, lower_order_final=True,
      prediction_type="epsilon")
  ref.set_timesteps(6)
  ac = ref.alphas_cumprod.numpy().astype(np.float64)
  z = np.random.RandomState(3).randn(2, 4, 4, 1).astype(np.float32)
  sample = torch.from_numpy(z.copy())
  for t in ref.timesteps:
    a, s = np.sqrt(ac[int(t)]), np.sqrt(1 - ac[int(t)])
    zn = sample.numpy().astype(np.float64)
    eps = (zn - a * _gauss_x_hat_vp(zn, a, s)) / s  # the exact eps of the Gaussian data
    sample = ref.step(torch.from_numpy(eps.astype(np.float32)), t, sample).prev_sample
  want = sample.numpy()
  grid = ref.sigmas.numpy()  # VE levels sqrt((1 - abar)/abar) at the timesteps, then 0
  assert grid[-1] == 0 and len(grid) == 7
  x_T = z * np.sqrt(1.0 + grid[0] ** 2)  # VE x = z / alpha
  seen = []
  got = sample_dpmpp_2m(_gauss_denoise_ve, jnp.asarray(x_T), jnp.asarray(grid),
                        callback=lambda i, x, d, s: seen.append(int(i)))
  jax.effects_barrier()
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4)
  assert sorted(seen) == list(range(6))


def test_dpmpp_2m_converges_on_gaussian():
  x_T = 80.0 * jax.random.normal(jax.random.PRNGKey(0), (4, 8))
  exact = MU + (x_T - MU) * SD / math.sqrt(SD ** 2 + 80.0 ** 2)
  errs = []
  for n in (8, 16, 32, 64):
    out = jax.jit(sample_dpmpp_2m, static_argnums=0)(_gauss_denoise_ve, x_T,
                                                     append_zero(karras_sigmas(n)))
    errs.append(float(jnp.max(jnp.abs(out - exact))))
  assert all(b < a for a, b in zip(errs, errs[1:])), errs
  assert errs[-2] / errs[-1] > 3.0, errs  # second order: ~4x per halving of the step
  assert errs[-1] < 1e-2, errs
