"""Guided-diffusion distillation, stage 2 (Meng et al. 2023; Salimans & Ho 2022 Algorithm 2),
ImageNet 64x64: progressive distillation of configs/imagenet64_guided.py's student.

  python train.py --config configs/imagenet64_pd.py --workdir gs://bucket/runs/in64_pd \
      --config.method.teacher_workdir=gs://bucket/runs/in64_guided --distributed
  python sample.py --workdir gs://bucket/runs/in64_pd --steps 4 --guidance 0.3 \
      --sampler meng_stochastic --out in64_pd4.npz

diffusion_distillation's ImageNet 64 settings (config/imagenet64_distill.py): 1024 teacher
steps halved to 1 (10 rounds), 50,000 steps per round at batch 2048, Adam lr 1e-4 annealed
linearly to 0 in every round, grad clip 1, no EMA, dropout 0; w ~ U[0, 4] (Meng et al.,
whose stage-2 configs use batch 256). Meng et al.: FID 18.5 / 5.81 / 2.24 / 2.31 at
1 / 2 / 4 / 8 steps (stochastic sampler).
"""
from cm_jax.methods.guided_distillation import method_config
from configs import imagenet64_guided
from configs.base import check_arg, pd_tiny_fields, pd_training_fields

STEPS_PER_ROUND = 50_000


def get_config(arg: str = ""):
  variant = check_arg(arg)
  c = imagenet64_guided.get_config(variant)
  c.method = method_config("pd", prediction="both", teacher_workdir="runs/in64_guided",
                           teacher_steps=1024, student_steps=1,
                           steps_per_round=STEPS_PER_ROUND, w_min=0.0, w_max=4.0)
  pd_training_fields(c, lr=1e-4, steps_per_round=STEPS_PER_ROUND)
  c.training.update(batch_size=2048, save_every=5_000)
  c.sample.update(num_steps=1)
  if variant == "tiny":
    pd_tiny_fields(c, "runs/in64_guided_tiny")
    c.training.update(batch_size=8)
  return c
