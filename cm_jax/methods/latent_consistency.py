"""Latent consistency models (Luo et al. 2023, "Latent Consistency Models: Synthesizing
High-Resolution Images with Few-Step Inference"; Luo et al. 2023b, "LCM-LoRA").

Three ways to train a few-step model of a text-conditioned latent diffusion model, all in
the frozen autoencoder's latent space with the frozen text encoder (`LatentDiffusion`):

* 'lcd' (LCM Algorithm 1, latent consistency distillation): with the skipping-step grid of
  `cm_jax.diffusion.lcm` (t_{n+k} from 19, 39, ..., 999; t_n = t_{n+k} - 20) and
  w ~ U[w_min, w_max] per example,
    z_{n+k} = alpha_{n+k} z + sigma_{n+k} eps                     (z = the scaled latent)
    x0, eps' = the teacher's guided predictions at z_{n+k}:
               x = (1 + w) x(c) - w x(empty prompt), for x0 and eps alike (LCM eq. 10-11)
    z_n^Psi  = one teacher solver step t_{n+k} -> t_n (DDIM, or DPM-Solver-2)
    loss     = d(f_theta(z_{n+k}, w, c, t_{n+k}), f_theta-(z_n^Psi, w, c, t_n))
  with f = c_skip(t) z + c_out(t) x0(F(z, t, w-embedding, c)) (LCM eq. 9; scalings of
  `parameterization.lcm_boundary_scalings`, timestep scaling 10), theta- the EMA target
  (decay 0.95), d the elementwise pseudo-Huber with c = 0.001 or l2, w fed to the UNet's
  `time_cond_proj_dim` layer as 256 sin/cos features of 1000 w (`guidance_embedding`). The
  student is the teacher with that fresh layer added (the reference script's
  `UNet2DConditionModel(**teacher.config, time_cond_proj_dim=256)` loaded with strict=False).
* LCM-LoRA (the same method with `method.lora_rank > 0`): the student is the frozen teacher
  plus LoRA adapters (`cm_jax.nets.lora`), the only parameters trained, saved and given to
  the optimizer; no w-embedding (`method.w_embedding = False`; w is drawn as above, or fixed
  with w_min = w_max) and no separate target network: the target is the online student
  under stop-gradient (diffusers' `train_lcm_distill_lora_sd_wds.py`).
* 'lcf' (LCM Sec. 4.5, latent consistency fine-tuning): no teacher. The pair shares the data
  latent and the noise, z_n = alpha_n z + sigma_n eps, and the student starts from an LCM.

Sampling is LCM Algorithm 3 / diffusers' LCMScheduler (`lcm.multistep_sample`): 1 to 50
steps, the w-embedding fed w (diffusers' LatentConsistencyModelPipeline embeds
guidance_scale - 1: our `--guidance W` is its guidance_scale = W + 1). A LoRA student has no
w input: `--guidance W` there is classifier-free guidance on its output, two evaluations.
"""
from __future__ import annotations

import functools
import json
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from cm_jax import conditioning as cond_lib
from cm_jax import runs
from cm_jax.diffusion import lcm
from cm_jax.methods import teachers
from cm_jax.methods.base import LossContext, network_fn
from cm_jax.methods.latent_diffusion import LatentDiffusion

LOSSES = ("huber", "l2")
SOLVERS = ("ddim", "dpm_solver_2")
# Teacher-run method fields that shape the frozen parts: a teacher that differs in one of
# them denoised other latents or read other text states than the student would. (Where the
# autoencoder run lives may differ: runs move.)
_FROZEN_FIELDS = ("vae", "tokenizer", "text_encoder", "text_encoder_seed", "clip_skip")


def _as_plain(v):
  """A config value as JSON text (ConfigDicts, tuples and lists compare alike)."""
  v = v.to_dict() if hasattr(v, "to_dict") else v
  return json.dumps(v, sort_keys=True, default=list)


class LatentConsistencyDistillation(LatentDiffusion):
  """LCD (and LCM-LoRA with method.lora_rank > 0) from a latent diffusion teacher."""

  name = "lcd"
  null_class = "empty prompt"

  def __init__(self, net, config):
    super().__init__(net, config)
    c = self.cfg
    self.config = config
    self.T = int(self.schedule.num_train_timesteps)
    self.original_steps = int(c.get("num_ddim_timesteps", 50))
    self.grid = lcm.skipping_grid(self.T, self.original_steps)
    self.k = lcm.skip(self.T, self.original_steps)
    self.timestep_scaling = float(c.get("timestep_scaling", 10.0))
    self.w_range = (float(c.w_min), float(c.w_max))
    if not 0.0 <= self.w_range[0] <= self.w_range[1]:
      raise ValueError(f"method.w_min / w_max must satisfy 0 <= w_min <= w_max, got "
                       f"{self.w_range}")
    self.w_embedding = bool(c.get("w_embedding", True))
    self.lora_rank = int(c.get("lora_rank", 0) or 0)
    if self.w_embedding and not int(getattr(net, "cond_dim", 0) or 0):
      raise ValueError(f"{self.name} feeds w to the UNet's guidance embedding, but "
                       f"model.time_cond_proj_dim is unset: set it (LCM uses 256), or "
                       f"method.w_embedding=False")
    if self.lora_rank and self.w_embedding:
      raise ValueError("LCM-LoRA adapts the teacher's own UNet, which has no w input: set "
                       "method.w_embedding=False (and leave model.time_cond_proj_dim unset)")
    if self.lora_rank and getattr(net, "time_cond_proj_dim", None):
      raise ValueError("LCM-LoRA's student is the teacher's UNet plus adapters: leave "
                       "model.time_cond_proj_dim unset")
    self.loss_type = c.get("loss_type", "huber")
    if self.loss_type not in LOSSES:
      raise ValueError(f"unknown method.loss_type {self.loss_type!r}; choose from {LOSSES}")
    self.huber_c = float(c.get("huber_c", 0.001))
    self.solver = c.get("solver", "ddim")
    if self.solver not in SOLVERS:
      raise ValueError(f"unknown method.solver {self.solver!r}; choose from {SOLVERS}")
    # The teacher is the student's network without the w input (the same weights else).
    self.teacher_net = net.clone(time_cond_proj_dim=None) if self.w_embedding else net

  # -- what kind of student ------------------------------------------------------------------

  @property
  def guidance_kind(self):
    return "embedding" if self.w_embedding else "classifier_free"

  def guidance_warning(self, w: float) -> Optional[str]:
    lo, hi = self.w_range
    if self.w_embedding and not lo <= float(w) <= hi:
      return (f"guidance w = {w:g} is outside the range this LCM was trained on "
              f"[{lo:g}, {hi:g}] (method.w_min / w_max); its samples are extrapolated")
    return None

  def uses_target(self) -> bool:
    return not self.lora_rank  # LCM-LoRA's target is the online student (stop-gradient)

  def target_decay(self, step):
    return jnp.asarray(float(self.cfg.get("ema_decay", 0.95)), jnp.float32)

  # -- the frozen networks -------------------------------------------------------------------

  def load_teacher(self):
    """{'vae', 'text_encoder', 'unet'}: the frozen parts and the teacher's UNet (the LoRA
    base), every problem a one-line error before anything is compiled."""
    unet = self.teacher_unet_params  # the teacher's problems first: they are the method's
    return dict(super().load_teacher(), unet=unet)

  @functools.cached_property
  def _teacher(self):
    """(UNet params, identity) of method.teacher_workdir (an ldm run) or method.pretrained."""
    c = self.cfg
    if c.get("teacher_workdir"):
      run = teachers.load_teacher_run(c, f"{self.name}", "a latent diffusion (ldm) run",
                                      self._check_teacher_config)
      params, ident = run.params, run.identity()
    elif c.get("pretrained"):
      from cm_jax.nets import sd_folder  # pylint: disable=g-import-not-at-top
      params = sd_folder.load_sd_folder(c.pretrained, components=("unet",)).unet_params
      ident = f"{c.pretrained} sha256 {teachers.params_sha256(params)[:16]}"
    else:
      raise ValueError(f"{self.name} needs a teacher: set --config.method.teacher_workdir="
                       f"<a latent diffusion (ldm) run> or --config.method.pretrained=<a "
                       f"diffusers folder>")
    self._check_fits(params, self.teacher_net, "teacher")
    return jax.device_get(params), ident

  @property
  def teacher_unet_params(self):
    return self._teacher[0]

  @property
  def teacher_identity(self) -> str:
    return f"{self.parts.identity} unet {self._teacher[1]}"

  def _check_teacher_config(self, tcfg, wd: str) -> None:
    problems = []
    if tcfg.method.name != "ldm":
      problems.append(f"it is a {tcfg.method.name!r} run, not latent diffusion ('ldm')")
    else:
      problems += [f"method.{k}" for k in _FROZEN_FIELDS
                   if _as_plain(tcfg.method.get(k)) != _as_plain(self.cfg.get(k))]
      if tcfg.method.get("prediction") != self.cfg.prediction:
        problems.append(f"method.prediction {tcfg.method.get('prediction')!r} != "
                        f"{self.cfg.prediction!r}")
      if dict(tcfg.schedule) != dict(self.config.schedule):
        problems.append("schedule")
      problems += teachers.model_mismatches(tcfg, self.config,
                                            new_layers=("time_cond_proj_dim",))
    if problems:
      raise ValueError(f"teacher run {wd!r} cannot teach this {self.name} student: "
                       f"{'; '.join(problems)}")

  def _abstract_unet(self, net):
    # pylint: disable-next=g-import-not-at-top
    from cm_jax.nets import init_inputs
    args, kwargs = init_inputs(self.config, self.network_input_shape(self.config))
    dim = int(getattr(net, "time_cond_proj_dim", 0) or 0)  # the teacher has no w input
    args = args[:3] + ((jnp.zeros((1, dim), jnp.float32) if dim else None),)
    return jax.eval_shape(lambda: net.init(jax.random.key(0), *args, **kwargs))["params"]

  def _check_fits(self, params, net, what: str) -> None:
    bad = teachers.shared_params_mismatch(params, self._abstract_unet(net))
    if bad:
      raise ValueError(f"the {what} UNet does not fit this run's network (model config): "
                       f"{bad}")

  def abstract_frozen(self) -> dict:
    return dict(super().abstract_frozen(), unet=self._abstract_unet(self.teacher_net))

  # -- the student ---------------------------------------------------------------------------

  @property
  def lora_scale(self) -> float:
    """alpha / r (PEFT's scaling); method.lora_alpha = 0 means alpha = r (scale 1)."""
    alpha = float(self.cfg.get("lora_alpha", 0) or self.lora_rank)
    return alpha / max(self.lora_rank, 1)

  def initial_params(self, params, frozen):
    """LCD: the teacher's weights, the w-embedding layer fresh; LCM-LoRA: the adapters
    (B = 0, so the student starts as the teacher)."""
    if self.lora_rank:
      from cm_jax.nets import lora  # pylint: disable=g-import-not-at-top
      return lora.init_lora(jax.random.key(int(self.cfg.get("lora_seed", 0))), params,
                            self.lora_rank, tuple(self.cfg.lora_targets))
    if frozen is None:
      return params
    return teachers.init_from(params, frozen["unet"])

  def student_unet(self, params, frozen):
    """The full UNet parameters of the student (LoRA: base + scale * A B)."""
    if not self.lora_rank:
      return params
    from cm_jax.nets import lora  # pylint: disable=g-import-not-at-top
    return lora.merge_lora(frozen["unet"], params, self.lora_scale)

  def sampling_params(self, params):
    unet = self.student_unet(params, {"unet": self.teacher_unet_params} if self.lora_rank
                             else None)
    return {"unet": unet, **self.parts.params}

  # -- the loss ------------------------------------------------------------------------------

  def _alpha_sigma(self, t, like):
    """alpha_t, sigma_t shaped to broadcast with `like`: the table at integer timesteps,
    the schedule's interpolation at fractional ones (DPM-Solver's intermediate point)."""
    if jnp.issubdtype(jnp.asarray(t).dtype, jnp.integer):
      abar = jnp.asarray(self.schedule.alphas_cumprod, jnp.float32)[t]
      alpha, sigma = jnp.sqrt(abar), jnp.sqrt(1.0 - abar)
    else:
      ve = self.schedule.ve_sigma(t)
      alpha = 1.0 / jnp.sqrt(1.0 + ve * ve)
      sigma = ve * alpha
    shape = (-1,) + (1,) * (like.ndim - 1)
    return alpha.reshape(shape), sigma.reshape(shape)

  def _w_cond(self, context, w):
    return cond_lib.Conditioning(context=context, w=w if self.w_embedding else None)

  def consistency(self, unet_params, z, t, context, w, train=False, dropout_rng=None):
    """f(z, t) = c_skip(t) z + c_out(t) x0(F(z, t, w, c)) (LCM eq. 9)."""
    apply = network_fn(self.net, unet_params, train=train, dropout_rng=dropout_rng)
    out = apply(z, jnp.asarray(t, jnp.float32), self._w_cond(context, w))
    alpha, sigma = self._alpha_sigma(t, z)
    x0 = self.param.to_x(out.astype(jnp.float32), z, alpha, sigma)
    return lcm.consistency_output(z, x0, t, self.timestep_scaling)

  def guided_teacher(self, unet_params, z, t, context, null_context, w):
    """The teacher's (x0, eps) at (z, t), each guided as (1 + w) x(c) - w x(empty prompt)
    (one batched evaluation of both prompts)."""
    apply = network_fn(self.teacher_net, unet_params)
    b = z.shape[0]
    t2 = jnp.concatenate([jnp.broadcast_to(jnp.asarray(t, jnp.float32), (b,))] * 2)
    out = apply(jnp.concatenate([z, z]), t2,
                cond_lib.Conditioning(context=jnp.concatenate([context, null_context])))
    out = out.astype(jnp.float32)
    alpha, sigma = self._alpha_sigma(t, z)
    zz = jnp.concatenate([z, z])
    a2, s2 = jnp.concatenate([alpha] * 2), jnp.concatenate([sigma] * 2)
    x0 = self.param.to_x(out, zz, a2, s2)
    eps = self.param.to_eps(out, zz, a2, s2)
    wc = w.reshape((-1,) + (1,) * (z.ndim - 1))
    guide = lambda v: (1.0 + wc) * v[:b] - wc * v[b:]
    return guide(x0), guide(eps)

  def next_point(self, frozen, z, eps, z_start, t_start, t_end, context, w):
    """z_n^Psi: the teacher's guided solver step t_{n+k} -> t_n from z_{n+k}."""
    null_context = jnp.broadcast_to(
        self.parts.encode_text(frozen["text_encoder"], jnp.asarray(self.empty_prompt_ids)),
        context.shape)
    x0, eps_hat = self.guided_teacher(frozen["unet"], z_start, t_start, context,
                                      null_context, w)
    if self.solver == "ddim":
      return lcm.ddim_teacher_step(x0, eps_hat, t_end, self.schedule.alphas_cumprod)
    eps_fn = lambda u, s: self.guided_teacher(frozen["unet"], u, s, context, null_context,
                                              w)[1]
    return lcm.dpm_solver_2_step(eps_fn, z_start, eps_hat, t_start, t_end, self.schedule)

  def draw(self, rng, b):
    """(t_{n+k}, t_n, w) for a batch of b: n uniform on the grid, w uniform on its range."""
    k_idx, k_w = jax.random.split(rng)
    index = jax.random.randint(k_idx, (b,), 0, len(self.grid))
    t_start = jnp.asarray(self.grid, jnp.int32)[index]
    t_end = jnp.maximum(t_start - self.k, 0)
    lo, hi = self.w_range
    w = jax.random.uniform(k_w, (b,), jnp.float32, lo, hi)
    return t_start, t_end, w

  def loss(self, params, batch, rng, ctx: LossContext):
    frozen = ctx.teacher_params
    k_vae, k_draw, k_eps, k_dropout = jax.random.split(rng, 4)
    z = self.latents(frozen, batch, k_vae)
    context = jax.lax.stop_gradient(
        self.parts.encode_text(frozen["text_encoder"], jnp.asarray(batch["input_ids"])))
    t_start, t_end, w = self.draw(k_draw, z.shape[0])
    eps = jax.random.normal(k_eps, z.shape, jnp.float32)
    loss = self.consistency_loss(params, frozen, ctx.target_params, z, context, eps,
                                 t_start, t_end, w, dropout_rng=k_dropout)
    return loss, {"loss": loss}

  def consistency_loss(self, params, frozen, target_params, z, context, eps, t_start, t_end,
                       w, dropout_rng=None):
    """d(f_theta(z_{n+k}, t_{n+k}), f_theta-(z_n, t_n)) on explicit draws (the parity test
    feeds the reference script's)."""
    alpha, sigma = self._alpha_sigma(t_start, z)
    z_start = alpha * z + sigma * eps    # diffusers' add_noise
    student = self.student_unet(params, frozen)
    pred = self.consistency(student, z_start, t_start, context, w, train=True,
                            dropout_rng=dropout_rng)
    z_end = jax.lax.stop_gradient(
        self.next_point(frozen, z, eps, z_start, t_start, t_end, context, w))
    target_unet = target_params if self.uses_target() else student
    target = jax.lax.stop_gradient(
        self.consistency(jax.lax.stop_gradient(target_unet), z_end, t_end, context, w))
    if self.loss_type == "huber":
      return lcm.pseudo_huber(pred, target, self.huber_c)
    return jnp.mean(jnp.square(pred - target))

  # -- sampling ------------------------------------------------------------------------------

  def check_sample_options(self, num_steps: int, sampler: Optional[str] = None, **_):
    sampler = sampler or self.sample_cfg.sampler
    if sampler != "lcm":
      raise ValueError(f"an LCM samples with the 'lcm' sampler (LCMScheduler), not "
                       f"{sampler!r}")
    if not 1 <= int(num_steps) <= self.original_steps:
      raise ValueError(f"an LCM samples with 1 to {self.original_steps} steps (its training "
                       f"grid), got {num_steps}")

  def sample_latents(self, params, noise, keys, labels, num_steps: int,
                     sampler: Optional[str] = None, guidance: float = 0.0, prompt_ids=None,
                     negative_prompt_ids=None, callback=None):
    """Scaled latents from LCM multistep sampling (`params` from sampling_params); the
    re-noising noise of step i for image j is drawn from fold_in(keys[j], i)."""
    del callback
    self.check_sample_options(num_steps, sampler)
    b = noise.shape[0]
    ids = self.prompt_ids_for(labels, b, prompt_ids)
    ids = jnp.broadcast_to(jnp.asarray(ids, jnp.int32), (b, ids.shape[-1]))
    context = self.parts.encode_text(params["text_encoder"], ids)
    ts = lcm.inference_timesteps(num_steps, self.T, self.original_steps)
    w = jnp.full((b,), float(guidance), jnp.float32)
    if self.w_embedding or not guidance:
      x0_fn = lambda z, t: self._x0(params["unet"], z, t, context, w)
    else:  # classifier-free guidance on a student without a w input (LCM-LoRA)
      negative = self.empty_prompt_ids if negative_prompt_ids is None else negative_prompt_ids
      null = jnp.broadcast_to(self.parts.encode_text(params["text_encoder"],
                                                     jnp.asarray(negative))[:1],
                              context.shape)
      wc = float(guidance)
      x0_fn = lambda z, t: ((1.0 + wc) * self._x0(params["unet"], z, t, context, w)
                            - wc * self._x0(params["unet"], z, t, null, w))
    noises = jax.vmap(lambda k: jax.vmap(
        lambda i: jax.random.normal(jax.random.fold_in(k, i), noise.shape[1:]))(
            jnp.arange(len(ts))))(keys)
    return lcm.multistep_sample(x0_fn, noise, ts, self.schedule.alphas_cumprod,
                                jnp.swapaxes(noises, 0, 1), self.timestep_scaling)

  def _x0(self, unet_params, z, t, context, w):
    out = network_fn(self.net, unet_params)(z, jnp.full((z.shape[0],), t, jnp.float32),
                                            self._w_cond(context, w))
    alpha, sigma = self._alpha_sigma(jnp.full((z.shape[0],), t, jnp.int32), z)
    return self.param.to_x(out.astype(jnp.float32), z, alpha, sigma)


class LatentConsistencyFinetuning(LatentConsistencyDistillation):
  """LCF: consistency fine-tuning of an LCM on image-caption data, without a teacher."""

  name = "lcf"

  def __init__(self, net, config):
    # Before LCD's own checks: those would ask a LoRA student for w_embedding=False, a
    # fix that leads here anyway.
    if int(config.method.get("lora_rank", 0) or 0):
      raise ValueError("lcf fine-tunes a whole LCM; LoRA adapters are for distillation "
                       "(method lcd with lora_rank > 0): set method.lora_rank=0")
    super().__init__(net, config)

  @functools.cached_property
  def _teacher(self):
    """The LCM the student starts from: method.init_workdir (an lcd / lcf run) or
    method.pretrained (an LCM folder, e.g. the LCM_Dreamshaper_v7 layout)."""
    c = self.cfg
    if c.get("init_workdir"):
      wd = c.init_workdir
      tcfg = runs.load_config(wd)
      if tcfg.method.name not in ("lcd", "lcf") or int(tcfg.method.get("lora_rank", 0) or 0):
        raise ValueError(f"{wd!r} is a {tcfg.method.name!r} run: LCF starts from an LCM "
                         f"(an lcd or lcf run with a w-embedding)")
      run = runs.load_run(wd, c.get("init_params", "ema"))
      params, ident = run.params, f"{wd} step {run.step}"
    elif c.get("pretrained"):
      from cm_jax.nets import sd_folder  # pylint: disable=g-import-not-at-top
      params = sd_folder.load_sd_folder(c.pretrained, components=("unet",)).unet_params
      ident = f"{c.pretrained} sha256 {teachers.params_sha256(params)[:16]}"
    else:
      raise ValueError("lcf starts from an LCM: set --config.method.init_workdir=<an lcd "
                       "run> or --config.method.pretrained=<an LCM diffusers folder>")
    self._check_fits(params, self.net, "starting LCM")
    return jax.device_get(params), ident

  def initial_params(self, params, frozen):
    if frozen is None:
      return params
    return teachers.init_from(params, frozen["unet"])

  def step_frozen(self, frozen):
    """The steps need no teacher: the LCM that seeded the student stays off the devices."""
    return {k: v for k, v in frozen.items() if k != "unet"}

  def next_point(self, frozen, z, eps, z_start, t_start, t_end, context, w):
    """z_n = alpha_n z + sigma_n eps: the same data latent and noise as z_{n+k}."""
    alpha, sigma = self._alpha_sigma(t_end, z)
    return alpha * z + sigma * eps
