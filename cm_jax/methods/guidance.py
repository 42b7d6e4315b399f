"""Classifier-free guidance set-up shared by the diffusion methods (EDM, VP): the null
class that label dropout trains (Ho & Salimans 2022, Algorithm 1) and the guided, clipped
denoisers their samplers use (the math itself is in cm_jax.conditioning)."""
from __future__ import annotations

from typing import Callable, Optional

import jax.numpy as jnp

from cm_jax import conditioning as cond_lib
from cm_jax.nets import null_class_index


def check_guidance_setup(config) -> Optional[int]:
  """The null class of a run, after checking label dropout can use it (one-line errors)."""
  null = null_class_index(config.model, config.data.num_classes)
  rate = float(config.method.get("label_dropout", 0.0) or 0.0)
  if not 0.0 <= rate < 1.0:
    raise ValueError(f"method.label_dropout must be in [0, 1), got {rate}")
  if rate > 0 and null is None:
    raise ValueError("method.label_dropout > 0 needs a class-conditional model with a null "
                     "class: set --config.model.null_class=True (and data.num_classes > 0)")
  return null


def clipped(denoise: Callable) -> Callable:
  """D clipped to [-1, 1] at every evaluation (after guidance, when guided)."""
  return lambda x, s, c=None: jnp.clip(denoise(x, s, c), -1.0, 1.0)


def sampling_denoiser(denoise: Callable, guidance: float, null_class: Optional[int],
                      clip: bool) -> Callable:
  """The denoiser a sampler runs: guided with strength w = `guidance` when non-zero
  (x_hat = (1 + w) x_c - w x_u), then clipped when `clip`."""
  if guidance:
    if null_class is None:
      raise ValueError("--guidance needs a model trained with a null class "
                       "(model.null_class=True, method.label_dropout > 0)")
    denoise = cond_lib.guided_denoiser(denoise, guidance, null_class)
  return clipped(denoise) if clip else denoise
