"""cm_jax.diffusion.solvers / samplers: EDM Algorithms 1 and 2 on analytic denoisers.

For data ~ N(0, sd^2) the ideal denoiser is D(x; s) = x sd^2/(s^2+sd^2), and the
PF ODE dx/ds = (x - D)/s = x s/(s^2+sd^2) has the exact solution
x(s) = x_T sqrt(s^2+sd^2)/sqrt(s_max^2+sd^2), so x(0) = x_T sd/sqrt(s_max^2+sd^2).
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cm_jax.conditioning import Conditioning
from cm_jax.diffusion.grids import append_zero, karras_sigmas
from cm_jax.diffusion.preconditioning import make_denoiser
from cm_jax.diffusion.samplers import (SAMPLERS, sample_edm_stochastic, sample_euler,
                                       sample_heun, sampler_nfe)
from cm_jax.diffusion.solvers import euler_step, heun_step

SD = 0.5


def gauss_denoiser(x, sigma, labels=None, cond=None):
  s = jnp.reshape(sigma, (-1,) + (1,) * (x.ndim - 1))
  return x * SD**2 / (s**2 + SD**2)


def nonlinear_denoiser(x, sigma, labels=None, cond=None):
  s = jnp.reshape(sigma, (-1,) + (1,) * (x.ndim - 1))
  return jnp.tanh(x) / (1.0 + s)


def _np_nonlinear(x, s):
  return np.tanh(x) / (1.0 + s)


def _exact(x_T, s_max):
  return np.asarray(x_T, np.float64) * SD / math.sqrt(s_max**2 + SD**2)


def _x_T(batch=4, seed=0, shape=(3, 3, 1), s_max=80.0):
  return s_max * jax.random.normal(jax.random.key(seed), (batch,) + shape)


# ---------------------------------------------------------------- single steps

def test_euler_step_by_hand():
  x = np.array([[0.3, -1.2], [2.0, 0.1]], np.float64)
  sc, sn = 1.5, 0.8
  d = (x - _np_nonlinear(x, sc)) / sc
  want = x + (sn - sc) * d
  got = euler_step(nonlinear_denoiser, jnp.asarray(x, jnp.float32), sc, sn)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5)


def test_heun_step_by_hand():
  x = np.array([[0.3, -1.2], [2.0, 0.1]], np.float64)
  sc, sn = 1.5, 0.8
  d = (x - _np_nonlinear(x, sc)) / sc
  xe = x + (sn - sc) * d
  d2 = (xe - _np_nonlinear(xe, sn)) / sn
  want = x + (sn - sc) * (0.5 * d + 0.5 * d2)
  got = heun_step(nonlinear_denoiser, jnp.asarray(x, jnp.float32), sc, sn)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5)


def test_heun_falls_back_to_euler_at_zero_under_jit():
  x = jax.random.normal(jax.random.key(0), (3, 2, 2, 1))
  f = jax.jit(lambda x, a, b: heun_step(nonlinear_denoiser, x, a, b))
  e = jax.jit(lambda x, a, b: euler_step(nonlinear_denoiser, x, a, b))
  np.testing.assert_allclose(np.asarray(f(x, 0.4, 0.0)), np.asarray(e(x, 0.4, 0.0)), rtol=1e-6)
  assert not np.allclose(np.asarray(f(x, 0.4, 0.2)), np.asarray(e(x, 0.4, 0.2)))
  # Per-example sigmas, one of them zero: that row is Euler, the others Heun; no nan.
  sc = jnp.array([0.4, 0.4, 0.4])
  sn = jnp.array([0.2, 0.0, 0.1])
  out = np.asarray(f(x, sc, sn))
  for b in range(3):
    ref = (f if float(sn[b]) else e)(x[b:b + 1], 0.4, float(sn[b]))
    np.testing.assert_allclose(out[b:b + 1], np.asarray(ref), rtol=1e-5)
  g = jax.grad(lambda x: jnp.sum(heun_step(nonlinear_denoiser, x, sc, sn)))(x)
  assert bool(jnp.all(jnp.isfinite(g)))


# ---------------------------------------------------------------- samplers

def _np_heun_sampler(D, x, grid):
  x = np.asarray(x, np.float64)
  for t, tn in zip(grid[:-1], grid[1:]):
    d = (x - D(x, t)) / t
    xn = x + (tn - t) * d
    if tn != 0:
      d2 = (xn - D(xn, tn)) / tn
      xn = x + (tn - t) * (0.5 * d + 0.5 * d2)
    x = xn
  return x


def test_heun_sampler_matches_numpy_algorithm_1():
  grid = append_zero(karras_sigmas(6, sigma_max=3.0))
  x_T = _x_T(s_max=3.0)
  got = jax.jit(lambda x: sample_heun(nonlinear_denoiser, x, grid))(x_T)
  want = _np_heun_sampler(_np_nonlinear, x_T, np.asarray(grid, np.float64))
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-5)


def test_heun_solves_gaussian_ode_and_beats_euler():
  x_T = _x_T()
  exact = _exact(x_T, 80.0)
  scale = np.abs(exact).max()
  err = {}
  for n in (18, 36, 72):
    grid = append_zero(karras_sigmas(n))
    for name in ("euler", "heun"):
      out = jax.jit(lambda x, g: SAMPLERS[name](gauss_denoiser, x, g))(x_T, grid)
      err[name, n] = float(np.abs(np.asarray(out) - exact).max()) / scale
  assert err["heun", 72] < 5e-3          # converges to the exact ODE solution
  assert err["heun", 18] < 0.08
  for n in (18, 36, 72):
    assert err["heun", n] < 0.5 * err["euler", n]
  # Second- vs first-order convergence when the step count doubles.
  assert err["heun", 36] / err["heun", 72] > 3.0
  assert 1.5 < err["euler", 36] / err["euler", 72] < 2.6


def test_samplers_with_make_denoiser_zero_net():
  # A zero network under the EDM preconditioning *is* the ideal Gaussian denoiser.
  den = make_denoiser(lambda x, c, l, k: jnp.zeros_like(x).astype(jnp.bfloat16))
  grid = append_zero(karras_sigmas(72))
  x_T = _x_T()
  out = jax.jit(lambda x: sample_heun(den, x, grid))(x_T)
  np.testing.assert_allclose(np.asarray(out), _exact(x_T, 80.0), rtol=5e-3, atol=1e-3)


def test_stochastic_without_churn_equals_heun():
  grid = append_zero(karras_sigmas(10))
  x_T = _x_T()
  keys = jax.random.split(jax.random.key(5), 4)
  heun = jax.jit(lambda x: sample_heun(nonlinear_denoiser, x, grid))(x_T)
  sto = jax.jit(lambda x, k: sample_edm_stochastic(nonlinear_denoiser, x, grid, k))(x_T, keys)
  np.testing.assert_allclose(np.asarray(sto), np.asarray(heun), rtol=1e-6, atol=1e-6)
  no_rng = sample_edm_stochastic(nonlinear_denoiser, x_T, grid, None)
  np.testing.assert_allclose(np.asarray(no_rng), np.asarray(heun), rtol=1e-6, atol=1e-6)
  with pytest.raises(ValueError):
    sample_edm_stochastic(nonlinear_denoiser, x_T, grid, None, s_churn=10.0)


def _predicted_std(grid, s_churn, s_min, s_max, s_t):
  """Exact std after EDM Alg. 2 on the linear Gaussian ODE dx/ds = k(s) x:
  each churn adds variance t_hat^2 - t_i^2, each Heun step multiplies x by a scalar."""
  k = lambda s: s / (s * s + SD * SD)
  var = s_t**2
  gmax = min(s_churn / (len(grid) - 1), math.sqrt(2) - 1)
  for t, tn in zip(grid[:-1], grid[1:]):
    t_hat = t * (1 + (gmax if s_min <= t <= s_max else 0.0))
    var += t_hat**2 - t**2
    a = 1 + (tn - t_hat) * k(t_hat)
    if tn != 0:
      a = 1 + (tn - t_hat) * 0.5 * (k(t_hat) + k(tn) * a)
    var *= a * a
  return math.sqrt(var)


def test_stochastic_with_churn_is_distributionally_right():
  grid = append_zero(karras_sigmas(64))
  opts = dict(s_churn=80.0, s_min=0.05, s_max=50.0, s_noise=1.0)
  run = jax.jit(lambda x, k: sample_edm_stochastic(gauss_denoiser, x, grid, k, **opts))
  x_T = _x_T(batch=512, shape=(4, 4, 1), seed=1)
  keys = jax.random.split(jax.random.key(9), 512)
  out = np.asarray(run(x_T, keys))
  # The samples have the std that Alg. 2 predicts on this ODE (sampling error
  # ~0.004), and that is sd up to the discretisation bias of 64 churned steps (~2%).
  pred = _predicted_std(np.asarray(grid, np.float64), 80.0, 0.05, 50.0, 80.0)
  assert abs(pred - SD) < 0.015
  assert abs(out.std() - pred) < 0.015 and abs(out.mean()) < 0.02
  assert abs(out.std() - SD) < 0.03
  # It depends on rng (and differs from the deterministic ODE solution) ...
  other = np.asarray(run(x_T, jax.random.split(jax.random.key(10), 512)))
  assert np.abs(other - out).max() > 0.1
  heun = np.asarray(jax.jit(lambda x: sample_heun(gauss_denoiser, x, grid))(x_T))
  assert np.abs(heun - out).max() > 0.1
  # ... but a given image does not depend on the batch it is drawn in.
  idx = jnp.array([3, 100, 511])
  sub = np.asarray(run(x_T[idx], keys[idx]))
  np.testing.assert_allclose(sub, out[np.asarray(idx)], rtol=1e-5, atol=1e-6)


def test_conditioning_passes_through_unopened():
  seen = []
  cond = Conditioning(labels=jnp.array([1, 2]), vector=jnp.array([[3.0], [4.0]]))

  def den(x, sigma, c=None):
    seen.append(c)
    return gauss_denoiser(x, sigma)

  grid = append_zero(karras_sigmas(3))
  for name in SAMPLERS:
    seen.clear()
    SAMPLERS[name](den, _x_T(batch=2), grid, jax.random.split(jax.random.key(0), 2), cond)
    assert seen and all(c is cond for c in seen), name


def test_callback_sees_every_step_under_jit():
  """callback(step, x, denoised, t) once per step, in order, with D's own output."""
  grid = append_zero(karras_sigmas(4))
  x_T = _x_T(batch=2)
  for name in SAMPLERS:
    got = []
    cb = lambda i, x, d, t: got.append((int(i), np.asarray(x), np.asarray(d), float(t)))
    # Stochastic samplers need per-image keys; the deterministic ones ignore them.
    keys = jax.random.split(jax.random.key(0), 2)
    jax.block_until_ready(jax.jit(lambda x: SAMPLERS[name](gauss_denoiser, x, grid, keys,
                                                           callback=cb))(x_T))
    jax.effects_barrier()
    assert [g[0] for g in got] == [0, 1, 2, 3], name
    np.testing.assert_allclose([g[3] for g in got], np.asarray(grid[:-1]), rtol=1e-6)
    # The first step's denoised estimate is D(x_T; t_0) itself.
    np.testing.assert_allclose(got[0][2], np.asarray(gauss_denoiser(x_T, grid[0])),
                               rtol=1e-5, atol=1e-5)


def test_nfe_counts():
  assert sampler_nfe("heun", 18) == 35
  assert sampler_nfe("edm_stochastic", 18) == 35
  assert sampler_nfe("euler", 18) == 18
  with pytest.raises(ValueError):
    sampler_nfe("dpm", 10)
  # Count the evaluations actually executed under jit with a host callback.
  calls = []

  def den(x, sigma, labels=None, cond=None):
    jax.debug.callback(lambda: calls.append(1))
    return gauss_denoiser(x, sigma)

  grid = append_zero(karras_sigmas(5))
  keys = jax.random.split(jax.random.key(0), 2)
  for name in SAMPLERS:
    calls.clear()
    out = jax.jit(lambda x: SAMPLERS[name](den, x, grid, keys, s_churn=1.0)
                  if name == "edm_stochastic" else SAMPLERS[name](den, x, grid, keys))(_x_T(batch=2))
    jax.block_until_ready(out)
    jax.effects_barrier()
    assert len(calls) == sampler_nfe(name, 5), name
