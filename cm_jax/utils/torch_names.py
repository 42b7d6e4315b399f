"""PyTorch state dicts of diffusers / transformers modules <-> Flax parameter trees.

The Flax networks of the latent path (`cm_jax.nets.sd_unet`, `sd_vae`, `clip_text`) name
every submodule exactly like the PyTorch attribute it stands for, so one mechanical rule
converts any of them, in both directions, without a table per network:

  torch key                                   Flax path
  down_blocks.0.resnets.1.conv1.weight        down_blocks_0 / resnets_1 / conv1 / kernel
  ...attn1.to_out.0.bias                      ... / attn1 / to_out_0 / bias
  text_model.encoder.layers.3.fc1.weight      text_model / encoder / layers_3 / fc1 / kernel

i.e. every numeric segment is joined to the segment before it with "_" (a ModuleList or
Sequential index), and the leaf `weight` becomes whichever of `kernel` (nn.Conv: (O, I, kh,
kw) -> (kh, kw, I, O); nn.Dense: (O, I) -> (I, O)), `scale` (nn.GroupNorm, nn.LayerNorm) or
`embedding` (nn.Embed) the Flax module at that path has. Transposes only, so
`state_dict_from_params(params_from_state_dict(sd, ...))` gives `sd` back bit for bit.

A tensor the Flax tree lacks, a Flax leaf no tensor fills, or a shape that disagrees is a
one-line ValueError naming the tensor: a checkpoint never half-loads.
"""
from __future__ import annotations

from typing import Iterable, Mapping

import numpy as np
from flax import traverse_util

_WEIGHT_LEAVES = ("kernel", "scale", "embedding")
# Attribute names that end in "_<digit>" without being a list index (diffusers'
# TimestepEmbedding.linear_1/2, some output heads); the reverse rule keeps them whole.
_LITERAL_NAMES = frozenset({"linear_1", "linear_2", "linear_3", "proj_out_1", "proj_out_2"})


def module_path(key: str) -> tuple[str, ...]:
  """'down_blocks.0.resnets.1.conv1' -> ('down_blocks_0', 'resnets_1', 'conv1')."""
  out: list[str] = []
  for part in key.split("."):
    if part.isdigit() and out:
      out[-1] = f"{out[-1]}_{part}"
    else:
      out.append(part)
  return tuple(out)


def torch_key(path: tuple[str, ...]) -> str:
  """The inverse of `module_path` for a Flax module path (leaf excluded)."""
  parts: list[str] = []
  for name in path:
    head, sep, tail = name.rpartition("_")
    is_index = sep and tail.isdigit() and head and name not in _LITERAL_NAMES
    parts.extend([head, tail] if is_index else [name])
  return ".".join(parts)


def to_flax(leaf: str, value: np.ndarray) -> np.ndarray:
  """conv (O, I, kh, kw) -> (kh, kw, I, O); linear (O, I) -> (I, O); others as they are."""
  if leaf != "kernel":
    return value
  return np.ascontiguousarray(value.transpose(2, 3, 1, 0) if value.ndim == 4 else value.T)


def from_flax(leaf: str, value: np.ndarray) -> np.ndarray:
  """The inverse of `to_flax`."""
  if leaf != "kernel":
    return value
  return np.ascontiguousarray(value.transpose(3, 2, 0, 1) if value.ndim == 4 else value.T)


def params_from_state_dict(state: Mapping[str, np.ndarray], abstract_params, *,
                           what: str = "checkpoint", ignore: Iterable[str] = ()) -> dict:
  """The Flax parameter tree shaped like `abstract_params` (arrays or ShapeDtypeStructs,
  e.g. `jax.eval_shape(net.init, ...)['params']`) filled from a torch state dict of numpy
  arrays. `ignore`: keys to skip (buffers such as CLIP's `position_ids`). Float32 out."""
  expected = traverse_util.flatten_dict(abstract_params)
  modules: dict[tuple[str, ...], set] = {}
  for path in expected:
    modules.setdefault(path[:-1], set()).add(path[-1])
  ignore = set(ignore)
  out = {}
  for key, value in state.items():
    if key in ignore:
      continue
    module_key, _, torch_leaf = key.rpartition(".")
    module = module_path(module_key)
    leaves = modules.get(module)
    if leaves is None:
      raise ValueError(f"{what}: tensor {key!r} has no place in the Flax network "
                       f"(no module {'/'.join(module)}); is this the right architecture?")
    if torch_leaf == "weight":
      found = [l for l in _WEIGHT_LEAVES if l in leaves]
      leaf = found[0] if found else torch_leaf
    else:
      leaf = torch_leaf
    path = module + (leaf,)
    if path not in expected:
      raise ValueError(f"{what}: tensor {key!r} has no place in the Flax network "
                       f"(module {'/'.join(module)} has {sorted(leaves)})")
    array = to_flax(leaf, np.asarray(value))
    want = tuple(expected[path].shape)
    if array.shape != want:
      raise ValueError(f"{what}: tensor {key!r} has shape {tuple(np.shape(value))}, the Flax "
                       f"network expects {want} at {'/'.join(path)}")
    out[path] = array.astype(np.float32, copy=False)
  missing = [p for p in expected if p not in out]
  if missing:
    first = missing[0]
    leaf = "weight" if first[-1] in _WEIGHT_LEAVES else first[-1]
    raise ValueError(f"{what}: tensor {torch_key(first[:-1]) + '.' + leaf!r} is missing "
                     f"({len(missing)} Flax parameter(s) unfilled)")
  return traverse_util.unflatten_dict(out)


def state_dict_from_params(params) -> dict[str, np.ndarray]:
  """The torch state dict (numpy arrays, torch layouts and names) of a Flax tree that
  follows the naming rule above; the exact inverse of `params_from_state_dict`."""
  out = {}
  for path, value in traverse_util.flatten_dict(params).items():
    leaf = path[-1]
    torch_leaf = "weight" if leaf in _WEIGHT_LEAVES else leaf
    out[torch_key(path[:-1]) + "." + torch_leaf] = from_flax(leaf, np.asarray(value))
  return out
