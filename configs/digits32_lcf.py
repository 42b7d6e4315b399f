"""Latent consistency fine-tuning (LCF, LCM Sec. 4.5, Luo et al. 2023) of the digits32 LCM
(`configs/digits32_lcd.py`) on image-caption data, without a teacher.

  python train.py --config configs/digits32_lcf.py --workdir runs/digits32_lcf \
      --config.method.init_workdir=runs/digits32_lcd \
      --config.data.name=latent_cache --config.data.path=runs/digits32_latents

LCF trains on consistency pairs that share the data latent and the noise,
z_{n+k} = alpha_{n+k} z + sigma_{n+k} eps and z_n = alpha_n z + sigma_n eps, with LCD's
grid (k = 20 of 1000), w-embedding, boundary scalings, pseudo-Huber loss and 0.95 EMA
target; the student starts from an LCM (method.init_workdir, a cm_jax lcd run, or
method.pretrained, an LCM diffusers folder). The paper fine-tunes on custom data sets
(Pokemon, Simpsons) for a style; here the digits themselves stand in for the custom set.
`:tiny` is the test variant.
"""
from configs import digits32_lcd
from configs.base import check_arg


def get_config(arg: str = ""):
  variant = check_arg(arg)
  c = digits32_lcd.get_config(arg)
  c.method.update(name="lcf", teacher_workdir="", init_workdir="runs/digits32_lcd",
                  init_params="online")
  c.training.update(num_steps=500 if variant != "tiny" else 2)
  return c
