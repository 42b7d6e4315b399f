"""A cm_jax latent diffusion run (method `ldm`) -> a diffusers Stable Diffusion folder.

The run's UNet (the chosen parameter copy), its frozen autoencoder and text encoder, its
tokenizer and a DDIMScheduler with the run's schedule become the folder
`StableDiffusionPipeline.from_pretrained(out)` loads (`cm_jax.nets.sd_folder.save_sd_folder`
writes it; the networks follow diffusers' / transformers' names, so the conversion is
transposes only, and `sample.py --pretrained out` reads it back bit for bit). The scheduler
carries Stable Diffusion's DDIM settings (leading spacing, steps_offset 1,
set_alpha_to_one False), the ones cm_jax samples such a run with
(`cm_jax.diffusion.discrete_timesteps`), so diffusers' DDIM reproduces cm_jax's samples.
"""
from __future__ import annotations

import tempfile

import jax
import numpy as np

from cm_jax.diffusion.discrete_timesteps import SD_SCHEDULER_SETTINGS
from cm_jax.methods import build_method
from cm_jax.nets import build_network, sd_folder

PREDICTION_TYPES = {"eps": "epsilon", "v": "v_prediction"}


def unet_config(config, latent_shape) -> dict:
  fields = {k: (list(v) if isinstance(v, tuple) else v)
            for k, v in config.model.to_dict().items() if k not in ("name", "dtype", "remat")}
  fields.update(_class_name="UNet2DConditionModel", in_channels=int(latent_shape[-1]),
                out_channels=int(latent_shape[-1]), sample_size=int(latent_shape[0]))
  return fields


def scheduler_config(config) -> dict:
  s = config.schedule
  return dict(_class_name="DDIMScheduler", num_train_timesteps=int(s.num_train_timesteps),
              beta_schedule=s.beta_schedule, beta_start=s.beta_start, beta_end=s.beta_end,
              prediction_type=PREDICTION_TYPES[config.method.prediction], clip_sample=False,
              **SD_SCHEDULER_SETTINGS)


def save(out_dir: str, params, config) -> str:
  """Writes the run as a diffusers folder at `out_dir` (new or empty); returns it."""
  if config.method.name != "ldm":
    raise ValueError(f"the Stable Diffusion layout holds latent diffusion runs (method ldm), "
                     f"not {config.method.name!r}")
  # pylint: disable-next=g-import-not-at-top
  from cm_jax.methods import network_input_shape
  shape = network_input_shape(config)
  net = build_network(config.model, image_size=shape[0], channels=shape[-1], num_classes=0)
  parts = build_method(net, config).parts
  frozen = parts.params
  text_config = dict(parts.text_config, architectures=["CLIPTextModel"],
                     model_type="clip_text_model")
  host = lambda tree: jax.tree.map(np.asarray, jax.device_get(tree))
  with tempfile.TemporaryDirectory() as tok_dir:
    parts.tokenizer.save_pretrained(tok_dir)
    folder = sd_folder.SDFolder(
        path=out_dir, model_index={"_class_name": "StableDiffusionPipeline",
                                   "safety_checker": [None, None],
                                   "feature_extractor": [None, None],
                                   "requires_safety_checker": False},
        unet_config=unet_config(config, shape), unet_params=host(params),
        vae_config=dict(parts.vae_config, _class_name="AutoencoderKL"),
        vae_params=host(frozen["vae"]), text_config=text_config,
        text_params=host(frozen["text_encoder"]), tokenizer_dir=tok_dir,
        scheduler_config=scheduler_config(config), text_key_prefix="text_model.")
    return sd_folder.save_sd_folder(out_dir, folder)
