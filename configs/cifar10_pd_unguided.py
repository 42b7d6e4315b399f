"""Progressive distillation (Salimans & Ho 2022, Algorithm 2) of the unconditional CIFAR-10
VP teacher, as google-research/diffusion_distillation runs it (config/cifar10_distill.py).

  python train.py --config configs/cifar10_vp.py --workdir runs/c10_vp          # the teacher
  python train.py --config configs/cifar10_pd_unguided.py --workdir runs/c10_pd_unguided \
      --config.data.data_dir=~/tensorflow_datasets

8192 teacher steps halved to 1 (13 rounds), 50,000 steps per round at batch 128, Adam
lr 5e-5 annealed linearly to 0 in every round, grad clip 1, no EMA, dropout 0, x prediction,
snr_trunc. Salimans & Ho (Fig. 4, CIFAR-10 FID): 2.57 at 8 steps, 3.00 at 4, 4.51 at 2,
9.12 at 1 (the paper's results as Papers with Code lists them).
"""
from cm_jax.methods.guided_distillation import method_config
from configs import cifar10_vp
from configs.base import check_arg, pd_tiny_fields, pd_training_fields

STEPS_PER_ROUND = 50_000


def get_config(arg: str = ""):
  variant = check_arg(arg)
  c = cifar10_vp.get_config(variant)
  c.model.update(dropout=0.0)
  c.method = method_config("pd", prediction="x", teacher_workdir="runs/c10_vp",
                           teacher_steps=8192, student_steps=1,
                           steps_per_round=STEPS_PER_ROUND)
  pd_training_fields(c, lr=5e-5, steps_per_round=STEPS_PER_ROUND)
  c.training.update(save_every=5_000)
  c.sample.update(num_steps=1)
  if variant == "tiny":
    pd_tiny_fields(c, "runs/c10_vp_tiny")
  return c
