"""A cm_jax latent diffusion run (method `ldm`) -> a diffusers Stable Diffusion folder.

The run's UNet (the chosen parameter copy), its frozen autoencoder and text encoder, its
tokenizer and a DDIMScheduler with the run's schedule become the folder
`StableDiffusionPipeline.from_pretrained(out)` loads (`cm_jax.nets.sd_folder.save_sd_folder`
writes it; the networks follow diffusers' / transformers' names, so the conversion is
transposes only, and `sample.py --pretrained out` reads it back bit for bit). The scheduler
carries Stable Diffusion's DDIM settings (leading spacing, steps_offset 1,
set_alpha_to_one False), the ones cm_jax samples such a run with
(`cm_jax.diffusion.discrete_timesteps`), so diffusers' DDIM reproduces cm_jax's samples.

A latent consistency model (an lcd or lcf run whose UNet takes w through
`time_cond_proj_dim`; Luo et al. 2023) becomes the folder
`LatentConsistencyModelPipeline.from_pretrained(out)` loads: the same components, the UNet
config with its guidance-embedding width, and an LCMScheduler on the run's schedule with
its skipping-step grid (original_inference_steps = method.num_ddim_timesteps) and boundary
timestep scaling, which is what cm_jax's LCM sampler follows (an LCM without the w input
gets a StableDiffusionPipeline folder with that scheduler). An LCM-LoRA run (lcd with
method.lora_rank > 0) holds only adapters: `save_lora` writes them as the LoRA file
`pipe.load_lora_weights` reads (`cm_jax.nets.lora_files`), to load onto the teacher's folder.
"""
from __future__ import annotations

import tempfile

import jax
import numpy as np

from cm_jax.diffusion.discrete_timesteps import SD_SCHEDULER_SETTINGS
from cm_jax.methods import build_method
from cm_jax.nets import build_network, sd_folder

PREDICTION_TYPES = {"eps": "epsilon", "v": "v_prediction"}
LCM_METHODS = ("lcd", "lcf")
PIPELINES = ("ldm",) + LCM_METHODS  # the methods a pipeline folder holds


def _lora_rank(config) -> int:
  return int(config.method.get("lora_rank", 0) or 0)


def check_exportable(config, fmt: str) -> None:
  """A one-line ValueError unless a run of this config can be written as `fmt`
  ('diffusers': a pipeline folder; 'lora': a LoRA file)."""
  name = config.method.name
  if fmt == "lora":
    if name not in LCM_METHODS or not _lora_rank(config):
      raise ValueError(f"--format lora writes the adapters of an LCM-LoRA run (method lcd "
                       f"with method.lora_rank > 0); this run's method is {name!r} without "
                       f"LoRA adapters")
    return
  if name not in PIPELINES:
    raise ValueError(f"the Stable Diffusion layout holds latent diffusion (ldm) and latent "
                     f"consistency (lcd, lcf) runs, not {name!r}")
  if _lora_rank(config):
    raise ValueError("an LCM-LoRA run holds only LoRA adapters: export them with --format "
                     "lora and load them onto the teacher's folder (pipe.load_lora_weights)")


def pipeline_class(config) -> str:
  """The diffusers pipeline of the folder: an LCM with a guidance embedding runs in
  LatentConsistencyModelPipeline (which feeds it guidance_scale - 1); one without (the
  method's w_embedding=False) in StableDiffusionPipeline with the LCMScheduler, whose
  classifier-free guidance is the sampler's, as for LCM-LoRA."""
  m = config.method
  if m.name in LCM_METHODS and m.get("w_embedding", True):
    return "LatentConsistencyModelPipeline"
  return "StableDiffusionPipeline"


def unet_config(config, latent_shape) -> dict:
  fields = {k: (list(v) if isinstance(v, tuple) else v)
            for k, v in config.model.to_dict().items() if k not in ("name", "dtype", "remat")}
  fields.update(_class_name="UNet2DConditionModel", in_channels=int(latent_shape[-1]),
                out_channels=int(latent_shape[-1]), sample_size=int(latent_shape[0]))
  return fields


def scheduler_config(config) -> dict:
  s = config.schedule
  fields = dict(num_train_timesteps=int(s.num_train_timesteps),
                beta_schedule=s.beta_schedule, beta_start=s.beta_start, beta_end=s.beta_end,
                prediction_type=PREDICTION_TYPES[config.method.prediction], clip_sample=False,
                **SD_SCHEDULER_SETTINGS)
  if config.method.name not in LCM_METHODS:
    return dict(_class_name="DDIMScheduler", **fields)
  # LCMScheduler's timesteps are the skipping-step grid alone (steps_offset and the spacing
  # do not enter them) and its last step returns the consistency output itself, so
  # final_alpha_cumprod is never read: the SD settings above change nothing there.
  m = config.method
  return dict(_class_name="LCMScheduler", **fields,
              original_inference_steps=int(m.get("num_ddim_timesteps", 50)),
              timestep_scaling=float(m.get("timestep_scaling", 10.0)))


def save(out_dir: str, params, config) -> str:
  """Writes the run as a diffusers folder at `out_dir` (new or empty); returns it."""
  check_exportable(config, "diffusers")
  # pylint: disable-next=g-import-not-at-top
  from cm_jax.methods import network_input_shape
  shape = network_input_shape(config)
  parts = _method(config).parts
  frozen = parts.params
  text_config = dict(parts.text_config, architectures=["CLIPTextModel"],
                     model_type="clip_text_model")
  host = lambda tree: jax.tree.map(np.asarray, jax.device_get(tree))
  with tempfile.TemporaryDirectory() as tok_dir:
    parts.tokenizer.save_pretrained(tok_dir)
    folder = sd_folder.SDFolder(
        path=out_dir, model_index={"_class_name": pipeline_class(config),
                                   "safety_checker": [None, None],
                                   "feature_extractor": [None, None],
                                   "requires_safety_checker": False},
        unet_config=unet_config(config, shape), unet_params=host(params),
        vae_config=dict(parts.vae_config, _class_name="AutoencoderKL"),
        vae_params=host(frozen["vae"]), text_config=text_config,
        text_params=host(frozen["text_encoder"]), tokenizer_dir=tok_dir,
        scheduler_config=scheduler_config(config), text_key_prefix="text_model.")
    return sd_folder.save_sd_folder(out_dir, folder)


def save_lora(out, params, config) -> str:
  """Writes an LCM-LoRA run's adapters (its params) as the PEFT / diffusers LoRA file at
  `out` (a .safetensors path, or a folder that gets pytorch_lora_weights.safetensors), the
  scale alpha / r folded in; returns the file."""
  check_exportable(config, "lora")
  # pylint: disable-next=g-import-not-at-top
  from cm_jax.nets import lora_files
  return lora_files.save_lora_file(out, jax.tree.map(np.asarray, jax.device_get(params)),
                                   _method(config).lora_scale)


def _method(config):
  # pylint: disable-next=g-import-not-at-top
  from cm_jax.methods import network_input_shape
  shape = network_input_shape(config)
  net = build_network(config.model, image_size=shape[0], channels=shape[-1], num_classes=0)
  return build_method(net, config)
