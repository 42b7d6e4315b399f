"""Import NVlabs/edm network pickles (.pkl) without running any code stored in them.

EDM's training loop pickles a dict whose 'ema' entry is the preconditioned network
(EDMPrecond wrapping SongUNet = DDPM++/NCSN++, or DhariwalUNet = ADM). Its classes are
`torch_utils.persistence` classes: each object pickles as a call
`torch_utils.persistence._reconstruct_persistent_obj(meta)` where `meta` holds the
*source code* of the module defining the class, the class name and the object's __dict__
(its torch parameters, buffers and child modules). Unpickling that file with `pickle.load`
would exec the stored source. Here a restricted `pickle.Unpickler` resolves only:

* the tensor rebuild functions torch's pickling uses (`torch._utils._rebuild_tensor_v2`,
  `_rebuild_parameter`, `_rebuild_parameter_with_state`), replaced by local functions that
  only build tensors;
* `torch.storage._load_from_bytes` (each storage is a nested torch.save blob), replaced by
  `torch.load(blob, weights_only=True)`;
* `_reconstruct_persistent_obj`, replaced by a function that records (class name, state)
  in an inert `Stub` and never looks at the stored source;
* torch container modules (ModuleDict, ModuleList, Sequential, Module) and the known EDM
  class names, all mapped to `Stub`;
* `collections.OrderedDict`, a few builtin containers, and numpy's scalar/array/dtype
  rebuilders (numeric dtypes only).

Anything else (os.system, builtins.eval, subprocess, ...) raises `UnsafePickleError`
before it is called. After loading, the 'ema' stub's parameters and buffers are collected
into a flat state dict and mapped onto NCSNppUNet (SongUNet) or ADMUNet (DhariwalUNet).
"""
from __future__ import annotations

import collections
import io
import os
import pickle
from typing import Any, Dict, Optional, Tuple

import numpy as np

from cm_jax.interop import name_maps
from cm_jax.utils import safe_load


class UnsafePickleError(pickle.UnpicklingError):
  """The pickle references a global that the restricted unpickler does not allow."""


class Stub:
  """Inert stand-in for a pickled object: remembers its class name and state, runs nothing."""

  def __init__(self, class_name: str = "", state: Optional[dict] = None):
    self.class_name = class_name
    self.state = dict(state or {})

  def __setstate__(self, state):
    if isinstance(state, tuple) and len(state) == 2:  # (state, slotstate)
      state = {**(state[0] or {}), **(state[1] or {})}
    if not isinstance(state, dict):
      raise UnsafePickleError(f"unexpected object state of type {type(state).__name__}")
    self.state.update(state)

  def __repr__(self):
    return f"Stub({self.class_name})"


def _stub_class(qualname: str):
  """A Stub subclass per pickled class name, so NEWOBJ (cls.__new__(cls)) works."""

  class _Named(Stub):

    def __new__(cls, *args, **kwargs):
      obj = object.__new__(cls)
      Stub.__init__(obj, qualname)
      return obj

    def __init__(self, *args, **kwargs):  # never called by pickle; kept inert
      pass

  _Named.__name__ = _Named.__qualname__ = qualname.rsplit(".", 1)[-1]
  return _Named


def _reconstruct_persistent_obj(meta):
  """Stand-in for torch_utils.persistence._reconstruct_persistent_obj: module_src is ignored."""
  if not isinstance(meta, dict) or meta.get("type") != "class":
    raise UnsafePickleError("malformed persistent-object record")
  name = str(meta.get("class_name", ""))
  if name not in EDM_CLASS_NAMES:
    raise UnsafePickleError(f"unknown persistent class {name!r} (known: "
                            f"{', '.join(sorted(EDM_CLASS_NAMES))})")
  state = meta.get("state") or {}
  if not isinstance(state, dict):
    raise UnsafePickleError(f"persistent object {name!r} has a non-dict state")
  return Stub(name, state)


def _load_storage_from_bytes(blob: bytes):
  import torch  # pylint: disable=g-import-not-at-top
  if not isinstance(blob, (bytes, bytearray)):
    raise UnsafePickleError("storage blob is not bytes")
  return torch.load(io.BytesIO(bytes(blob)), map_location="cpu", weights_only=True)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False,
                       backward_hooks=None, metadata=None):
  import torch  # pylint: disable=g-import-not-at-top
  if not isinstance(storage, (torch.TypedStorage, torch.UntypedStorage)):
    raise UnsafePickleError(f"tensor storage of type {type(storage).__name__}")
  del requires_grad, backward_hooks, metadata  # hooks are never attached
  return torch._utils._rebuild_tensor(storage, storage_offset, size, stride)  # pylint: disable=protected-access


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None):
  del requires_grad, backward_hooks, state
  return data


def _numpy_dtype(spec, align=False, copy=False):
  del align, copy
  dt = np.dtype(spec)
  if dt.kind not in "biufc":
    raise UnsafePickleError(f"numpy dtype {dt} is not numeric")
  return dt


def _numpy_scalar(dtype, data=None):
  if not isinstance(dtype, np.dtype) or dtype.kind not in "biufc":
    raise UnsafePickleError("numpy scalar of a non-numeric dtype")
  return np.frombuffer(data, dtype=dtype, count=1)[0]


def _numpy_reconstruct(subtype, shape, dtype):
  if subtype is not np.ndarray:
    raise UnsafePickleError("numpy array subclass")
  return np.ndarray.__new__(np.ndarray, shape, _numpy_dtype(dtype))


# Persistent class names of NVlabs/edm (training/networks.py, loss.py, augment.py).
EDM_CLASS_NAMES = frozenset({
    "EDMPrecond", "VPPrecond", "VEPrecond", "iDDPMPrecond", "SongUNet", "DhariwalUNet",
    "UNetBlock", "Linear", "Conv2d", "GroupNorm", "PositionalEmbedding", "FourierEmbedding",
    "EDMLoss", "VPLoss", "VELoss", "AugmentPipe"})

_TORCH_CONTAINERS = {
    ("torch.nn.modules.container", "ModuleDict"), ("torch.nn.modules.container", "ModuleList"),
    ("torch.nn.modules.container", "Sequential"), ("torch.nn.modules.module", "Module")}


def _allowed_globals() -> Dict[Tuple[str, str], Any]:
  allowed: Dict[Tuple[str, str], Any] = {
      ("collections", "OrderedDict"): collections.OrderedDict,
      ("builtins", "set"): set, ("builtins", "frozenset"): frozenset,
      ("builtins", "list"): list, ("builtins", "dict"): dict, ("builtins", "tuple"): tuple,
      ("builtins", "bytearray"): bytearray, ("builtins", "complex"): complex,
      ("builtins", "slice"): slice,
      ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
      ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
      ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
      ("torch.storage", "_load_from_bytes"): _load_storage_from_bytes,
      ("torch_utils.persistence", "_reconstruct_persistent_obj"): _reconstruct_persistent_obj,
      ("dnnlib.util", "EasyDict"): type("EasyDict", (dict,), {}),
  }
  for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
    allowed[(mod, "scalar")] = _numpy_scalar
    allowed[(mod, "_reconstruct")] = _numpy_reconstruct
  allowed[("numpy", "dtype")] = _numpy_dtype
  allowed[("numpy", "ndarray")] = np.ndarray
  for key in _TORCH_CONTAINERS:
    allowed[key] = _stub_class(".".join(key))
  for name in EDM_CLASS_NAMES:  # direct references (a non-persistent copy of a class)
    for mod in ("training.networks", "training.loss", "training.augment"):
      allowed[(mod, name)] = _stub_class(f"{mod}.{name}")
  return allowed


class RestrictedUnpickler(pickle.Unpickler):
  """pickle.Unpickler that resolves only the globals listed in `_allowed_globals()`."""

  _ALLOWED = None

  def find_class(self, module, name):
    if RestrictedUnpickler._ALLOWED is None:
      RestrictedUnpickler._ALLOWED = _allowed_globals()
    try:
      return RestrictedUnpickler._ALLOWED[(module, name)]
    except KeyError:
      raise UnsafePickleError(
          f"refusing to load {module}.{name}: the EDM importer only rebuilds tensors, plain "
          f"containers and known EDM network classes (as inert stubs)") from None

  def persistent_load(self, pid):
    raise UnsafePickleError("persistent ids are not used by EDM pickles; refusing")


def load_pickle(path: str) -> Any:
  """The pickled object with every EDM class replaced by a `Stub`; runs no stored code."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"no checkpoint file at {path!r}")
  with open(path, "rb") as f:
    try:
      return RestrictedUnpickler(f).load()
    except UnsafePickleError:
      raise
    except Exception as e:  # pylint: disable=broad-except  (a damaged or foreign file)
      raise ValueError(f"{path!r} is not a readable EDM network pickle "
                       f"({safe_load.torch_failure(e, 'pickle')})") from None


# ---- from stubs to a state dict ---------------------------------------------------------------

def module_state_dict(obj: Stub, prefix: str = "") -> Dict[str, np.ndarray]:
  """{dotted name: float32 numpy} of a stubbed torch module's parameters and buffers."""
  from cm_jax.interop.openai_import import tensor_to_numpy  # pylint: disable=g-import-not-at-top
  out: Dict[str, np.ndarray] = {}
  state = obj.state
  for coll in ("_parameters", "_buffers"):
    for name, t in (state.get(coll) or {}).items():
      if t is not None:
        out[prefix + name] = tensor_to_numpy(t)
  for name, child in (state.get("_modules") or {}).items():
    if child is None:
      continue
    if not isinstance(child, Stub):
      raise ValueError(f"unexpected child module {prefix + name} of type {type(child).__name__}")
    out.update(module_state_dict(child, prefix + name + "."))
  return out


def describe_network(ema: Stub) -> dict:
  """Facts about the pickled network: precond, architecture, label/augment dims, sigma_data."""
  if not isinstance(ema, Stub):
    raise ValueError("the pickle's 'ema' entry is not a network")
  st = ema.state
  model = (st.get("_modules") or {}).get("model")
  if not isinstance(model, Stub):
    raise ValueError(f"{ema.class_name} has no 'model' child network")
  kwargs = dict(st.get("_init_kwargs") or {})
  return dict(precond=ema.class_name, arch=model.class_name,
              img_resolution=int(st.get("img_resolution", kwargs.get("img_resolution", 0))),
              img_channels=int(st.get("img_channels", kwargs.get("img_channels", 0))),
              label_dim=int(st.get("label_dim", kwargs.get("label_dim", 0)) or 0),
              sigma_data=float(st.get("sigma_data", 0.5)), init_kwargs=kwargs)


def load_edm_network(path: str) -> Tuple[dict, Dict[str, np.ndarray]]:
  """(description, state dict of the 'ema' network) of an EDM network pickle."""
  data = load_pickle(path)
  ema = data.get("ema") if isinstance(data, dict) else None
  if ema is None:
    raise ValueError(f"{path!r} has no 'ema' network (keys: "
                     f"{sorted(data) if isinstance(data, dict) else type(data).__name__})")
  return describe_network(ema), module_state_dict(ema)


# ---- state dict -> cm_jax params ---------------------------------------------------------------

def song_params(state: Dict[str, np.ndarray]) -> Tuple[name_maps.FlatParams, list]:
  """SongUNet state dict (keys 'model.*') -> flat NCSNppUNet params, and dropped keys.

  `map_augment` (EDM's augmentation-label input; no augmentation labels are given at
  sampling time, so it never acts there) is dropped."""
  flat: name_maps.FlatParams = {}
  dropped = []
  for key, w in state.items():
    if not key.startswith("model."):
      dropped.append(key)
      continue
    sub = key[len("model."):]
    if sub.startswith("map_augment."):
      dropped.append(key)
      continue
    path = name_maps.song_key_to_path(sub, np.ndim(w))
    if path is None:
      continue
    flat[path] = name_maps.edm_to_flax_leaf(w)
  return flat, dropped


def check_resample_filters(state: Dict[str, np.ndarray], kernel) -> None:
  """EDM stores each resampling conv's FIR taps (outer(f, f) / sum(f)^2) as a buffer; cm_jax
  derives them from the config. Refuse a checkpoint whose taps differ from the config's."""
  k = np.asarray(kernel, np.float64)
  want = np.outer(k, k) / k.sum() ** 2
  for key, f in state.items():
    if key.endswith("resample_filter"):
      got = np.asarray(f, np.float64).reshape(np.shape(f)[-2:])
      if got.shape != want.shape or not np.allclose(got, want, atol=1e-6):
        raise ValueError(f"{key}: the checkpoint resamples with FIR taps {got.shape} "
                         f"different from the config's {tuple(kernel)} filter")


def dhariwal_params(state: Dict[str, np.ndarray], model_cfg,
                    image_size: int) -> Tuple[name_maps.FlatParams, list]:
  """DhariwalUNet state dict (keys 'model.*') -> flat ADMUNet params, and dropped keys."""
  rules = name_maps.dhariwal_adm_rules(
      image_size, model_cfg.model_channels, model_cfg.channel_mult, model_cfg.num_res_blocks,
      model_cfg.attention_resolutions, model_cfg.get("num_head_channels", 64),
      model_cfg.get("num_heads", -1))
  flat, used = name_maps.apply_rules_to_flax(state, rules, qkv_src="edm", qkv_dst="three_heads",
                                             prefix="model.")
  used = set(used)
  rest = [k for k in state if k not in used and not k.endswith("resample_filter")]
  unknown = [k for k in rest if not k.startswith("model.map_augment.")]
  if unknown:
    raise ValueError(f"DhariwalUNet parameters with no ADM counterpart (is the preset's "
                     f"architecture the checkpoint's?): {unknown[:8]}")
  return flat, rest


def check_precond(desc: dict) -> None:
  if desc["precond"] != "EDMPrecond":
    raise ValueError(
        f"the network uses {desc['precond']}; cm_jax implements EDM's own preconditioning "
        f"(EDMPrecond: c_noise = ln(sigma)/4) only. The VP/VE/iDDPM baselines feed the "
        f"network other noise labels and scalings and cannot be imported as EDM teachers.")


# ---- cm_jax params -> EDM names (the inverse maps; the tests build EDM-layout fixtures) ----

def song_state_dict(flat: name_maps.FlatParams) -> Dict[str, np.ndarray]:
  """flat NCSNppUNet params -> SongUNet state dict keys under 'model.'."""
  return {"model." + name_maps.path_to_song_key(p): name_maps.flax_to_edm_leaf(p, v)
          for p, v in flat.items()}


def dhariwal_state_dict(flat: name_maps.FlatParams, model_cfg,
                        image_size: int) -> Dict[str, np.ndarray]:
  """flat ADMUNet params -> DhariwalUNet state dict keys under 'model.'."""
  rules = name_maps.dhariwal_adm_rules(
      image_size, model_cfg.model_channels, model_cfg.channel_mult, model_cfg.num_res_blocks,
      model_cfg.attention_resolutions, model_cfg.get("num_head_channels", 64),
      model_cfg.get("num_heads", -1))
  state, used = name_maps.apply_rules_from_flax(flat, rules, qkv_src="three_heads",
                                                qkv_dst="edm", prefix="model.")
  left = sorted(set(flat) - set(used))
  if left:
    raise ValueError(f"ADMUNet parameters with no DhariwalUNet counterpart: {left[:8]}")
  return state
