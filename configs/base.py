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
  c.model = ml_collections.ConfigDict(dict(name="adm"))

  # Karras et al. 2022, Table 1 and eq. 5.
  c.precond = ml_collections.ConfigDict(dict(
      sigma_data=0.5, sigma_min=0.002, sigma_max=80.0, rho=7.0,
      c_noise="edm",          # edm: ln(sigma)/4 | openai: 250 ln(sigma)
  ))

  # EDM training distribution of sigma: ln(sigma) ~ N(P_mean, P_std^2).
  c.method = ml_collections.ConfigDict(dict(name="edm", p_mean=-1.2, p_std=1.2))

  c.optim = ml_collections.ConfigDict(dict(
      name="adam", lr=1e-3, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0,
      warmup_steps=0, grad_clip=0.0))

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
      sampler="heun",         # heun (EDM Alg. 1) | euler | edm_stochastic (EDM Alg. 2)
      num_steps=18,           # grid points; Heun uses 2N-1 network evaluations
      params="ema",           # ema | online | an EMA's name
      grid_size=64,
      batch_size=256,
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
