"""Stable Diffusion 1.5 as a cm_jax latent diffusion run: its UNet, autoencoder and CLIP
text encoder in Flax (`cm_jax.nets.sd_unet`, `sd_vae`, `clip_text`), on its scaled_linear
1000-step schedule with eps-prediction.

  python train.py --config configs/sd15_ldm.py --dry_run --config.mesh.fsdp=8
      # UNet 859,520,964 / VAE 83,653,863 / text encoder 123,060,480 parameters, and the
      # train state's memory per device under FSDP over 8 devices
  python train.py --config configs/sd15_ldm.py --workdir runs/sd15_ft \
      --config.method.pretrained=/path/to/stable-diffusion-v1-5 \
      --config.method.init_unet_from_pretrained=True \
      --config.data.name=caption_folder --config.data.path=/path/to/images

`from_folder(dir)` builds the config of any diffusers text-to-image folder laid out like
Stable Diffusion (`sample.py --pretrained DIR` samples it directly). `:tiny` is the test
variant: the same code on a tiny random folder (tests/sd_tiny.py).
"""
import json
import os

import ml_collections

from configs.base import base_config, check_arg


def _unet_fields(unet_config: dict) -> ml_collections.ConfigDict:
  fields = {k: v for k, v in unet_config.items()
            if not k.startswith("_") and k not in ("in_channels", "out_channels")}
  fields = {k: (tuple(v) if isinstance(v, list) else v) for k, v in fields.items()}
  return ml_collections.ConfigDict(dict(name="sd_unet", dtype="float32", remat=False,
                                        **fields))


def _schedule(scheduler_config: dict) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      name="ddpm", beta_schedule=scheduler_config.get("beta_schedule", "scaled_linear"),
      beta_start=float(scheduler_config.get("beta_start", 0.00085)),
      beta_end=float(scheduler_config.get("beta_end", 0.012)),
      num_train_timesteps=int(scheduler_config.get("num_train_timesteps", 1000))))


def _base(unet_config: dict, vae_config: dict, text_config: dict, scheduler_config: dict,
          prediction: str):
  c = base_config()
  factor = 2 ** (len(vae_config["block_out_channels"]) - 1)
  size = int(unet_config.get("sample_size", 64)) * factor
  c.data.update(name="caption_folder", image_size=size, channels=3, num_classes=0,
                random_flip=False, tokenizer="")
  c.model = _unet_fields(unet_config)
  c.schedule = _schedule(scheduler_config)
  c.method = ml_collections.ConfigDict(dict(
      name="ldm", prediction=prediction, caption_dropout=0.1, pretrained="",
      vae=ml_collections.ConfigDict(vae_config), vae_workdir="", vae_params="ema",
      tokenizer="", text_encoder=ml_collections.ConfigDict(text_config),
      text_encoder_seed=0, clip_skip=0, init_unet_from_pretrained=False))
  # The LDM / SD fine-tuning recipe: AdamW 1e-4 ... a small constant rate for fine-tuning.
  c.optim.update(name="adamw", lr=1e-5, weight_decay=1e-2, warmup_steps=500, grad_clip=1.0)
  c.ema.update(halflife_kimg=0.0, rates=(0.9999,))
  c.training.update(batch_size=64, num_steps=10_000, log_every=50, save_every=1000,
                    sample_every=1000)
  c.sample.update(sampler="ddim", num_steps=50, guidance=6.5, grid_size=16, batch_size=4,
                  params="ema")
  return c


def read_folder_config(folder: str, sub: str, name: str = "config.json") -> dict:
  """One component config of a diffusers folder (`unet`, `vae`, ...; the scheduler's is
  `scheduler_config.json`); a missing one is a one-line FileNotFoundError."""
  path = os.path.join(folder, sub, name)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{folder!r} is not a diffusers pipeline folder: {sub}/{name} "
                            f"is missing")
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def from_folder(folder: str, prediction=None):
  """The config of a diffusers Stable-Diffusion-style folder (its configs only; no weights
  are read here)."""
  read = lambda sub, name="config.json": read_folder_config(folder, sub, name)
  scheduler = read("scheduler", "scheduler_config.json")
  prediction = prediction or {"epsilon": "eps", "v_prediction": "v"}.get(
      scheduler.get("prediction_type", "epsilon"))
  if prediction is None:
    raise ValueError(f"{folder!r}: prediction_type {scheduler.get('prediction_type')!r} is "
                     f"not supported (epsilon, v_prediction)")
  c = _base(read("unet"), read("vae"), read("text_encoder"), scheduler, prediction)
  c.method.update(pretrained=folder, init_unet_from_pretrained=True)
  return c


def _tiny_configs():
  """SD 1.5's layout at toy widths (the shapes of tests/sd_tiny.py's random folder)."""
  unet = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=[8, 16],
              layers_per_block=1, norm_num_groups=4, attention_head_dim=2,
              cross_attention_dim=16, down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
              up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"])
  vae = dict(sample_size=16, in_channels=3, out_channels=3, latent_channels=4,
             block_out_channels=[8, 16], layers_per_block=1, norm_num_groups=4,
             down_block_types=["DownEncoderBlock2D"] * 2,
             up_block_types=["UpDecoderBlock2D"] * 2, scaling_factor=0.18215)
  text = dict(vocab_size=1000, hidden_size=16, intermediate_size=37, num_hidden_layers=2,
              num_attention_heads=2, max_position_embeddings=77, hidden_act="quick_gelu",
              layer_norm_eps=1e-5, bos_token_id=0, eos_token_id=2, pad_token_id=1)
  return unet, vae, text


def get_config(arg: str = ""):
  variant = check_arg(arg)
  scheduler = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                   num_train_timesteps=1000)
  if variant == "tiny":
    c = _base(*_tiny_configs(), scheduler, "eps")
    c.training.update(batch_size=2, num_steps=2, log_every=1, save_every=2, sample_every=0)
    c.sample.update(num_steps=2, grid_size=2, batch_size=2)
    return c
  # pylint: disable=g-import-not-at-top
  from cm_jax.nets.clip_text import sd15_text_config
  from cm_jax.nets.sd_unet import sd15_unet_config
  from cm_jax.nets.sd_vae import sd15_vae_config
  return _base(sd15_unet_config(), sd15_vae_config(), sd15_text_config(), scheduler, "eps")
