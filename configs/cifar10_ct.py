"""Consistency training with LPIPS on unconditional CIFAR-10 (NCSN++), CM Algorithm 3.

  python train.py --config configs/cifar10_ct.py --workdir runs/cifar10_ct \
      --config.method.lpips_weights=lpips_vgg16.npz
  python sample.py --workdir runs/cifar10_ct --num 50000 --steps 1 --out ct_1step.npz
  python -m cm_jax.cli.cm_search --workdir runs/cifar10_ct       # two-step index
  python sample.py --workdir runs/cifar10_ct --num 50000 --ts 0,<best>,150 --out ct_2step.npz

Expected (Song et al. 2023, Table 1): FID 8.70 in one step, 5.83 in two.
Hyper-parameters: openai/consistency_models_cifar10 configs/cifar10_ve_ct_adaptive.py:
RAdam lr 2e-4 (beta 0.9/0.999, eps 1e-8, no warm-up, no clipping), batch 512, 800k
iterations, EMA 0.9999 for sampling, adaptive N(k) and mu(k) with s0 = 2, s1 = 150,
mu0 = 0.9 (CM Appendix C; mu(k) with the reference's N(k) - 1, see cm_schedules), LPIPS
(max pooling), uniform weighting, dropout 0, random init, c_noise = ln(sigma)/4.
`:paper` takes the CM paper's Table 3 learning rate, 4e-4, and its mu(k) = exp(s0 ln mu0 /
N(k)); the default follows the reference code, which produced the published checkpoints.
Two-step sampling visits (0, t, 150) on the final 151-level grid; the CIFAR-10 t is not
published: find it with cm_search (the default 75 is only a starting point).
"""
from cm_jax.methods.consistency import method_config, sample_config_fields
from configs import cifar10_edm
from configs.base import check_arg


def get_config(arg: str = ""):
  variant = check_arg(arg, allowed=("", "tiny", "paper"))
  c = cifar10_edm.get_config("tiny" if variant == "tiny" else "")
  c.model.update(dropout=0.0)
  c.precond.update(c_noise="edm")
  c.method = method_config("ct", scale_mode="progressive", target_ema_mode="adaptive",
                           s0=2, s1=150, mu0=0.9, mu_variant="reference", metric="lpips",
                           lpips_weights="lpips_vgg16.npz", lpips_pooling="max",
                           weighting="uniform")
  c.optim.update(name="radam", lr=2e-4, b1=0.9, b2=0.999, eps=1e-8, warmup_steps=0,
                 grad_clip=0.0, weight_decay=0.0)
  if variant == "paper":
    c.optim.update(lr=4e-4)
    c.method.update(mu_variant="paper")
  c.ema.update(rates=(0.9999,), halflife_kimg=0.0)
  c.training.update(batch_size=512, num_steps=800_000, log_every=100, save_every=5_000,
                    sample_every=10_000)
  c.sample.update(params="ema", batch_size=500,
                  **sample_config_fields(ts=(0, 75, 150), grid_points=151))
  if variant == "tiny":
    c.method.update(metric="l2")
    c.training.update(batch_size=8, num_steps=2, log_every=1, save_every=2, sample_every=0)
    c.sample.update(batch_size=8, grid_size=8)
  return c
