"""Guided-diffusion distillation, stage 2 (Meng et al. 2023; Salimans & Ho 2022 Algorithm 2),
class-conditional CIFAR-10: progressive distillation of configs/cifar10_guided.py's student.

  python train.py --config configs/cifar10_pd.py --workdir runs/c10_pd \
      --config.data.data_dir=~/tensorflow_datasets
  python sample.py --workdir runs/c10_pd --steps 4 --guidance 0.3 --out c10_pd4.npz

diffusion_distillation's CIFAR-10 settings (config/cifar10_distill.py): 8192 teacher steps
halved to 1 (13 rounds), 50,000 steps per round at batch 128, Adam lr 5e-5 annealed
linearly to 0 in every round, grad clip 1, no EMA, dropout 0; w ~ U[0, 4] (Meng).
"""
from cm_jax.methods.guided_distillation import method_config
from configs import cifar10_guided
from configs.base import check_arg, pd_tiny_fields, pd_training_fields

STEPS_PER_ROUND = 50_000


def get_config(arg: str = ""):
  variant = check_arg(arg)
  c = cifar10_guided.get_config(variant)
  c.method = method_config("pd", prediction="x", teacher_workdir="runs/c10_guided",
                           teacher_steps=8192, student_steps=1,
                           steps_per_round=STEPS_PER_ROUND, w_min=0.0, w_max=4.0)
  pd_training_fields(c, lr=5e-5, steps_per_round=STEPS_PER_ROUND)
  c.training.update(save_every=5_000)
  c.sample.update(num_steps=1)
  if variant == "tiny":
    pd_tiny_fields(c, "runs/c10_guided_tiny")
  return c
