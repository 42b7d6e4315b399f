"""Run configs for imported checkpoints: a configs/<data>_<method>.py config with the
network, data shape and preconditioning of the released model.

Presets (source -> network):
  imagenet64       openai UNetModel (edm_imagenet64_ema.pt, cd_imagenet64_{l2,lpips}.pt,
                   ct_imagenet64.pt) or EDM DhariwalUNet (edm-imagenet-64x64-cond-adm.pkl)
                   -> ADM 192 ch, mult 1-2-3-4, 3 res blocks, attention 32/16/8 (64 ch/head),
                   scale-shift norm, resblock up/down, 1000 classes
  lsun256[-bedroom], lsun256-cat
                   openai UNetModel (edm/cd/ct_{bedroom,cat}256*.pt) -> ADM 256 ch,
                   mult 1-1-2-2-4-4, 2 res blocks, attention 32/16/8 (64 ch/head),
                   NO scale-shift norm, resblock up/down, unconditional (scripts/launch.sh)
  cifar10-ncsnpp   EDM SongUNet NCSN++ (edm-cifar10-32x32-{cond,uncond}-ve.pkl)
  cifar10-ddpmpp   EDM SongUNet DDPM++ (edm-cifar10-32x32-{cond,uncond}-vp.pkl)

c_noise: openai networks were trained on 250 ln(sigma) ('openai'), EDM's on ln(sigma)/4
('edm'). --method edm|cd|ct picks configs/<data>_edm.py / _cd*.py / _ct.py as the base
(LSUN reuses the ImageNet 64 files with the LSUN network, data and sampling settings of
openai's scripts/launch.sh).
"""
from __future__ import annotations

import importlib
import os
import sys
from typing import Optional

import ml_collections

PRESETS = ("imagenet64", "lsun256", "lsun256-bedroom", "lsun256-cat", "cifar10-ncsnpp",
           "cifar10-ddpmpp")
SOURCES = ("openai", "edm")
METHODS = ("edm", "cd", "ct")

_CONFIG_MODULES = {
    ("imagenet64", "edm"): "configs.imagenet64_edm",
    ("imagenet64", "cd"): "configs.imagenet64_cd",
    ("imagenet64", "ct"): "configs.imagenet64_ct",
    ("cifar10", "edm"): "configs.cifar10_edm",
    ("cifar10", "cd"): "configs.cifar10_cd_lpips",
    ("cifar10", "ct"): "configs.cifar10_ct",
}

# Fields of the released networks (openai scripts/launch.sh; EDM train.py --arch).
IMAGENET64_ADM = dict(name="adm", model_channels=192, channel_mult=(1, 2, 3, 4),
                      num_res_blocks=3, attention_resolutions=(32, 16, 8), num_head_channels=64,
                      use_scale_shift_norm=True, resblock_updown=True, num_groups=32)
LSUN256_ADM = dict(name="adm", model_channels=256, channel_mult=(1, 1, 2, 2, 4, 4),
                   num_res_blocks=2, attention_resolutions=(32, 16, 8), num_head_channels=64,
                   use_scale_shift_norm=False, resblock_updown=True, num_groups=32)
CIFAR10_NCSNPP = dict(name="ncsnpp", model_channels=128, channel_mult=(2, 2, 2),
                      num_res_blocks=4, attention_resolutions=(16,), embedding_type="fourier",
                      resample="fir", progressive_input="residual", progressive="none",
                      resblock_type="biggan", skip_rescale=True)
CIFAR10_DDPMPP = dict(CIFAR10_NCSNPP, embedding_type="positional", resample="plain",
                      progressive_input="none")

LSUN_EMA_SAMPLING = 0.9999432189950708
# Two-step ts of openai's launch.sh for LSUN 256 (CD: lpips bedroom; CT per data set).
_LSUN_CD_TS = (0, 17, 39)
_LSUN_CT_TS = {"lsun/bedroom": (0, 67, 150), "lsun/cat": (0, 62, 150)}


def family(preset: str) -> str:
  if preset not in PRESETS:
    raise ValueError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
  return preset.split("-")[0] if preset.startswith(("cifar10", "lsun256")) else preset


def method_from_filename(path: str) -> Optional[str]:
  """openai release names start with the method: edm_*, cd_*, ct_*."""
  base = os.path.basename(path).lower()
  for m in METHODS:
    if base.startswith(m + "_") or base.startswith(m + "-"):
      return m
  return None


def check_source(preset: str, source: str) -> None:
  if source not in SOURCES:
    raise ValueError(f"unknown source {source!r}; choose from {SOURCES}")
  fam = family(preset)
  if source == "openai" and fam == "cifar10":
    raise ValueError("openai/consistency_models released no CIFAR-10 PyTorch checkpoints "
                     "(its CIFAR-10 models are JAX); use --source edm for EDM's CIFAR-10 nets")
  if source == "edm" and fam == "lsun256":
    raise ValueError("EDM released no LSUN 256 networks; use --source openai")


def _import_config(name: str):
  """configs/ sits beside the cm_jax package in a checkout; outside the repository root
  it is not on sys.path, so add the checkout that holds this package."""
  try:
    return importlib.import_module(name)
  except ModuleNotFoundError as e:
    if e.name not in ("configs", name):
      raise
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  if not os.path.isfile(os.path.join(root, "configs", "base.py")):
    raise ModuleNotFoundError(f"cannot find the configs/ directory (looked in {root}); run "
                              f"from the cm_jax repository root")
  sys.path.insert(0, root)
  return importlib.import_module(name)


def build_config(preset: str, source: str, method: str, *, num_classes: Optional[int] = None,
                 sigma_data: float = 0.5, variant: str = "",
                 teacher_workdir: str = "") -> ml_collections.ConfigDict:
  """The run config of an imported checkpoint.

  variant='tiny' keeps the base config's tiny network and data size (for tests: a tiny
  checkpoint built in that shape imports through the same path)."""
  check_source(preset, source)
  if method not in METHODS:
    raise ValueError(f"unknown method {method!r}; choose from {METHODS}")
  if source == "edm" and method != "edm":
    raise ValueError("EDM checkpoints are diffusion models: import them with --method edm "
                     "(then distil with configs/*_cd*.py and config.method.teacher_workdir)")
  fam = family(preset)
  base_family = "cifar10" if fam == "cifar10" else "imagenet64"
  module = _import_config(_CONFIG_MODULES[(base_family, method)])
  c = module.get_config(variant)
  tiny = variant == "tiny"

  if fam == "imagenet64" and not tiny:
    c.model.update(**IMAGENET64_ADM)
  elif fam == "lsun256":
    name = "lsun/cat" if preset.endswith("cat") else "lsun/bedroom"
    c.data.update(name="tfds", tfds_name=name, random_flip=False)
    if tiny:
      c.model.update(use_scale_shift_norm=False)
    else:
      c.data.update(image_size=256)
      c.model.update(**LSUN256_ADM)
    if method == "edm":
      c.sample.update(batch_size=8 if tiny else 32)
    else:
      c.ema.update(rates=(0.9999, 0.99994, LSUN_EMA_SAMPLING), halflife_kimg=0.0)
      ts = _LSUN_CD_TS if method == "cd" else _LSUN_CT_TS[name]
      grid = 40 if method == "cd" else 151
      c.sample.update(params=f"ema_{LSUN_EMA_SAMPLING:g}", ts=ts, grid_points=grid,
                      batch_size=8 if tiny else 32)
      if method == "ct":
        c.method.update(s1=150)
  elif fam == "cifar10":
    arch = CIFAR10_DDPMPP if preset == "cifar10-ddpmpp" else CIFAR10_NCSNPP
    if tiny:
      arch = {k: v for k, v in arch.items()
              if k in ("name", "embedding_type", "resample", "progressive_input")}
    c.model.update(**arch)

  if num_classes is not None:
    c.data.update(num_classes=int(num_classes))
  if source == "openai":
    c.precond.update(c_noise="openai", sigma_data=0.5)
    if method == "edm":
      # The openai EDM teachers were sampled with Heun, 40 steps, no churn, and
      # karras_sample's default clip_denoised=True: D(x; sigma) clamped to [-1, 1] at
      # every evaluation (EDM Algorithm 1 does not clip; cm_jax's own EDM configs do not).
      c.sample.update(sampler="heun", num_steps=40 if not tiny else c.sample.num_steps,
                      clip_denoised=True)
  else:
    c.precond.update(c_noise="edm", sigma_data=float(sigma_data))
  if method == "cd" and teacher_workdir:
    c.method.update(teacher_workdir=teacher_workdir)
  return c


def apply_overrides(config: ml_collections.ConfigDict, overrides) -> None:
  """`key.path=value` strings (value parsed as a Python literal when it is one)."""
  import ast  # pylint: disable=g-import-not-at-top
  for item in overrides or ():
    if "=" not in item:
      raise ValueError(f"--set wants key.path=value, got {item!r}")
    key, text = item.split("=", 1)
    try:
      value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      value = text
    node = config
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    if leaf not in node:
      raise ValueError(f"--set {key}: the config has no field {leaf!r} there")
    node[leaf] = value
