"""Multistep consistency distillation (Heek, Hoogeboom & Salimans 2024, Algorithm 1 with the
aDDIM teacher step) of the digits VP teacher, S segments sampled in S steps (Algorithm 2).

  python train.py --config configs/digits_vp.py --workdir runs/digits_vp   # the teacher
  python train.py --config configs/digits_mcm_cd.py --workdir runs/digits_mcm_cd4 \
      --config.method.student_steps=4
  python sample.py --workdir runs/digits_mcm_cd4 --out runs/digits_mcm_cd4/samples.npz

The paper's method constants (N_teacher annealed 64 -> 1280, eta = 0.75, pseudo-Huber
eps 1e-4, loss weight SNR + 1, student initialised from the teacher) on the digits, with
the anneal compressed from the paper's I = 100k steps to 800 of a 1,000-step run at batch
128 (ours, sized for a 2-core CPU), Adam 2e-4 with grad clip 1, the teacher's EMA
(half-life 25k images). `--config.method.teacher_solver=ddim` is the paper's Table 4
ablation, `--config.method.teacher_anneal_steps=0` its fixed-teacher-steps one (Table 2).
`:tiny` (seconds) distils runs/digits_vp_tiny with S = 2.

Paper (Table 1, ImageNet 64, large model, FID): 3.2 / 1.9 / 1.6 / 1.4 at 1 / 2 / 4 / 8 steps.
"""
from configs import digits_vp
from configs.base import check_arg, mcm_fields, mcm_tiny_fields


def get_config(arg: str = ""):
  variant = check_arg(arg)
  c = digits_vp.get_config(variant)  # the teacher's network, schedule and data, exactly
  mcm_fields(c, "mcm_cd", teacher_workdir="runs/digits_vp", student_steps=8,
             anneal_steps=800, lr=2e-4)
  c.training.update(batch_size=128, num_steps=1000, log_every=50, save_every=500,
                    sample_every=500)
  if variant == "tiny":
    mcm_tiny_fields(c, "runs/digits_vp_tiny")
  return c
