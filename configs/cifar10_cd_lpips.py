"""Consistency distillation with LPIPS on unconditional CIFAR-10 (NCSN++), CM Algorithm 2.

  python train.py --config configs/cifar10_edm.py --workdir runs/cifar10_edm   # the teacher
  python -m cm_jax.nets.lpips_convert --vgg16 vgg16-397923af.pth --lin vgg.pth \
      --out lpips_vgg16.npz
  python train.py --config configs/cifar10_cd_lpips.py --workdir runs/cifar10_cd \
      --config.method.lpips_weights=lpips_vgg16.npz
  python sample.py --workdir runs/cifar10_cd --num 50000 --steps 1 --out cd_1step.npz
  python sample.py --workdir runs/cifar10_cd --num 50000 --ts 0,11,17 --out cd_2step.npz

Expected (Song et al. 2023, Table 1): FID 3.55 in one step, 2.93 in two.
Hyper-parameters: CM paper Table 3 (CIFAR-10, CD) = openai/consistency_models_cifar10
configs/cifar10_ve_cd.py: RAdam lr 4e-4 (beta 0.9/0.999, eps 1e-8, no warm-up -- the
reference's RAdam branch ignores its `warmup` field -- no clipping, no weight decay), batch
512, 800k iterations, EMA 0.9999 for sampling, N = 18, Heun teacher steps, mu = 0 (the
target is the online net under stop-gradient), LPIPS on 224x224 bilinear upsamplings (VGG
max pooling as the JAX reference's lpips-j), uniform weighting, dropout 0, the student
initialised from the EDM teacher (the same NCSN++: configs/cifar10_edm.py; the reference's
teacher used dropout 0.13, which does not change the weights), c_noise = ln(sigma)/4 as the
JAX reference. Two-step ts = (0, 11, 17) on the 18-level grid: the reference notebook
(editing_multistep_sampling.ipynb).
"""
from cm_jax.methods.consistency import method_config, sample_config_fields
from configs import cifar10_edm
from configs.base import check_arg


def get_config(arg: str = ""):
  variant = check_arg(arg)
  c = cifar10_edm.get_config(variant)  # the teacher's network and data
  c.model.update(dropout=0.0)
  c.precond.update(c_noise="edm")
  c.method = method_config("cd", teacher_workdir="runs/cifar10_edm", num_scales=18,
                           solver="heun", target_ema=0.0, metric="lpips",
                           lpips_weights="lpips_vgg16.npz", lpips_pooling="max",
                           weighting="uniform")
  batch = 512
  c.optim.update(name="radam", lr=4e-4, b1=0.9, b2=0.999, eps=1e-8, warmup_steps=0,
                 grad_clip=0.0, weight_decay=0.0)
  c.ema.update(rates=(0.9999,), halflife_kimg=0.0)
  c.training.update(batch_size=batch, num_steps=800_000, log_every=100, save_every=5_000,
                    sample_every=10_000)
  c.sample.update(params="ema", batch_size=500,
                  **sample_config_fields(ts=(0, 11, 17), grid_points=18))
  if variant == "tiny":
    c.method.update(teacher_workdir="runs/cifar10_edm_tiny", metric="l2")
    c.training.update(batch_size=8, num_steps=2, log_every=1, save_every=2, sample_every=0)
    c.sample.update(batch_size=8, grid_size=8)
  return c
