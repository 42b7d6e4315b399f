"""Guided-diffusion distillation, stage 2 (Meng et al. 2023 Sec. 4.1; Salimans & Ho 2022
Algorithm 2) on the digits: progressive distillation of the stage-1 student, 64 DDIM steps
halved round after round down to one, w ~ U[0, 4] fed to teacher and student.

  python train.py --config configs/digits_guided.py --workdir runs/digits_guided  # stage 1
  python train.py --config configs/digits_pd.py --workdir runs/digits_pd
  python sample.py --workdir runs/digits_pd --steps 4 --guidance 1.0 --out pd4.npz
  python sample.py --workdir runs/digits_pd --steps 4 --sampler meng_stochastic --out s4.npz

Six rounds (64 -> 32 -> ... -> 1 student steps) of 300 steps at batch 128; each round starts
from the last one's student with a fresh Adam whose rate anneals linearly to 0 over the
round (diffusion_distillation: 50k steps per round, lr 1e-4 ImageNet 64 / 5e-5 CIFAR-10,
grad clip 1, no EMA). sample.py --steps N reads the checkpoint that ends the round whose
student takes N steps. `:tiny`: two rounds of two steps from runs/digits_guided_tiny.

Measured (benchmarks/digits_guided.py, 1,000 samples, FD-digits / class accuracy; the
teacher with 2 x 256 NFE: 8.32 / 1.000 at w = 1): DDIM 1 step 10.51 / 1.000, 2 steps 9.62,
4 steps 9.22, 8 steps 9.09; at w = 0: 4.03 / 0.995 in one step (teacher 2.22 / 0.979).
"""
from cm_jax.methods.guided_distillation import method_config
from configs import digits_guided
from configs.base import check_arg, pd_tiny_fields, pd_training_fields


def get_config(arg: str = ""):
  variant = check_arg(arg)
  c = digits_guided.get_config(variant)  # the stage-1 student's network, w-embedding included
  c.model.update(dropout=0.0)
  c.method = method_config("pd", prediction="v", teacher_workdir="runs/digits_guided",
                           teacher_steps=64, student_steps=1, steps_per_round=300,
                           w_min=0.0, w_max=4.0)
  pd_training_fields(c, lr=5e-4, steps_per_round=300)
  c.training.update(save_every=300, sample_every=300, log_every=50)
  c.sample.update(num_steps=1, guidance=1.0)
  if variant == "tiny":
    pd_tiny_fields(c, "runs/digits_guided_tiny")
    c.training.update(sample_every=0, log_every=1)
  return c
