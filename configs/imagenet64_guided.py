"""Guided-diffusion distillation, stage 1 (Meng et al. 2023, Sec. 4.1), ImageNet 64x64.

  python train.py --config configs/imagenet64_vp.py --workdir gs://bucket/runs/in64_vp
  python train.py --config configs/imagenet64_guided.py --workdir gs://bucket/runs/in64_guided \
      --config.method.teacher_workdir=gs://bucket/runs/in64_vp \
      --config.data.data_dir=gs://bucket/tensorflow_datasets --distributed

The guided teacher of imagenet64_vp.py ('both' output, label dropout 0.1) plus a 256-wide
w-embedding; Meng et al.'s stage-1 settings: batch 256, Adam lr 1e-4, grad clip 1, EMA
0.9999, dropout 0, w ~ U[0, 4]. Stage 2: configs/imagenet64_pd.py. Meng et al. (as Heek et
al. 2024 quote them): guided ImageNet 64 FID 18.5 / 5.81 / 2.24 / 2.31 at 1 / 2 / 4 / 8 steps
(stochastic sampler) after stage 2.
"""
from cm_jax.methods.guided_distillation import method_config
from configs import imagenet64_vp
from configs.base import check_arg


def get_config(arg: str = ""):
  variant = check_arg(arg)
  c = imagenet64_vp.get_config(variant)
  c.model.update(cond_dim=256, dropout=0.0)
  c.method = method_config("guided", prediction="both", teacher_workdir="runs/in64_vp",
                           w_min=0.0, w_max=4.0)
  c.optim.update(name="adam", lr=1e-4, warmup_steps=0, grad_clip=1.0)
  c.training.update(batch_size=256, num_steps=100_000)
  c.sample.update(num_steps=256, guidance=0.3)
  if variant == "tiny":
    c.method.teacher_workdir = "runs/in64_vp_tiny"
    c.training.update(batch_size=8, num_steps=2)
    c.sample.update(num_steps=4)
  return c
