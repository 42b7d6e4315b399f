"""Consistency training on class-conditional ImageNet 64x64 (ADM), CM Algorithm 3.

  python train.py --config configs/imagenet64_ct.py --workdir runs/in64_ct \
      --config.method.lpips_weights=lpips_vgg16.npz
  python sample.py --workdir runs/in64_ct --num 50000 --steps 1 --out ct_1step.npz
  python sample.py --workdir runs/in64_ct --num 50000 --ts 0,106,200 --out ct_2step.npz

Expected (Song et al. 2023, Table 2): FID 13.0 in one step, 11.1 in two.
Hyper-parameters: openai/consistency_models scripts/launch.sh "L_CT^N on ImageNet-64":
RAdam lr 1e-4 (beta 0.9/0.999, eps 1e-8, no warm-up), batch 2048, 800k iterations,
adaptive N(k), mu(k) with s0 = 2, s1 = 200, mu0 = 0.95 (mu(k) with the reference's N(k) - 1,
see cm_schedules), LPIPS with piq's average pooling, uniform weighting, dropout 0, random
init, EMAs 0.999 / 0.9999 / 0.9999432189950708 (sampling: the last). `:paper` takes the
CM paper's Table 3 learning rate, 8e-6, and its mu(k) = exp(s0 ln mu0 / N(k)); the default
follows the released launch command. Two-step ts = (0, 106, 200) on the final 201-level
grid (launch.sh). See imagenet64_cd.py on fp16 and c_noise.
"""
from cm_jax.methods.consistency import method_config, sample_config_fields
from configs import imagenet64_edm
from configs.base import check_arg

EMA_SAMPLING = 0.9999432189950708


def get_config(arg: str = ""):
  variant = check_arg(arg, allowed=("", "tiny", "paper"))
  c = imagenet64_edm.get_config("tiny" if variant == "tiny" else "")
  c.model.update(dropout=0.0)
  c.method = method_config("ct", scale_mode="progressive", target_ema_mode="adaptive",
                           s0=2, s1=200, mu0=0.95, mu_variant="reference", metric="lpips",
                           lpips_weights="lpips_vgg16.npz", lpips_pooling="avg",
                           weighting="uniform")
  c.optim.update(name="radam", lr=1e-4, b1=0.9, b2=0.999, eps=1e-8, warmup_steps=0,
                 grad_clip=0.0, weight_decay=0.0)
  if variant == "paper":
    c.optim.update(lr=8e-6)
    c.method.update(mu_variant="paper")
  c.ema.update(rates=(0.999, 0.9999, EMA_SAMPLING), halflife_kimg=0.0)
  c.training.update(batch_size=2048, num_steps=800_000, log_every=100, save_every=2_000,
                    sample_every=10_000)
  c.sample.update(params=f"ema_{EMA_SAMPLING:g}", batch_size=256,
                  **sample_config_fields(ts=(0, 106, 200), grid_points=201))
  if variant == "tiny":
    c.method.update(metric="l2")
    c.training.update(batch_size=8, num_steps=2, log_every=1, save_every=2, sample_every=0)
    c.sample.update(batch_size=8, grid_size=8)
  return c
