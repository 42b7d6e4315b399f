"""CD / CT / iCT with the one train step: boundary condition, teacher loading, learning steps."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cm_testlib import TinyNet, fixed_batch, run_steps, tiny_method, tiny_params
from cm_jax.conditioning import Conditioning
from cm_jax.diffusion import preconditioning
from cm_jax.methods import METHODS, cm_schedules
from cm_jax.methods.base import LossContext
from cm_jax.methods.consistency import (ConsistencyDistillation, ConsistencyTraining,
                                        ImprovedConsistencyTraining)
from cm_jax.train import builders
from configs import digits_cd, digits_ct, digits_edm, digits_ict


def test_registered():
  assert METHODS["cd"] is ConsistencyDistillation
  assert METHODS["ct"] is ConsistencyTraining
  assert METHODS["ict"] is ImprovedConsistencyTraining


def test_scalings_boundary_condition():
  smin = 0.002
  c_skip, c_out, c_in = preconditioning.consistency_scalings(jnp.float32(smin), 0.5, smin)
  assert float(c_skip) == 1.0 and float(c_out) == 0.0
  assert float(c_in) == pytest.approx(1.0 / np.sqrt(smin ** 2 + 0.25))
  c_skip, c_out, _ = preconditioning.consistency_scalings(jnp.float32(80.0), 0.5, smin)
  assert float(c_skip) < 1e-4
  assert float(c_out) == pytest.approx(0.5 * (80 - smin) / np.sqrt(6400.25))


def test_consistency_fn_boundary_is_identity():
  config = digits_ct.get_config("tiny")
  m = tiny_method(ConsistencyTraining, config)
  f = m.consistency_fn(tiny_params(m))
  x = jax.random.normal(jax.random.key(1), (3, 8, 8, 1))
  labels = jnp.zeros((3,), jnp.int32)
  out = f(x, jnp.full((3,), config.precond.sigma_min), labels)
  np.testing.assert_array_equal(np.asarray(out), np.asarray(x))  # f(x, sigma_min) = x exactly
  assert not np.allclose(np.asarray(f(x, jnp.full((3,), 1.0), labels)), np.asarray(x))


def test_ct_schedule_hooks():
  config = digits_ct.get_config("tiny")
  m = tiny_method(ConsistencyTraining, config)
  K, mc = config.training.num_steps, config.method
  assert m.total_steps == K and m.uses_target()
  for k in (0, K // 2, K):
    assert float(m.target_decay(jnp.asarray(k))) == pytest.approx(
        float(cm_schedules.ct_target_ema(k, K, mc.s0, mc.s1, mc.mu0, "reference")))
    assert int(m.num_scales(jnp.asarray(k))) == int(
        cm_schedules.ct_num_scales(k, K, mc.s0, mc.s1))
  # K comes from config.method.total_steps when set (train.py --steps never changes it).
  config.method.total_steps = 1000
  assert tiny_method(ConsistencyTraining, config).total_steps == 1000
  config.method.update(target_ema_mode="fixed", target_ema=0.0)
  assert not tiny_method(ConsistencyTraining, config).uses_target()
  config.method.update(mu_variant="paper", target_ema_mode="adaptive", mu0=0.9)
  assert float(tiny_method(ConsistencyTraining, config).target_decay(jnp.asarray(0))) == \
      pytest.approx(0.9)                                  # paper: mu(0) = mu0


def test_ct_steps_lower_the_loss():
  config = digits_ct.get_config("tiny")
  # A fixed N (the adaptive one changes the pairs every step) and a CT target EMA.
  config.method.update(scale_mode="fixed", num_scales=18, target_ema_mode="fixed",
                       target_ema=0.9)
  m = tiny_method(ConsistencyTraining, config, dropout=0.1)
  state, losses, metrics = run_steps(m, config, tiny_params(m))
  assert losses[-1] < 0.7 * losses[0], losses
  assert int(state.step) == 8 and float(metrics["target_ema"]) == pytest.approx(0.9)
  # The target followed the online net at rate 0.9 (it started equal to it).
  tgt, online = jax.tree.leaves(state.target_params)[0], jax.tree.leaves(state.params)[0]
  assert not np.allclose(np.asarray(tgt), np.asarray(online))


def test_ct_adaptive_curriculum_in_step():
  config = digits_ct.get_config("tiny")
  config.method.update(total_steps=8, s0=2, s1=150, mu0=0.9)   # the CIFAR-10 curriculum
  m = tiny_method(ConsistencyTraining, config)
  _, losses, metrics = run_steps(m, config, tiny_params(m), steps=5)
  assert np.all(np.isfinite(losses))
  assert float(metrics["num_scales"]) == float(cm_schedules.ct_num_scales(4, 8, 2, 150))
  assert float(metrics["target_ema"]) == pytest.approx(
      float(cm_schedules.ct_target_ema(4, 8, 2, 150, 0.9, "reference")))


def test_cd_steps_lower_the_loss():
  config = digits_cd.get_config("tiny")
  m = tiny_method(ConsistencyDistillation, config)
  teacher = {"teacher": tiny_params(m, seed=7)}
  start = m.initial_params(tiny_params(m), teacher)                 # the teacher's weights
  for a, b in zip(jax.tree.leaves(start), jax.tree.leaves(teacher["teacher"])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  _, losses, _ = run_steps(m, config, start, teacher)
  assert losses[-1] < 0.8 * losses[0] and losses[-1] == min(losses), losses


def test_cd_euler_and_target_ema():
  config = digits_cd.get_config("tiny")
  config.method.update(solver="euler", target_ema=0.95)
  m = tiny_method(ConsistencyDistillation, config)
  assert m.uses_target() and float(m.target_decay(jnp.asarray(0))) == pytest.approx(0.95)
  params = tiny_params(m)
  batch, _ = fixed_batch(config)
  ctx = LossContext(step=jnp.asarray(0), target_params=params,
                    teacher_params={"teacher": tiny_params(m, seed=3)})
  loss, _ = jax.jit(m.loss)(params, batch, jax.random.key(0), ctx)
  assert np.isfinite(float(loss)) and float(loss) > 0
  with pytest.raises(ValueError, match="teacher"):
    m.loss(params, batch, jax.random.key(0), LossContext(step=jnp.asarray(0)))


def test_cd_loads_teacher_and_starts_from_it(tiny_edm_run):
  _, teacher_dir, teacher_state = tiny_edm_run
  config = digits_cd.get_config("tiny")
  config.method.teacher_workdir = teacher_dir
  parts = builders.build_parts(config)
  aux = parts.method.load_teacher()
  assert set(aux) == {"teacher"}
  want = builders.params_for_sampling(teacher_state, "ema", digits_edm.get_config("tiny").ema)
  for a, b in zip(jax.tree.leaves(aux["teacher"]), jax.tree.leaves(want)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  start = parts.method.initial_params(jax.tree.map(jnp.zeros_like, want), aux)
  for a, b in zip(jax.tree.leaves(start), jax.tree.leaves(want)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert parts.method.initial_params("p", None) == "p"   # shape tracing / sample.py
  assert not parts.method.uses_target()  # mu = 0: the online net under stop-gradient


def test_cd_refuses_missing_or_mismatched_teacher(tiny_edm_run, tmp_path):
  _, teacher_dir, _ = tiny_edm_run
  net = TinyNet()
  config = digits_cd.get_config("tiny")
  config.method.teacher_workdir = str(tmp_path / "no_such_run")
  with pytest.raises(FileNotFoundError, match="no checkpoints"):
    ConsistencyDistillation(net, config).load_teacher()
  config.method.teacher_workdir = ""
  with pytest.raises(ValueError, match="teacher_workdir"):
    ConsistencyDistillation(net, config).load_teacher()
  for section, key, value in [("model", "model_channels", 32), ("data", "num_classes", 0),
                              ("precond", "c_noise", "openai")]:
    config = digits_cd.get_config("tiny")
    config.method.teacher_workdir = teacher_dir
    config[section][key] = value
    with pytest.raises(ValueError, match=rf"does not match.*{key}"):
      ConsistencyDistillation(net, config).load_teacher()
  # Dropout is free: the reference distils a dropout-0.1 teacher into a dropout-0 student.
  config = digits_cd.get_config("tiny")
  config.method.teacher_workdir = teacher_dir
  config.model.dropout = 0.2
  assert "teacher" in builders.build_parts(config).method.load_teacher()


def test_cd_distils_a_vp_teacher_through_its_adapter(tiny_vp_run):
  """Teacher != student schedule: a VP v-prediction run teaches a consistency model on the
  Karras grid; the teacher's D(x; sigma) is its x-prediction at z = alpha x."""
  vp_config, vp_dir, _ = tiny_vp_run
  config = digits_cd.get_config("tiny")
  config.method.teacher_workdir = vp_dir
  with pytest.raises(ValueError, match="init_from_teacher=False"):
    builders.build_parts(config).method.load_teacher()
  config.method.init_from_teacher = False
  method = builders.build_parts(config).method
  aux = method.load_teacher()
  teacher = aux["teacher"]
  x = jax.random.normal(jax.random.key(1), (2, 8, 8, 1))
  sigma = jnp.array([0.5, 20.0])
  labels = jnp.array([3, 4])
  got = method.teacher_denoiser(teacher)(x, sigma, labels)
  vp = builders.build_parts(vp_config).method
  logsnr = -2.0 * jnp.log(sigma)  # sigma_ve = sigma_t / alpha_t = exp(-logSNR / 2)
  alpha = jnp.sqrt(1.0 / (1.0 + jnp.exp(-logsnr)))[:, None, None, None]
  want = vp.x_prediction(teacher, alpha * x, logsnr, Conditioning(labels=labels))
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
  # The guided teacher: (1 + w) D(x; c) - w D(x; null class).
  config.method.teacher_guidance = 2.0
  guided_method = builders.build_parts(config).method
  guided_method.load_teacher()
  g = guided_method.teacher_denoiser(teacher)(x, sigma, labels)
  u = vp.x_prediction(teacher, alpha * x, logsnr, Conditioning(labels=jnp.array([10, 10])))
  np.testing.assert_allclose(np.asarray(g), np.asarray(3.0 * want - 2.0 * u),
                             rtol=1e-4, atol=1e-4)
  # One CD loss on the VP teacher's Heun step.
  params = builders.init_params(builders.build_parts(config), config, jax.random.key(0))
  batch, _ = fixed_batch(config)
  loss, _ = jax.jit(method.loss)(params, batch, jax.random.key(0),
                                 LossContext(step=jnp.asarray(0), teacher_params=aux))
  assert np.isfinite(float(loss)) and float(loss) > 0


def test_ict_steps_without_target():
  config = digits_ict.get_config("tiny")
  m = tiny_method(ImprovedConsistencyTraining, config, dropout=0.3)
  assert not m.uses_target() and float(m.target_decay(jnp.asarray(3))) == 0.0
  assert config.method.metric == "pseudo_huber" and config.method.weighting == "ict"
  state, losses, metrics = run_steps(m, config, tiny_params(m), steps=4)
  assert state.target_params is None
  assert all(np.isfinite(losses)) and losses[0] > 0
  # K = 4 < 8 doublings: K' = 1, so N(k) = 10 * 2^k + 1 at k = 3.
  assert float(metrics["num_scales"]) == 81.0 == float(cm_schedules.ict_num_scales(3, 4))
