"""Import openai/consistency_models (and guided-diffusion) UNetModel checkpoints into ADMUNet.

The released files (edm_imagenet64_ema.pt, cd_imagenet64_l2.pt, cd_imagenet64_lpips.pt,
ct_imagenet64.pt, edm/cd/ct_bedroom256*.pt, edm/cd/ct_cat256*.pt) are plain state dicts
written by torch.save. They are read with `torch.load(..., weights_only=True)`: PyTorch's
restricted unpickler, which rebuilds tensors and plain containers and refuses anything else,
so no code from the file runs.

The mapping is mechanical (cm_jax/nets/adm.py docstring; name_maps.openai_key_to_path), plus
the attention qkv channel order: openai/consistency_models stores (3, heads, head_dim)
('three_heads', the default here); guided-diffusion's QKVAttentionLegacy nets store
(heads, 3, head_dim): pass qkv_layout='heads_three' for those.
"""
from __future__ import annotations

import os
from typing import Dict, Optional

import numpy as np

from cm_jax.interop import name_maps
from cm_jax.utils import safe_load


def tensor_to_numpy(t) -> np.ndarray:
  """A CPU torch tensor as a float32 (for floating types) numpy array; exact for float32,
  exact upcast for float16/bfloat16."""
  import torch  # pylint: disable=g-import-not-at-top
  t = t.detach().cpu()
  if t.is_floating_point() and t.dtype != torch.float32:
    t = t.to(torch.float32)
  return t.numpy().copy()


def load_torch_state_dict(path: str) -> Dict[str, np.ndarray]:
  """A torch.save'd state dict as {key: numpy array}, read with weights_only=True."""
  import torch  # pylint: disable=g-import-not-at-top
  obj = safe_load.load_torch(path, "PyTorch state dict")
  for wrapper in ("state_dict", "model", "ema"):  # common wrappers around a state dict
    if isinstance(obj, dict) and wrapper in obj and isinstance(obj[wrapper], dict) and not any(
        torch.is_tensor(v) for v in obj.values()):
      obj = obj[wrapper]
  if not isinstance(obj, dict) or not all(torch.is_tensor(v) for v in obj.values()):
    raise ValueError(f"{path!r} is not a state dict of tensors (found {type(obj).__name__})")
  return name_maps.strip_prefix({k: tensor_to_numpy(v) for k, v in obj.items()})


def adm_params_from_openai(state: Dict[str, np.ndarray], model_cfg,
                           qkv_layout: str = "three_heads") -> name_maps.FlatParams:
  """UNetModel state dict -> flat ADMUNet params. `model_cfg` needs num_head_channels (and
  num_heads when num_head_channels <= 0) to split the qkv channels into heads."""
  if qkv_layout not in ("three_heads", "heads_three"):
    raise ValueError(f"qkv_layout {qkv_layout!r}: openai checkpoints use 'three_heads' "
                     "(consistency_models) or 'heads_three' (guided-diffusion legacy)")
  flat: name_maps.FlatParams = {}
  for key, w in state.items():
    path = name_maps.openai_key_to_path(key, np.ndim(w))
    leaf = name_maps.openai_to_flax_leaf(key, w)
    if name_maps.is_qkv(path):
      heads = name_maps.adm_heads(leaf.shape[-1] // 3, model_cfg.get("num_head_channels", -1),
                                  model_cfg.get("num_heads", -1))
      leaf = name_maps.permute_qkv(leaf, heads, qkv_layout, "three_heads", axis=-1)
    flat[path] = leaf
  return flat


def import_openai(path: str, model_cfg, expected: Optional[name_maps.FlatParams] = None,
                  qkv_layout: str = "three_heads") -> dict:
  """Read an openai UNetModel checkpoint into an ADMUNet parameter tree (numpy leaves).

  `expected` (flat shapes of the network the config builds) turns any name or shape
  mismatch into one ValueError listing them, instead of a failure at the first apply.
  """
  if model_cfg.get("name", "adm") != "adm":
    raise ValueError(f"openai checkpoints are ADM UNets; the config's network is "
                     f"{model_cfg.name!r}")
  flat = adm_params_from_openai(load_torch_state_dict(path), model_cfg, qkv_layout)
  if expected is not None:
    name_maps.check_against(flat, expected, f"checkpoint {os.path.basename(path)}")
  return name_maps.unflatten(flat)


def num_classes_in(state: Dict[str, np.ndarray]) -> int:
  """Classes of a UNetModel state dict (0 when it has no label embedding)."""
  w = state.get("label_emb.weight")
  return 0 if w is None else int(w.shape[0])
