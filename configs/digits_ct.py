"""Consistency training (CM Algorithm 3) on the 8x8 digits: no teacher.

  python train.py --config configs/digits_ct.py --workdir runs/digits_ct
  python sample.py --workdir runs/digits_ct --steps 1 --out runs/digits_ct/onestep.npz
  python sample.py --workdir runs/digits_ct --steps 2 --out runs/digits_ct/twostep.npz

The CIFAR-10 curriculum of Song et al. 2023 (Appendix C: s0 = 2, s1 = 150, mu0 = 0.9,
adaptive N(k) and mu(k), Euler step with the data as denoiser, uniform weighting) on the
digits with the squared l2 metric, sized for a 2-core CPU (a few minutes). CT samples are
blurrier than CD's at this size; `:tiny` runs a few steps in seconds.
"""
from cm_jax.methods.consistency import method_config, sample_config_fields
from configs import digits_edm
from configs.base import check_arg


def get_config(arg: str = ""):
  variant = check_arg(arg)
  c = digits_edm.get_config(variant)
  c.model.update(dropout=0.0)
  c.method = method_config("ct", scale_mode="progressive", target_ema_mode="adaptive",
                           s0=2, s1=150, mu0=0.9, metric="l2", weighting="uniform")
  c.optim.update(name="radam", lr=4e-4, b1=0.9, b2=0.999, eps=1e-8, warmup_steps=0,
                 grad_clip=0.0)
  c.ema.update(rates=(0.999,), halflife_kimg=0.0)
  c.training.update(batch_size=128, num_steps=3000, log_every=50, save_every=1000,
                    sample_every=1000)
  # Algorithm 1 on the final training grid N(K) = s1 + 1 = 151 levels.
  c.sample.update(params="ema", **sample_config_fields(ts=(0, 75, 150), grid_points=151))
  if variant == "tiny":
    c.training.update(batch_size=16, num_steps=4, log_every=2, save_every=2, sample_every=0)
    c.sample.update(grid_size=16, batch_size=16)
  return c
