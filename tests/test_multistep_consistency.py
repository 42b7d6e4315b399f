"""Multistep consistency models (Heek, Hoogeboom & Salimans 2024): the paper's teacher-step
anneal, the segment arithmetic at its boundaries, the loss on a Gaussian toy problem whose
consistency function is known in closed form, S = 1 as a consistency model, Algorithm 2,
the aDDIM sampler, and resume."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cm_jax.diffusion import samplers, solvers
from cm_jax.diffusion.addim_sampler import sample_addim
from cm_jax.methods import multistep_consistency as mcm
from cm_jax.methods.base import LossContext
from cm_jax.train import builders, loop
from configs import digits_mcm_cd, digits_mcm_ct


def _method(config_module=digits_mcm_cd, **method_fields):
  config = config_module.get_config("tiny")
  config.method.update(method_fields)
  return builders.build_parts(config).method


# -- the schedule of teacher steps (App. A) -----------------------------------------------------


def test_teacher_steps_follow_the_papers_anneal():
  steps = np.array([0, 1, 777, 12_345, 50_000, 99_999, 100_000, 250_000])
  want = np.exp(np.log(64) + np.clip(steps / 100_000, 0, 1) * (np.log(1280) - np.log(64)))
  got = np.asarray(mcm.teacher_steps(jnp.asarray(steps), 64, 1280, 100_000))
  np.testing.assert_allclose(got, want, rtol=2e-6)
  assert got[0] == pytest.approx(64) and got[-1] == pytest.approx(1280)
  assert float(mcm.teacher_steps(50_000, 64, 1280, 100_000)) == pytest.approx(64 * math.sqrt(20))
  # I = 0: fixed teacher steps (the paper's Table 2 ablation).
  assert np.all(np.asarray(mcm.teacher_steps(jnp.asarray(steps), 64, 1280, 0)) == 64)
  # N_seg = round(N_teacher / S): 1280/8 = 160, 64/8 = 8, 286.2/8 = 35.8 -> 36, never 0.
  n = jnp.asarray([1280.0, 64.0, 64 * math.sqrt(20), 3.0])
  np.testing.assert_array_equal(np.asarray(mcm.segment_steps(n, 8)), [160, 8, 36, 1])
  assert float(mcm.segment_steps(64 * math.sqrt(20), 4)) == 72  # 71.55


# -- segments and their boundaries (Algorithm 1, Algorithm 2) ------------------------------------


def test_segment_boundaries_are_exact():
  s_count, n_seg = 4, 5.0
  for k in range(s_count):
    t_step, t_end, _ = mcm.segment_times(k, n_seg, n_seg, s_count)
    _, _, s_first = mcm.segment_times(k, 1, n_seg, s_count)
    assert float(t_step) == k / s_count and float(s_first) == k / s_count
    assert float(t_end) == (k + 1) / s_count  # the segment's last t is the next start
    # The sampler's t = (k+1)/S belongs to segment k: its f maps to the start k/S.
    assert float(mcm.segment_of(t_end, s_count)) == k
    assert float(mcm.segment_of(t_step + 1e-4, s_count)) == k
  # Drawn times: t in (t_step, t_step + 1/S], s = t - 1/T >= t_step, on the grid i/T.
  method = _method(student_steps=4, teacher_steps_min=64, teacher_anneal_steps=0)
  t_step, t, s, n = method.draw_times(jax.random.key(0), 4096, 0)
  t_step, t, s = (np.asarray(v, np.float64) for v in (t_step, t, s))
  assert float(n) == 16
  assert np.all(t > t_step) and np.all(t <= t_step + 0.25 + 1e-7) and np.all(s >= t_step)
  np.testing.assert_allclose(t - s, 1 / 64, atol=1e-7)
  np.testing.assert_allclose(np.round(t * 64), t * 64, atol=1e-5)
  assert set(np.round(t_step * 4).astype(int)) == {0, 1, 2, 3}
  assert np.isclose(t, t_step + 0.25).any() and np.isclose(s, t_step).any()


def test_sampler_is_algorithm_2_at_t_equal_k_over_s():
  method = _method(student_steps=4)
  seen_t = []
  fake_f = lambda params, z, logsnr, cond, **kw: 0.5 * z + 0.1 * jnp.tanh(logsnr)[:, None, None, None]
  method.x_prediction = fake_f
  noise = jax.random.normal(jax.random.key(1), (3, 8, 8, 1))
  out = method.sample(None, noise, None, jnp.zeros((3,), jnp.int32), 4,
                      callback=lambda i, z, x, t: seen_t.append(float(np.asarray(t)[0])))
  jax.block_until_ready(out)
  assert seen_t == [1.0, 0.75, 0.5, 0.25]
  # The same in numpy: z_{(k-1)/S} = DDIM_{k/S -> (k-1)/S}(f(z, k/S), z); the last returns f.
  z = np.asarray(noise, np.float64)
  for k in (4, 3, 2, 1):
    a_t, s_t, l_t = (np.asarray(v, np.float64).reshape(-1)[0]
                     for v in method.alpha_sigma(jnp.full((1,), k / 4), (1,)))
    x_hat = 0.5 * z + 0.1 * np.tanh(l_t)
    if k == 1:
      z = x_hat
      break
    a_s, s_s, _ = (np.asarray(v, np.float64).reshape(-1)[0]
                   for v in method.alpha_sigma(jnp.full((1,), (k - 1) / 4), (1,)))
    z = a_s * x_hat + s_s * (z - a_t * x_hat) / s_t
  np.testing.assert_allclose(np.asarray(out), np.clip(z, -1, 1), atol=1e-5)


def test_sampling_step_counts_and_samplers_are_checked():
  method = _method(student_steps=4)
  method.check_sample_options(4)
  method.check_sample_options(2)  # a divisor: every step still lands on a segment start
  method.check_sample_options(1)
  assert method.steps_warning(4) is None
  assert "S = 4 segments in 2 steps: each step jumps 2 segments" in method.steps_warning(2)
  for bad in (3, 8):
    with pytest.raises(ValueError, match=r"S = 4 segments; sample it with 4 steps or a divisor "
                                         r"of 4 \(1, 2, 4\), got " + str(bad)):
      method.check_sample_options(bad)
  with pytest.raises(ValueError, match="its own sampler"):
    method.check_sample_options(4, sampler="ddim")


def test_sample_steps_follow_s_and_setting_them_leaves_s_alone():
  config = digits_mcm_cd.get_config("")
  config.lock()  # as the command line's config flag holds it
  config.method.student_steps = 2
  assert config.sample.num_steps == 2
  config.sample.num_steps = 1
  assert config.method.student_steps == 2
  resolved = config.copy_and_resolve_references()
  assert (resolved.method.student_steps, resolved.sample.num_steps) == (2, 1)


def test_bad_settings_are_one_line_errors():
  with pytest.raises(ValueError, match=r"student_steps S = 128 > teacher_steps_min = 64"):
    _method(student_steps=128)
  with pytest.raises(ValueError, match="teacher_solver 'heun'"):
    _method(teacher_solver="heun")
  with pytest.raises(ValueError, match="mcm_cd.*only"):
    _method(digits_mcm_ct, teacher_guidance=1.0)


# -- the loss (Algorithm 1) on a Gaussian toy problem ------------------------------------------


def _gaussian_setup(method, c, seg_count, n_seg, batch=64, seed=0):
  """Data x ~ N(0, c^2 I): the teacher's exact denoiser is x_hat(z_t) = k_t z_t with
  k_t = alpha_t c^2 / (alpha_t^2 c^2 + sigma_t^2). Chaining its DDIM steps multiplies z by
  m = alpha_s k_t + sigma_s (1 - alpha_t k_t) / sigma_t per step, so the exact consistency
  function of the discretised teacher on grid point t = t_step + n/T is linear,
  f(z_t, t) = g_t z_t, g_t = (M - sigma_0/sigma_t) / (alpha_0 - alpha_t sigma_0/sigma_t),
  M = the product of m from t down to t_step. Everything in float64 from the schedule's
  alpha and sigma."""
  total = seg_count * n_seg
  grid = np.arange(total + 1) / total
  a, s, _ = (np.asarray(v, np.float64).reshape(-1)
             for v in method.alpha_sigma(jnp.asarray(grid, jnp.float32), (total + 1,)))
  k = a * c * c / (a * a * c * c + s * s)
  g = np.zeros(total + 1)
  for i in range(1, total + 1):
    start = (i - 1) // n_seg * n_seg  # the segment of grid point i: (start, start + n_seg]
    m = 1.0
    for j in range(i, start, -1):
      m *= a[j - 1] * k[j] + s[j - 1] * (1 - a[j] * k[j]) / s[j]
    ratio = s[start] / s[i]
    g[i] = (m - ratio) / (a[start] - a[i] * ratio)
  rng = np.random.default_rng(seed)
  seg = rng.integers(0, seg_count, batch)
  n_rel = rng.integers(1, n_seg + 1, batch)
  i_t = seg * n_seg + n_rel
  x = c * rng.standard_normal((batch, 2, 2, 1))
  eps = rng.standard_normal((batch, 2, 2, 1))
  return dict(a=a, s=s, k=k, g=g, i_t=i_t, i_s=i_t - 1, i_0=seg * n_seg, x=x, eps=eps,
              n_rel=n_rel)


def _loss_terms(method, d, f_t, f_s, solver="ddim"):
  """segment_loss on the toy problem with f(z_t, t) = f_t z_t and f(z_s, s) = f_s z_s
  (f_t, f_s per example) and the exact teacher: (per-example loss, x_diff, x_teacher, z_s)."""
  bs = lambda v: jnp.asarray(v, jnp.float32).reshape(-1, 1, 1, 1)
  at = lambda i: (bs(d["a"][i]), bs(d["s"][i]))
  logsnr = lambda i: jnp.asarray(2 * np.log(d["a"][i] / d["s"][i]), jnp.float32)
  (a_t, s_t), (a_s, s_s), (a_0, s_0) = at(d["i_t"]), at(d["i_s"]), at(d["i_0"])
  x = jnp.asarray(d["x"], jnp.float32)
  z_t = a_t * x + s_t * jnp.asarray(d["eps"], jnp.float32)
  x_teacher = bs(d["k"][d["i_t"]]) * z_t  # the exact denoiser
  z_s = mcm.teacher_step(x_teacher, x_teacher, x, z_t, (a_t, s_t), (a_s, s_s), solver, 0.75)
  l_s = logsnr(d["i_s"])
  f = lambda z, l, **kw: (bs(f_s) if l is l_s else bs(f_t)) * z
  per_example, x_diff = mcm.segment_loss(f, z_t, z_s, (a_t, s_t, logsnr(d["i_t"])),
                                         (a_s, s_s, l_s), (a_0, s_0), "v_mse", 1e-4)
  return np.asarray(per_example), np.asarray(x_diff), np.asarray(x_teacher), np.asarray(z_s)


def test_loss_vanishes_for_the_exact_consistency_function_of_a_gaussian():
  method = _method(student_steps=3)
  d = _gaussian_setup(method, c=0.7, seg_count=3, n_seg=6)
  per_example, x_diff, _, _ = _loss_terms(method, d, d["g"][d["i_t"]], d["g"][d["i_s"]])
  assert np.abs(x_diff).max() < 2e-5  # float32 rounding, amplified near the segment starts
  # Weighted by SNR + 1 and measured by the pseudo-Huber d, still ~0 next to a wrong f:
  # the teacher's denoiser (a diffusion model is no consistency function off the start).
  wrong, wrong_diff, _, _ = _loss_terms(method, d, d["k"][d["i_t"]], d["k"][d["i_s"]])
  inside = d["n_rel"] > 1
  assert np.abs(wrong_diff[inside]).max() > 1e-2
  assert per_example.mean() < 1e-3 * wrong.mean()


def test_at_a_segment_start_the_target_is_the_teachers_step():
  """n_rel = 1 (s = t_step): z_ref = z_s, so the target is the x that takes z_t to z_s in one
  DDIM step, the teacher's own x_hat, whatever f(z_s, s) is (the consistency boundary)."""
  method = _method(student_steps=2)
  d = _gaussian_setup(method, c=0.5, seg_count=2, n_seg=4, seed=3)
  d["i_t"], d["i_s"] = d["i_0"] + 1, d["i_0"]
  f_s = np.random.default_rng(4).uniform(0, 1, 64)
  _, target, x_teacher, _ = _loss_terms(method, d, np.zeros(64), f_s)  # x_diff = target
  np.testing.assert_allclose(target, x_teacher, atol=2e-4)


def test_one_segment_is_a_consistency_model():
  """S = 1: every t_step is 0, and the target is f(z_s, s) itself up to sigma_0 (~5e-5 at
  logSNR 20), or z_s where s = 0: the loss of a consistency model between adjacent levels,
  the online network (stop-gradient) as its own target, with f(x, 0) = x."""
  method = _method(student_steps=1)
  _, t, _, n = method.draw_times(jax.random.key(5), 512, 0)
  assert np.all(np.asarray(mcm.segment_of(t, 1)) == 0) and float(n) == 64
  assert float(mcm.segment_times(0, 1, n, 1)[0]) == 0.0
  d = _gaussian_setup(method, c=0.6, seg_count=1, n_seg=64, seed=6)
  f_s = np.random.default_rng(7).uniform(0.2, 0.9, 64)
  _, target, _, z_s = _loss_terms(method, d, np.zeros(64), f_s)  # x_diff = target
  # Where s = 0 (n_rel = 1) the target is z_s itself: CM's boundary condition f(x, 0) = x.
  first = (d["n_rel"] == 1).reshape(-1, 1, 1, 1)
  assert first.any() and (~first).any()
  want = np.where(first, z_s, f_s.reshape(-1, 1, 1, 1) * z_s)
  np.testing.assert_allclose(target, want, atol=1e-3)


# -- aDDIM as a sampler of the diffusion teacher (App. A baseline) -----------------------------


def test_addim_sampler_step_is_algorithm_3_in_ve_coordinates():
  """The VE-coordinate step (alpha = 1, sigma = sigma/alpha) equals the VP step of z = alpha x
  divided by alpha_s, and the sampler chains it with the paper's sampling x_var."""
  rng = np.random.default_rng(8)
  z_t = jnp.asarray(rng.standard_normal((2, 4, 4, 1)), jnp.float32)
  x_hat = jnp.asarray(rng.uniform(-1, 1, (2, 4, 4, 1)), jnp.float32)
  l_t, l_s = 0.5, 2.0
  a = lambda l: math.sqrt(1 / (1 + math.exp(-l)))
  s = lambda l: math.sqrt(1 / (1 + math.exp(l)))
  x_var = 0.1 / (2 + math.exp(l_t))  # the paper's sampling x_var: 0.1 / (2 + alpha^2/sigma^2)
  want = solvers.addim_step(x_hat, z_t, a(l_t), s(l_t), a(l_s), s(l_s), x_var) / a(l_s)
  ve = lambda l: s(l) / a(l)
  ve_step = lambda xh, x, t_cur, t_next, var: solvers.addim_step(xh, x, 1.0, t_cur, 1.0,
                                                                 t_next, var)
  got = ve_step(x_hat, z_t / a(l_t), ve(l_t), ve(l_s), x_var)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(float(solvers.addim_sampling_x_var(a(l_t), s(l_t))), x_var,
                             rtol=1e-6)
  # The sampler: aDDIM steps, then x_hat on the last step to 0; N evaluations.
  denoise = lambda x, sigma, cond=None: 0.8 * x / (1 + sigma[:, None, None, None] ** 2)
  grid = jnp.asarray([3.0, 1.0, 0.3, 0.0])
  x = jnp.asarray(rng.standard_normal((2, 4, 4, 1)) * 3, jnp.float32)
  out = sample_addim(denoise, x, grid)
  ref = x
  for t_cur, t_next in zip(grid[:-1], grid[1:]):
    xh = denoise(ref, jnp.full((2,), t_cur))
    ref = xh if t_next == 0 else ve_step(xh, ref, t_cur, t_next, 0.1 / (2 + 1 / t_cur ** 2))
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-6)
  assert samplers.sampler_nfe("addim", 18) == 18 and "addim" in samplers.SAMPLERS


# -- training end to end -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mcm_setup(tiny_vp_run):
  _, vp_workdir, _ = tiny_vp_run
  cd = digits_mcm_cd.get_config("tiny")
  cd.method.teacher_workdir = vp_workdir
  return cd, vp_workdir


def test_student_starts_from_the_teacher_and_resume_equals_uninterrupted(mcm_setup, tmp_path):
  config, vp_workdir = mcm_setup
  parts = builders.build_parts(config)
  teacher = parts.method.load_teacher()
  assert "multistep" == config.sample.sampler and config.sample.num_steps == 2
  start = builders.new_train_state(parts, config, jax.random.key(0), teacher)
  for a, b in zip(jax.tree.leaves(start.params), jax.tree.leaves(teacher["teacher"])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  straight = loop.train(config, str(tmp_path / "straight"), progress=False)
  loop.train(config, str(tmp_path / "resumed"), num_steps=2, progress=False)
  resumed = loop.train(config, str(tmp_path / "resumed"), progress=False)
  assert int(resumed.step) == int(straight.step) == 4
  for a, b in zip(jax.tree.leaves((straight.params, straight.ema)),
                  jax.tree.leaves((resumed.params, resumed.ema))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  changed = any(not np.array_equal(np.asarray(a), np.asarray(b)) for a, b in
                zip(jax.tree.leaves(straight.params), jax.tree.leaves(teacher["teacher"])))
  assert changed


def test_ct_reads_its_start_only_and_an_edm_start_is_refused(mcm_setup, tiny_edm_run):
  config, vp_workdir = mcm_setup
  ct = digits_mcm_ct.get_config("tiny")
  ct.method.teacher_workdir = vp_workdir
  method = builders.build_parts(ct).method
  assert method.teacher_seeds_only and not builders.build_parts(config).method.teacher_seeds_only
  edm = digits_mcm_ct.get_config("tiny")
  edm.method.teacher_workdir = tiny_edm_run[1]
  with pytest.raises(ValueError, match=r"method is 'edm', not one of \('vp',\)"):
    builders.build_parts(edm).method.load_teacher()
  cd_edm = digits_mcm_cd.get_config("tiny")
  cd_edm.method.teacher_workdir = tiny_edm_run[1]
  with pytest.raises(ValueError, match="init_from_teacher=False"):
    builders.build_parts(cd_edm).method.load_teacher()


def test_an_edm_teacher_teaches_cd_through_its_adapter(tiny_edm_run):
  """CD's teacher may be an EDM run: its x-prediction at z_t is its VE denoiser at
  (z_t / alpha_t, sigma_t / alpha_t); the student then starts fresh (init_from_teacher=False)."""
  config = digits_mcm_cd.get_config("tiny")
  config.method.update(teacher_workdir=tiny_edm_run[1], init_from_teacher=False)
  parts = builders.build_parts(config)
  teacher = parts.method.load_teacher()
  z = jax.random.normal(jax.random.key(2), (4, 8, 8, 1))
  alpha, sigma = jnp.full((4, 1, 1, 1), 0.6), jnp.full((4, 1, 1, 1), 0.8)
  labels = jnp.arange(4) % 10
  x_teacher, x_cond = parts.method.teacher_x(teacher["teacher"], z, alpha, sigma, labels)
  edm = parts.method._teacher  # pylint: disable=protected-access
  want = edm.denoiser(teacher["teacher"])(z / 0.6, jnp.full((4,), 0.8 / 0.6), labels)
  np.testing.assert_allclose(np.asarray(x_teacher), np.asarray(want), rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(x_teacher), np.asarray(x_cond))  # unguided
  params = builders.new_train_state(parts, config, jax.random.key(0), teacher).params
  batch = {"image": jax.random.uniform(jax.random.key(3), (4, 8, 8, 1), minval=-1, maxval=1),
           "label": labels}
  loss, metrics = parts.method.loss(params, batch, jax.random.key(4),
                                    LossContext(step=jnp.asarray(3), teacher_params=teacher))
  assert np.isfinite(float(loss)) and float(loss) > 0 and float(metrics["segment_steps"]) > 1
