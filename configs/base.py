"""Fields every config has, with EDM's defaults; each configs/<data>_<method>.py edits them.

A field here is a promise: train.py, sample.py and the tests read it by name,
and ml_collections refuses overrides of keys that do not exist, so a typo on
the command line is an error rather than a silently ignored setting.
"""
import ml_collections


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0

  c.data = ml_collections.ConfigDict(dict(
      name="digits",          # digits | tfds | npz | folder
      tfds_name="",           # e.g. cifar10, imagenet_resized/64x64
      data_dir="",            # TFDS data directory ('' = TFDS default)
      split="train",
      path="",                # .npz (arr_0 uint8 NHWC, arr_1 labels) or an image folder
      image_size=8,           # images are resized to this
      channels=1,             # 1 = grey, 3 = RGB; shapes the network
      random_flip=False,
      num_classes=10,         # 0 = unconditional
      num_threads=0,          # reader threads (TFDS / folders want ~16)
      prefetch_buffer_size=500,
      worker_count=0,         # Grain worker processes (0 = read in this process)
      download=False,         # let TFDS download and prepare the data set
  ))

  # Network fields are passed to the Flax module as keywords (cm_jax.nets.build_network).
  # null_class: one more class embedding, the "no label" token that label dropout trains
  # for classifier-free guidance (method.label_dropout > 0 needs it).
  c.model = ml_collections.ConfigDict(dict(name="adm", null_class=False))

  # Karras et al. 2022, Table 1 and eq. 5.
  c.precond = ml_collections.ConfigDict(dict(
      sigma_data=0.5, sigma_min=0.002, sigma_max=80.0, rho=7.0,
      c_noise="edm",          # edm: ln(sigma)/4 | openai: 250 ln(sigma)
  ))

  # EDM training distribution of sigma: ln(sigma) ~ N(P_mean, P_std^2).
  # label_dropout: probability of training on the null class (classifier-free guidance,
  # Ho & Salimans 2022); 0 = a plain conditional model.
  c.method = ml_collections.ConfigDict(dict(name="edm", p_mean=-1.2, p_std=1.2,
                                            label_dropout=0.0))

  # anneal: 'none' (constant after warm-up) | 'linear' (to 0 over anneal_steps; progressive
  # distillation anneals every round anew).
  c.optim = ml_collections.ConfigDict(dict(
      name="adam", lr=1e-3, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0,
      warmup_steps=0, grad_clip=0.0, anneal="none", anneal_steps=0))

  # Fixed-rate EMAs by decay, plus EDM's half-life EMA when halflife_kimg > 0.
  c.ema = ml_collections.ConfigDict(dict(rates=(), halflife_kimg=500.0, rampup_ratio=0.05))

  c.training = ml_collections.ConfigDict(dict(
      batch_size=512,         # the global batch (all devices and processes together)
      num_steps=100_000, log_every=100, save_every=5_000,
      sample_every=5_000, keep_checkpoints=3,
      grad_accum_steps=1,     # k > 1: the batch is split in k microbatches inside the step
                              # (lax.scan), gradients averaged: same update, 1/k activations
      handle_signals=True,    # SIGTERM/SIGINT: finish the step, save, exit 0 (preemption)
  ))

  c.sample = ml_collections.ConfigDict(dict(
      sampler="heun",         # heun (EDM Alg. 1) | euler | ddim | addim | dpmpp_2m | edm_stochastic (EDM Alg. 2)
      num_steps=18,           # grid points; Heun uses 2N-1 network evaluations
      params="ema",           # ema | online | an EMA's name
      grid_size=64,
      batch_size=256,
      guidance=0.0,           # classifier-free guidance w: (1 + w) x_cond - w x_uncond
      clip_denoised=False,    # clip D(x; sigma) to [-1, 1] at every step (not in EDM Alg. 1)
      s_churn=0.0, s_min=0.0, s_max=float("inf"), s_noise=1.0))

  # How the one train step is compiled: 'jit' (a Mesh with named shardings; data
  # parallelism and FSDP) or 'pmap' (legacy: state replicated per device, lax.pmean).
  c.parallel = "jit"
  # Device mesh (parallel='jit'): data x fsdp devices. data = -1 takes every device
  # left after fsdp. The batch is split over both axes; params, EMA copies, target,
  # teacher and optimizer state are sharded over fsdp (each array along its largest
  # dimension fsdp divides) and replicated over data; arrays with fewer than
  # fsdp_min_size elements stay replicated.
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, fsdp_min_size=2**14))
  return c


def check_arg(arg: str, allowed=("", "tiny")) -> str:
  if arg not in allowed:
    raise ValueError(f"unknown config variant {arg!r}; choose from {allowed}")
  return arg


def vp_fields(c, *, prediction: str, loss_weight: str = "snr_trunc",
              label_dropout: float = 0.0) -> None:
  """Turns a base_config() into a VP teacher on diffusion_distillation's cosine schedule."""
  # logSNR(t) = -2 log tan(a t + b) on [-20, 20] (Salimans & Ho 2022; schedules.py there).
  c.schedule = ml_collections.ConfigDict(dict(name="vp_cosine", logsnr_min=-20.0,
                                              logsnr_max=20.0))
  c.method = ml_collections.ConfigDict(dict(
      name="vp",
      prediction=prediction,     # x | eps | v | both (dpm.py mean_type)
      loss_weight=loss_weight,   # constant | snr | snr_trunc | v_mse (dpm.py mean_loss_weight_type)
      label_dropout=label_dropout,
  ))
  # DDIM on u_i = i/N, x_hat clipped at every step (dpm.py eval_clip_denoised=True).
  c.sample.update(sampler="ddim", num_steps=256, clip_denoised=True)
  c.model.update(null_class=label_dropout > 0,
                 out_channels_factor=2 if prediction == "both" else 1)


def pd_training_fields(c, *, lr: float, steps_per_round: int) -> None:
  """The optimizer and EMA of progressive distillation as diffusion_distillation's
  config/*_distill.py set them: Adam at `lr` annealed linearly to 0 over each round, no
  warm-up, no weight decay, grad clip 1, no EMA (ema_decay 0)."""
  c.method.steps_per_round = steps_per_round
  c.optim.update(name="adam", lr=lr, warmup_steps=0, weight_decay=0.0, grad_clip=1.0,
                 anneal="linear", anneal_steps=steps_per_round)
  c.ema.update(rates=(), halflife_kimg=0.0)


def pd_tiny_fields(c, teacher_workdir: str) -> None:
  """The seconds-long `:tiny` progressive distillation: two rounds (4 -> 2 -> 1 steps) of two
  steps each from `teacher_workdir`."""
  c.method.update(teacher_workdir=teacher_workdir, teacher_steps=4)
  pd_training_fields(c, lr=c.optim.lr, steps_per_round=2)
  c.training.update(save_every=2)


def mcm_fields(c, name: str, *, teacher_workdir: str, student_steps: int,
               anneal_steps: int, lr: float) -> None:
  """Turns a VP teacher's config into multistep CD / CT of that teacher (Heek et al. 2024):
  the teacher's network, schedule and output parameterisation (the student starts from its
  weights), the paper's annealed teacher steps 64 -> 1280 over `anneal_steps`, Algorithm 2
  sampling with S steps (sample.num_steps follows method.student_steps, also when it is set
  on the command line), no per-step clipping (Algorithm 2 has none). The optimizer (Adam at
  `lr`, grad clip 1, no warm-up: the run starts from a trained network) is ours; the paper
  does not pin it in what cm_jax reads."""
  # pylint: disable-next=g-import-not-at-top
  from cm_jax.methods.multistep_consistency import SAMPLER, method_config
  c.method = method_config(name, prediction=c.method.prediction,
                           teacher_workdir=teacher_workdir, student_steps=student_steps,
                           teacher_anneal_steps=anneal_steps)
  c.model.update(dropout=0.0)
  c.optim.update(name="adam", lr=lr, warmup_steps=0, weight_decay=0.0, grad_clip=1.0)
  c.sample.update(sampler=SAMPLER, clip_denoised=False)
  # A derived reference (`+ 0`): it follows method.student_steps, and setting
  # sample.num_steps changes only itself (a plain get_ref would also set S).
  c.sample.num_steps = c.method.get_ref("student_steps") + 0


def mcm_tiny_fields(c, teacher_workdir: str, batch: int = 16) -> None:
  """The seconds-long `:tiny` multistep run: S = 2, 4 steps at `batch` from
  `teacher_workdir`."""
  c.method.update(teacher_workdir=teacher_workdir, student_steps=2, teacher_anneal_steps=4)
  c.training.update(batch_size=batch, num_steps=4, log_every=2, save_every=2, sample_every=0)
  c.sample.update(grid_size=batch, batch_size=batch)
