"""Improved consistency training (Song & Dhariwal 2023) on unconditional CIFAR-10 (NCSN++).

  python train.py --config configs/cifar10_ict.py --workdir runs/cifar10_ict
  python sample.py --workdir runs/cifar10_ict --num 50000 --steps 1 --out ict_1step.npz
  python sample.py --workdir runs/cifar10_ict --num 50000 --ts 0,788,1280 --out ict_2step.npz

Expected (iCT, Table 2, NCSN++ of the CT size): FID 2.83 in one step, 2.46 in two
(2.51 / 2.24 for iCT-deep, twice the residual blocks: --config.model.num_res_blocks=8).
iCT's recipe: pseudo-Huber metric, c = 0.00054 sqrt(3072) = 0.030; pair indices from the
discretised log-normal with P_mean = -1.1, P_std = 2.0; lambda = 1/(sigma_n - sigma_n+1);
N(k) = min(10 2^floor(k/K'), 1280) + 1; no EMA target (stop-gradient of the online net);
the same dropout key for both evaluations; NCSN++ with Fourier scale 0.02 instead of 16 and
dropout 0.3; batch 1024, 400k iterations, RAdam lr 1e-4 (beta 0.9/0.999, eps 1e-8), EMA
0.99993 for sampling, random init. The two-step ts puts the middle level at sigma = 0.821,
the CIFAR-10 intermediate level of ECT (Geng et al. 2024, ct_eval.py --mid_t default)
following iCT; tune it with `python -m cm_jax.cli.cm_search`.
"""
from cm_jax.methods.consistency import method_config, sample_config_fields
from configs import cifar10_edm
from configs.base import check_arg


def get_config(arg: str = ""):
  variant = check_arg(arg)
  c = cifar10_edm.get_config(variant)
  c.model.update(dropout=0.3, fourier_scale=0.02)
  c.precond.update(c_noise="edm")
  c.method = method_config("ict", s0=10, s1=1280, p_mean=-1.1, p_std=2.0,
                           metric="pseudo_huber", weighting="ict", index_sampling="lognormal")
  c.optim.update(name="radam", lr=1e-4, b1=0.9, b2=0.999, eps=1e-8, warmup_steps=0,
                 grad_clip=0.0, weight_decay=0.0)
  c.ema.update(rates=(0.99993,), halflife_kimg=0.0)
  c.training.update(batch_size=1024, num_steps=400_000, log_every=100, save_every=5_000,
                    sample_every=10_000)
  c.sample.update(params="ema", batch_size=500,
                  **sample_config_fields(ts=(0, 788, 1280), grid_points=1281))
  if variant == "tiny":
    c.model.update(dropout=0.0)
    c.training.update(batch_size=8, num_steps=2, log_every=1, save_every=2, sample_every=0)
    c.sample.update(batch_size=8, grid_size=8)
  return c
