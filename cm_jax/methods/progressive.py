"""Progressive distillation (Salimans & Ho 2022, "Progressive Distillation for Fast Sampling
of Diffusion Models", Algorithm 2), unguided or as stage 2 of guided distillation (Meng et
al. 2023, Sec. 4.1), checked against google-research/diffusion_distillation (`dpm.py`
`training_losses` with a teacher, `config/*_distill.py`).

Rounds: the teacher samples with N DDIM steps; the student learns to take N/2, then becomes
the next round's teacher; N halves down to method.student_steps. In the round whose student
takes N steps (time u on the grid u_i = i/N):

  i ~ U{0, ..., N-1},  u = (i + 1)/N,  z_u = alpha_u x + sigma_u eps,
  z'  = DDIM of the teacher from u to u - 0.5/N,  z'' = DDIM from u - 0.5/N to u - 1/N,
  x~  = (z'' - (sigma''/sigma_u) z_u) / (alpha'' - (sigma''/sigma_u) alpha_u)   (Alg. 2),
  x~  = the teacher's x_hat(z') when i = 0 (its last step, which lands on x itself),
  L   = max(SNR(u), 1) ||x_hat_student(z_u) - x~||^2 / d    (dpm.py 'snr_trunc').

x~ is the x for which ONE student DDIM step from z_u lands where the teacher's two steps do
(solvers.inverse_ddim_logsnr: sigma''/sigma_u computed in log space as dpm.py does). The
teacher's DDIM steps use its x and eps predictions as dpm.py's `_run_model` gives them,
unclipped. When the network takes w (model.cond_dim > 0, a stage-1 student), w ~ U[w_min,
w_max] is drawn per example and fed to teacher and student alike (Meng stage 2).

Each round the student starts from the round's teacher (round 1: the teacher run's
weights; later: the previous round's final student) with a fresh optimizer, so a linear
learning-rate anneal over the round (optim.anneal_steps = steps_per_round) restarts
(cm_jax.train.rounds). diffusion_distillation keeps no EMA in distillation (ema_decay 0),
so the teacher's "EMA weights" are its weights; the configs keep none either. The
checkpoint at the end of each round is kept, and sampling a PD run with N steps reads the
checkpoint of the round whose student takes N steps (`checkpoint_step_for`).
"""
from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp

from cm_jax.diffusion import schedules, solvers
from cm_jax.methods import teachers
from cm_jax.methods.guided_distillation import WConditionedVP

# Runs that can be the first teacher: a VP diffusion model, a stage-1 guided student, or
# the last student of another progressive run.
PD_TEACHER_METHODS = ("vp", "guided", "pd")


def num_rounds(teacher_steps: int, student_steps: int) -> int:
  """Rounds that halve `teacher_steps` down to `student_steps` (one-line error if none do)."""
  t, s = int(teacher_steps), int(student_steps)
  if t < 2 or s < 1:
    raise ValueError(f"method.teacher_steps must be >= 2 and student_steps >= 1, got "
                     f"{t} and {s}")
  if t % 2:
    raise ValueError(f"method.teacher_steps = {t} is odd: each round's student takes half "
                     f"the teacher's steps")
  ratio = t // s
  if t % s or ratio < 2 or ratio & (ratio - 1):
    halvings = []
    n = t
    while n % 2 == 0 and n > 1:
      n //= 2
      halvings.append(n)
    raise ValueError(f"halving method.teacher_steps = {t} never reaches student_steps = {s} "
                     f"(the rounds give {halvings}); choose teacher_steps = student_steps x 2^k")
  return int(round(math.log2(ratio)))


def two_step_target(teacher_pred: Callable, z, logsnr_u, logsnr_mid, logsnr_s, last):
  """x~ of Algorithm 2 from z_u: two teacher DDIM steps u -> mid -> s, then the x that takes
  z_u to z'' in one DDIM step; where `last` (i = 0, s = 0) the teacher's x at its last step,
  x_hat(z_mid), as dpm.py substitutes it (z'' is that x up to sigma_0, and the division
  would amplify the difference).

  teacher_pred(z, logsnr (B,)) -> (x_hat, eps_hat); logsnr_* are (B,).
  """
  bshape = (z.shape[0],) + (1,) * (z.ndim - 1)
  alpha_sigma = lambda l: (v.reshape(bshape) for v in schedules.vp_alpha_sigma(l))
  x_u, eps_u = teacher_pred(z, logsnr_u)
  a_mid, s_mid = alpha_sigma(logsnr_mid)
  z_mid = a_mid * x_u + s_mid * eps_u
  x_mid, eps_mid = teacher_pred(z_mid, logsnr_mid)
  a_s, s_s = alpha_sigma(logsnr_s)
  z_s = a_s * x_mid + s_s * eps_mid
  x_tilde = solvers.inverse_ddim_logsnr(z_s, z, logsnr_u, logsnr_s)
  return jnp.where(jnp.reshape(last, bshape), x_mid, x_tilde)


class ProgressiveDistillation(WConditionedVP):
  """Algorithm 2 in rounds N -> N/2 -> ... -> method.student_steps."""

  name = "pd"
  # load_teacher()'s weights only seed round 1 (initial_params); the steps read the round's
  # teacher from the train state, so the trainer does not carry a second copy (loop.py).
  teacher_seeds_only = True

  def __init__(self, net, config):
    super().__init__(net, config)
    self.teacher_steps = int(self.cfg.teacher_steps)
    self.student_steps = int(self.cfg.student_steps)
    self.num_rounds = num_rounds(self.teacher_steps, self.student_steps)
    self.steps_per_round = int(self.cfg.steps_per_round)
    if self.steps_per_round < 1:
      raise ValueError(f"method.steps_per_round must be >= 1, got {self.steps_per_round}")

  # -- rounds (cm_jax.train.rounds) --------------------------------------------------------

  def rounds(self):
    return self.num_rounds, self.steps_per_round

  @classmethod
  def checkpoint_step_for(cls, config, num_steps: int) -> int:
    """The step of the checkpoint that ends the round whose student takes `num_steps`."""
    m = config.method
    rounds = num_rounds(m.teacher_steps, m.student_steps)
    offered = [int(m.teacher_steps) >> (r + 1) for r in range(rounds)]
    if int(num_steps) not in offered:
      raise ValueError(f"this progressive-distillation run's rounds make students of "
                       f"{offered} steps; {num_steps} is none of them (or pass "
                       f"--checkpoint_step to sample any checkpoint)")
    return (offered.index(int(num_steps)) + 1) * int(m.steps_per_round)

  # -- the teacher ---------------------------------------------------------------------------

  def load_teacher(self):
    run = teachers.load_teacher_run(
        self.cfg, "progressive distillation",
        "a VP diffusion run or a guided-distillation (stage 1) run", self._check_teacher)
    self.teacher_identity = run.identity()
    return {"initial": run.params}

  def _check_teacher(self, tcfg, wd: str) -> None:
    problems = []
    if tcfg.method.name not in PD_TEACHER_METHODS:
      problems.append(f"method is {tcfg.method.name!r}, not one of {PD_TEACHER_METHODS}")
    problems += teachers.data_mismatches(tcfg, self.config)
    # The student is the teacher's network (w input included) and starts from its weights.
    problems += self._teacher_mismatches(tcfg, new_layers=())
    if problems:
      raise ValueError(f"progressive-distillation teacher {wd!r} cannot be used: "
                       + "; ".join(problems))

  def initial_params(self, params, teacher_params):
    """Round 1's student: the teacher's weights (Algorithm 2: 'eta <- theta')."""
    if teacher_params is None:
      return params
    return teachers.init_from(params, teacher_params["initial"])

  # -- the loss ------------------------------------------------------------------------------

  def loss(self, params, batch, rng, ctx):
    aux = ctx.teacher_params
    if not aux or "teacher" not in aux or ctx.round is None:
      raise ValueError("progressive distillation trains in rounds: the round's teacher must "
                       "be in ctx.teacher_params['teacher'] and ctx.round set (the trainer does)")
    x = jnp.asarray(batch["image"], jnp.float32)
    b = x.shape[0]
    labels = batch["label"] if self.conditional else None
    k_i, k_eps, k_w, k_drop = jax.random.split(rng, 4)
    # The student's N in this round: teacher_steps / 2^(round + 1), exact in float32.
    n = self.teacher_steps * jnp.exp2(-(jnp.asarray(ctx.round, jnp.float32) + 1.0))
    i = jnp.minimum(jnp.floor(jax.random.uniform(k_i, (b,), jnp.float32) * n), n - 1.0)
    u = (i + 1.0) / n
    z, logsnr, _, _ = self.noised(x, u, k_eps)
    cond = self.student_cond(labels, self.draw_w(k_w, b) if self.w_conditioned else None)

    def teacher_pred(z_, l_):
      return self.prediction(aux["teacher"], z_, l_, cond)

    target = jax.lax.stop_gradient(two_step_target(
        teacher_pred, z, logsnr, self.schedule.logsnr(u - 0.5 / n),
        self.schedule.logsnr(u - 1.0 / n), i == 0))
    x_hat = self.x_prediction(params, z, logsnr, cond, train=True, dropout_rng=k_drop)
    loss, x_mse = self.weighted_x_loss(x_hat, target, logsnr)
    return loss, {"loss": loss, "x_mse": jnp.mean(x_mse), "student_steps": n}
