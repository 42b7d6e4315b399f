"""The frozen pieces of a latent text-to-image model: autoencoder, text encoder, tokenizer.

Latent diffusion (Rombach et al. 2022, "High-Resolution Image Synthesis with Latent
Diffusion Models", Sec. 3) trains the denoiser on z = scaling_factor * E(x), the latents
of a frozen KL autoencoder, conditioned by cross-attention on a text encoder's token
states. The pieces come from one of two places, chosen by `config.method`:

* `pretrained`: a diffusers pipeline folder (`vae/`, `text_encoder/`, `tokenizer/`,
  `scheduler/`; Stable Diffusion and anything laid out like it), read by
  `cm_jax.nets.sd_folder` (safetensors, no torch).
* `vae_workdir` + `text_encoder` + `tokenizer`: an autoencoder trained by cm_jax
  (`configs/digits32_vae.py`, method `autoencoder_kl`) and a small CLIP text transformer
  given by its config. No pretrained text encoder can be read on a machine without a
  download, so that CLIP starts from `text_encoder_seed` and stays frozen: a fixed random
  transformer still maps each caption to its own token states, which is all
  cross-attention needs to tell the captions apart (the UNet learns what they mean).
  `tokenizer = "digits"` is the built-in word-level CLIP tokenizer over the digits
  captions (`cm_jax.data.text_tokenizer`).

Everything here is read once per process and kept on the host; the methods place it.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from cm_jax import runs
from cm_jax.data import text_tokenizer
from cm_jax.data.sources import cfg_get
from cm_jax.nets import clip_text, sd_vae


def vae_config_of(mcfg) -> dict:
  """The autoencoder's diffusers-style config: the pretrained folder's `vae/config.json`,
  else `method.vae` (what the configs write, so shapes are known without reading a run),
  else the saved config of the cm_jax autoencoder run `method.vae_workdir`."""
  folder = cfg_get(mcfg, "pretrained", "")
  if folder:
    path = os.path.join(folder, "vae", "config.json")
    if not os.path.isfile(path):
      raise FileNotFoundError(f"method.pretrained={folder!r} has no vae/config.json")
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  vae = mcfg.get("vae")
  if vae:
    return vae.to_dict() if hasattr(vae, "to_dict") else dict(vae)
  workdir = cfg_get(mcfg, "vae_workdir", "")
  if not workdir:
    raise ValueError("a latent method needs its autoencoder: set method.pretrained (a "
                     "diffusers folder) or method.vae_workdir (a run of configs/*_vae.py)")
  return autoencoder_config_of_run(runs.load_config(workdir))


def autoencoder_config_of_run(config) -> dict:
  """diffusers-style AutoencoderKL fields of a cm_jax `autoencoder_kl` run's config."""
  if config.method.name != "autoencoder_kl":
    raise ValueError(f"method.vae_workdir holds a {config.method.name!r} run, not an "
                     f"autoencoder (train one with configs/digits32_vae.py)")
  fields = {k: (list(v) if isinstance(v, tuple) else v)
            for k, v in config.model.to_dict().items() if k not in ("name", "dtype", "remat")}
  fields.update(in_channels=config.data.channels, out_channels=config.data.channels,
                sample_size=config.data.image_size)
  return fields


def latent_shape(mcfg, image_size: int) -> tuple[int, int, int]:
  """(h, w, c) of the latents of `image_size` images: one halving per encoder block
  after the first (diffusers' Encoder downsamples in every block but the last)."""
  vcfg = vae_config_of(mcfg)
  factor = 2 ** (len(vcfg["block_out_channels"]) - 1)
  if image_size % factor:
    raise ValueError(f"data.image_size={image_size} is not a multiple of the autoencoder's "
                     f"downsampling factor {factor}")
  return (image_size // factor, image_size // factor, int(vcfg.get("latent_channels", 4)))


def _jsonish(v):
  return list(v) if isinstance(v, tuple) else v


class LatentParts:
  """The frozen autoencoder, text encoder and tokenizer of one config (read lazily)."""

  def __init__(self, mcfg):
    self.mcfg = mcfg
    self.vae_config = vae_config_of(mcfg)
    self.vae = sd_vae.AutoencoderKL.from_config(self.vae_config)
    self.scaling_factor = float(self.vae_config.get("scaling_factor", 0.18215))
    self.clip_skip = int(cfg_get(mcfg, "clip_skip", 0))

  # -- text -----------------------------------------------------------------------------

  @functools.cached_property
  def _folder(self):
    folder = cfg_get(self.mcfg, "pretrained", "")
    if not folder:
      return None
    from cm_jax.nets import sd_folder  # pylint: disable=g-import-not-at-top
    return sd_folder.load_sd_folder(folder, components=("vae", "text_encoder", "tokenizer",
                                                        "scheduler"))

  @functools.cached_property
  def text_config(self) -> dict:
    if self._folder is not None:
      return dict(self._folder.text_config)
    cfg = self.mcfg.get("text_encoder")
    if cfg is None:
      raise ValueError("a latent method without method.pretrained needs method.text_encoder "
                       "(a CLIP text config)")
    return cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)

  @functools.cached_property
  def text_encoder(self):
    return clip_text.CLIPTextModel.from_config(self.text_config)

  @functools.cached_property
  def tokenizer(self):
    if self._folder is not None:
      return text_tokenizer.load_tokenizer(self._folder.tokenizer_dir)
    name = cfg_get(self.mcfg, "tokenizer", "")
    if name in text_tokenizer.BUILTIN:
      return text_tokenizer.builtin_tokenizer(name)
    if not name:
      raise ValueError("method.tokenizer is empty: name a tokenizer folder or 'digits'")
    return text_tokenizer.load_tokenizer(name)

  def tokenize(self, prompts) -> np.ndarray:
    return text_tokenizer.tokenize(self.tokenizer, list(prompts))

  @functools.cached_property
  def scheduler_config(self) -> Optional[dict]:
    return None if self._folder is None else dict(self._folder.scheduler_config)

  # -- parameters -------------------------------------------------------------------------

  @functools.cached_property
  def params(self) -> dict:
    """{'vae': ..., 'text_encoder': ...} on the host (float32 numpy)."""
    if self._folder is not None:
      return {"vae": self._folder.vae_params, "text_encoder": self._folder.text_params}
    workdir = cfg_get(self.mcfg, "vae_workdir", "")
    if not workdir:
      raise ValueError("method.vae_workdir is empty: train the autoencoder first "
                       "(configs/digits32_vae.py) and point this run at it")
    trained = autoencoder_config_of_run(runs.load_config(workdir))
    # The latent scale is the latent model's choice (SD's 0.18215), not the weights'.
    differs = sorted(k for k in set(trained) | set(self.vae_config)
                     if k not in ("scaling_factor", "shift_factor")
                     and _jsonish(trained.get(k)) != _jsonish(self.vae_config.get(k)))
    if differs:
      raise ValueError(f"the autoencoder run {workdir!r} differs from method.vae in "
                       f"{differs}; train the latent model on the autoencoder it was "
                       f"configured for")
    run = runs.load_run(workdir, cfg_get(self.mcfg, "vae_params", "ema"))
    ids = jnp.zeros((1, self.tokenizer.model_max_length), jnp.int32)
    seed = int(cfg_get(self.mcfg, "text_encoder_seed", 0))
    text = self.text_encoder.init(jax.random.key(seed), ids)["params"]
    return {"vae": jax.device_get(run.params), "text_encoder": jax.device_get(text)}

  @functools.cached_property
  def identity(self) -> str:
    """A short hash of the frozen weights (recorded in latent caches and runs)."""
    h = hashlib.sha256()
    for leaf in jax.tree.leaves(self.params):
      h.update(np.ascontiguousarray(np.asarray(leaf, np.float32)).tobytes())
    return h.hexdigest()[:16]

  # -- the frozen functions (pure in their params) -----------------------------------------

  def encode_text(self, text_params, input_ids) -> jax.Array:
    """Token states the UNet cross-attends to (clip_skip as diffusers' pipelines)."""
    out = self.text_encoder.apply({"params": text_params}, jnp.asarray(input_ids, jnp.int32))
    return clip_text.text_embeddings(out, self.clip_skip).astype(jnp.float32)

  def encode_images(self, vae_params, images, rng=None) -> jax.Array:
    """Scaled latents z = scaling_factor * (a posterior sample, or its mean without `rng`)
    of images in [-1, 1] (B, H, W, 3)."""
    mean, logvar = self.vae.apply({"params": vae_params}, jnp.asarray(images, jnp.float32),
                                  method=sd_vae.AutoencoderKL.encode)
    z = mean if rng is None else sd_vae.latent_sample(mean, logvar, rng)
    return z * self.scaling_factor

  def decode_latents(self, vae_params, z) -> jax.Array:
    """Images in [-1, 1] (clipped) from scaled latents."""
    x = self.vae.apply({"params": vae_params}, z / self.scaling_factor,
                       method=sd_vae.AutoencoderKL.decode)
    return jnp.clip(x.astype(jnp.float32), -1.0, 1.0)
