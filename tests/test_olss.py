"""OLSS (Duan et al. 2023): the least squares, the path search, the fitted sampler on a
Gaussian toy whose ODE solution is known in closed form, and a fitted run as users read it.

The toy: data N(mu, s_d^2) per pixel has the exact denoiser D(x; sigma) = mu + s_d^2 /
(s_d^2 + sigma^2) (x - mu), and the probability-flow ODE dx/dsigma = (x - D) / sigma
(Karras et al. 2022 eq. 4) is solved by x(sigma) - mu = (x_T - mu) sqrt((s_d^2 + sigma^2) /
(s_d^2 + sigma_T^2)). With one s_d for every pixel every state x(sigma) = mu + A (x_T - mu)
and the first output e_0 = sigma_T / (s_d^2 + sigma_T^2) (x_T - mu) span x_T - mu and mu,
so the endpoint is one combination of any state (z_T or the current one) and e_0: OLSS of
any n >= 1 steps, in either basis, must reproduce it to float precision.
"""
import json
import os
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cm_jax import runs
from cm_jax.diffusion import grids, olss_solver, samplers
from cm_jax.methods import olss
from cm_jax.train import builders, fit
from configs import digits_olss

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPE = (4, 4, 1)
SIGMA_MAX = 80.0


class GaussianTeacher:
  """A 'teacher' whose denoiser is exact for N(mu, s_d^2) data (per-pixel mu and s_d)."""
  conditional = False

  def __init__(self, mu, s_d):
    self.mu, self.s_d = jnp.asarray(mu, jnp.float32), jnp.asarray(s_d, jnp.float32)
    self.calls = []

  def sampling_setup(self, params, noise, num_steps, guidance=0.0, clip_denoised=None):
    del params, guidance, clip_denoised
    grid = grids.append_zero(grids.karras_sigmas(num_steps, 0.002, SIGMA_MAX, 7.0))

    def denoise(x, sigma, cond=None):
      del cond
      s = jnp.broadcast_to(jnp.reshape(jnp.asarray(sigma, jnp.float32), (-1,)), x.shape[:1])
      s2 = jnp.square(s).reshape((-1,) + (1,) * (x.ndim - 1))
      return self.mu + self.s_d ** 2 / (self.s_d ** 2 + s2) * (x - self.mu)

    return denoise, noise * grid[0], grid


def closed_form_endpoint(noise, mu, s_d):
  x_T = np.asarray(noise, np.float64) * SIGMA_MAX
  return mu + (x_T - mu) * s_d / np.sqrt(s_d ** 2 + SIGMA_MAX ** 2)


def _toy(anisotropic=False):
  rng = np.random.default_rng(0)
  mu = rng.uniform(-0.6, 0.6, SHAPE)
  s_d = rng.uniform(0.1, 0.8, SHAPE) if anisotropic else np.full(SHAPE, 0.5)
  return GaussianTeacher(mu, s_d), mu, s_d


def _olss_with(teacher, steps, teacher_steps, basis="current"):
  """An OLSS method object driving `teacher` (no run on disk)."""
  config = digits_olss.get_config("tiny")
  config.method.update(steps=steps, teacher_steps=teacher_steps, basis=basis)
  method = olss.OLSS(None, config)
  method._teacher = types.SimpleNamespace(method=teacher)  # pylint: disable=protected-access
  return method


@pytest.fixture(scope="module")
def toy_trajectories():
  teacher, mu, s_d = _toy()
  noise = np.asarray(jax.random.normal(jax.random.key(1), (16,) + SHAPE))
  states, outputs, grid = olss.record_trajectories(
      teacher, None, noise, None, sampler="heun", num_steps=100, batch_size=8)
  return teacher, mu, s_d, noise, states, outputs, grid


def test_recorded_coordinates_are_the_vp_state_and_the_eps_output(toy_trajectories):
  teacher, mu, s_d, noise, states, outputs, grid = toy_trajectories
  assert states.shape == (101, 16) + SHAPE and outputs.shape == (100, 16) + SHAPE
  assert states.dtype == outputs.dtype == np.float64
  # z_0 = x_T / sqrt(1 + sigma_max^2), e_0 = (x_T - D(x_T)) / sigma_max
  x_T = noise.astype(np.float32).astype(np.float64) * SIGMA_MAX
  np.testing.assert_allclose(states[0], x_T / np.sqrt(1 + SIGMA_MAX ** 2), rtol=1e-5)
  e_0 = SIGMA_MAX / (s_d ** 2 + SIGMA_MAX ** 2) * (x_T - mu)
  np.testing.assert_allclose(outputs[0], e_0, rtol=1e-4, atol=1e-6)
  # Heun on 100 Karras levels follows the closed-form ODE solution (to its discretisation
  # error: 7e-4 of 0.8 for one pixel in float64 numpy)
  np.testing.assert_allclose(states[-1], closed_form_endpoint(noise, mu, s_d), atol=3e-3)
  assert grid[0] == pytest.approx(SIGMA_MAX) and grid[-1] == 0.0


@pytest.mark.parametrize("n,basis", [(1, "current"), (3, "current"), (3, "start")])
def test_olss_reproduces_the_full_trajectory_endpoint_on_the_gaussian_toy(toy_trajectories, n,
                                                                         basis):
  teacher, mu, s_d, _, states, outputs, grid = toy_trajectories
  fitted = olss.fit_coefficients(states, outputs, grid, n, "search", basis=basis)
  # exactly representable (the module doc): the residual is the float32 recording's
  assert fitted["errors"].max() < 1e-10
  method = _olss_with(teacher, n, 100, basis=basis)
  params = {"olss": jax.tree.map(jnp.asarray, fitted), "teacher": None}
  # held-out noises: the fitted coefficients are exact for every x_T, not just the fit's
  noise = jax.random.normal(jax.random.key(2), (8,) + SHAPE)
  got = np.asarray(jax.jit(lambda p: method.sample(p, noise, None, None, n))(params))
  held, _, _ = olss.record_trajectories(teacher, None, np.asarray(noise), None,
                                        sampler="heun", num_steps=100)
  want = np.clip(held[-1], -1, 1)
  # float32: the state and e terms are up to ~200 each and cancel to ~1: ~1e-5 is exact
  np.testing.assert_allclose(got, want, atol=1e-4)
  np.testing.assert_allclose(got, np.clip(closed_form_endpoint(noise, mu, s_d), -1, 1),
                             atol=3e-3)
  # the teacher's own DDIM (Euler) at the same n evaluations is far off
  denoise, x_T, g = teacher.sampling_setup(None, noise, n)
  ddim = np.clip(np.asarray(samplers.sample_ddim(denoise, x_T, g)), -1, 1)
  assert np.abs(ddim - want).max() > 100 * np.abs(got - want).max()


def test_least_squares_recovers_known_coefficients_and_matches_the_normal_equations():
  rng = np.random.default_rng(3)
  n_teacher, r = 6, 500
  z = rng.normal(size=(n_teacher + 1, r))
  e = rng.normal(size=(n_teacher, r))
  # step 0 targets z_2 = 0.3 z_T - 1.2 e_0; step 1 targets z_N = -0.5 z_2 + 0.7 e_0 + 2 e_2,
  # which from z_T is z_N = -0.15 z_T + 1.3 e_0 + 2 e_2
  z[2] = 0.3 * z[0] - 1.2 * e[0]
  z[n_teacher] = -0.5 * z[2] + 0.7 * e[0] + 2.0 * e[2]
  for basis, wx_1, we_10 in (("current", -0.5, 0.7), ("start", -0.15, 1.3)):
    wx, we, errors = olss_solver.fit_path(z, e, [0, 2], basis)
    np.testing.assert_allclose(wx, [0.3, wx_1], atol=1e-12)
    np.testing.assert_allclose(we, [[-1.2, 0.0], [we_10, 2.0]], atol=1e-12)
    assert errors.max() < 1e-25
  with pytest.raises(ValueError, match="unknown OLSS basis"):
    olss_solver.fit_path(z, e, [0, 2], "x_T")
  # with noise: the normal equations (A^T A) c = A^T y, solved independently
  y = 0.4 * z[0] + 0.1 * e[0] - 0.3 * e[1] + 0.05 * rng.normal(size=r)
  coef, mse = olss_solver.step_fit(z[0], e[:2], y)
  a = np.stack([z[0], e[0], e[1]], axis=1)
  want = np.linalg.solve(a.T @ a, a.T @ y)
  np.testing.assert_allclose(coef, want, rtol=1e-10)
  assert mse == pytest.approx(np.mean((a @ want - y) ** 2), rel=1e-10)
  assert 0.05 ** 2 * 0.8 < mse < 0.05 ** 2 * 1.2  # the noise's variance


@pytest.fixture(scope="module")
def anisotropic_trajectories():
  teacher, _, _ = _toy(anisotropic=True)
  noise = np.asarray(jax.random.normal(jax.random.key(4), (8,) + SHAPE))
  return olss.record_trajectories(teacher, None, noise, None, sampler="heun", num_steps=40)


@pytest.mark.parametrize("n", [2, 4])
def test_path_search_is_feasible_minimal_and_deterministic(anisotropic_trajectories, n):
  states, outputs, _ = anisotropic_trajectories
  path, tolerance = olss_solver.search_path(states, outputs, n)
  assert len(path) == n and path[0] == 0 and path[-1] < 40
  assert all(b > a for a, b in zip(path, path[1:]))
  _, _, errors = olss_solver.fit_path(states, outputs, path)
  assert errors.max() <= tolerance * (1 + 1e-9) and errors.max() > 1e-10
  # the tolerance is the smallest feasible one (to the bisection's resolution)
  assert olss_solver.greedy_path(states, outputs, n, tolerance * 0.9) is None
  assert olss_solver.greedy_path(states, outputs, n, tolerance) is not None
  assert olss_solver.search_path(states, outputs, n) == (path, tolerance)
  # searched beats uniform (OLSS against OLSS-P) on the final step's error
  _, _, uniform = olss_solver.fit_path(states, outputs, olss_solver.uniform_path(40, n))
  assert errors.max() <= uniform.max()


def test_uniform_path_and_bad_paths_are_one_line():
  assert olss_solver.uniform_path(100, 3) == [0, 33, 66]
  assert olss_solver.uniform_path(100, 5) == [0, 20, 40, 60, 80]
  assert olss_solver.uniform_path(8, 8) == list(range(8))
  for call, match in ((lambda: olss_solver.uniform_path(8, 0), "n >= 1"),
                      (lambda: olss_solver.uniform_path(8, 9), "raise method.teacher_steps"),
                      (lambda: olss_solver.check_path([1, 3], 8), "0 = i_0"),
                      (lambda: olss_solver.check_path([0, 3, 3], 8), "0 = i_0"),
                      (lambda: olss_solver.check_path([0, 8], 8), "0 = i_0"),
                      (lambda: olss_solver.check_path(range(9), 8), "longer than"),
                      (lambda: olss_solver.check_trajectory(np.zeros((3, 2)), np.zeros((3, 2))),
                       "N \\+ 1 states")):
    with pytest.raises(ValueError, match=match) as e:
      call()
    assert "\n" not in str(e.value)
  bad = np.zeros((3, 2))
  bad[1, 0] = np.nan
  with pytest.raises(ValueError, match="not finite"):
    olss_solver.check_trajectory(bad, np.zeros((2, 2)))


# -- a fitted run on the tiny teachers -----------------------------------------------------------


def _olss_config(teacher_dir, variant="tiny", **method):
  config = digits_olss.get_config(variant)
  config.method.update(teacher_workdir=teacher_dir, **method)
  return config


@pytest.fixture(scope="module")
def edm_fit(tiny_edm_run, tmp_path_factory):
  _, teacher_dir, _ = tiny_edm_run
  workdir = str(tmp_path_factory.mktemp("olss_edm"))
  config = _olss_config(teacher_dir)
  state = fit.fit_run(config, workdir)
  return config, workdir, state


def test_fitted_run_records_the_teacher_and_is_deterministic(edm_fit, tiny_edm_run):
  config, workdir, state = edm_fit
  saved = runs.load_config(workdir)
  assert saved.method.name == "olss" and saved.method.teacher_step == 4
  assert saved.method.teacher_identity.startswith("step 4 sha256 ")
  fitted = jax.tree.map(np.asarray, state.params)
  assert fitted["path"].shape == (3,) and fitted["path"][0] == 0
  assert np.all(np.diff(fitted["path"]) > 0) and fitted["path"][-1] < 8
  np.testing.assert_array_equal(fitted["labels"], np.arange(8) % 10)
  # the same seed fits the same coefficients
  method = builders.build_parts(config).method
  again = method.fit(None, jax.random.key(config.seed), None)
  for key in ("path", "sigmas", "wx", "we", "errors"):
    np.testing.assert_array_equal(np.asarray(again[key]), fitted[key], err_msg=key)


def test_sampling_costs_n_evaluations_and_refuses_another_teacher(edm_fit):
  _, workdir, _ = edm_fit
  config = runs.load_config(workdir)
  method = builders.build_parts(config).method
  run = runs.load_run(workdir, "ema", 0)
  params = method.sampling_params(run.params)
  rows = _count_rows(method)
  noise = jax.random.normal(jax.random.key(0), (4,) + (8, 8, 1))
  images = jax.jit(lambda p: method.sample(p, noise, None, jnp.arange(4), 3))(params)
  assert np.all(np.isfinite(np.asarray(images))) and images.shape == (4, 8, 8, 1)
  assert sum(rows) / 4 == 3 == method.nfe(3)
  with pytest.raises(ValueError, match="fitted for 3 steps, not 4"):
    method.sample(params, noise, None, jnp.arange(4), 4)
  with pytest.raises(ValueError, match="fitted scheduler only"):
    method.sample(params, noise, None, jnp.arange(4), 3, sampler="ddim")

  config.method.teacher_identity = "step 4 sha256 0123456789abcdef"
  other = builders.build_parts(config).method
  with pytest.raises(ValueError, match="refit them for this teacher") as e:
    other.sampling_params(run.params)
  assert "\n" not in str(e.value)


def _count_rows(method):
  """Wraps the teacher's denoiser so every network call records its batch rows."""
  rows = []
  tm = method._teacher.method  # pylint: disable=protected-access
  inner = tm.denoiser

  def counted(params, **kw):
    d = inner(params, **kw)

    def call(x, sigma, cond=None):
      jax.debug.callback(lambda: rows.append(x.shape[0]))
      return d(x, sigma, cond)
    return call

  tm.denoiser = counted
  return rows


def test_guided_fit_on_the_vp_teacher_costs_2n(tiny_vp_run, tmp_path):
  _, teacher_dir, _ = tiny_vp_run
  config = _olss_config(teacher_dir, "vp_tiny", guidance=1.0, steps=2, path="uniform")
  fit.fit_run(config, str(tmp_path / "fit"))
  saved = runs.load_config(str(tmp_path / "fit"))
  assert saved.method.guidance == 1.0 and saved.method.path == "uniform"
  method = builders.build_parts(saved).method
  params = method.sampling_params(runs.load_run(str(tmp_path / "fit"), "ema", 0).params)
  np.testing.assert_array_equal(np.asarray(params["olss"]["path"]), [0, 4])
  rows = _count_rows(method)
  noise = jax.random.normal(jax.random.key(0), (4, 8, 8, 1))
  images = jax.jit(lambda p: method.sample(p, noise, None, jnp.arange(4), 2))(params)
  assert np.all(np.isfinite(np.asarray(images)))
  assert rows == [8, 8] and method.nfe(2) == 4  # one call of 2B rows per step


def test_bad_teachers_are_one_line(tiny_edm_run, tmp_path):
  _, teacher_dir, _ = tiny_edm_run
  cases = (
      (_olss_config(str(tmp_path / "nowhere")), "nowhere"),
      (_olss_config(""), "needs a teacher"),
      (_olss_config(teacher_dir, guidance=2.0), "label dropout"),
      (_olss_config(teacher_dir, teacher_sampler="edm_stochastic"), "deterministic sampler"),
  )
  for i, (config, match) in enumerate(cases):
    with pytest.raises((ValueError, FileNotFoundError), match=match) as e:
      fit.fit_run(config, str(tmp_path / f"fit{i}"))
    assert "\n" not in str(e.value)
  for fields, match in (({"steps": 9}, "raise method.teacher_steps"),
                        ({"steps": 0}, "n >= 1"), ({"path": "best"}, "unknown method.path")):
    with pytest.raises(ValueError, match=match):
      builders.build_parts(_olss_config(teacher_dir, **fields))


def _cli(script, *args):
  return subprocess.run([sys.executable, os.path.join(ROOT, script), *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=600,
                        env=dict(os.environ, JAX_PLATFORMS="cpu"))


def test_sample_and_evaluate_read_the_fitted_run(edm_fit, tmp_path):
  _, workdir, _ = edm_fit
  out = str(tmp_path / "s.npz")
  r = _cli("sample.py", "--workdir", workdir, "--num", "6", "--out", out)
  assert r.returncode == 0, r.stderr[-2000:]
  assert "(olss, 3 steps)" in r.stdout
  images = np.load(out)["arr_0"]
  assert images.shape == (6, 8, 8, 1) and images.dtype == np.uint8
  assert os.path.exists(str(tmp_path / "s.png"))
  for args, match in ((("--steps", "4"), "fitted for 3 steps, not 4"),
                      (("--sampler", "ddim"), "fitted scheduler only")):
    r = _cli("sample.py", "--workdir", workdir, "--num", "2", "--out", out, *args)
    assert r.returncode != 0 and match in r.stderr, r.stderr[-2000:]
    assert r.stderr.strip().count("\n") == 0, r.stderr[-2000:]

  r = _cli("evaluate.py", "--workdir", workdir, "--num", "20", "--batch_size", "16",
           "--ref", "data", "--detector", "digits", "--out", str(tmp_path / "e.json"))
  assert r.returncode == 0, r.stderr[-2000:]
  result = json.loads((tmp_path / "e.json").read_text())
  s = result["protocol"]["samples"]
  assert s["method"] == "olss" and s["num_steps"] == 3 and s["nfe"] == 3
  assert np.isfinite(result["metrics"]["fd_digits"])
