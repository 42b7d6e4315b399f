"""Consistency distillation (CM Algorithm 2) of the digits EDM teacher.

  python train.py --config configs/digits_edm.py --workdir runs/digits_edm   # the teacher
  python train.py --config configs/digits_cd.py --workdir runs/digits_cd
  python sample.py --workdir runs/digits_cd --steps 1 --out runs/digits_cd/onestep.npz
  python sample.py --workdir runs/digits_cd --ts 0,9,17 --out runs/digits_cd/twostep.npz

The CIFAR-10 recipe of Song et al. 2023 (Table 3: N = 18, Heun teacher steps, mu = 0,
uniform weighting, student initialised from the teacher) on the 8x8 digits, with the
squared l2 metric (LPIPS needs natural RGB images) and a run sized for a 2-core CPU:
about 20 minutes on a loaded 2-core CPU (1500 steps) to one-step samples that read as
digits. The teacher run must use this config's network (digits_edm.py). `:tiny` (seconds)
distils a tiny teacher in runs/digits_edm_tiny (python train.py --config
configs/digits_edm.py:tiny --workdir runs/digits_edm_tiny) or wherever
--config.method.teacher_workdir points.

Expected (evaluate.py --ref digits --detector digits, 1000 samples; the 2000-step teacher
of digits_edm.py scores fd_digits 2.1 with Heun, 18 steps, NFE 35): one step fd_digits
~6.5, two steps (ts 0,9,17) ~3.8, class accuracy ~0.98.
"""
from cm_jax.methods.consistency import method_config, sample_config_fields
from configs import digits_edm
from configs.base import check_arg


def get_config(arg: str = ""):
  variant = check_arg(arg)
  c = digits_edm.get_config(variant)  # the teacher's network and data, exactly
  c.model.update(dropout=0.0)         # CM Table 3: no dropout in the consistency model
  c.method = method_config("cd", teacher_workdir="runs/digits_edm", num_scales=18,
                           solver="heun", target_ema=0.0, metric="l2", weighting="uniform")
  # CM / both references: RAdam, constant rate, no warm-up, no clipping.
  c.optim.update(name="radam", lr=2e-4, b1=0.9, b2=0.999, eps=1e-8, warmup_steps=0,
                 grad_clip=0.0)
  c.ema.update(rates=(0.999,), halflife_kimg=0.0)
  c.training.update(batch_size=128, num_steps=1500, log_every=50, save_every=500,
                    sample_every=500)
  c.sample.update(params="ema", **sample_config_fields(ts=(0, 9, 17), grid_points=18))
  if variant == "tiny":
    c.method.teacher_workdir = "runs/digits_edm_tiny"
    c.training.update(batch_size=16, num_steps=4, log_every=2, save_every=2, sample_every=0)
    c.sample.update(grid_size=16, batch_size=16)
  return c
