"""Multistep consistency distillation (Heek, Hoogeboom & Salimans 2024) on class-conditional ImageNet 64,
from configs/imagenet64_vp.py ('both' output, label dropout 0.1), S = 8 by default.

  python train.py --config configs/imagenet64_vp.py --workdir runs/in64_vp \
      --config.data.data_dir=~/tensorflow_datasets                       # the teacher
  python train.py --config configs/imagenet64_mcm_cd.py --workdir runs/in64_mcm_cd8 \
      --config.data.data_dir=~/tensorflow_datasets --config.method.student_steps=8
  python sample.py --workdir runs/in64_mcm_cd8 --num 50000 --out in64_mcm_cd8.npz

The paper's constants: N_teacher = exp(log 64 + clip(i / 100k, 0, 1)(log 1280 - log 64)),
eta = 0.75 (CD's aDDIM x_var), pseudo-Huber eps 1e-4, weight SNR + 1, the student
initialised from the teacher. Batch 2048 as the teacher; Adam 1e-4, length ours.
Paper (Table 1, large model, FID at 1 / 2 / 4 / 8 steps): 3.2 / 1.9 / 1.6 / 1.4. `:tiny` starts
from runs/in64_vp_tiny.
"""
from configs import imagenet64_vp
from configs.base import check_arg, mcm_fields, mcm_tiny_fields


def get_config(arg: str = ""):
  variant = check_arg(arg)
  c = imagenet64_vp.get_config(variant)
  mcm_fields(c, "mcm_cd", teacher_workdir="runs/in64_vp", student_steps=8,
             anneal_steps=100_000, lr=1e-4)
  c.training.update(batch_size=2048, num_steps=200_000, save_every=2_000, sample_every=10_000)
  if variant == "tiny":
    mcm_tiny_fields(c, "runs/in64_vp_tiny", batch=8)
  return c
