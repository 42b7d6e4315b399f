"""A small text-conditioned latent diffusion teacher (Rombach et al. 2022; Stable Diffusion's
recipe at CPU scale) on the latents of `configs/digits32_vae.py`, with captions such as
"a handwritten digit seven".

  python train.py --config configs/digits32_vae.py --workdir runs/digits32_vae
  python train.py --config configs/digits32_ldm.py --workdir runs/digits32_ldm \
      --config.method.vae_workdir=runs/digits32_vae
  python sample.py --workdir runs/digits32_ldm --prompt "a handwritten digit three" \
      --guidance 4 --steps 50 --num 16 --out threes.npz

Stable Diffusion's schedule and objective: eps-prediction on the scaled_linear DDPM
schedule (beta 0.00085 .. 0.012, 1000 steps), DDIM 50 steps with its 'leading' spacing,
10% of the captions replaced by the empty prompt for classifier-free guidance. The UNet is
diffusers' UNet2DConditionModel (`cm_jax.nets.sd_unet`) with two blocks (64, 128 channels)
on 8x8x4 latents; the text encoder is a 2-layer CLIP text transformer, frozen at its seeded
initialisation (no pretrained CLIP can be read offline; see cm_jax/methods/latent_parts.py),
over the built-in word-level tokenizer of the ten captions. `:tiny` is the test variant.
"""
import ml_collections

from configs import digits32_vae
from configs.base import check_arg


def text_encoder_config(hidden: int = 64, layers: int = 2, heads: int = 4):
  """A small CLIP text transformer over the digits tokenizer (vocab from
  cm_jax.data.text_tokenizer.builtin_tokenizer('digits'))."""
  from cm_jax.data import text_tokenizer  # pylint: disable=g-import-not-at-top
  tok = text_tokenizer.builtin_tokenizer("digits")
  return ml_collections.ConfigDict(dict(
      vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
      num_hidden_layers=layers, num_attention_heads=heads, max_position_embeddings=77,
      hidden_act="quick_gelu", layer_norm_eps=1e-5, bos_token_id=tok.bos_token_id,
      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))


def get_config(arg: str = ""):
  variant = check_arg(arg)
  c = digits32_vae.get_config(arg)
  # pylint: disable-next=g-import-not-at-top
  from cm_jax.methods.latent_parts import autoencoder_config_of_run
  vae = autoencoder_config_of_run(c)  # the latent shape, known before the run is read
  c.data.update(tokenizer="digits")
  hidden = 16 if variant == "tiny" else 64
  c.model = ml_collections.ConfigDict(dict(
      name="sd_unet", block_out_channels=(64, 128), layers_per_block=1,
      down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
      up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=4,
      cross_attention_dim=hidden, norm_num_groups=16, dtype="float32", remat=False))
  c.schedule = ml_collections.ConfigDict(dict(name="ddpm", beta_schedule="scaled_linear",
                                              beta_start=0.00085, beta_end=0.012,
                                              num_train_timesteps=1000))
  c.method = ml_collections.ConfigDict(dict(
      name="ldm", prediction="eps", caption_dropout=0.1, pretrained="",
      vae=ml_collections.ConfigDict(vae), vae_workdir="runs/digits32_vae",
      vae_params="online", tokenizer="digits",
      text_encoder=text_encoder_config(hidden=hidden, layers=1 if variant == "tiny" else 2),
      text_encoder_seed=0, clip_skip=0, init_unet_from_pretrained=False))
  c.optim.update(lr=3e-4, warmup_steps=200, grad_clip=1.0)
  c.ema.update(halflife_kimg=25.0, rates=())
  c.training.update(batch_size=64, num_steps=3000, log_every=50, save_every=500,
                    sample_every=1000)
  c.sample.update(sampler="ddim", num_steps=50, grid_size=64, batch_size=64, guidance=0.0,
                  params="ema")
  if variant == "tiny":
    c.model.update(block_out_channels=(16, 32), norm_num_groups=8, attention_head_dim=2)
    c.training.update(batch_size=8, num_steps=4, log_every=2, save_every=2, sample_every=0)
    c.sample.update(num_steps=4, grid_size=8, batch_size=8)
  return c
