"""Consistency distillation (CD), consistency training (CT) and improved CT (iCT).

Song, Dhariwal, Chen, Sutskever 2023, "Consistency Models" (CM) and Song & Dhariwal 2023,
"Improved Techniques for Training Consistency Models" (iCT), checked against the reference
code openai/consistency_models (PyTorch; ImageNet 64, LSUN) and
openai/consistency_models_cifar10 (JAX; CIFAR-10).

The consistency function (CM eq. 5, Appendix C scalings; cm_jax.diffusion.preconditioning):
  f(x, sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x, c_noise(sigma)),
with f(x, sigma_min) = x exactly. Every loss below is CM eq. 7 / iCT eq. 4 on a pair of
adjacent levels sigma_n > sigma_{n+1} of the Karras grid (descending; cm_schedules):
  L = E[ lambda(sigma_n) d( f_theta(x_n, sigma_n), f_target(x_{n+1}, sigma_{n+1}) ) ],
  x_n = x + sigma_n z, the target output under stop-gradient, the SAME dropout key for
  online and target evaluations (both references do so: the PyTorch one restores the RNG
  state, the JAX one passes one dropout_rng; iCT Sec. 3.1 recommends it).

* 'cd'  (CM Algorithm 2): x_{n+1} = one ODE step of the frozen EDM teacher from x_n
        (Heun by default, Euler on request); N fixed (18 CIFAR-10, 40 ImageNet 64);
        target = EMA of the online net at rate mu (mu = 0: the online net itself under
        stop-gradient, no copy kept); the student starts from the teacher's weights.
* 'ct'  (CM Algorithm 3): the teacher step is an Euler step with the data as denoiser,
        i.e. x_{n+1} = x + sigma_{n+1} z with the same z; N(k) and mu(k) follow the CM
        curriculum (cm_schedules.ct_num_scales / ct_target_ema).
* 'ict' (iCT): CT with pseudo-Huber d (c = 0.00054 sqrt(d)), pair index n drawn from the
        discretised log-normal (P_mean -1.1, P_std 2.0), lambda = 1/(sigma_n - sigma_{n+1}),
        the exponential N(k) curriculum (s0 10, s1 1280) and NO EMA target: the target is
        the online parameters under stop-gradient (uses_target() is False).

Frozen networks a loss reads (the CD teacher, the LPIPS metric) reach it through
`ctx.teacher_params`, a dict {'teacher': ..., 'lpips': ...} built by `load_teacher()`:
the trainer passes it to every step as a replicated argument (never a baked-in constant).

K, the total number of training steps every curriculum is scaled by, is
`config.method.total_steps`, or `config.training.num_steps` when that is 0. train.py's
`--steps` only stops the loop early; it does not change K, so a run cut short and resumed
follows the same schedule.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from cm_jax.conditioning import guided_denoiser
from cm_jax.diffusion import preconditioning, solvers
from cm_jax.methods import cm_metrics, cm_sampling, cm_schedules, teachers
from cm_jax.methods.base import LossContext, network_fn
from cm_jax.nets import example_inputs

# Runs that can teach CD: diffusion methods with a `denoiser(params)` in VE coordinates.
TEACHER_METHODS = ("edm", "vp")


def method_config(name: str, **overrides) -> ml_collections.ConfigDict:
  """Every config.method field a consistency method reads, with the papers' defaults.

  Configs start from this so each field exists (and can be set from the command line).
  """
  common = dict(
      name=name,
      metric="l2",             # l2 | l1 | pseudo_huber | lpips (cm_metrics)
      huber_c=0.0,             # pseudo-Huber c; 0 = iCT's 0.00054 sqrt(H W C)
      lpips_weights="",        # .npz from `python -m cm_jax.nets.lpips_convert`
      lpips_pooling="max",     # max: LPIPS / CIFAR-10 JAX reference; avg: piq (PyTorch reference)
      weighting="uniform",     # cm_schedules.WEIGHTINGS
      same_dropout=True,       # one dropout key for online and target (both references)
      total_steps=0,           # K of the curricula; 0 = config.training.num_steps
  )
  if name == "cd":
    common.update(
        teacher_workdir="",      # a diffusion run: configs/<data>_edm.py or <data>_vp.py
        teacher_params="ema",    # which weights of the teacher run: ema | online | an EMA name
        teacher_step=-1,         # teacher checkpoint step; -1 = latest
        allow_new_teacher=False,  # resume against another teacher than the run started with
        init_from_teacher=True,  # the student starts from the teacher's weights (both refs)
        teacher_guidance=0.0,    # w > 0: distil the guided teacher (1 + w) D_c - w D_u
        solver="heun",           # heun (CM Table 3) | euler
        num_scales=18,           # N: 18 CIFAR-10, 40 ImageNet 64 (CM Table 3)
        target_ema=0.0,          # mu: 0 CIFAR-10, 0.95 ImageNet 64 (CM Table 3)
    )
  elif name == "ct":
    common.update(
        scale_mode="progressive",    # progressive: N(k) of CM App. C | fixed: num_scales
        num_scales=18,
        target_ema_mode="adaptive",  # adaptive: mu(k) of CM App. C | fixed: target_ema
        target_ema=0.0,
        s0=2, s1=150, mu0=0.9,       # CIFAR-10 (CM Table 3); ImageNet 64: 2, 200, 0.95
        mu_variant="reference",      # reference: exp(s0 ln mu0/(N-1)) | paper: /N (cm_schedules)
    )
  elif name == "ict":
    common.update(
        metric="pseudo_huber", weighting="ict",
        s0=10, s1=1280,              # iCT Sec. 3.5
        index_sampling="lognormal",  # lognormal (iCT Sec. 3.5) | uniform (CM)
        p_mean=-1.1, p_std=2.0,      # iCT Sec. 3.5
    )
  else:
    raise ValueError(f"no consistency method {name!r}; choose cd, ct or ict")
  cfg = ml_collections.ConfigDict(common)
  cfg.update(overrides)
  return cfg


def sample_config_fields(*, ts=(0, 22, 39), grid_points: int = 40) -> dict:
  """config.sample fields of a consistency model: one-step by default, Algorithm 1 with
  `ts` (indices into a `grid_points`-level Karras grid) for --steps > 1."""
  return dict(sampler="multistep", num_steps=1, ts=tuple(ts), grid_points=int(grid_points))


class _Consistency:
  """What CD, CT and iCT share: f, the pair loss, the sampler, the frozen extras."""

  name = ""

  def __init__(self, net, config):
    self.net = net
    self.config = config
    self.precond = config.precond
    self.cfg = config.method
    self.sample_cfg = config.sample
    self.conditional = config.data.num_classes > 0
    self.total_steps = int(self.cfg.get("total_steps", 0) or config.training.num_steps)
    if self.cfg.metric not in cm_metrics.METRICS:
      raise ValueError(f"unknown metric {self.cfg.metric!r}; choose from {cm_metrics.METRICS}")
    if self.cfg.weighting not in cm_schedules.WEIGHTINGS:
      raise ValueError(f"unknown weighting {self.cfg.weighting!r}; "
                       f"choose from {cm_schedules.WEIGHTINGS}")
    self._lpips_net = None
    if self.cfg.metric == "lpips":
      from cm_jax.nets.lpips import LPIPS  # pylint: disable=g-import-not-at-top
      self._lpips_net = LPIPS(pooling=self.cfg.lpips_pooling)

  # -- the consistency function ------------------------------------------------------------

  def consistency_fn(self, params, *, train: bool = False, dropout_rng=None):
    """f(x, sigma, labels, cond) of CM eq. 5 with the Appendix C boundary scalings."""
    return preconditioning.make_denoiser(
        network_fn(self.net, params, train=train, dropout_rng=dropout_rng),
        parameterization="consistency", sigma_data=self.precond.sigma_data,
        sigma_min=self.precond.sigma_min, c_noise=self.precond.c_noise)

  def _sigmas(self, n, num_scales):
    p = self.precond
    t = cm_schedules.karras_sigma(n, num_scales, p.sigma_min, p.sigma_max, p.rho)
    t_next = cm_schedules.karras_sigma(n + 1, num_scales, p.sigma_min, p.sigma_max, p.rho)
    return t, t_next

  def _huber_c(self, image_shape):
    return float(self.cfg.huber_c) or cm_metrics.pseudo_huber_c(image_shape)

  def _pair_loss(self, params, target_params, x_t, t, x_next, t_next, labels, dropout_rng,
                 aux):
    """mean_b lambda_b d(f_theta(x_t, t), sg f_target(x_next, t_next)) and its parts."""
    online = self.consistency_fn(params, train=True, dropout_rng=dropout_rng)(x_t, t, labels)
    tgt_rng = dropout_rng if self.cfg.same_dropout else jax.random.fold_in(dropout_rng, 1)
    target = self.consistency_fn(target_params, train=True, dropout_rng=tgt_rng)(
        x_next, t_next, labels)
    target = jax.lax.stop_gradient(target)
    lpips_fn = None
    if self._lpips_net is not None:
      if not aux or "lpips" not in aux:
        raise ValueError("metric 'lpips' needs its weights: call load_teacher() and pass its "
                         "result as teacher_params (the trainer does this)")
      lpips_fn = lambda a, b: self._lpips_net.apply({"params": aux["lpips"]}, a, b)
    d = cm_metrics.distance(online, target, self.cfg.metric,
                            huber_c=self._huber_c(x_t.shape[1:]), lpips_fn=lpips_fn)
    w = cm_schedules.loss_weight(self.cfg.weighting, t, t_next, self.precond.sigma_data)
    loss = jnp.mean(w * d)
    return loss, {"loss": loss, "distance": jnp.mean(d)}

  def _noise_pair(self, x, n, num_scales, rng):
    t, t_next = self._sigmas(n, num_scales)
    z = jax.random.normal(rng, x.shape, jnp.float32)
    bshape = (x.shape[0],) + (1,) * (x.ndim - 1)
    return t, t_next, z, bshape

  # -- frozen extras -------------------------------------------------------------------------

  def load_teacher(self):
    """Frozen networks the loss reads: {'lpips': ...} (plus 'teacher' for CD), or None."""
    aux = {}
    if self.cfg.metric == "lpips":
      from cm_jax.nets import lpips  # pylint: disable=g-import-not-at-top
      aux["lpips"] = lpips.load_params(self.cfg.lpips_weights)
    return aux or None

  # -- sampling ------------------------------------------------------------------------------

  def resolve_ts(self, num_steps: int, ts=None, grid_points=None) -> tuple[int, ...]:
    """The grid indices Algorithm 1 visits for `num_steps` evaluations (see sample())."""
    grid_points = int(grid_points or self.sample_cfg.get("grid_points", 0) or 40)
    if ts is not None:
      ts = cm_sampling.check_ts(ts, grid_points)
      k = cm_sampling.ts_evaluations(ts, grid_points)
      if num_steps not in (None, k):
        raise ValueError(f"ts {ts} makes {k} steps on a {grid_points}-point grid but "
                         f"num_steps is {num_steps}")
      return ts
    cfg_ts = tuple(self.sample_cfg.get("ts", ()) or ())
    if len(cfg_ts) - 1 == num_steps:
      return cm_sampling.check_ts(cfg_ts, grid_points)
    return cm_sampling.even_ts(num_steps, grid_points)

  def sample(self, params, noise, keys, labels: Optional[jax.Array], num_steps: int,
             sampler: Optional[str] = None, ts=None, grid_points=None, **options):
    """Images in [-1, 1]: one-step f(sigma_max z, sigma_max) when num_steps == 1 and no `ts`;
    else CM Algorithm 1 on the Karras levels at `ts` (default: config.sample.ts when it has
    num_steps + 1 entries, else num_steps + 1 evenly spaced indices) of a
    `grid_points`-level grid (default config.sample.grid_points)."""
    if options:
      raise TypeError(f"unexpected sampler options for a consistency model: {sorted(options)}")
    if sampler not in (None, "multistep", "onestep"):
      raise ValueError(f"consistency models sample with 'multistep' (CM Algorithm 1) or "
                       f"'onestep', not {sampler!r}")
    p = self.precond
    f = self.consistency_fn(params)
    labels = labels if self.conditional else None
    if ts is None and (num_steps == 1 or sampler == "onestep"):
      return cm_sampling.sample_onestep(f, noise, p.sigma_max, labels)
    grid_points = int(grid_points or self.sample_cfg.get("grid_points", 0) or 40)
    ts = self.resolve_ts(num_steps, ts, grid_points)
    # f at every evaluated level; the loop's last level, sigma_min, adds no noise.
    levels = np.append(cm_sampling.evaluated_levels(ts, grid_points, p.sigma_min, p.sigma_max,
                                                    p.rho), np.float32(p.sigma_min))
    return cm_sampling.sample_multistep(f, noise, levels, keys, labels,
                                        sigma_min=p.sigma_min, sigma_max=p.sigma_max)


class ConsistencyDistillation(_Consistency):
  """CD, CM Algorithm 2: distil an EDM teacher's PF-ODE into a consistency model."""

  name = "cd"

  def __init__(self, net, config):
    super().__init__(net, config)
    if self.cfg.solver not in ("heun", "euler"):
      raise ValueError(f"unknown CD solver {self.cfg.solver!r}; choose heun or euler")
    if int(self.cfg.num_scales) < 2:
      raise ValueError("CD needs num_scales N >= 2")
    self._teacher_precond = None
    self._teacher_method = None

  def uses_target(self) -> bool:
    return float(self.cfg.target_ema) > 0.0

  def target_decay(self, step):
    return jnp.asarray(self.cfg.target_ema, jnp.float32)

  # -- the teacher ---------------------------------------------------------------------------

  def load_teacher(self):
    aux = super().load_teacher() or {}
    aux["teacher"] = self._load_teacher_params()
    return aux

  def _load_teacher_params(self):
    run = teachers.load_teacher_run(self.cfg, "consistency distillation",
                                    "an EDM or VP run directory", self._check_teacher_config)
    self._teacher_method = run.method
    self.teacher_identity = run.identity()
    if self.cfg.init_from_teacher:
      want = jax.eval_shape(lambda: self.net.init(
          {"params": jax.random.key(0)}, *example_inputs(self.config), train=False)["params"])
      missing = teachers.shared_params_mismatch(run.params, want)
      if missing:
        raise ValueError(f"CD teacher {run.workdir!r}: its parameters do not fit the student "
                         f"network (different architecture: {missing}); use the teacher's "
                         f"model config")
    self._teacher_precond = run.config.precond
    return run.params

  def _check_teacher_config(self, tcfg, wd: str) -> None:
    """One-line ValueError when the teacher cannot be distilled into this student.

    Any diffusion run can teach (EDM, or VP through its VE-coordinate adapter): the teacher
    is evaluated with its own network, schedule and parameterisation. What must match is
    the data it models; and, when the student starts from the teacher's weights, the
    network (except layers only the student has, e.g. a guidance-strength embedding, which
    start fresh) and the EDM input scalings the student's consistency function feeds it.
    """
    problems = []
    if tcfg.method.name not in TEACHER_METHODS:
      problems.append(f"method is {tcfg.method.name!r}, not one of {TEACHER_METHODS}")
    problems += teachers.data_mismatches(tcfg, self.config)
    if self.cfg.init_from_teacher:
      if tcfg.method.name != "edm":
        problems.append(f"the student starts from the teacher's weights, but a "
                        f"{tcfg.method.name!r} network takes other inputs than the student's "
                        f"EDM scalings; set --config.method.init_from_teacher=False")
      problems += teachers.model_mismatches(tcfg, self.config)
      for key in ("c_noise", "sigma_data"):
        if tcfg.precond.get(key) != self.precond.get(key):
          problems.append(f"precond.{key} {tcfg.precond.get(key)!r} != student's "
                          f"{self.precond.get(key)!r} (the student starts from its weights)")
    problems += teachers.guidance_problems(tcfg,
                                           float(self.cfg.get("teacher_guidance", 0.0) or 0.0))
    if problems:
      raise ValueError(f"CD teacher {wd!r} does not match the student: " + "; ".join(problems))

  def initial_params(self, params, teacher_params):
    """The teacher's weights (CM Sec. 6 / both references), if loaded and asked for; layers
    the teacher does not have (a new guidance-strength embedding) keep their fresh init."""
    return teachers.start_from_teacher(params, teacher_params, self.cfg.init_from_teacher)

  def teacher_denoiser(self, teacher):
    """D(x; sigma, cond) of the frozen teacher in eval mode: its own method's denoiser (EDM
    preconditioning, or a VP network through its adapter), guided with
    method.teacher_guidance w when set. Without a loaded teacher run (tests that pass
    weights directly) it is the student's network with EDM preconditioning."""
    if self._teacher_method is not None:
      denoise = self._teacher_method.denoiser(teacher)
      null = getattr(self._teacher_method, "null_class", None)
    else:
      tp = self._teacher_precond or self.precond
      denoise = preconditioning.make_denoiser(
          network_fn(self.net, teacher, train=False), parameterization="edm",
          sigma_data=tp.sigma_data, c_noise=tp.c_noise)
      null = None
    w = float(self.cfg.get("teacher_guidance", 0.0) or 0.0)
    if w:
      denoise = guided_denoiser(denoise, w, null)
    return denoise

  # -- the loss ------------------------------------------------------------------------------

  def loss(self, params, batch, rng, ctx: LossContext):
    aux = ctx.teacher_params
    if not aux or "teacher" not in aux:
      raise ValueError("CD needs the teacher's parameters in ctx.teacher_params['teacher'] "
                       "(from load_teacher())")
    x = jnp.asarray(batch["image"], jnp.float32)
    labels = batch["label"] if self.conditional else None
    k_idx, k_noise, k_drop = jax.random.split(rng, 3)
    num_scales = int(self.cfg.num_scales)
    n = cm_schedules.sample_uniform_index(k_idx, x.shape[0], num_scales)  # n ~ U{0..N-2}
    t, t_next, z, bshape = self._noise_pair(x, n, num_scales, k_noise)
    x_t = x + t.reshape(bshape) * z
    # One teacher PF-ODE step from sigma_n to sigma_{n+1} (CM Alg. 2; EDM Alg. 1 Heun step).
    step = solvers.heun_step if self.cfg.solver == "heun" else solvers.euler_step
    x_next = jax.lax.stop_gradient(
        step(self.teacher_denoiser(aux["teacher"]), x_t, t, t_next, labels))
    target = ctx.target_params if self.uses_target() else jax.lax.stop_gradient(params)
    loss, metrics = self._pair_loss(params, target, x_t, t, x_next, t_next, labels, k_drop, aux)
    return loss, metrics


class ConsistencyTraining(_Consistency):
  """CT, CM Algorithm 3: no teacher; the data is the denoiser of the Euler step."""

  name = "ct"

  def num_scales(self, step):
    if self.cfg.scale_mode == "progressive":
      return cm_schedules.ct_num_scales(step, self.total_steps, self.cfg.s0, self.cfg.s1)
    if self.cfg.scale_mode == "fixed":
      return jnp.asarray(int(self.cfg.num_scales), jnp.int32)
    raise ValueError(f"unknown CT scale_mode {self.cfg.scale_mode!r}; choose progressive or fixed")

  def uses_target(self) -> bool:
    return not (self.cfg.target_ema_mode == "fixed" and float(self.cfg.target_ema) == 0.0)

  def target_decay(self, step):
    if self.cfg.target_ema_mode == "adaptive":
      return cm_schedules.ct_target_ema(step, self.total_steps, self.cfg.s0, self.cfg.s1,
                                        self.cfg.mu0, self.cfg.mu_variant)
    if self.cfg.target_ema_mode == "fixed":
      return jnp.asarray(self.cfg.target_ema, jnp.float32)
    raise ValueError(f"unknown CT target_ema_mode {self.cfg.target_ema_mode!r}; "
                     "choose adaptive or fixed")

  def _sample_index(self, rng, batch, num_scales):
    return cm_schedules.sample_uniform_index(rng, batch, num_scales)

  def _target(self, params, ctx):
    return ctx.target_params if self.uses_target() else jax.lax.stop_gradient(params)

  def loss(self, params, batch, rng, ctx: LossContext):
    x = jnp.asarray(batch["image"], jnp.float32)
    labels = batch["label"] if self.conditional else None
    k_idx, k_noise, k_drop = jax.random.split(rng, 3)
    num_scales = self.num_scales(ctx.step)
    n = self._sample_index(k_idx, x.shape[0], num_scales)
    t, t_next, z, bshape = self._noise_pair(x, n, num_scales, k_noise)
    # CM Alg. 3: the Euler step with the data as denoiser from x + t z lands on x + t' z.
    x_t = x + t.reshape(bshape) * z
    x_next = x + t_next.reshape(bshape) * z
    loss, metrics = self._pair_loss(params, self._target(params, ctx), x_t, t, x_next, t_next,
                                    labels, k_drop, ctx.teacher_params)
    metrics["num_scales"] = num_scales.astype(jnp.float32)
    metrics["target_ema"] = self.target_decay(ctx.step) if self.uses_target() else jnp.zeros(())
    return loss, metrics


class ImprovedConsistencyTraining(ConsistencyTraining):
  """iCT: CT with pseudo-Huber, log-normal pairs, 1/(sigma_n - sigma_n+1), no EMA target."""

  name = "ict"

  def __init__(self, net, config):
    super().__init__(net, config)
    if self.cfg.index_sampling not in ("lognormal", "uniform"):
      raise ValueError(f"unknown iCT index_sampling {self.cfg.index_sampling!r}; "
                       "choose lognormal or uniform")

  def num_scales(self, step):
    return cm_schedules.ict_num_scales(step, self.total_steps, self.cfg.s0, self.cfg.s1)

  def uses_target(self) -> bool:
    return False  # iCT Sec. 3.2: the teacher is the student under stop-gradient

  def target_decay(self, step):
    return jnp.zeros((), jnp.float32)

  def _sample_index(self, rng, batch, num_scales):
    if self.cfg.index_sampling == "uniform":
      return cm_schedules.sample_uniform_index(rng, batch, num_scales)
    p = self.precond
    return cm_schedules.sample_lognormal_index(
        rng, batch, num_scales, cm_schedules.ict_max_scales(self.cfg.s1),
        p_mean=self.cfg.p_mean, p_std=self.cfg.p_std, sigma_min=p.sigma_min,
        sigma_max=p.sigma_max, rho=p.rho)
