"""Flax Linen networks: (x, noise_cond, labels, cond) -> output; no noise schedule inside."""
from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

NETWORKS = ("adm", "ncsnpp", "sd_unet", "sd_vae")
# Networks whose fields are diffusers' config keys (built with their from_config).
_DIFFUSERS_STYLE = ("sd_unet", "sd_vae")
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def null_class_index(model_cfg, num_classes: int):
  """The label that means "no label" (classifier-free guidance), or None without one."""
  return int(num_classes) if (num_classes and model_cfg.get("null_class", False)) else None


def build_network(model_cfg, *, image_size: int, channels: int, num_classes: int) -> nn.Module:
  """The network named by `model_cfg.name`, shaped for the data set.

  Every other field of `model_cfg` is passed to the module as a keyword, so a
  config override like `--config.model.dropout=0.1` reaches the network as is, except:
  `null_class` (True: one more class embedding, index num_classes, the "no label" token
  classifier-free guidance trains with label dropout) and `out_channels_factor` (2 for
  diffusion_distillation's 'both' output: x and eps channels).
  """
  if model_cfg.name in _DIFFUSERS_STYLE:
    return _build_diffusers_style(model_cfg, channels)
  kwargs = {k: (tuple(v) if isinstance(v, list) else v)
            for k, v in model_cfg.to_dict().items()
            if k not in ("name", "null_class", "out_channels_factor")}
  kwargs["dtype"] = _DTYPES[kwargs.get("dtype", "float32")]
  classes = (num_classes + 1 if model_cfg.get("null_class", False) else num_classes) \
      if num_classes else 0
  out_channels = channels * int(model_cfg.get("out_channels_factor", 1) or 1)
  kwargs.update(image_size=image_size, in_channels=channels, out_channels=out_channels,
                num_classes=classes or None)
  if model_cfg.name == "adm":
    from cm_jax.nets.adm import ADMUNet
    return ADMUNet(**kwargs)
  if model_cfg.name == "ncsnpp":
    from cm_jax.nets.ncsnpp import NCSNppUNet
    return NCSNppUNet(**kwargs)
  raise ValueError(f"unknown network {model_cfg.name!r}; choose from {NETWORKS}")


def _build_diffusers_style(model_cfg, channels: int) -> nn.Module:
  """Stable Diffusion's networks: `model_cfg` holds a diffusers config's keys (what
  `configs/digits32_*.py` and `--pretrained` folders give), and the data decides the
  channels (latent channels for the UNet, image channels for the autoencoder)."""
  fields = {k: v for k, v in model_cfg.to_dict().items() if k != "name"}
  fields["dtype"] = _DTYPES[fields.get("dtype", "float32")]
  fields.update(in_channels=channels, out_channels=channels)
  if model_cfg.name == "sd_unet":
    from cm_jax.nets.sd_unet import UNet2DCondition
    return UNet2DCondition.from_config(fields)
  from cm_jax.nets.sd_vae import AutoencoderKL
  return AutoencoderKL.from_config(fields)


def init_inputs(config, image_shape, batch: int = 1) -> tuple[tuple, dict]:
  """(args, kwargs) of the `init` call that fixes every parameter's shape of the network
  `config` builds: `example_inputs` for the pixel UNets; for Stable Diffusion's UNet also
  a text context (B, 77, cross_attention_dim) so its cross-attention layers get their key
  and value shapes; an image alone for the autoencoder."""
  name = config.model.name
  if name == "sd_vae":
    return (jnp.zeros((batch,) + tuple(image_shape), jnp.float32),), {}
  args = example_inputs(config, batch, image_shape=image_shape)
  if name == "sd_unet":
    cond_dim = int(config.model.get("time_cond_proj_dim", 0) or 0)
    cond = jnp.zeros((batch, cond_dim), jnp.float32) if cond_dim else None
    context = jnp.zeros((batch, 77, int(config.model.cross_attention_dim)), jnp.float32)
    return (args[0], args[1], None, cond), {"context": context, "train": False}
  return args, {"train": False}


def example_inputs(config, batch: int = 1, image_shape=None):
  """Dummy (x, noise_cond, labels, cond) that fix every parameter's shape of the network
  `config` builds: x zeros (batch, H, W, C) (default H = W = data.image_size, C =
  data.channels), noise_cond zeros (batch,), labels int32 zeros when data.num_classes > 0
  else None, cond zeros (batch, model.cond_dim) when the model has a cond_dim else None."""
  if image_shape is None:
    size = config.data.image_size
    image_shape = (size, size, config.data.channels)
  x = jnp.zeros((batch,) + tuple(image_shape), jnp.float32)
  noise_cond = jnp.zeros((batch,), jnp.float32)
  labels = jnp.zeros((batch,), jnp.int32) if config.data.num_classes > 0 else None
  cond_dim = config.model.get("cond_dim", 0)
  cond = jnp.zeros((batch, cond_dim), jnp.float32) if cond_dim else None
  return x, noise_cond, labels, cond
