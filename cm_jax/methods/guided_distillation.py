"""Guided-diffusion distillation, stage 1 (Meng et al. 2023, "On Distillation of Guided
Diffusion Models", Sec. 4.1): one student that takes the guidance strength w as an input.

A classifier-free-guided teacher costs two network evaluations per step,
  x_hat^w(z_t) = (1 + w) x_hat(z_t, c) - w x_hat(z_t, null)         (Meng eq. 2),
for hundreds of steps. Stage 1 trains a single network x_eta1(z_t, w, c) to match it for
every w in [w_min, w_max] at once:

  t ~ U[0, 1], w ~ U[w_min, w_max], z_t = alpha_t x + sigma_t eps,
  L(eta1) = E[ max(SNR(t), 1) || x_eta1(z_t, w, c) - x_hat^w(z_t) ||^2 / d ]   (Meng eq. 6)

with diffusion_distillation's truncated-SNR weighting ('snr_trunc', any of
vp_diffusion.LOSS_WEIGHTS can be chosen). w enters the student through LCM's sin/cos
features of 1000 w (cm_jax.conditioning.guidance_embedding) fed to the ADM UNet's
zero-initialised `cond_emb`, which is added to the time (and class) embedding: the
student starts as exactly its teacher at every w, the new layer fresh (Meng: "initialized
from the teacher ... w-embedding layers"). Meng et al. train w in [0, 4] in pixel space.

The teacher is any class-conditional diffusion run trained with label dropout: the VP
teacher (its network on its schedule) or an EDM teacher (through its VE denoiser; its
weights cannot seed a VP student then: init_from_teacher=False). The student is a VP
diffusion model on the run's schedule and samples like one (DDIM, or Meng's stochastic
sampler, `meng_stochastic`), with `sample.py --guidance W` feeding w to the embedding:
one evaluation per step instead of two. Stage 2 (progressive distillation of this
student down to 1-8 steps) is cm_jax.methods.progressive.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import ml_collections

from cm_jax import conditioning as cond_lib
from cm_jax.methods import teachers
from cm_jax.methods.guidance import clipped
from cm_jax.methods.vp_diffusion import VPDiffusion

# Runs whose x-prediction can be guided and distilled (their `denoiser(params)` in VE
# coordinates, cm_jax.methods.base).
GUIDED_TEACHER_METHODS = ("edm", "vp")


def method_config(name: str, **overrides) -> ml_collections.ConfigDict:
  """Every config.method field of guided / progressive distillation, with the papers'
  defaults (configs start from this so each field can be set on the command line)."""
  common = dict(
      name=name,
      prediction="v",            # the student's output: x | eps | v | both (dpm.py mean_type)
      loss_weight="snr_trunc",   # max(SNR, 1) on the x-MSE (Meng Sec. 4.1; dpm.py default)
      label_dropout=0.0,         # the student is always told its class
      teacher_workdir="",
      teacher_params="ema",      # ema | online | an EMA's name
      teacher_step=-1,           # -1 = the teacher run's latest checkpoint
      allow_new_teacher=False,   # resume against another teacher than the run started with
      w_min=0.0, w_max=4.0,      # w ~ U[w_min, w_max] (Meng Sec. 5: [0, 4] in pixel space)
  )
  if name == "guided":
    common.update(init_from_teacher=True)
  elif name == "pd":
    common.update(
        teacher_steps=1024,      # N of the teacher's DDIM sampler in round 1
        student_steps=1,         # the last round's student steps; rounds halve N down to it
        steps_per_round=50_000,  # diffusion_distillation distill_steps_per_iter
    )
  else:
    raise ValueError(f"no guided-distillation method {name!r}; choose guided or pd")
  cfg = ml_collections.ConfigDict(common)
  cfg.update(overrides)
  return cfg


def check_w_range(mcfg) -> tuple[float, float]:
  lo, hi = float(mcfg.w_min), float(mcfg.w_max)
  if not 0.0 <= lo <= hi:
    raise ValueError(f"method.w_min and w_max must satisfy 0 <= w_min <= w_max, got "
                     f"[{lo}, {hi}]")
  return lo, hi


class WConditionedVP(VPDiffusion):
  """A VP diffusion student whose network may take w (model.cond_dim > 0): what guided
  and progressive distillation share (the w draw, the w-fed sampler, the teacher run)."""

  def __init__(self, net, config):
    super().__init__(net, config)
    self.config = config
    self.w_conditioned = int(config.model.get("cond_dim", 0) or 0) > 0
    self.w_range = check_w_range(self.cfg)
    self._teacher = None  # the teacher run's method object, once loaded

  @property
  def guidance_kind(self) -> Optional[str]:
    # w is an input of the network: one evaluation per step, no null class needed.
    return "embedding" if self.w_conditioned else None

  def guidance_warning(self, w: float) -> Optional[str]:
    """One line when w lies outside the range the student was trained on."""
    lo, hi = self.w_range
    if self.w_conditioned and not lo <= float(w) <= hi:
      return (f"guidance w = {w:g} is outside the range this student was trained on "
              f"[{lo:g}, {hi:g}] (method.w_min / w_max); its samples are extrapolated")
    return None

  def draw_w(self, rng, batch: int):
    lo, hi = self.w_range
    return jax.random.uniform(rng, (batch,), jnp.float32, lo, hi)

  def student_cond(self, labels, w) -> cond_lib.Conditioning:
    return cond_lib.Conditioning(labels=labels, w=w if self.w_conditioned else None)

  def guided_sampling_denoiser(self, params, guidance: float, clip: bool):
    """The student's D(x; sigma) with w = `guidance` fed to its embedding (one network
    evaluation per step); a student without a w input refuses w != 0."""
    if not self.w_conditioned:
      if guidance:
        raise ValueError("this student has no guidance-strength input (model.cond_dim = 0): "
                         "it samples at the w it was distilled with; drop --guidance")
      denoise = self.denoiser(params)
    else:
      base = self.denoiser(params)

      def denoise(x, sigma, cond=None):
        w = jnp.full((x.shape[0],), guidance, jnp.float32)
        return base(x, sigma, cond_lib.as_conditioning(cond).replace(w=w))

    return clipped(denoise) if clip else denoise

  def _teacher_mismatches(self, tcfg, new_layers) -> list[str]:
    """Why the student cannot start from (or be) this teacher's network, if it cannot."""
    return teachers.vp_start_mismatches(tcfg, self.config, new_layers)


class GuidedDistillation(WConditionedVP):
  """Meng et al. 2023 stage 1: x_eta1(z_t, w, c) regressed onto the guided teacher."""

  name = "guided"

  def __init__(self, net, config):
    super().__init__(net, config)
    if not self.w_conditioned:
      raise ValueError("guided distillation's student takes w as an input: set "
                       "--config.model.cond_dim (e.g. 256, the w-embedding width)")
    if not self.conditional:
      raise ValueError("guided distillation distils classifier-free guidance of a "
                       "class-conditional teacher: data.num_classes must be > 0")

  # -- the teacher ---------------------------------------------------------------------------

  def load_teacher(self):
    run = teachers.load_teacher_run(
        self.cfg, "guided distillation",
        "a class-conditional EDM or VP run trained with label dropout", self._check_teacher)
    self._teacher = run.method
    self.teacher_identity = run.identity()
    return {"teacher": run.params}

  def _check_teacher(self, tcfg, wd: str) -> None:
    problems = []
    if tcfg.method.name not in GUIDED_TEACHER_METHODS:
      problems.append(f"method is {tcfg.method.name!r}, not one of {GUIDED_TEACHER_METHODS}")
    problems += teachers.data_mismatches(tcfg, self.config)
    from cm_jax.nets import null_class_index  # pylint: disable=g-import-not-at-top
    dropout = float(tcfg.method.get("label_dropout", 0.0) or 0.0)
    if null_class_index(tcfg.model, tcfg.data.num_classes) is None or dropout <= 0:
      problems.append("it was trained without label dropout, so it has no unconditional "
                      "model to guide with (train it with --config.model.null_class=True "
                      "--config.method.label_dropout=0.1)")
    if self.cfg.init_from_teacher and not problems:
      if tcfg.method.name != "vp":
        problems.append(f"the student starts from the teacher's weights, but a "
                        f"{tcfg.method.name!r} network takes other inputs than a VP student's; "
                        f"set --config.method.init_from_teacher=False")
      else:
        problems += self._teacher_mismatches(tcfg, teachers.MODEL_FIELDS_NEW_LAYERS)
    if problems:
      raise ValueError(f"guided-distillation teacher {wd!r} cannot be used: "
                       + "; ".join(problems))

  def initial_params(self, params, teacher_params):
    """The teacher's weights with the w-embedding (`cond_emb`, zero-initialised) fresh."""
    return teachers.start_from_teacher(params, teacher_params, self.cfg.init_from_teacher)

  def guided_teacher_x(self, teacher, z, alpha, sigma, labels, w):
    """x_hat^w(z_t) = (1 + w) x_hat(z_t, c) - w x_hat(z_t, null): the teacher's own denoiser
    in VE coordinates (x = z/alpha, sigma_ve = sigma/alpha), guided in one 2B batch."""
    if self._teacher is None:
      raise ValueError("guided distillation needs its teacher: call load_teacher() first "
                       "(the trainer does)")
    guided = cond_lib.guided_denoiser(self._teacher.denoiser(teacher), w,
                                      self._teacher.null_class)
    return guided(z / alpha, (sigma / alpha).reshape((-1,)),
                  cond_lib.Conditioning(labels=labels))

  # -- the loss ------------------------------------------------------------------------------

  def loss(self, params, batch, rng, ctx):
    aux = ctx.teacher_params
    if not aux or "teacher" not in aux:
      raise ValueError("guided distillation needs the teacher's parameters in "
                       "ctx.teacher_params['teacher'] (from load_teacher())")
    x = jnp.asarray(batch["image"], jnp.float32)
    b = x.shape[0]
    labels = batch["label"]
    k_u, k_eps, k_w, k_drop = jax.random.split(rng, 4)
    u = jax.random.uniform(k_u, (b,), jnp.float32)
    z, logsnr, alpha, sigma = self.noised(x, u, k_eps)
    w = self.draw_w(k_w, b)
    target = jax.lax.stop_gradient(
        self.guided_teacher_x(aux["teacher"], z, alpha, sigma, labels, w))
    x_hat = self.x_prediction(params, z, logsnr, self.student_cond(labels, w), train=True,
                              dropout_rng=k_drop)
    loss, x_mse = self.weighted_x_loss(x_hat, target, logsnr)
    return loss, {"loss": loss, "x_mse": jnp.mean(x_mse), "w": jnp.mean(w)}
