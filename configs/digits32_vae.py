"""A small KL autoencoder (latent diffusion's first stage; Rombach et al. 2022, Sec. 3.1) on
the embedded digits upscaled to 32x32x3, the latent space of `configs/digits32_ldm.py`.

  python train.py --config configs/digits32_vae.py --workdir runs/digits32_vae

diffusers' AutoencoderKL layout (`cm_jax.nets.sd_vae`) at a CPU size: three encoder blocks
(16, 32, 32 channels, one resnet each), so f = 4 and 32x32x3 images become 8x8x4 latents.
L1 reconstruction plus the KL term at LDM's weight scale (see cm_jax/methods/autoencoder.py).
`model.scaling_factor` is what the latent model multiplies the latents by, chosen as
Stable Diffusion chose 0.18215: 1 / (the std of the trained autoencoder's latents), measured
once on the training set: 0.33 = 1 / 3.03 (posterior means of all 1,797 digits; README,
"Latent space"). It scales the latents, not the weights: a latent model may set its own. `:tiny` is the seconds-long test variant.
"""
import ml_collections

from configs.base import base_config, check_arg


def get_config(arg: str = ""):
  variant = check_arg(arg)
  c = base_config()
  c.data.update(name="digits_captions", image_size=32, channels=3, num_classes=10,
                tokenizer="")
  c.model = ml_collections.ConfigDict(dict(
      name="sd_vae", block_out_channels=(16, 32, 32), layers_per_block=1, latent_channels=4,
      norm_num_groups=8, down_block_types=("DownEncoderBlock2D",) * 3,
      up_block_types=("UpDecoderBlock2D",) * 3, scaling_factor=0.33, dtype="float32",
      remat=False))
  c.method = ml_collections.ConfigDict(dict(name="autoencoder_kl", reconstruction="l1",
                                            kl_weight=1e-4))
  c.optim.update(lr=1e-3, warmup_steps=100, grad_clip=1.0)
  # No EMA: latent models read the trained weights themselves (method.vae_params).
  c.ema.update(halflife_kimg=0.0, rates=())
  c.training.update(batch_size=32, num_steps=1000, log_every=50, save_every=500,
                    sample_every=500)
  c.sample.update(num_steps=1, grid_size=64, batch_size=64, params="online")
  if variant == "tiny":
    c.model.update(block_out_channels=(8, 8), norm_num_groups=4,
                   down_block_types=("DownEncoderBlock2D",) * 2,
                   up_block_types=("UpDecoderBlock2D",) * 2)
    c.data.update(image_size=16)
    c.training.update(batch_size=8, num_steps=4, log_every=2, save_every=2, sample_every=0)
    c.sample.update(grid_size=8, batch_size=8)
  return c
