"""Multistep consistency training (Heek, Hoogeboom & Salimans 2024; x_teacher = x, the
student started from the teacher's weights) on class-conditional ImageNet 64, from
configs/imagenet64_vp.py ('both' output, label dropout 0.1), S = 8 by default.

  python train.py --config configs/imagenet64_vp.py --workdir runs/in64_vp \
      --config.data.data_dir=~/tensorflow_datasets                       # the teacher
  python train.py --config configs/imagenet64_mcm_ct.py --workdir runs/in64_mcm_ct8 \
      --config.data.data_dir=~/tensorflow_datasets --config.method.student_steps=8
  python sample.py --workdir runs/in64_mcm_ct8 --num 50000 --out in64_mcm_ct8.npz

configs/imagenet64_mcm_cd.py's settings (the paper's N_teacher anneal over 100k steps,
pseudo-Huber eps 1e-4, weight SNR + 1, the student initialised from the teacher; batch 2048,
Adam 1e-4 and the length ours); only the pairs differ: z_s = alpha_s x + sigma_s eps.
Paper (Table 1, large model, FID at 1 / 2 / 4 / 8 steps): 6.4 / 2.3 / 1.6 / 1.5. `:tiny` starts
from runs/in64_vp_tiny.
"""
from configs import imagenet64_mcm_cd
from configs.base import check_arg


def get_config(arg: str = ""):
  c = imagenet64_mcm_cd.get_config(check_arg(arg))  # the same run, only the pairs differ
  c.method.name = "mcm_ct"
  return c
