"""Flax Linen networks: (x, noise_cond, labels, cond) -> output; no noise schedule inside."""
from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

NETWORKS = ("adm", "ncsnpp")
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def build_network(model_cfg, *, image_size: int, channels: int, num_classes: int) -> nn.Module:
  """The network named by `model_cfg.name`, shaped for the data set.

  Every other field of `model_cfg` is passed to the module as a keyword, so a
  config override like `--config.model.dropout=0.1` reaches the network as is.
  """
  kwargs = {k: (tuple(v) if isinstance(v, list) else v)
            for k, v in model_cfg.to_dict().items() if k != "name"}
  kwargs["dtype"] = _DTYPES[kwargs.get("dtype", "float32")]
  kwargs.update(image_size=image_size, in_channels=channels, out_channels=channels,
                num_classes=num_classes or None)
  if model_cfg.name == "adm":
    from cm_jax.nets.adm import ADMUNet
    return ADMUNet(**kwargs)
  if model_cfg.name == "ncsnpp":
    from cm_jax.nets.ncsnpp import NCSNppUNet
    return NCSNppUNet(**kwargs)
  raise ValueError(f"unknown network {model_cfg.name!r}; choose from {NETWORKS}")
