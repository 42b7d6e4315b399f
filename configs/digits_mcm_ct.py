"""Multistep consistency training (Heek, Hoogeboom & Salimans 2024, Algorithm 1 with
x_teacher = x: no teacher network) on the digits, started from the digits VP teacher's
weights as the paper starts from a diffusion model.

  python train.py --config configs/digits_vp.py --workdir runs/digits_vp   # the start
  python train.py --config configs/digits_mcm_ct.py --workdir runs/digits_mcm_ct4 \
      --config.method.student_steps=4
  python sample.py --workdir runs/digits_mcm_ct4 --out runs/digits_mcm_ct4/samples.npz

The digits settings of configs/digits_mcm_cd.py (1,000 steps, N_teacher 64 -> 1280 over
800); only the pairs differ: z_s = alpha_s x + sigma_s eps (DDIM with the data itself).
`:tiny` starts from runs/digits_vp_tiny with S = 2.

Paper (Table 1, ImageNet 64, large model, FID): 6.4 / 2.3 / 1.6 / 1.5 at 1 / 2 / 4 / 8 steps.
"""
from configs import digits_mcm_cd
from configs.base import check_arg


def get_config(arg: str = ""):
  variant = check_arg(arg)
  c = digits_mcm_cd.get_config(variant)  # the same run, only the pairs differ
  c.method.name = "mcm_ct"
  if variant != "tiny":
    c.method.student_steps = 4
  return c
