"""ADMUNet parameters as an openai/consistency_models UNetModel state dict (.pt).

The inverse of openai_import: keys 'input_blocks.1.0.in_layers.2.weight' etc., conv
weights OIHW, linear weights (out, in), GroupNorm 'weight', label_emb.weight (classes,
4*model_channels). Attention qkv/proj_out are written as the 2-D 1x1 convs
(O, I, 1, 1) of consistency_models' AttentionBlock (dims=2) with the qkv channels in its
(3, heads, head_dim) order; `qkv_layout='heads_three', conv1d_attention=True` writes
guided-diffusion's legacy layout instead (Conv1d weights (O, I, 1)).

The file is written with torch.save of an OrderedDict of tensors only, so
`torch.load(path, weights_only=True)` reads it and `UNetModel.load_state_dict` accepts it.
"""
from __future__ import annotations

import collections
import os
from typing import Dict

import numpy as np

from cm_jax.interop import name_maps


def openai_state_dict(params, model_cfg, qkv_layout: str = "three_heads",
                      conv1d_attention: bool = False) -> Dict[str, np.ndarray]:
  """ADMUNet params -> {torch key: numpy array} in UNetModel's layout."""
  if model_cfg.get("name", "adm") != "adm":
    raise ValueError(f"the openai layout is for ADM nets; this run's network is "
                     f"{model_cfg.name!r} (use --format safetensors)")
  flat = name_maps.flatten(params)
  if any(p[0] == "cond_emb" for p in flat):
    raise ValueError("this net has a cond_emb (guidance-scale) input, which UNetModel lacks")
  out: Dict[str, np.ndarray] = collections.OrderedDict()
  for path, v in flat.items():
    v = np.asarray(v)
    attn_conv = len(path) >= 2 and path[-2] in ("qkv", "proj_out")
    if name_maps.is_qkv(path):
      heads = name_maps.adm_heads(v.shape[-1] // 3, model_cfg.get("num_head_channels", -1),
                                  model_cfg.get("num_heads", -1))
      v = name_maps.permute_qkv(v, heads, "three_heads", qkv_layout, axis=-1)
    ndim = 3 if (attn_conv and conv1d_attention) else 4
    out[name_maps.path_to_openai_key(path)] = name_maps.flax_to_openai_leaf(path, v, ndim)
  return out


def save(path: str, params, model_cfg, qkv_layout: str = "three_heads",
         conv1d_attention: bool = False) -> str:
  """torch.save the state dict of tensors to `path` (a directory gets 'model.pt')."""
  import torch  # pylint: disable=g-import-not-at-top
  if os.path.isdir(path) or path.endswith(os.sep) or not os.path.splitext(path)[1]:
    os.makedirs(path, exist_ok=True)
    path = os.path.join(path, "model.pt")
  else:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  state = openai_state_dict(params, model_cfg, qkv_layout, conv1d_attention)
  torch.save(collections.OrderedDict((k, torch.from_numpy(np.array(v))) for k, v in state.items()),
             path)
  return path
