"""Parameterizations, boundary scalings and schedule adapters (cm_jax.diffusion.parameterization)."""
import numpy as np
import jax.numpy as jnp
import pytest

from cm_jax.diffusion import parameterization as P
from cm_jax.diffusion import schedules as S
from cm_jax.diffusion.preconditioning import consistency_scalings


def _data(seed=0, shape=(3, 4, 4, 2)):
  r = np.random.RandomState(seed)
  x = r.randn(*shape).astype(np.float32)
  eps = r.randn(*shape).astype(np.float32)
  return x, eps


@pytest.mark.parametrize("vp", [True, False])
def test_conversions_round_trip(vp):
  x, eps = _data()
  if vp:
    logsnr = np.array([-3.0, 0.5, 4.0], np.float32)
    alpha = np.sqrt(1 / (1 + np.exp(-logsnr)))
    sigma = np.sqrt(1 / (1 + np.exp(logsnr)))
  else:
    alpha, sigma = np.ones(3, np.float32), np.array([0.1, 1.0, 20.0], np.float32)
  a4, s4 = alpha[:, None, None, None], sigma[:, None, None, None]
  z = a4 * x + s4 * eps
  tol = dict(rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(P.x_from_eps(z, eps, alpha, sigma), x, **tol)
  np.testing.assert_allclose(P.eps_from_x(z, x, alpha, sigma), eps, **tol)
  v = P.v_from_x_eps(x, eps, alpha, sigma)
  np.testing.assert_allclose(v, a4 * eps - s4 * x, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(P.x_from_v(z, v, alpha, sigma), x, **tol)
  np.testing.assert_allclose(P.eps_from_v(z, v, alpha, sigma), eps, **tol)
  for name, param in P.PARAMETERIZATIONS.items():
    assert param.name == name and P.get_parameterization(name) is param
    out = param.target(x, eps, alpha, sigma)
    assert out.shape[-1] == x.shape[-1] * param.out_channels_factor
    np.testing.assert_allclose(param.to_x(out, z, alpha, sigma), x, **tol)
    np.testing.assert_allclose(param.to_eps(out, z, alpha, sigma), eps, rtol=1e-3, atol=2e-3)


def test_both_matches_diffusion_distillation_combination():
  """'both': x = sigmoid(-logsnr) x_part + sigmoid(logsnr) x(eps_part) (dpm.py _run_model)."""
  r = np.random.RandomState(1)
  z = r.randn(2, 3, 3, 2).astype(np.float32)
  out = r.randn(2, 3, 3, 4).astype(np.float32)
  logsnr = np.array([-1.0, 2.0])
  alpha, sigma = np.sqrt(1 / (1 + np.exp(-logsnr))), np.sqrt(1 / (1 + np.exp(logsnr)))
  l4 = logsnr[:, None, None, None]
  x_eps = np.sqrt(1 + np.exp(-l4)) * (z - out[..., 2:] / np.sqrt(1 + np.exp(l4)))
  wx = 1 / (1 + np.exp(l4))
  want = wx * out[..., :2] + (1 - wx) * x_eps
  got = P.BothPrediction().to_x(out, z, alpha.astype(np.float32), sigma.astype(np.float32))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_get_parameterization_error():
  with pytest.raises(ValueError, match="both"):
    P.get_parameterization("score")


def test_consistency_boundary_scalings():
  s = jnp.asarray([0.002, 0.01, 0.5, 3.0, 80.0], jnp.float32)
  cs, co = P.consistency_boundary_scalings(s, 0.002)
  rs, ro, _ = consistency_scalings(s, 0.5, 0.002)
  np.testing.assert_array_equal(cs, rs)
  np.testing.assert_array_equal(co, ro)
  # per-example boundary: c_skip == 1, c_out == 0 exactly at s == sb
  sb = jnp.asarray([0.002, 0.01, 0.5, 3.0, 1.0], jnp.float32)
  cs, co = P.consistency_boundary_scalings(sb, sb)
  assert np.all(np.asarray(cs) == 1.0) and np.all(np.asarray(co) == 0.0)
  cs, co = P.consistency_boundary_scalings(80.0, sb)
  np.testing.assert_allclose(cs, 0.25 / ((80.0 - np.asarray(sb)) ** 2 + 0.25), rtol=1e-6)


def test_lcm_boundary_scalings_match_diffusers():
  diffusers = pytest.importorskip("diffusers")
  ref = diffusers.LCMScheduler(timestep_scaling=10.0)
  ts = [0, 1, 19, 259, 499, 759, 999]
  cs, co = P.lcm_boundary_scalings(jnp.asarray(ts), 10.0)
  for i, t in enumerate(ts):
    rs, ro = ref.get_scalings_for_boundary_condition_discrete(t)
    np.testing.assert_allclose(float(cs[i]), float(rs), rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(float(co[i]), float(ro), rtol=1e-6)
  assert float(cs[0]) == 1.0 and float(co[0]) == 0.0


def test_vp_time_input():
  l = jnp.asarray([-30.0, -20.0, 0.0, 20.0])
  got = np.asarray(P.vp_time_input(l))
  want = 1000 * np.arctan(np.exp(-0.5 * np.clip([-30.0, -20.0, 0.0, 20.0], -20, 20))) / (np.pi / 2)
  np.testing.assert_allclose(got, want, rtol=1e-6)
  np.testing.assert_allclose(float(P.vp_time_input(0.0, scale=1.0)), 0.5, rtol=1e-6)
  # for the cosine schedule with a wide logsnr range the input is ~ t
  sc = S.VPCosine()
  np.testing.assert_allclose(np.asarray(P.vp_time_input(sc.logsnr(jnp.asarray([0.3, 0.7])), 1.0)),
                             [0.3, 0.7], atol=1e-4)


@pytest.mark.parametrize("sched", [S.VPCosine(), S.DiscreteDDPM(), S.KarrasVE(),
                                   S.ShiftedCosine(32, 64)], ids=lambda s: s.name)
@pytest.mark.parametrize("pname", ["x", "eps", "v", "both"])
def test_schedule_denoiser_recovers_x(sched, pname):
  """A network that outputs the exact target of a known (x, eps) gives back x."""
  x, eps = _data(2, (3, 2, 2, 1))
  t = np.asarray([0.25, 0.5, 0.8]) * (sched.t_max - sched.t_min) + sched.t_min
  alpha, sigma = np.asarray(sched.alpha(t)), np.asarray(sched.sigma(t))
  param = P.get_parameterization(pname)
  seen = {}

  def net_fn(z, noise_cond, cond):
    seen["z"], seen["nc"], seen["cond"] = z, noise_cond, cond
    return param.target(x, eps, alpha, sigma)

  den = P.make_schedule_denoiser(net_fn, sched, pname, lambda tt: tt * 2.0)
  sve = np.asarray(sched.ve_sigma(t))
  z = alpha[:, None, None, None] * x + sigma[:, None, None, None] * eps
  x_ve = z / alpha[:, None, None, None]
  got = den(jnp.asarray(x_ve), jnp.asarray(sve), cond="c")
  np.testing.assert_allclose(np.asarray(got), x, rtol=1e-3, atol=1e-3)
  np.testing.assert_allclose(np.asarray(seen["z"]), z, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(np.asarray(seen["nc"]), 2.0 * t, rtol=1e-3, atol=1e-3)
  assert seen["cond"] == "c"
