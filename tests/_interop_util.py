"""Shared pieces of the interop tests: tiny networks, random parameters, EDM-layout pickles.

EDM pickles are built here the way torch_utils.persistence lays them out (read from the
NVlabs/edm sources for the facts; no code of theirs): every network object pickles as a
call `torch_utils.persistence._reconstruct_persistent_obj(meta)`, `meta` holding the module's
*source code*, the class name and the object's __dict__. The fake
`torch_utils.persistence` installed here executes that source when called, as the real one
does, and the source writes a marker file: a loader that ran stored code leaves the marker.
"""
from __future__ import annotations

import contextlib
import sys
import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import torch

from cm_jax.interop import name_maps
from cm_jax.nets import build_network

TINY_ADM = dict(name="adm", model_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                attention_resolutions=(4,), num_head_channels=8, num_heads=-1, num_groups=8,
                use_scale_shift_norm=True, resblock_updown=True, cond_dim=0, dropout=0.0,
                dtype="float32", remat=False)


def model_cfg(**overrides) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(TINY_ADM, **overrides))


def net_for(cfg, image_size: int = 8, channels: int = 3, num_classes: int = 0):
  return build_network(cfg, image_size=image_size, channels=channels, num_classes=num_classes)


def random_params(net, image_size: int = 8, channels: int = 3, num_classes: int = 0,
                  seed: int = 0, scale: float = 0.2) -> dict:
  """Noise in every parameter (numpy; nothing is compiled)."""
  x = jnp.zeros((1, image_size, image_size, channels))
  y = jnp.zeros((1,), jnp.int32) if num_classes else None
  shapes = jax.eval_shape(lambda: net.init(jax.random.key(0), x, jnp.zeros((1,)), y))["params"]
  rng = np.random.RandomState(seed)
  return jax.tree.map(lambda s: (scale * rng.randn(*s.shape)).astype(np.float32), shapes)


def assert_trees_equal(a, b) -> None:
  fa, fb = name_maps.flatten(a), name_maps.flatten(b)
  assert set(fa) == set(fb), sorted(set(fa) ^ set(fb))[:5]
  for k in fa:
    assert fa[k].dtype == fb[k].dtype, k
    assert np.array_equal(fa[k], fb[k]), k  # bit for bit (no NaNs in these trees)


# ---- EDM persistence layout ------------------------------------------------------------------

def _fake_reconstruct(meta):
  """What torch_utils.persistence does: exec the stored module source (here: the payload)."""
  exec(meta["module_src"], {})  # pylint: disable=exec-used
  raise RuntimeError("the fake persistence module only runs the payload")


@contextlib.contextmanager
def fake_persistence():
  """Installs importable `torch_utils.persistence._reconstruct_persistent_obj`."""
  pkg = types.ModuleType("torch_utils")
  mod = types.ModuleType("torch_utils.persistence")
  _fake_reconstruct.__module__ = "torch_utils.persistence"
  _fake_reconstruct.__qualname__ = _fake_reconstruct.__name__ = "_reconstruct_persistent_obj"
  mod._reconstruct_persistent_obj = _fake_reconstruct
  pkg.persistence = mod
  saved = {k: sys.modules.get(k) for k in ("torch_utils", "torch_utils.persistence")}
  sys.modules["torch_utils"], sys.modules["torch_utils.persistence"] = pkg, mod
  try:
    yield mod
  finally:
    for k, v in saved.items():
      if v is None:
        sys.modules.pop(k, None)
      else:
        sys.modules[k] = v


class Persistent(torch.nn.Module):
  """A torch module that pickles like an EDM persistent class."""

  def __init__(self, class_name: str, module_src: str, **attrs):
    super().__init__()
    self._edm_class = class_name
    self._edm_src = module_src
    for k, v in attrs.items():
      setattr(self, k, v)

  def __reduce__(self):
    meta = dict(type="class", version=6, module_src=self._edm_src, class_name=self._edm_class,
                state=dict(self.__dict__))
    return (sys.modules["torch_utils.persistence"]._reconstruct_persistent_obj, (meta,))


def _leaf_class(name: str, params: dict) -> str:
  if "freqs" in params:
    return "FourierEmbedding"
  w = params.get("weight")
  if w is None:
    return "UNetBlock"
  return {1: "GroupNorm", 2: "Linear"}.get(w.ndim, "Conv2d")


def build_edm_network(state: dict, precond: str, arch: str, payload: str, attrs: dict,
                      block_attrs: dict | None = None) -> torch.nn.Module:
  """An EDM-like module tree whose state_dict() is `state` (keys 'model.*')."""
  root = Persistent(precond, payload, **attrs)
  nodes = {"": root}

  def node(path: str, leaf_params: dict):
    if path in nodes:
      return nodes[path]
    parent_path, _, name = path.rpartition(".")
    parent = node(parent_path, {})
    if path == "model":
      mod = Persistent(arch, payload)
    elif path in ("model.enc", "model.dec"):
      mod = torch.nn.ModuleDict()
    else:
      kind = _leaf_class(name, leaf_params)
      extra = (block_attrs or {}) if kind == "UNetBlock" else {}
      mod = Persistent(kind, payload, **extra)
    parent.add_module(name, mod)
    nodes[path] = mod
    return mod

  by_module: dict = {}
  for key, value in state.items():
    mod_path, _, leaf = key.rpartition(".")
    by_module.setdefault(mod_path, {})[leaf] = np.asarray(value)
  for mod_path in sorted(by_module, key=lambda p: p.count(".")):
    leaves = by_module[mod_path]
    mod = node(mod_path, leaves)
    for leaf, v in leaves.items():
      t = torch.from_numpy(np.array(v))
      if leaf in ("freqs", "resample_filter"):
        mod.register_buffer(leaf, t)
      else:
        mod.register_parameter(leaf, torch.nn.Parameter(t))
  return root
