"""Consistency distillation on class-conditional ImageNet 64x64 (ADM), CM Algorithm 2.

  python train.py --config configs/imagenet64_edm.py --workdir runs/in64_edm     # the teacher
  python train.py --config configs/imagenet64_cd.py --workdir runs/in64_cd \
      --config.method.teacher_workdir=runs/in64_edm \
      --config.method.lpips_weights=lpips_vgg16.npz
  python sample.py --workdir runs/in64_cd --num 50000 --steps 1 --out cd_1step.npz
  python sample.py --workdir runs/in64_cd --num 50000 --ts 0,22,39 --out cd_2step.npz

Expected (Song et al. 2023, Table 2): FID 6.20 in one step, 4.70 in two (LPIPS).
Hyper-parameters: CM Table 3 (ImageNet 64, CD) = openai/consistency_models scripts/launch.sh
"L_CD^N (LPIPS) on ImageNet-64": RAdam lr 8e-6 (torch defaults beta 0.9/0.999, eps 1e-8,
no warm-up), batch 2048, 600k iterations, N = 40, Heun teacher steps, target EMA mu = 0.95,
LPIPS with piq's average pooling on 224x224 bilinear upsamplings, uniform weighting,
dropout 0 (teacher 0.1), the student initialised from the teacher; EMAs 0.999, 0.9999 and
0.9999432189950708 are kept, samples use the last (CM Table 3's 0.999943). The reference
trains in fp16 (`--config.model.dtype=bfloat16` is the TPU/GPU analogue here). Its
networks see c_noise = 250 ln(sigma) ('openai'); this config keeps the teacher's c_noise
(configs/imagenet64_edm.py trains with 'edm'); distilling a converted OpenAI checkpoint
needs --config.precond.c_noise=openai. Two-step ts = (0, 22, 39) on the 40-level grid
(launch.sh). `--config.method.metric=l2` gives the L_CD^N (l2) run of launch.sh.
"""
from cm_jax.methods.consistency import method_config, sample_config_fields
from configs import imagenet64_edm
from configs.base import check_arg

EMA_SAMPLING = 0.9999432189950708


def get_config(arg: str = ""):
  variant = check_arg(arg)
  c = imagenet64_edm.get_config(variant)
  c.model.update(dropout=0.0)
  c.method = method_config("cd", teacher_workdir="runs/in64_edm", num_scales=40,
                           solver="heun", target_ema=0.95, metric="lpips",
                           lpips_weights="lpips_vgg16.npz", lpips_pooling="avg",
                           weighting="uniform")
  c.optim.update(name="radam", lr=8e-6, b1=0.9, b2=0.999, eps=1e-8, warmup_steps=0,
                 grad_clip=0.0, weight_decay=0.0)
  c.ema.update(rates=(0.999, 0.9999, EMA_SAMPLING), halflife_kimg=0.0)
  c.training.update(batch_size=2048, num_steps=600_000, log_every=100, save_every=2_000,
                    sample_every=10_000)
  c.sample.update(params=f"ema_{EMA_SAMPLING:g}", batch_size=256,
                  **sample_config_fields(ts=(0, 22, 39), grid_points=40))
  if variant == "tiny":
    c.method.update(teacher_workdir="runs/in64_edm_tiny", metric="l2")
    c.training.update(batch_size=8, num_steps=2, log_every=1, save_every=2, sample_every=0)
    c.sample.update(batch_size=8, grid_size=8)
  return c
