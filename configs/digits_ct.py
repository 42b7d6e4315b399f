"""Consistency training (CM Algorithm 3) on the 8x8 digits: no teacher.

  python train.py --config configs/digits_ct.py --workdir runs/digits_ct
  python sample.py --workdir runs/digits_ct --steps 1 --out runs/digits_ct/onestep.npz
  python sample.py --workdir runs/digits_ct --steps 2 --out runs/digits_ct/twostep.npz

CM Algorithm 3 as on CIFAR-10 (adaptive N(k) and mu(k) of CM Appendix C with the
reference code's mu(k), Euler step with the data as denoiser, uniform weighting, RAdam,
no warm-up) with the squared l2 metric and two digits choices: s1 = 30 and mu0 = 0.5
instead of CIFAR-10's 150 and 0.9. With the CIFAR-10 constants, 3000 steps do not get
past the grey mean (fd_digits ~840): the EMA target (mu(K) = exp(2 ln 0.9 / 150) ~ 0.9986
at the end of the run, N(K) = 151; with s1 = 30, mu0 = 0.5 it is 0.955, N(K) = 31; values
of cm_schedules.ct_target_ema, reference mu(k)) lets the boundary condition climb the 151
levels far too slowly for a CPU-sized run (the effect iCT
removes by dropping the target EMA). `:tiny` runs a few steps in seconds.

Expected (about 25 minutes on a loaded 2-core CPU; evaluate.py --ref digits --detector
digits, 1000 samples): one step fd_digits ~21, two steps (ts 0,15,30) ~16, class accuracy
~0.97 (CD from the EDM teacher: ~6.5 / ~3.8).
"""
from cm_jax.methods.consistency import method_config, sample_config_fields
from configs import digits_edm
from configs.base import check_arg


def get_config(arg: str = ""):
  variant = check_arg(arg)
  c = digits_edm.get_config(variant)
  c.model.update(dropout=0.0)
  c.method = method_config("ct", scale_mode="progressive", target_ema_mode="adaptive",
                           s0=2, s1=30, mu0=0.5, metric="l2", weighting="uniform")
  c.optim.update(name="radam", lr=4e-4, b1=0.9, b2=0.999, eps=1e-8, warmup_steps=0,
                 grad_clip=0.0)
  c.ema.update(rates=(0.999,), halflife_kimg=0.0)
  c.training.update(batch_size=128, num_steps=3000, log_every=50, save_every=1000,
                    sample_every=1000)
  # Algorithm 1 on the final training grid N(K) = s1 + 1 = 31 levels.
  c.sample.update(params="ema", **sample_config_fields(ts=(0, 15, 30), grid_points=31))
  if variant == "tiny":
    c.training.update(batch_size=16, num_steps=4, log_every=2, save_every=2, sample_every=0)
    c.sample.update(grid_size=16, batch_size=16)
  return c
