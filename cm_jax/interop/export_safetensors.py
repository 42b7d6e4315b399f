"""Parameters as one .safetensors file (flat keys) plus a JSON of the network config.

  <out>/params.safetensors   keys are Flax paths joined by '/', e.g.
                             'input_blocks_1_0/in_layers_2/kernel'; arrays in the Flax
                             layout (conv kernels HWIO, dense kernels (in, out)), dtype as
                             stored (float32)
  <out>/config.json          {"format": "cm_jax.params", "model": config.model,
                              "data": {image_size, channels, num_classes},
                              "precond": config.precond, "method": config.method.name,
                              "params": which copy was exported}

The same JSON is also in the safetensors header metadata (key 'cm_jax_config'). Reading it
back (`load`) gives the exact arrays: import(export(params)) == params bit for bit. Only
numpy and the `safetensors` package are needed (no torch, no jax).
"""
from __future__ import annotations

import json
import os
from typing import Optional, Tuple

import numpy as np

from cm_jax.interop import name_maps

PARAMS_FILE = "params.safetensors"
CONFIG_FILE = "config.json"
SEP = "/"


def network_config_json(config, which: str = "") -> dict:
  """The part of a run config that fixes the network and how to call it."""
  return {
      "format": "cm_jax.params",
      "model": config.model.to_dict(),
      "data": {"image_size": int(config.data.image_size), "channels": int(config.data.channels),
               "num_classes": int(config.data.num_classes)},
      "precond": config.precond.to_dict(),
      "method": config.method.name,
      "params": which,
  }


def save(out_dir: str, params, config=None, which: str = "",
         extra: Optional[dict] = None) -> str:
  """Writes params (a nested dict of arrays) and the config JSON; returns the .safetensors path."""
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  os.makedirs(out_dir, exist_ok=True)
  flat = name_maps.flatten(params)
  tensors = {}
  for path, v in flat.items():
    key = SEP.join(path)
    if any(SEP in p for p in path):
      raise ValueError(f"parameter name {path} contains {SEP!r}")
    tensors[key] = np.ascontiguousarray(v)
  meta = dict(network_config_json(config, which) if config is not None else {}, **(extra or {}))
  text = json.dumps(meta, indent=2, sort_keys=True, default=_json_default)
  path = os.path.join(out_dir, PARAMS_FILE)
  save_file(tensors, path, metadata={"cm_jax_config": text})
  with open(os.path.join(out_dir, CONFIG_FILE), "w") as f:
    f.write(text + "\n")
  return path


def load(path: str) -> Tuple[dict, dict]:
  """(params as a nested dict of numpy arrays, config JSON) from a file or export directory."""
  from safetensors import safe_open  # pylint: disable=g-import-not-at-top
  if os.path.isdir(path):
    path = os.path.join(path, PARAMS_FILE)
  flat = {}
  with safe_open(path, framework="numpy") as f:
    meta = f.metadata() or {}
    for key in f.keys():
      flat[tuple(key.split(SEP))] = f.get_tensor(key)
  config = json.loads(meta["cm_jax_config"]) if "cm_jax_config" in meta else {}
  return name_maps.unflatten(flat), config


def _json_default(v):
  if isinstance(v, (np.integer, np.floating)):
    return v.item()
  if isinstance(v, tuple):
    return list(v)
  raise TypeError(f"not JSON serialisable: {type(v).__name__}")
