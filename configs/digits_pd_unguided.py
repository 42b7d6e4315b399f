"""Progressive distillation without guidance (Salimans & Ho 2022, Algorithm 2) of the
digits VP teacher: the same rounds as configs/digits_pd.py, no w and no w-embedding.

  python train.py --config configs/digits_vp.py --workdir runs/digits_vp   # the teacher
  python train.py --config configs/digits_pd_unguided.py --workdir runs/digits_pd_unguided
  python sample.py --workdir runs/digits_pd_unguided --steps 4 --out pd4.npz

The class-conditional teacher is distilled at w = 0 (its conditional model). `:tiny`: two
rounds of two steps from runs/digits_vp_tiny.
"""
from cm_jax.methods.guided_distillation import method_config
from configs import digits_vp
from configs.base import check_arg, pd_tiny_fields, pd_training_fields


def get_config(arg: str = ""):
  variant = check_arg(arg)
  c = digits_vp.get_config(variant)  # the teacher's network exactly
  c.model.update(dropout=0.0)
  c.method = method_config("pd", prediction="v", teacher_workdir="runs/digits_vp",
                           teacher_steps=64, student_steps=1, steps_per_round=300)
  pd_training_fields(c, lr=5e-4, steps_per_round=300)
  c.training.update(save_every=300, sample_every=300, log_every=50)
  c.sample.update(num_steps=1)
  if variant == "tiny":
    pd_tiny_fields(c, "runs/digits_vp_tiny")
    c.training.update(sample_every=0, log_every=1)
  return c
