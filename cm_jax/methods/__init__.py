"""One module per paper; `build_method` picks one by `config.method.name`."""
from __future__ import annotations

from cm_jax.methods.autoencoder import AutoencoderKLTraining
from cm_jax.methods.consistency import (ConsistencyDistillation, ConsistencyTraining,
                                        ImprovedConsistencyTraining)
from cm_jax.methods.edm import EDM
from cm_jax.methods.guided_distillation import GuidedDistillation
from cm_jax.methods.latent_consistency import (LatentConsistencyDistillation,
                                                LatentConsistencyFinetuning)
from cm_jax.methods.latent_diffusion import LatentDiffusion
from cm_jax.methods.multistep_consistency import (MultistepConsistency,
                                                  MultistepConsistencyTraining)
from cm_jax.methods.olss import OLSS
from cm_jax.methods.progressive import ProgressiveDistillation
from cm_jax.methods.vp_diffusion import VPDiffusion

METHODS = {
    "edm": EDM,
    "vp": VPDiffusion,
    "cd": ConsistencyDistillation,
    "ct": ConsistencyTraining,
    "ict": ImprovedConsistencyTraining,
    "guided": GuidedDistillation,
    "pd": ProgressiveDistillation,
    "mcm_cd": MultistepConsistency,
    "mcm_ct": MultistepConsistencyTraining,
    "olss": OLSS,
    "autoencoder_kl": AutoencoderKLTraining,
    "ldm": LatentDiffusion,
    "lcd": LatentConsistencyDistillation,
    "lcf": LatentConsistencyFinetuning,
}


def method_class(config):
  name = config.method.name
  if name not in METHODS:
    raise ValueError(f"unknown method {name!r}; choose from {sorted(METHODS)}")
  return METHODS[name]


def network_input_shape(config) -> tuple[int, int, int]:
  """(H, W, C) the network sees: the data's for pixel methods; a method that works
  elsewhere (an autoencoder's latent space) says so with a classmethod
  `network_input_shape(config)`, and then provides `decode(x)` back to images."""
  cls = method_class(config)
  if hasattr(cls, "network_input_shape"):
    return tuple(int(d) for d in cls.network_input_shape(config))
  size = config.data.image_size
  return (size, size, config.data.channels)


def build_method(net, config):
  return method_class(config)(net, config)
