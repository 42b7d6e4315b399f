"""Improved consistency training (Song & Dhariwal 2023) on the 8x8 digits.

  python train.py --config configs/digits_ict.py --workdir runs/digits_ict
  python sample.py --workdir runs/digits_ict --steps 1 --out runs/digits_ict/onestep.npz
  python sample.py --workdir runs/digits_ict --steps 2 --out runs/digits_ict/twostep.npz

iCT's recipe: pseudo-Huber metric with c = 0.00054 sqrt(d) (d = 64 here), log-normal pair
sampling (P_mean -1.1, P_std 2.0), lambda = 1/(sigma_n - sigma_n+1), exponential N(k)
curriculum with s0 = 10, s1 = 1280, no EMA target, RAdam at 1e-4, dropout 0.3 (the
CIFAR-10 value); the run length and sampling EMA are the digits' own (about 30 minutes on
a loaded 2-core CPU). `:tiny` runs a few steps in seconds.

Expected (evaluate.py --ref digits --detector digits, 1000 samples): one step fd_digits
~22, class accuracy ~0.94 (digits, but rougher than CD's ~6.5 from its teacher). At this
training length the two-step sampler does not beat one step (fd ~30-40 for a middle
level sigma in 0.3..4; cm_search finds p -> 1, i.e. one step).
"""
from cm_jax.methods.consistency import method_config, sample_config_fields
from configs import digits_edm
from configs.base import check_arg


def get_config(arg: str = ""):
  variant = check_arg(arg)
  c = digits_edm.get_config(variant)
  c.model.update(dropout=0.3 if variant != "tiny" else 0.0)
  c.method = method_config("ict")  # iCT defaults: pseudo_huber, ict weighting, 10/1280, lognormal
  c.optim.update(name="radam", lr=1e-4, b1=0.9, b2=0.999, eps=1e-8, warmup_steps=0,
                 grad_clip=0.0)
  c.ema.update(rates=(0.999,), halflife_kimg=0.0)
  c.training.update(batch_size=128, num_steps=3000, log_every=50, save_every=1000,
                    sample_every=1000)
  # Algorithm 1 on the final grid N(K) = s1 + 1 = 1281 levels; the middle level is
  # sigma = 0.821, as configs/cifar10_ict.py.
  c.sample.update(params="ema", **sample_config_fields(ts=(0, 788, 1280), grid_points=1281))
  if variant == "tiny":
    c.training.update(batch_size=16, num_steps=4, log_every=2, save_every=2, sample_every=0)
    c.sample.update(grid_size=16, batch_size=16)
  return c
