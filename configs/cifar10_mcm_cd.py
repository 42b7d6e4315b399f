"""Multistep consistency distillation (Heek, Hoogeboom & Salimans 2024) of the CIFAR-10 VP
teacher (configs/cifar10_vp.py: x prediction, unconditional), S = 8 by default.

  python train.py --config configs/cifar10_vp.py --workdir runs/c10_vp \
      --config.data.data_dir=~/tensorflow_datasets                       # the teacher
  python train.py --config configs/cifar10_mcm_cd.py --workdir runs/c10_mcm_cd8 \
      --config.data.data_dir=~/tensorflow_datasets --config.method.student_steps=8
  python sample.py --workdir runs/c10_mcm_cd8 --num 50000 --out c10_mcm_cd8.npz

The paper's constants (N_teacher annealed exp(log 64 -> log 1280) over I = 100k steps,
aDDIM teacher steps with eta = 0.75, pseudo-Huber eps 1e-4, weight SNR + 1, student from
the teacher). The paper reports no CIFAR-10 multistep number; batch, length and Adam at
1e-4 here are ours. `:tiny` distils runs/c10_vp_tiny.
"""
from configs import cifar10_vp
from configs.base import check_arg, mcm_fields, mcm_tiny_fields


def get_config(arg: str = ""):
  variant = check_arg(arg)
  c = cifar10_vp.get_config(variant)
  mcm_fields(c, "mcm_cd", teacher_workdir="runs/c10_vp", student_steps=8,
             anneal_steps=100_000, lr=1e-4)
  c.training.update(batch_size=512, num_steps=200_000, save_every=5_000, sample_every=10_000)
  if variant == "tiny":
    mcm_tiny_fields(c, "runs/c10_vp_tiny", batch=8)
  return c
