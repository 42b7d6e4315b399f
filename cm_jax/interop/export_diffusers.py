"""ADMUNet runs as a diffusers directory: UNet2DModel + scheduler (+ pipeline index).

  <out>/unet/config.json                          UNet2DModel config
  <out>/unet/diffusion_pytorch_model.safetensors  weights (torch layout)
  <out>/scheduler/scheduler_config.json           CMStochasticIterativeScheduler (consistency
                                                  models) or EDMEulerScheduler (EDM teachers)
  <out>/model_index.json                          ConsistencyModelPipeline (consistency models)
  <out>/cm_jax.json                               the cm_jax config facts (c_noise, sigmas, ...)

so that `diffusers.ConsistencyModelPipeline.from_pretrained(out)` loads and samples a
consistency model, and `UNet2DModel.from_pretrained(out, subfolder="unet")` plus
`EDMEulerScheduler.from_pretrained(out, subfolder="scheduler")` give an EDM teacher.

The ADM -> UNet2DModel correspondence is that of diffusers'
scripts/convert_consistency_to_diffusers.py (name_maps.adm_diffusers_rules): ResnetBlock2D
for ResBlock, the resampling ResBlocks as 'resnet' down/upsamplers (downsample_type =
upsample_type = 'resnet'), Attention with to_q/to_k/to_v split from the fused qkv conv
(3, heads, head_dim order), sinusoidal time embedding with flip_sin_to_cos=True and
freq_shift=0 (ADM's [cos, sin], max period 10^4), and attn_norm_num_groups set so the middle
attention keeps its GroupNorm. It needs resblock_updown=True, channel_mult[0] == 1 (the
time embedding width is block_out_channels[0] in diffusers, model_channels in ADM),
num_head_channels > 0 (diffusers has one head width for every level) and no cond_emb.

What the pipeline feeds the UNet: ConsistencyModelPipeline scales the input by
1/sqrt(sigma^2 + sigma_data^2) (CMStochasticIterativeScheduler.scale_model_input) and passes
the timestep 250 ln(sigma + 1e-44) (sigma_to_t); its step applies the boundary-condition
scalings c_skip = sd^2/((s - s_min)^2 + sd^2), c_out = (s - s_min) sd / sqrt(s^2 + sd^2) and
clips to [-1, 1]: exactly cm_jax's consistency parameterisation with
config.precond.c_noise='openai'. A consistency model trained with c_noise='edm' (ln(s)/4)
would see timesteps 1000x too large in that pipeline, so it is refused. EDMEulerScheduler
feeds ln(sigma)/4 (c_noise='edm'); for an EDM teacher with c_noise='openai', cm_jax.json says
so and the scheduler's timesteps must be multiplied by 1000 before they reach the UNet.
"""
from __future__ import annotations

import json
import os
from typing import Dict, Optional

import numpy as np

from cm_jax.interop import name_maps

DIFFUSERS_VERSION_FALLBACK = "0.21.0"
CONSISTENCY_METHODS = ("cd", "ct", "ict")


def _diffusers_version() -> str:
  try:
    import diffusers  # pylint: disable=g-import-not-at-top
    return diffusers.__version__
  except ImportError:
    return DIFFUSERS_VERSION_FALLBACK


def check_exportable(model_cfg) -> None:
  problems = []
  if model_cfg.get("name") != "adm":
    problems.append(f"network {model_cfg.get('name')!r} (only ADM maps onto UNet2DModel)")
  else:
    if not model_cfg.get("resblock_updown", True):
      problems.append("resblock_updown=False")
    if float(model_cfg.channel_mult[0]) != 1:
      problems.append(f"channel_mult[0]={model_cfg.channel_mult[0]} (must be 1)")
    if any(float(m) != int(m) for m in model_cfg.channel_mult):
      problems.append("fractional channel_mult")
    if int(model_cfg.get("num_head_channels", -1)) <= 0:
      problems.append("num_head_channels <= 0 (diffusers uses one head width)")
    if int(model_cfg.get("cond_dim", 0)) > 0:
      problems.append("cond_dim > 0 (UNet2DModel has no extra conditioning input)")
  if problems:
    raise ValueError("cannot export to diffusers: " + "; ".join(problems) +
                     " (use --format safetensors)")


def unet_config(model_cfg, image_size: int, channels: int, num_classes: int) -> dict:
  """UNet2DModel config of an ADMUNet."""
  check_exportable(model_cfg)
  mc = int(model_cfg.model_channels)
  size = int(image_size)
  attn = {int(r) for r in model_cfg.attention_resolutions}
  has_attn = [(size >> lvl) in attn for lvl in range(len(model_cfg.channel_mult))]
  groups = int(model_cfg.get("num_groups", 32))
  return {
      "_class_name": "UNet2DModel",
      "_diffusers_version": _diffusers_version(),
      "sample_size": size,
      "in_channels": int(channels),
      "out_channels": int(channels),
      "center_input_sample": False,
      "time_embedding_type": "positional",
      "flip_sin_to_cos": True,
      "freq_shift": 0,
      "down_block_types": ["AttnDownBlock2D" if a else "ResnetDownsampleBlock2D"
                           for a in has_attn],
      "mid_block_type": "UNetMidBlock2D",
      "up_block_types": ["AttnUpBlock2D" if a else "ResnetUpsampleBlock2D"
                         for a in reversed(has_attn)],
      "block_out_channels": [int(m * mc) for m in model_cfg.channel_mult],
      "layers_per_block": int(model_cfg.num_res_blocks),
      "mid_block_scale_factor": 1,
      "downsample_padding": 1,
      "downsample_type": "resnet",
      "upsample_type": "resnet",
      "dropout": 0.0,
      "act_fn": "silu",
      "attention_head_dim": int(model_cfg.num_head_channels),
      "norm_num_groups": groups,
      "attn_norm_num_groups": groups,
      "norm_eps": 1e-5,
      "resnet_time_scale_shift": ("scale_shift" if model_cfg.get("use_scale_shift_norm", True)
                                  else "default"),
      "add_attention": True,
      "class_embed_type": None,
      "num_class_embeds": int(num_classes) if num_classes else None,
  }


def _rules(model_cfg, image_size: int):
  return name_maps.adm_diffusers_rules(
      int(image_size), int(model_cfg.model_channels), model_cfg.channel_mult,
      int(model_cfg.num_res_blocks), model_cfg.attention_resolutions,
      int(model_cfg.get("num_head_channels", 64)), int(model_cfg.get("num_heads", -1)))


def diffusers_state_dict(params, model_cfg, image_size: int) -> Dict[str, np.ndarray]:
  """ADMUNet params -> UNet2DModel state dict (numpy, torch layout)."""
  check_exportable(model_cfg)
  flat = name_maps.flatten(params)
  state, used = name_maps.apply_rules_from_flax(flat, _rules(model_cfg, image_size))
  left = sorted(set(flat) - set(used))
  if left:
    raise ValueError(f"ADMUNet parameters with no UNet2DModel counterpart: {left[:8]}")
  return state


def params_from_diffusers(state: Dict[str, np.ndarray], model_cfg, image_size: int,
                          expected: Optional[name_maps.FlatParams] = None) -> dict:
  """UNet2DModel state dict (numpy) -> ADMUNet params (the inverse of diffusers_state_dict)."""
  check_exportable(model_cfg)
  flat, used = name_maps.apply_rules_to_flax(state, _rules(model_cfg, image_size))
  left = sorted(set(state) - set(used))
  if left:
    raise ValueError(f"UNet2DModel parameters with no ADMUNet counterpart: {left[:8]}")
  if expected is not None:
    name_maps.check_against(flat, expected, "diffusers state dict")
  return name_maps.unflatten(flat)


def scheduler_config(config) -> dict:
  """CMStochasticIterativeScheduler for consistency models, EDMEulerScheduler for EDM."""
  p = config.precond
  common = {"_diffusers_version": _diffusers_version(), "sigma_min": float(p.sigma_min),
            "sigma_max": float(p.sigma_max), "sigma_data": float(p.sigma_data),
            "rho": float(p.rho)}
  if config.method.name in CONSISTENCY_METHODS:
    grid = int(config.sample.get("grid_points", 0) or 40)
    return dict(common, _class_name="CMStochasticIterativeScheduler", num_train_timesteps=grid,
                s_noise=1.0, clip_denoised=True)
  return dict(common, _class_name="EDMEulerScheduler", sigma_schedule="karras",
              num_train_timesteps=1000, prediction_type="epsilon", rho=float(p.rho),
              final_sigmas_type="zero")


def save(out_dir: str, params, config, which: str = "") -> str:
  """Writes the diffusers directory for an ADM run; returns out_dir."""
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  is_cm = config.method.name in CONSISTENCY_METHODS
  c_noise = config.precond.get("c_noise", "edm")
  if is_cm and c_noise != "openai":
    raise ValueError(
        "ConsistencyModelPipeline feeds the UNet 250 ln(sigma) (c_noise='openai'); this "
        f"consistency model was trained with c_noise={c_noise!r}. Export it with "
        "--format safetensors, or train with --config.precond.c_noise=openai.")
  size = int(config.data.image_size)
  ucfg = unet_config(config.model, size, int(config.data.channels),
                     int(config.data.num_classes))
  state = diffusers_state_dict(params, config.model, size)
  os.makedirs(os.path.join(out_dir, "unet"), exist_ok=True)
  os.makedirs(os.path.join(out_dir, "scheduler"), exist_ok=True)
  _write_json(os.path.join(out_dir, "unet", "config.json"), ucfg)
  save_file({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in state.items()},
            os.path.join(out_dir, "unet", "diffusion_pytorch_model.safetensors"),
            metadata={"format": "pt"})
  _write_json(os.path.join(out_dir, "scheduler", "scheduler_config.json"),
              scheduler_config(config))
  if is_cm:
    _write_json(os.path.join(out_dir, "model_index.json"), {
        "_class_name": "ConsistencyModelPipeline", "_diffusers_version": _diffusers_version(),
        "scheduler": ["diffusers", "CMStochasticIterativeScheduler"],
        "unet": ["diffusers", "UNet2DModel"]})
  note = ("EDMEulerScheduler passes ln(sigma)/4 as the timestep; this network expects "
          "250 ln(sigma): multiply the scheduler's timesteps by 1000"
          if (not is_cm and c_noise == "openai") else "")
  _write_json(os.path.join(out_dir, "cm_jax.json"), {
      "method": config.method.name, "params": which, "c_noise": c_noise,
      "parameterization": "consistency" if is_cm else "edm",
      "precond": config.precond.to_dict(), "note": note})
  return out_dir


def _write_json(path: str, obj: dict) -> None:
  with open(path, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True)
    f.write("\n")
