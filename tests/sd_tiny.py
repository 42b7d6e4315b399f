"""A tiny random-weight Stable Diffusion pipeline folder, built offline for tests.

`make_tiny_sd_folder(path)` makes, with diffusers' and transformers' PyTorch classes, the
folder `StableDiffusionPipeline.save_pretrained(path, safe_serialization=True)` writes for
a pipeline of SD 1.5's shape at toy widths: a UNet2DConditionModel (8/16 channels, one
cross-attention level, 2-wide heads, 16-wide text states; optionally LCM's
`time_cond_proj_dim`), an AutoencoderKL (16x16 images <-> 8x8x4 latents), a 2-layer
CLIPTextModel over a word-level CLIP tokenizer (`cm_jax.data.text_tokenizer`), and SD 1.5's
DDIMScheduler settings (or an LCMScheduler). Every torch parameter gets small noise on top
of its init, so the layers diffusers zero-initialises (conv_out, proj_out, ...) are not zero
and a converter that drops one would be seen.

The tokenizer folder is the one `write_word_level_tokenizer` writes (vocab.json,
merges.txt, ...), as in the released SD 1.x folders, rather than the tokenizer.json that
transformers 5's save_pretrained writes. Callers cache the folder with module- or
session-scoped fixtures; this is a plain function.
"""
from __future__ import annotations

import os
import shutil

WORDS = ("a", "handwritten", "digit", "zero", "one", "two", "three", "four", "five", "six",
         "seven", "eight", "nine", "red", "blue", "cat")
NOISE = 0.05  # on top of torch's init: small, so activations stay tame


def unet_kwargs(time_cond_proj_dim=None) -> dict:
  return dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16),
              layers_per_block=1, norm_num_groups=4, attention_head_dim=2,
              cross_attention_dim=16,
              down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
              up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
              time_cond_proj_dim=time_cond_proj_dim)


def vae_kwargs() -> dict:
  return dict(sample_size=16, in_channels=3, out_channels=3, latent_channels=4,
              block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
              down_block_types=("DownEncoderBlock2D",) * 2,
              up_block_types=("UpDecoderBlock2D",) * 2)


def scheduler_kwargs() -> dict:
  """SD 1.5's scheduler settings (runwayml/stable-diffusion-v1-5 scheduler_config.json)."""
  return dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
              beta_schedule="scaled_linear", steps_offset=1, set_alpha_to_one=False,
              clip_sample=False)


def make_tiny_sd_folder(path, *, time_cond_proj_dim=None, scheduler="ddim", seed=0):
  """Writes the tiny pipeline folder at `path` (new or empty) and returns `path`."""
  import torch  # pylint: disable=g-import-not-at-top
  from diffusers import (AutoencoderKL, DDIMScheduler, LCMScheduler,  # pylint: disable=g-import-not-at-top
                         StableDiffusionPipeline, UNet2DConditionModel)
  from transformers import CLIPTextConfig, CLIPTextModel  # pylint: disable=g-import-not-at-top

  from cm_jax.data import text_tokenizer  # pylint: disable=g-import-not-at-top

  if scheduler not in ("ddim", "lcm"):
    raise ValueError(f"make_tiny_sd_folder: scheduler must be 'ddim' or 'lcm', not {scheduler!r}")
  path = os.fspath(path)
  tok_dir = path + ".tokenizer-src"  # a sibling, moved into the folder at the end
  shutil.rmtree(tok_dir, ignore_errors=True)
  text_tokenizer.write_word_level_tokenizer(WORDS, tok_dir)
  tokenizer = text_tokenizer.load_tokenizer(tok_dir)

  torch.manual_seed(seed)
  unet = UNet2DConditionModel(**unet_kwargs(time_cond_proj_dim))
  vae = AutoencoderKL(**vae_kwargs())
  text_encoder = CLIPTextModel(CLIPTextConfig(
      vocab_size=len(tokenizer), hidden_size=16, intermediate_size=37, num_hidden_layers=2,
      num_attention_heads=2, max_position_embeddings=77, projection_dim=16,
      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
      pad_token_id=tokenizer.pad_token_id))
  with torch.no_grad():
    for model in (unet, vae, text_encoder):
      for p in model.parameters():
        p.add_(NOISE * torch.randn_like(p))
  sched_cls = DDIMScheduler if scheduler == "ddim" else LCMScheduler
  pipe = StableDiffusionPipeline(
      vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
      scheduler=sched_cls(**scheduler_kwargs()), safety_checker=None,
      feature_extractor=None, requires_safety_checker=False)
  pipe.save_pretrained(path, safe_serialization=True)
  # The released SD folders keep CLIP's vocab.json + merges.txt (what load_tokenizer reads);
  # transformers 5 writes tokenizer.json instead, so put the source files in its place.
  shutil.rmtree(os.path.join(path, "tokenizer"))
  shutil.move(tok_dir, os.path.join(path, "tokenizer"))
  return path


def lcd_config(folder, *, time_cond_proj_dim=8, prediction=None, **method_overrides):
  """An LCD config distilling the (DDIM, no w input) tiny folder at `folder`: the folder's
  shapes (`configs.sd15_ldm.from_folder`), the LCD method fields with the folder as both the
  frozen parts and the teacher, a `time_cond_proj_dim`-wide w input on the student (None:
  none), LCM sampling. `method_overrides` update the method fields (loss_type='l2', ...)."""
  from configs import digits32_lcd, sd15_ldm  # pylint: disable=g-import-not-at-top
  c = sd15_ldm.from_folder(os.fspath(folder), prediction=prediction)
  fields = dict(pretrained=os.fspath(folder), teacher_workdir="")
  fields.update(method_overrides)
  c.method = digits32_lcd.lcm_method_fields(c.method, **fields)
  c.model.time_cond_proj_dim = time_cond_proj_dim
  c.ema.update(halflife_kimg=0.0, rates=())  # the student is read online, as LCD's
  c.sample.update(sampler="lcm", num_steps=4, params="online")
  return c
