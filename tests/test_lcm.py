"""The discrete LCM pieces (`cm_jax.diffusion.lcm`) against diffusers and worked numbers.

* The skipping-step grid is the reference script's `DDIMSolver` timesteps
  ((arange(1, 51) * 20).round() - 1, `train_lcm_distill_sd_wds.py`), and the sampling
  timesteps are `LCMScheduler.set_timesteps`' (and the lists LCM's users quote).
* c_skip / c_out are `LCMScheduler.get_scalings_for_boundary_condition_discrete`'s.
* Multistep sampling is a loop of `LCMScheduler.step` fed the same noises.
* The DDIM teacher step is `DDIMSolver.ddim_step` (alpha_cumprod_prev at t - 20); the
  DPM-Solver-2 step (Lu et al. 2022, Algorithm 1, r1 = 1/2) is checked on Gaussian data,
  where the probability-flow ODE has a closed form: with x ~ N(0, s^2 I),
  z_t ~ N(0, v_t I), v_t = abar_t s^2 + 1 - abar_t, the exact noise prediction is
  eps*(z, t) = sigma_t z / v_t, and the ODE maps z_t to z_t sqrt(v_n / v_t) (a linear
  monotone map of a centred Gaussian onto the next marginal).
"""
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from cm_jax.diffusion import lcm, schedules

T = 1000
SCHEDULE = schedules.DiscreteDDPM(beta_schedule="scaled_linear", beta_start=0.00085,
                                  beta_end=0.012, num_train_timesteps=T)
AC = SCHEDULE.alphas_cumprod


def _lcm_scheduler(**kwargs):
  from diffusers import LCMScheduler  # pylint: disable=g-import-not-at-top
  return LCMScheduler(num_train_timesteps=T, beta_start=0.00085, beta_end=0.012,
                      beta_schedule="scaled_linear", **kwargs)


def test_alphas_cumprod_are_diffusers():
  np.testing.assert_array_equal(AC, _lcm_scheduler().alphas_cumprod.numpy())


# -- grids ---------------------------------------------------------------------------------


def test_skipping_grid_is_the_reference_ddim_solver_grid():
  grid = lcm.skipping_grid()
  np.testing.assert_array_equal(grid, np.arange(19, 1000, 20))
  step_ratio = T // 50  # DDIMSolver(timesteps=1000, ddim_timesteps=50)
  reference = (np.arange(1, 51) * step_ratio).round().astype(np.int64) - 1
  np.testing.assert_array_equal(grid, reference)
  assert lcm.skip() == 20


@pytest.mark.parametrize("steps", [1, 2, 3, 4, 8, 50])
def test_inference_timesteps_are_lcm_schedulers(steps):
  sched = _lcm_scheduler()
  sched.set_timesteps(steps)
  np.testing.assert_array_equal(lcm.inference_timesteps(steps), sched.timesteps.numpy())


def test_inference_timesteps_quoted_lists():
  assert lcm.inference_timesteps(1).tolist() == [999]
  assert lcm.inference_timesteps(2).tolist() == [999, 499]
  assert lcm.inference_timesteps(4).tolist() == [999, 759, 499, 259]
  assert lcm.inference_timesteps(8).tolist() == [999, 879, 759, 639, 499, 379, 259, 139]


@pytest.mark.parametrize("steps", [0, 51])
def test_inference_timesteps_out_of_range(steps):
  with pytest.raises(ValueError, match="1 to 50 steps"):
    lcm.inference_timesteps(steps)


# -- the consistency function --------------------------------------------------------------


def test_consistency_output_scalings_are_lcm_schedulers():
  sched = _lcm_scheduler()
  ts = np.array([0, 1, 19, 259, 499, 999])
  rng = np.random.default_rng(0)
  z = rng.standard_normal((len(ts), 3, 2)).astype(np.float32)
  x0 = rng.standard_normal((len(ts), 3, 2)).astype(np.float32)
  got = np.asarray(lcm.consistency_output(z, x0, ts))
  for i, t in enumerate(ts):
    c_skip, c_out = sched.get_scalings_for_boundary_condition_discrete(int(t))
    np.testing.assert_allclose(got[i], c_skip * z[i] + c_out * x0[i], rtol=1e-6, atol=1e-7)
  # The boundary condition f(z, 0) = z exactly: c_skip(0) = 1, c_out(0) = 0.
  np.testing.assert_array_equal(got[0], z[0])
  # One worked value: t = 1 -> u = 10, c_skip = 0.25 / 100.25, c_out = 10 / sqrt(100.25).
  np.testing.assert_allclose(got[1], 0.25 / 100.25 * z[1] + 10 / np.sqrt(100.25) * x0[1],
                             rtol=1e-6)


def _toy_x0(z, t):
  return 0.5 * z + 1e-3 * jnp.asarray(t, jnp.float32)  # depends on t: order matters


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_multistep_sample_is_lcm_scheduler_step(steps, monkeypatch):
  from diffusers.schedulers import scheduling_lcm  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(steps)
  shape = (2, 4, 3, 3)
  z_T = rng.standard_normal(shape).astype(np.float32)
  noises = rng.standard_normal((steps,) + shape).astype(np.float32)
  handed = iter(noises[:-1])  # diffusers draws no noise after the last step
  monkeypatch.setattr(scheduling_lcm, "randn_tensor",
                      lambda *a, **k: torch.from_numpy(next(handed)))
  sched = _lcm_scheduler(prediction_type="sample")
  sched.set_timesteps(steps)
  z = torch.from_numpy(z_T)
  for t in sched.timesteps:
    z = sched.step(torch.from_numpy(np.array(_toy_x0(z.numpy(), int(t)))), t, z).prev_sample
  assert next(handed, None) is None  # every noise but the last was used
  ours = lcm.multistep_sample(_toy_x0, z_T, lcm.inference_timesteps(steps), AC, noises)
  np.testing.assert_allclose(np.asarray(ours), z.numpy(), atol=1e-5, rtol=0)


# -- teacher solvers -----------------------------------------------------------------------


def test_ddim_teacher_step_is_reference_ddim_solver():
  # The reference's DDIMSolver: alpha_cumprods_prev[i] = abar at grid[i - 1] (abar_0 for
  # i = 0), and x_prev = sqrt(prev) x0 + sqrt(1 - prev) eps.
  grid = (np.arange(1, 51) * 20).round().astype(np.int64) - 1
  prev = np.asarray([AC[0]] + AC[grid[:-1]].tolist())
  index = np.array([0, 1, 12, 25, 49])
  rng = np.random.default_rng(1)
  x0 = rng.standard_normal((5, 4, 4, 2)).astype(np.float32)
  eps = rng.standard_normal((5, 4, 4, 2)).astype(np.float32)
  p = prev[index].reshape(-1, 1, 1, 1)
  reference = np.sqrt(p) * x0 + np.sqrt(1 - p) * eps
  t_n = np.maximum(grid[index] - 20, 0)
  got = np.asarray(lcm.ddim_teacher_step(x0, eps, t_n, AC))
  np.testing.assert_allclose(got, reference, atol=1e-6, rtol=0)


DATA_STD = 0.5


def _gaussian_eps(z, t):
  """eps*(z, t) for x ~ N(0, DATA_STD^2 I), at integer or fractional t (the schedule's
  interpolation, as the solver's intermediate point uses)."""
  ve = SCHEDULE.ve_sigma(jnp.asarray(t, jnp.float32)).reshape(-1, 1)
  alpha = 1.0 / jnp.sqrt(1.0 + ve * ve)
  sigma = ve * alpha
  return sigma * z / (alpha * alpha * DATA_STD ** 2 + sigma * sigma)


def test_dpm_solver_2_beats_ddim_on_gaussian_data():
  t = np.array([999, 759, 499, 259, 99, 19])
  t_n = np.maximum(t - 20, 0)
  v = lambda s: AC[s] * DATA_STD ** 2 + 1 - AC[s]
  rng = np.random.default_rng(2)
  z = (rng.standard_normal((len(t), 64)) * np.sqrt(v(t))[:, None]).astype(np.float32)
  exact = z * np.sqrt(v(t_n) / v(t))[:, None]
  eps = _gaussian_eps(z, t)
  alpha, sigma = np.sqrt(AC[t])[:, None], np.sqrt(1 - AC[t])[:, None]
  x0 = (z - sigma * np.asarray(eps)) / alpha
  ddim = np.asarray(lcm.ddim_teacher_step(x0, eps, t_n, AC))
  dpm = np.asarray(lcm.dpm_solver_2_step(_gaussian_eps, z, eps, jnp.asarray(t, jnp.int32),
                                         jnp.asarray(t_n, jnp.int32), SCHEDULE))
  err_ddim = np.abs(ddim - exact).max(axis=1)
  err_dpm = np.abs(dpm - exact).max(axis=1)
  scale = np.abs(exact).max(axis=1)
  assert (err_ddim < 0.03 * scale).all(), err_ddim / scale  # both close to the ODE...
  assert (err_dpm < 0.01 * scale).all(), err_dpm / scale
  assert (err_dpm < err_ddim).all(), (err_dpm, err_ddim)     # ...the 2nd-order one closer
  # Away from t = 0 the second-order step is an order of magnitude closer.
  assert (err_dpm[1:-1] < 0.1 * err_ddim[1:-1]).all(), (err_dpm, err_ddim)


def test_dpm_solver_2_intermediate_point_by_hand():
  t, t_n = 499, 479
  lam = lambda s: 0.5 * np.log(AC[s] / (1 - AC[s]))  # lambda = log(alpha / sigma)
  h = lam(t_n) - lam(t)
  lam_s1 = lam(t) + h / 2
  alpha_s1, sigma_s1 = np.sqrt(1 / (1 + np.exp(-2 * lam_s1))), np.sqrt(1 / (1 + np.exp(2 * lam_s1)))
  alpha_t, alpha_n, sigma_n = np.sqrt(AC[t]), np.sqrt(AC[t_n]), np.sqrt(1 - AC[t_n])
  z = np.array([[1.0, -2.0, 0.5]], np.float32)
  eps_t = np.array([[0.3, 0.1, -0.7]], np.float32)
  eps_s1 = np.array([[-0.2, 0.4, 0.9]], np.float32)
  seen = {}

  def eps_fn(u, s):
    seen["u"], seen["s"] = u, s
    return jnp.asarray(eps_s1)

  out = lcm.dpm_solver_2_step(eps_fn, jnp.asarray(z), jnp.asarray(eps_t),
                              jnp.asarray([t], jnp.int32), jnp.asarray([t_n], jnp.int32),
                              SCHEDULE)
  # abar_499 = 0.27767, abar_479 = 0.30510 (scaled_linear): h = 0.0665 for this hop.
  np.testing.assert_allclose([AC[t], AC[t_n], h], [0.27767, 0.30510, 0.06645], atol=1e-5)
  u = alpha_s1 / alpha_t * z - sigma_s1 * np.expm1(h / 2) * eps_t
  np.testing.assert_allclose(np.asarray(seen["u"]), u, rtol=1e-5, atol=1e-6)
  # s1 is the fractional timestep whose (interpolated) log-SNR is the midpoint's.
  s1 = float(np.asarray(seen["s"]).reshape(()))
  assert t_n < s1 < t
  log_ve = 0.5 * (np.log1p(-AC) - np.log(AC))
  np.testing.assert_allclose(np.interp(s1, np.arange(T), log_ve), -lam_s1, atol=1e-5)
  expected = alpha_n / alpha_t * z - sigma_n * np.expm1(h) * eps_s1
  np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-5, atol=1e-6)


# -- the distance --------------------------------------------------------------------------


def test_pseudo_huber_by_hand():
  a = np.array([[0.0, 1.0], [3.0, -4.0]], np.float32)
  b = np.zeros_like(a)
  # sqrt(d^2 + c^2) - c with c = 1: 0, sqrt(2) - 1, sqrt(10) - 1, sqrt(17) - 1; mean.
  want = (0 + (2 ** 0.5 - 1) + (10 ** 0.5 - 1) + (17 ** 0.5 - 1)) / 4
  np.testing.assert_allclose(float(lcm.pseudo_huber(a, b, 1.0)), want, rtol=1e-6)
  # LCM's c = 0.001: all but the mean absolute difference (0 + 1 + 3 + 4) / 4 = 2.
  want = (1e-3 + (1 + 1e-6) ** 0.5 + (9 + 1e-6) ** 0.5 + (16 + 1e-6) ** 0.5 - 4e-3) / 4
  np.testing.assert_allclose(float(lcm.pseudo_huber(a, b, 0.001)), want, rtol=1e-6)
  assert abs(want - 2.0) < 1e-3
  # Symmetric in its arguments.
  assert float(lcm.pseudo_huber(b, a, 1.0)) == float(lcm.pseudo_huber(a, b, 1.0))
