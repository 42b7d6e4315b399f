"""Guided distillation (Meng et al. 2023) and progressive distillation (Salimans & Ho 2022):
the Algorithm 2 target, Meng's stochastic sampler, the w-embedding start, rounds, the CLI."""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cm_jax import runs
from cm_jax.conditioning import Conditioning
from cm_jax.diffusion import schedules
from cm_jax.diffusion.vp_samplers import sample_meng_stochastic
from cm_jax.eval import evaluator
from cm_jax.methods import teachers
from cm_jax.methods.base import LossContext
from cm_jax.methods.progressive import num_rounds, two_step_target
from cm_jax.train import builders, loop
from cm_jax.train.optim import learning_rate_schedule
from configs import digits_guided, digits_pd, digits_pd_unguided

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _np_alpha_sigma(l):
  return np.sqrt(1.0 / (1.0 + np.exp(-l))), np.sqrt(1.0 / (1.0 + np.exp(l)))


def test_two_step_target_recovers_the_teachers_two_steps():
  """On a linear toy teacher x_hat = c(logsnr) z: one DDIM step with x~ from z_u lands
  exactly where the teacher's two DDIM steps land (numpy, float64); at i = 0 the target is
  the teacher's x at its second (last) step, x_hat(z'), as in dpm.py."""
  rng = np.random.default_rng(0)
  z = rng.normal(size=(3, 4, 4, 1))
  l_u = np.array([-4.0, 0.5, 3.0])
  l_mid, l_s = l_u + 1.3, l_u + 2.1
  coef = lambda l: 0.3 + 0.5 / (1.0 + np.exp(-l))   # any smooth function of logsnr
  b = lambda v: v.reshape(-1, 1, 1, 1)

  def teacher(zz, l):
    a, s = _np_alpha_sigma(np.asarray(l, np.float64))
    x = b(coef(np.asarray(l, np.float64))) * np.asarray(zz, np.float64)
    return x, (np.asarray(zz, np.float64) - b(a) * x) / b(s)

  def ddim(x, eps, l):
    a, s = _np_alpha_sigma(l)
    return b(a) * x + b(s) * eps

  x_u, e_u = teacher(z, l_u)
  z_mid = ddim(x_u, e_u, l_mid)
  x_mid, e_mid = teacher(z_mid, l_mid)
  z_s = ddim(x_mid, e_mid, l_s)                  # the teacher's two steps
  jteacher = lambda zz, l: tuple(jnp.asarray(v, jnp.float32) for v in teacher(zz, l))
  last = np.array([False, False, True])
  x_tilde = np.asarray(two_step_target(jteacher, jnp.asarray(z, jnp.float32),
                                       jnp.asarray(l_u), jnp.asarray(l_mid), jnp.asarray(l_s),
                                       jnp.asarray(last)), np.float64)
  a_u, s_u = _np_alpha_sigma(l_u)
  a_s, s_s = _np_alpha_sigma(l_s)
  one_step = b(a_s) * x_tilde + b(s_s) * (z - b(a_u) * x_tilde) / b(s_u)
  np.testing.assert_allclose(one_step[:2], z_s[:2], rtol=1e-4, atol=1e-4)
  # Algorithm 2's closed form with plain division
  ratio = b(s_s / s_u)
  np.testing.assert_allclose(x_tilde[:2], ((z_s - ratio * z) / (b(a_s) - ratio * b(a_u)))[:2],
                             rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(x_tilde[2], x_mid[2], rtol=1e-5, atol=1e-6)
  assert not np.allclose(x_mid[2], x_u[2], atol=1e-3)  # the two evaluations differ here


def test_meng_stochastic_step_variance():
  """sigma^2_{s|k} = (1 - e^{lambda_s - lambda_k}) sigma_s^2 (Meng Sec. 4.3), VP, equals the
  VE step back alpha_s^2 (s_ve^2 - k_ve^2); and the sampler's marginal after one step."""
  sched = schedules.VPCosine()
  u_s, u_k = 0.6, 0.4
  l_s, l_k = float(sched.logsnr(jnp.asarray(u_s))), float(sched.logsnr(jnp.asarray(u_k)))
  a_s, s_s = _np_alpha_sigma(l_s)
  var_paper = (1.0 - np.exp(l_s - l_k)) * s_s ** 2
  ve_s, ve_k = np.exp(-l_s / 2), np.exp(-l_k / 2)
  np.testing.assert_allclose(a_s ** 2 * (ve_s ** 2 - ve_k ** 2), var_paper, rtol=1e-5)

  # x_hat = 0: from x_0 = g0 n, step 0 gives (g2/g0) x_0 + sqrt(g1^2 - g2^2) eps, whose
  # variance is g1^2 and whose regression on n is g2.
  grid = jnp.array([3.0, 2.0, 1.0, 0.0])
  n = jax.random.normal(jax.random.key(1), (64, 16, 16, 1))
  keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(2), i))(jnp.arange(64))
  seen = {}
  record = lambda i, x, d, t: seen.setdefault(int(i), np.asarray(x))
  out = sample_meng_stochastic(lambda x, s, c=None: jnp.zeros_like(x), grid[0] * n, grid,
                               keys, None, record)
  jax.effects_barrier()
  x1 = seen[1].ravel()
  assert abs(np.std(x1) - 2.0) < 0.05
  assert abs(np.mean(x1 * np.asarray(n).ravel()) - 1.0) < 0.05
  np.testing.assert_array_equal(np.asarray(out), 0.0)   # the last step is deterministic: x_hat
  with pytest.raises(ValueError, match="per-image keys"):
    sample_meng_stochastic(lambda x, s, c=None: x, n, grid)


def test_rounds_and_their_one_line_errors():
  assert num_rounds(64, 1) == 6 and num_rounds(1024, 4) == 8 and num_rounds(8192, 1) == 13
  with pytest.raises(ValueError, match="is odd"):
    num_rounds(7, 1)
  with pytest.raises(ValueError, match=r"never reaches student_steps = 5 \(the rounds give "
                                       r"\[24, 12, 6, 3\]\)"):
    num_rounds(48, 5)
  cfg = digits_pd.get_config("")
  method = builders.build_parts(cfg).method
  assert method.rounds() == (6, 300)
  assert type(method).checkpoint_step_for(cfg, 64 // 2) == 300
  assert type(method).checkpoint_step_for(cfg, 1) == 1800
  with pytest.raises(ValueError, match="students of"):
    type(method).checkpoint_step_for(cfg, 3)


def test_linear_anneal_restarts_from_the_rate():
  from ml_collections import ConfigDict
  sched = learning_rate_schedule(ConfigDict(dict(lr=1.0, warmup_steps=0, anneal="linear",
                                                 anneal_steps=4)))
  np.testing.assert_allclose([float(sched(s)) for s in (0, 1, 2, 4, 6)], [1, .75, .5, 0, 0])
  sched = learning_rate_schedule(ConfigDict(dict(lr=2.0, warmup_steps=2, anneal="linear",
                                                 anneal_steps=4)))
  np.testing.assert_allclose([float(sched(s)) for s in (1, 2, 4, 6)], [1.0, 2.0, 1.0, 0.0])
  with pytest.raises(ValueError, match="anneal_steps"):
    learning_rate_schedule(ConfigDict(dict(lr=1.0, warmup_steps=0, anneal="linear",
                                           anneal_steps=0)))


@pytest.fixture(scope="module")
def guided_setup(tiny_vp_run, tmp_path_factory):
  """Stage 1 of the tiny VP teacher, trained two steps: (config, workdir, state)."""
  _, teacher_dir, _ = tiny_vp_run
  config = digits_guided.get_config("tiny")
  config.method.teacher_workdir = teacher_dir
  workdir = str(tmp_path_factory.mktemp("tiny_guided"))
  return config, workdir, loop.train(config, workdir, progress=False)


def test_w_embedding_starts_fresh_and_the_rest_is_the_teacher(tiny_vp_run, guided_setup):
  t_config, _, t_state = tiny_vp_run
  config, _, _ = guided_setup
  parts = builders.build_parts(config)
  method = parts.method
  teacher = method.load_teacher()
  params = method.initial_params(builders.init_params(parts, config, jax.random.key(3)),
                                 teacher)
  flat_t = dict(jax.tree_util.tree_flatten_with_path(teacher["teacher"])[0])
  flat_s = dict(jax.tree_util.tree_flatten_with_path(params)[0])
  new = [k for k in flat_s if k not in flat_t]
  assert new and all("cond_emb" in jax.tree_util.keystr(k) for k in new)
  for k, v in flat_t.items():
    np.testing.assert_array_equal(np.asarray(flat_s[k]), np.asarray(v))
  for k in new:  # the zero-initialised layer: the student is its teacher at every w
    np.testing.assert_array_equal(np.asarray(flat_s[k]), 0.0)
  z = jax.random.normal(jax.random.key(4), (2, 8, 8, 1))
  labels = jnp.array([3, 7])
  logsnr = jnp.array([-1.0, 2.0])
  student_x = method.x_prediction(params, z, logsnr, Conditioning(labels=labels,
                                                                  w=jnp.array([0.0, 3.0])))
  teacher_method = builders.build_parts(t_config).method
  teacher_x = teacher_method.x_prediction(teacher["teacher"], z, logsnr,
                                          Conditioning(labels=labels))
  np.testing.assert_allclose(student_x, teacher_x, atol=1e-5)


def _check_guided_target(method, teacher, *, seed, logsnr, labels, w, x_of):
  """method.guided_teacher_x == (1 + w) x_c - w x_u, the halves from two separate calls of
  x_of(z, logsnr, cond) (Meng eq. 2); the null class of the digits is 10."""
  z = jax.random.normal(jax.random.key(seed), (2, 8, 8, 1))
  logsnr, labels, w = jnp.asarray(logsnr), jnp.asarray(labels), jnp.asarray(w)
  alpha, sigma = (v.reshape(-1, 1, 1, 1) for v in schedules.vp_alpha_sigma(logsnr))
  got = method.guided_teacher_x(teacher, z, alpha, sigma, labels, w)
  x_c = x_of(z, logsnr, Conditioning(labels=labels))
  x_u = x_of(z, logsnr, Conditioning(labels=jnp.full((2,), 10)))
  wb = w.reshape(-1, 1, 1, 1)
  np.testing.assert_allclose(got, (1 + wb) * x_c - wb * x_u, atol=2e-5)


def test_stage1_target_is_the_guided_teacher(guided_setup):
  """x^w = (1 + w) x_c - w x_u from two separate teacher calls (Meng eq. 2)."""
  config, _, _ = guided_setup
  method = builders.build_parts(config).method
  teacher = method.load_teacher()["teacher"]
  tm = method._teacher  # pylint: disable=protected-access
  _check_guided_target(method, teacher, seed=5, logsnr=[-2.0, 1.0], labels=[1, 4],
                       w=[0.5, 2.0],
                       x_of=lambda z, l, c: tm.x_prediction(teacher, z, l, c))
  assert method.guidance_warning(2.0) is None and "outside" in method.guidance_warning(4.5)
  assert evaluator.nfe(method, "ddim", 8, guidance=1.0) == 8           # w is an input
  assert evaluator.nfe(tm, "ddim", 8, guidance=1.0) == 16              # two passes


def test_an_edm_teacher_guides_through_its_adapter(tmp_path):
  """Stage 1 from an EDM teacher (label dropout, null class): its VE denoiser, guided, is the
  target; its weights cannot seed the VP student (one-line error), a fresh student trains."""
  from configs import digits_edm  # pylint: disable=g-import-not-at-top
  edm = digits_edm.get_config("tiny")
  edm.model.null_class = True
  edm.method.label_dropout = 0.1
  edm.training.update(num_steps=2, save_every=2)
  loop.train(edm, str(tmp_path / "edm"), progress=False)
  config = digits_guided.get_config("tiny")
  config.method.teacher_workdir = str(tmp_path / "edm")
  with pytest.raises(ValueError, match="init_from_teacher=False"):
    builders.build_parts(config).method.load_teacher()
  config.method.init_from_teacher = False
  method = builders.build_parts(config).method
  teacher = method.load_teacher()["teacher"]
  den = method._teacher.denoiser(teacher)  # pylint: disable=protected-access
  alpha_of = lambda l: schedules.vp_alpha_sigma(l)[0].reshape(-1, 1, 1, 1)
  _check_guided_target(method, teacher, seed=6, logsnr=[-1.0, 3.0], labels=[2, 5],
                       w=[1.0, 3.0],
                       x_of=lambda z, l, c: den(z / alpha_of(l), jnp.exp(-l / 2), c))
  ctx = LossContext(step=jnp.zeros((), jnp.int32), teacher_params={"teacher": teacher})
  params = builders.init_params(builders.build_parts(config), config, jax.random.key(7))
  batch = {"image": jnp.zeros((4, 8, 8, 1)), "label": jnp.array([0, 1, 2, 3])}
  loss, _ = method.loss(params, batch, jax.random.key(8), ctx)
  assert np.isfinite(float(loss)) and float(loss) > 0


def test_teacher_without_label_dropout_is_refused_in_one_line(tiny_edm_run):
  _, edm_dir, _ = tiny_edm_run
  config = digits_guided.get_config("tiny")
  config.method.teacher_workdir = edm_dir
  with pytest.raises(ValueError, match="without label dropout") as err:
    builders.build_parts(config).method.load_teacher()
  assert "\n" not in str(err.value)
  config.model.cond_dim = 0
  with pytest.raises(ValueError, match="cond_dim"):
    builders.build_parts(config)


def test_resuming_against_another_teacher_is_refused(guided_setup):
  """The run records its teacher's step and weight hash; another teacher checkpoint (here
  the teacher run's step 2 instead of its latest, 4) is refused in one line on resume."""
  config, workdir, _ = guided_setup
  saved = runs.load_config(workdir).method.teacher_identity
  assert saved.startswith("step 4 sha256 ")
  other = config.copy_and_resolve_references()
  other.method.teacher_step = 2
  with pytest.raises(ValueError, match="trained against teacher step 4") as err:
    loop.train(other, workdir, num_steps=4, progress=False)
  assert "\n" not in str(err.value) and "allow_new_teacher" in str(err.value)
  assert runs.load_config(workdir).method.teacher_identity == saved  # nothing written
  teachers.check_same_teacher(saved, "step 2 sha256 0", allow=True)  # the explicit override
  teachers.check_same_teacher(None, "step 2 sha256 0", allow=False)  # runs from before


def _pd_config(teacher_dir):
  config = digits_pd.get_config("tiny")
  config.method.teacher_workdir = teacher_dir
  config.training.keep_checkpoints = 1  # the round-end checkpoint must survive anyway
  return config


def test_pd_resumed_across_a_round_equals_uninterrupted(guided_setup, tmp_path):
  _, guided_dir, _ = guided_setup
  straight = loop.train(_pd_config(guided_dir), str(tmp_path / "a"), progress=False)
  loop.train(_pd_config(guided_dir), str(tmp_path / "b"), num_steps=3, progress=False)
  resumed = loop.train(_pd_config(guided_dir), str(tmp_path / "b"), progress=False)
  assert int(resumed.step) == int(straight.step) == 4 and int(resumed.round) == 1
  for a, b in zip(jax.tree.leaves(straight.params), jax.tree.leaves(resumed.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # the end of round 1 (step 2: the 2-step student) is kept beside the latest
  assert sorted(os.listdir(tmp_path / "b" / "checkpoints")) == ["2", "4"]

  # the loss halves N with the round: round 0 trains 2-step students, round 1 one-step
  config = _pd_config(guided_dir)
  method = builders.build_parts(config).method
  batch = {"image": jnp.zeros((2, 8, 8, 1)), "label": jnp.array([0, 1])}
  for r, n in ((0, 2.0), (1, 1.0)):
    ctx = LossContext(step=jnp.zeros((), jnp.int32), teacher_params={"teacher": straight.params},
                      round=jnp.asarray(r, jnp.int32))
    _, metrics = method.loss(straight.params, batch, jax.random.key(0), ctx)
    assert float(metrics["student_steps"]) == n

  env = dict(os.environ, JAX_PLATFORMS="cpu")
  run = lambda *a: subprocess.run([sys.executable, os.path.join(ROOT, "sample.py"),
                                   "--workdir", str(tmp_path / "a"), "--num", "4",
                                   "--out", str(tmp_path / "s.npz"), *a],
                                  capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
  r = run("--steps", "2", "--guidance", "6", "--sampler", "meng_stochastic")
  assert r.returncode == 0, r.stderr[-2000:]
  assert "from step 2 (meng_stochastic, 2 steps)" in r.stdout
  assert "outside the range this student was trained on" in r.stderr
  r = run("--steps", "3")
  assert r.returncode != 0 and r.stderr.strip().count("\n") == 0
  assert "students of [2, 1] steps" in r.stderr


def test_unguided_pd_has_no_w(tiny_vp_run):
  _, teacher_dir, _ = tiny_vp_run
  config = digits_pd_unguided.get_config("tiny")
  config.method.teacher_workdir = teacher_dir
  method = builders.build_parts(config).method
  assert not method.w_conditioned and method.guidance_kind is None
  teacher = method.load_teacher()
  assert "initial" in teacher
  with pytest.raises(ValueError, match="no guidance-strength input"):
    method.guided_sampling_denoiser(teacher["initial"], 1.0, True)
  # a guided (w-input) student config cannot start from a teacher without the w input
  config = digits_pd.get_config("tiny")
  config.method.teacher_workdir = teacher_dir
  with pytest.raises(ValueError, match="model.cond_dim"):
    builders.build_parts(config).method.load_teacher()
