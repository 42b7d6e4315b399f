"""Multistep consistency models (Heek, Hoogeboom & Salimans 2024, "Multistep Consistency
Models", Algorithms 1-3 and App. A): consistency within each of S segments of the time axis.

The VP time axis t in [0, 1] (cm_jax.diffusion.schedules, z_t = alpha_t x + sigma_t eps) is
split into S segments [k/S, (k+1)/S]. Within a segment the model's x-prediction f(z_t, t) is
trained so that one DDIM step with it from t lands where the PF-ODE lands at the segment's
start t_step; S = 1 is a consistency model, S -> infinity a diffusion model. Sampling takes
S DDIM steps on t = S/S, ..., 1/S (Algorithm 2).

Training (Algorithm 1; `segment_times`, `teacher_steps`):
  N_teacher(i) = exp(log 64 + clip(i / I, 0, 1) (log 1280 - log 64))   (annealed, I = 100k)
  N_seg = round(N_teacher / S), T = N_seg S,
  step ~ U{0..S-1}, n_rel ~ U{1..N_seg}, t_step = step / S, t = t_step + n_rel / T, s = t - 1/T,
  z_t = alpha_t x + sigma_t eps.
  CD: x_teacher = the teacher's x-prediction at (z_t, t) (guided with w when set; x_var from
      the conditional output), x_var = eta ||x_teacher - x||^2 / d (eta = 0.75),
      z_s = aDDIM_{t->s}(x_teacher, z_t, x_var)   (Algorithm 3; plain DDIM as an ablation).
  CT: x_teacher = x, x_var = 0 (DDIM: z_s = alpha_s x + sigma_s eps).
  x_ref  = stopgrad f(z_s, s),   z_ref = DDIM_{s -> t_step}(x_ref, z_s),
  x_diff = invDDIM_{t -> t_step}(z_ref, z_t) - f(z_t, t),
  L      = (SNR(t) + 1) d(x_diff),  d(x) = sqrt(mean(x^2) + eps^2) - eps,  eps = 1e-4.

invDDIM_{t -> t_step}(z_ref, z_t) is the x_hat that takes z_t to z_ref in one DDIM step
(solvers.inverse_ddim), so the loss asks f(z_t, t) for the x with which DDIM from t reaches
the target's landing point at t_step. When s = t_step (n_rel = 1), z_ref = z_s: the target
is the teacher's own step (CD) or the data (CT), as in a consistency model's boundary.

d is the paper's pseudo-Huber "l2, not squared" form; we take the norm per element (RMS), so
eps = 1e-4 is in the data's units; below it d is quadratic, which keeps the large SNR(t) + 1
weight of the segment starts near t = 0 finite.

The student is a VP diffusion network with the teacher's architecture, schedule and output
parameterisation, initialised from a diffusion checkpoint (method.teacher_workdir; CT uses
that run only for the starting weights). CD's teacher may also be an EDM run, through its
VE-coordinate denoiser (x = z/alpha, sigma_ve = sigma/alpha); it cannot seed a VP student
then (init_from_teacher=False).
"""
from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from cm_jax import conditioning as cond_lib
from cm_jax.diffusion import schedules, solvers
from cm_jax.methods import teachers
from cm_jax.methods.base import LossContext
from cm_jax.methods.vp_diffusion import VPDiffusion, loss_weight

# Runs the student may start from (a VP diffusion model on the same schedule) and, for CD,
# runs that may teach (any diffusion model, EDM through its VE denoiser).
INIT_METHODS = ("vp",)
CD_TEACHER_METHODS = ("vp", "edm")
TEACHER_SOLVERS = ("addim", "ddim")
SAMPLER = "multistep"  # Algorithm 2


def method_config(name: str, **overrides) -> ml_collections.ConfigDict:
  """Every config.method field of multistep CD / CT with the paper's values."""
  if name not in ("mcm_cd", "mcm_ct"):
    raise ValueError(f"no multistep consistency method {name!r}; choose mcm_cd or mcm_ct")
  cfg = ml_collections.ConfigDict(dict(
      name=name,
      student_steps=8,            # S, the segments (and sampling steps)
      prediction="v",             # the student's output, as its teacher's (dpm.py mean_type)
      loss_weight="v_mse",        # w(t) = SNR(t) + 1 (the paper's; vp_diffusion.LOSS_WEIGHTS)
      teacher_steps_min=64,       # N_teacher at step 0 (App. A: exp(log 64 + ...))
      teacher_steps_max=1280,     # N_teacher once annealed
      teacher_anneal_steps=100_000,  # I; 0 = fixed N_teacher = teacher_steps_min (Table 2)
      teacher_solver="addim",     # CD's teacher step: addim | ddim (Table 4)
      eta=0.75,                   # x_var = eta ||x_teacher - x||^2 / d (App. A)
      huber_eps=1e-4,             # d(x) = sqrt(mean(x^2) + eps^2) - eps
      teacher_guidance=0.0,       # CD: w of the class-conditional teacher's guidance
      label_dropout=0.0,          # the student is always told its class
      init_from_teacher=True,     # the student starts from the diffusion run's weights
      teacher_workdir="",
      teacher_params="ema",       # ema | online | an EMA's name
      teacher_step=-1,            # the run's checkpoint step; -1 = its latest
      allow_new_teacher=False,    # resume against another teacher than the run started with
  ))
  cfg.update(overrides)
  return cfg


# -- the paper's schedule of teacher steps and segments ---------------------------------------


def teacher_steps(step, n_min: int, n_max: int, anneal_steps: int):
  """N_teacher(i) = exp(log n_min + clip(i / I, 0, 1) (log n_max - log n_min)) (App. A) as a
  float32 (traced) value; I = 0 keeps it at n_min."""
  i = jnp.asarray(step, jnp.float32)
  if int(anneal_steps) <= 0:
    return jnp.full(i.shape, float(n_min), jnp.float32)
  frac = jnp.clip(i / float(anneal_steps), 0.0, 1.0)
  return jnp.exp(math.log(n_min) + frac * (math.log(n_max) - math.log(n_min)))


def segment_steps(n_teacher, student_steps: int):
  """N_seg = round(N_teacher / S), at least 1 (float32, an integer value)."""
  return jnp.maximum(jnp.round(n_teacher / float(student_steps)), 1.0)


def segment_times(step_index, n_rel, n_seg, student_steps: int):
  """(t_step, t, s) of Algorithm 1 from the segment `step_index` in {0..S-1} and the position
  n_rel in {1..N_seg} within it: t = (step N_seg + n_rel) / T, s = t - 1/T, t_step = step / S,
  with T = N_seg S. Computed from integer counts (exact in float32 below 2^24), so t at the
  segment's end is exactly (step + 1) / S and s at n_rel = 1 exactly t_step."""
  k = jnp.asarray(step_index, jnp.float32)
  n = jnp.asarray(n_rel, jnp.float32)
  total = n_seg * float(student_steps)
  start = k * n_seg
  return start / total, (start + n) / total, (start + n - 1.0) / total


def segment_of(t, student_steps: int):
  """The segment index (0..S-1) a time t in (0, 1] belongs to: t in (k/S, (k+1)/S] is
  segment k, so the sampler's t = (k+1)/S maps to the start k/S (Algorithm 2)."""
  return jnp.clip(jnp.ceil(jnp.asarray(t, jnp.float32) * student_steps) - 1.0, 0.0,
                  student_steps - 1.0)


def pseudo_huber(x, eps: float):
  """sqrt(mean(x^2) + eps^2) - eps per example (the mean over every non-batch axis)."""
  ms = jnp.mean(jnp.square(x), axis=tuple(range(1, x.ndim)))
  return jnp.sqrt(ms + eps * eps) - eps


def teacher_step(x_teacher, x_cond, x, z_t, at_t, at_s, solver: str, eta: float):
  """CD's z_s from z_t (Algorithm 1): aDDIM_{t->s}(x_teacher, z_t, x_var) with
  x_var = eta ||x_cond - x||^2 / d per example (Algorithm 3; x_cond is the teacher's
  conditional output, = x_teacher unguided), or DDIM_{t->s}(x_teacher, z_t) (Table 4)."""
  (a_t, s_t), (a_s, s_s) = at_t, at_s
  if solver == "ddim":
    return solvers.ddim_step(x_teacher, z_t, a_t, s_t, a_s, s_s)
  x_var = eta * jnp.mean(jnp.square(x_cond - x), axis=tuple(range(1, x.ndim)))
  return solvers.addim_step(x_teacher, z_t, a_t, s_t, a_s, s_s, x_var)


def segment_loss(f, z_t, z_s, at_t, at_s, at_step, weight_kind: str, huber_eps: float,
                 dropout_rng=None):
  """Algorithm 1's loss from z_t and the teacher's (or the data's) z_s: per-example
  (SNR(t) + 1) d(x_diff) and x_diff, with

    x_ref = stopgrad f(z_s, s),  z_ref = DDIM_{s -> t_step}(x_ref, z_s),
    x_diff = invDDIM_{t -> t_step}(z_ref, z_t) - f(z_t, t).

  f(z, logsnr, train=..., dropout_rng=...) is the student's x-prediction; at_t and at_s are
  (alpha, sigma, logsnr) at t and s, at_step (alpha, sigma) at t_step, shaped to broadcast
  over the images (logsnr (B,)). f(z_t, t) is the one evaluation gradients flow through."""
  a_t, s_t, logsnr_t = at_t
  a_s, s_s, logsnr_s = at_s
  a_0, s_0 = at_step
  x_ref = jax.lax.stop_gradient(f(z_s, logsnr_s))
  z_ref = solvers.ddim_step(x_ref, z_s, a_s, s_s, a_0, s_0)
  target = jax.lax.stop_gradient(solvers.inverse_ddim(z_ref, z_t, a_t, s_t, a_0, s_0))
  x_diff = target - f(z_t, logsnr_t, train=True, dropout_rng=dropout_rng)
  return loss_weight(weight_kind, logsnr_t) * pseudo_huber(x_diff, huber_eps), x_diff


def check_sampling_steps(student_steps: int, num_steps: int) -> None:
  """A multistep model samples with its S steps, or with a divisor of S (each step then
  jumps S / m segments with the first one's prediction: an approximation); else one line."""
  s, m = int(student_steps), int(num_steps)
  if m < 1 or s % m:
    divisors = [d for d in range(1, s + 1) if s % d == 0]
    raise ValueError(f"this multistep consistency model has S = {s} segments; sample it with "
                     f"{s} steps or a divisor of {s} ({', '.join(map(str, divisors))}), "
                     f"got {m}")


class MultistepConsistency(VPDiffusion):
  """Algorithm 1 (CD or CT in segments) and Algorithm 2 (sampling) on the VP schedule."""

  name = "mcm_cd"
  distill = True

  def __init__(self, net, config):
    super().__init__(net, config)
    self.config = config
    m = self.cfg
    self.student_steps = int(m.student_steps)
    self.n_min, self.n_max = int(m.teacher_steps_min), int(m.teacher_steps_max)
    self.anneal_steps = int(m.teacher_anneal_steps)
    if self.student_steps < 1:
      raise ValueError(f"method.student_steps must be >= 1, got {self.student_steps}")
    if not 1 <= self.n_min <= self.n_max:
      raise ValueError(f"method.teacher_steps_min / max must satisfy 1 <= min <= max, got "
                       f"{self.n_min} and {self.n_max}")
    if self.student_steps > self.n_min:
      raise ValueError(f"method.student_steps S = {self.student_steps} > teacher_steps_min = "
                       f"{self.n_min}: a segment would hold no teacher step; choose S <= "
                       f"{self.n_min} or raise teacher_steps_min")
    if self.anneal_steps < 0:
      raise ValueError(f"method.teacher_anneal_steps must be >= 0, got {self.anneal_steps}")
    if m.teacher_solver not in TEACHER_SOLVERS:
      raise ValueError(f"unknown method.teacher_solver {m.teacher_solver!r}; choose from "
                       f"{TEACHER_SOLVERS}")
    if float(m.huber_eps) <= 0 or float(m.eta) < 0:
      raise ValueError(f"method.huber_eps must be > 0 and eta >= 0, got {m.huber_eps} and "
                       f"{m.eta}")
    if getattr(self.schedule, "kind", "vp") != "vp":
      raise ValueError("multistep consistency models live on a VP schedule (config.schedule); "
                       "an EDM run can teach CD, but the student is a VP model")
    self.guidance = float(m.get("teacher_guidance", 0.0) or 0.0)
    if self.guidance and not self.distill:
      raise ValueError("method.teacher_guidance applies to multistep CD (mcm_cd) only")
    self._teacher = None  # the CD teacher run's method object, once loaded

  # -- the teacher run -----------------------------------------------------------------------

  @property
  def teacher_seeds_only(self) -> bool:
    """CT reads its diffusion run only for the starting weights (cm_jax.train.loop)."""
    return not self.distill

  def load_teacher(self):
    if not self.distill and not self.cfg.init_from_teacher:
      return None
    kinds = ("a VP or EDM diffusion run" if self.distill
             else "a VP diffusion run to start from")
    run = teachers.load_teacher_run(self.cfg, f"multistep {'CD' if self.distill else 'CT'}",
                                    kinds, self._check_teacher)
    self._teacher = run.method
    if self.distill:  # CD's target depends on it; CT's resumed state no longer does
      self.teacher_identity = run.identity()
    return {"teacher": run.params}

  def _check_teacher(self, tcfg, wd: str) -> None:
    problems = []
    allowed = CD_TEACHER_METHODS if self.distill else INIT_METHODS
    if tcfg.method.name not in allowed:
      problems.append(f"method is {tcfg.method.name!r}, not one of {allowed}")
    problems += teachers.data_mismatches(tcfg, self.config)
    if self.cfg.init_from_teacher and not problems:
      if tcfg.method.name != "vp":
        problems.append(f"the student starts from the teacher's weights, but a "
                        f"{tcfg.method.name!r} network takes other inputs than a VP student's "
                        f"(set --config.method.init_from_teacher=False)")
      else:
        # f is that network's x-prediction on that schedule: all of it must match.
        problems += teachers.vp_start_mismatches(tcfg, self.config)
    problems += teachers.guidance_problems(tcfg, self.guidance)
    if problems:
      raise ValueError(f"multistep consistency teacher {wd!r} cannot be used: "
                       + "; ".join(problems))

  def initial_params(self, params, teacher_params):
    """The diffusion run's weights (Heek et al. initialise from the teacher)."""
    return teachers.start_from_teacher(params, teacher_params, self.cfg.init_from_teacher)

  def teacher_x(self, teacher, z, alpha, sigma, labels):
    """(x_teacher, x_cond): the teacher's x-prediction at z_t, guided with w when set, and
    its conditional output (what x_var is measured on). The teacher's own VE denoiser
    (x = z/alpha, sigma_ve = sigma/alpha), the halves in one 2B batch when guided."""
    if self._teacher is None:
      raise ValueError("multistep CD needs its teacher: call load_teacher() first (the "
                       "trainer does)")
    denoise = self._teacher.denoiser(teacher)
    b = z.shape[0]
    x_ve, s_ve = z / alpha, jnp.reshape(sigma / alpha, (b,))
    cond = cond_lib.Conditioning(labels=labels)
    if not self.guidance:
      x_c = jnp.asarray(denoise(x_ve, s_ve, cond), jnp.float32)
      return x_c, x_c
    x_c, x_u = cond_lib.conditional_and_unconditional(
        denoise, x_ve, s_ve, cond, getattr(self._teacher, "null_class", None))
    w = self.guidance
    return (1.0 + w) * x_c - w * x_u, x_c

  # -- the loss (Algorithm 1) ----------------------------------------------------------------

  def alpha_sigma(self, t, bshape):
    """(alpha_t, sigma_t, logSNR(t)) shaped to broadcast over a batch of images."""
    logsnr = self.schedule.logsnr(t)
    alpha, sigma = (v.reshape(bshape) for v in schedules.vp_alpha_sigma(logsnr))
    return alpha, sigma, logsnr

  def draw_times(self, rng, batch: int, step):
    """(t_step, t, s, N_seg) for a batch at train step `step` (Algorithm 1)."""
    n_seg = segment_steps(teacher_steps(step, self.n_min, self.n_max, self.anneal_steps),
                          self.student_steps)
    k_step, k_rel = jax.random.split(rng)
    seg = jax.random.randint(k_step, (batch,), 0, self.student_steps)
    u = jax.random.uniform(k_rel, (batch,), jnp.float32)
    n_rel = jnp.minimum(jnp.floor(u * n_seg), n_seg - 1.0) + 1.0  # U{1..N_seg}
    t_step, t, s = segment_times(seg, n_rel, n_seg, self.student_steps)
    return t_step, t, s, n_seg

  def loss(self, params, batch, rng, ctx: LossContext):
    x = jnp.asarray(batch["image"], jnp.float32)
    b = x.shape[0]
    bshape = (b,) + (1,) * (x.ndim - 1)
    labels = batch["label"] if self.conditional else None
    cond = cond_lib.Conditioning(labels=labels)
    k_t, k_eps, k_drop = jax.random.split(rng, 3)
    t_step, t, s, n_seg = self.draw_times(k_t, b, ctx.step)
    z_t, logsnr_t, a_t, s_t = self.noised(x, t, k_eps)  # z_t = alpha_t x + sigma_t eps
    a_s, s_s, logsnr_s = self.alpha_sigma(s, bshape)
    a_0, s_0, _ = self.alpha_sigma(t_step, bshape)

    if self.distill:
      aux = ctx.teacher_params
      if not aux or "teacher" not in aux:
        raise ValueError("multistep CD needs the teacher's parameters in "
                         "ctx.teacher_params['teacher'] (from load_teacher())")
      x_teacher, x_cond = jax.lax.stop_gradient(
          self.teacher_x(aux["teacher"], z_t, a_t, s_t, labels))
      z_s = teacher_step(x_teacher, x_cond, x, z_t, (a_t, s_t), (a_s, s_s),
                         self.cfg.teacher_solver, float(self.cfg.eta))
    else:  # CT: the data itself, plain DDIM (x_var = 0)
      z_s = solvers.ddim_step(x, z_t, a_t, s_t, a_s, s_s)

    f = lambda z, logsnr, **kw: self.x_prediction(params, z, logsnr, cond, **kw)
    per_example, x_diff = segment_loss(
        f, z_t, z_s, (a_t, s_t, logsnr_t), (a_s, s_s, logsnr_s), (a_0, s_0),
        self.cfg.loss_weight, float(self.cfg.huber_eps), dropout_rng=k_drop)
    loss = jnp.mean(per_example)
    return loss, {"loss": loss, "x_mse": jnp.mean(jnp.square(x_diff)),
                  "segment_steps": n_seg}

  # -- sampling (Algorithm 2) ----------------------------------------------------------------

  guidance_kind = None  # a CD student samples at the w it was distilled with

  def check_sample_options(self, num_steps: int, sampler: Optional[str] = None, **_) -> None:
    if sampler not in (None, SAMPLER):
      raise ValueError(f"a multistep consistency model samples with its own sampler "
                       f"({SAMPLER!r}, Algorithm 2), not {sampler!r}")
    check_sampling_steps(self.student_steps, num_steps)

  def steps_warning(self, num_steps: int) -> Optional[str]:
    """One line when sampling with a divisor m of S instead of S (sample.py prints it)."""
    m = int(num_steps)
    if m != self.student_steps and m >= 1 and self.student_steps % m == 0:
      return (f"sampling a model of S = {self.student_steps} segments in {m} steps: each "
              f"step jumps {self.student_steps // m} segments with the prediction of the "
              f"first, an approximation (it was trained for {self.student_steps} steps)")
    return None

  def sample(self, params, noise, keys, labels: Optional[jax.Array], num_steps: int,
             sampler: Optional[str] = None, callback=None, **options):
    """z_1 = `noise`; for t = m/m, ..., 1/m: z_{t - 1/m} = DDIM_{t -> t - 1/m}(f(z_t, t), z_t),
    f evaluated at t exactly; the last step returns f (DDIM to t = 0 up to sigma_0 ~ 5e-5).
    m = num_steps is S or a divisor of S (`check_sampling_steps`)."""
    del keys, options
    self.check_sample_options(num_steps, sampler)
    m = int(num_steps)
    cond = cond_lib.Conditioning(labels=labels if self.conditional else None)
    b = noise.shape[0]
    bshape = (b,) + (1,) * (noise.ndim - 1)
    clip = bool(self.sample_cfg.get("clip_denoised", False))

    def body(z, k):  # k = m, m-1, ..., 1
      t = jnp.full((b,), k / m, jnp.float32)
      s = jnp.full((b,), (k - 1) / m, jnp.float32)
      a_t, s_t, logsnr_t = self.alpha_sigma(t, bshape)
      a_s, s_s, _ = self.alpha_sigma(s, bshape)
      x_hat = self.x_prediction(params, z, logsnr_t, cond)
      if clip:  # off in the configs: Algorithm 2 does not clip
        x_hat = jnp.clip(x_hat, -1.0, 1.0)
      if callback is not None:
        jax.debug.callback(callback, m - k, z, x_hat, t, ordered=True)
      z_next = solvers.ddim_step(x_hat, z, a_t, s_t, a_s, s_s)
      return jnp.where(k > 1, z_next, x_hat), None

    ks = jnp.arange(m, 0, -1, dtype=jnp.float32)
    x0, _ = jax.lax.scan(body, jnp.asarray(noise, jnp.float32), ks)
    return jnp.clip(x0, -1.0, 1.0)

  def sampling_grid(self, num_steps: int):
    """Algorithm 2's times t = m/m, ..., 1/m and 0 (for reports; sample() computes them)."""
    return np.linspace(1.0, 0.0, int(num_steps) + 1)


class MultistepConsistencyTraining(MultistepConsistency):
  """Multistep CT: Algorithm 1 with x_teacher = x (no teacher network)."""

  name = "mcm_ct"
  distill = False
