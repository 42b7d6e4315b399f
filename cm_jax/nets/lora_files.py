"""LoRA files in the formats diffusers reads, to and from cm_jax lora trees (cm_jax.nets.lora).

Both formats are one .safetensors file of torch-layout tensors named after the torch modules.

PEFT / diffusers: what `StableDiffusionPipeline.save_lora_weights(dir, unet_lora_layers=
get_peft_model_state_dict(unet))` writes, as `dir/pytorch_lora_weights.safetensors`:

  unet.<module>.lora_A.weight    Linear (r, in)     Conv2d (r, in, kh, kw)
  unet.<module>.lora_B.weight    Linear (out, r)    Conv2d (out, r, 1, 1)

No alpha travels with these tensors. diffusers 0.42.1 (with peft 0.21.2; checked by loading
files into a pipeline and fusing) builds the adapter's LoraConfig from the JSON under the
safetensors metadata key "lora_adapter_metadata" when the file has it ("unet.r",
"unet.lora_alpha", "unet.alpha_pattern", ...), and otherwise sets lora_alpha = r, i.e.
scale 1; a ".alpha" tensor in such a file is refused ("Invalid LoRA checkpoint"). So
`save_lora_file` folds the scale into lora_B and writes no adapter metadata: the file then
means the same to every reader, old diffusers releases (which read no metadata) included.
`load_lora_file` honours that metadata when a file has it, as diffusers does.

kohya-ss: the published LCM-LoRA files (latent-consistency/lcm-lora-sdv1-5) and the
LCM-LoRA trainer's validation state dict (its get_module_kohya_state_dict):

  lora_unet_<module, "." -> "_">.lora_down.weight    laid out as lora_A
  lora_unet_<module, "." -> "_">.lora_up.weight      laid out as lora_B
  lora_unet_<module, "." -> "_">.alpha               a scalar: this module's scale is alpha / r

(diffusers' loaders/lora_conversion_utils.py: _convert_non_diffusers_lora_to_diffusers hands
each alpha to PEFT as that module's lora_alpha, r being its lora_down's first dimension; a
module without an alpha gets alpha = r.) Its underscored names are resolved here against the
base tree's own module names, not by diffusers' table of renames, so a name either spells
exactly one module of the network or the file is refused.

A file never half-loads: a tensor naming a module the network lacks, a shape that disagrees,
or tensors that are not plain LoRA factors are one-line ValueErrors naming the tensor.
"""
from __future__ import annotations

import json
import os
import re

import numpy as np
from flax import traverse_util

from cm_jax.nets.lora import lora_modules
from cm_jax.utils.torch_names import from_flax, module_path, to_flax, torch_key

WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # diffusers' LORA_WEIGHT_NAME_SAFE
_METADATA_KEY = "lora_adapter_metadata"           # diffusers' LORA_ADAPTER_METADATA_KEY
_KOHYA_TE = ("lora_te_", "lora_te1_", "lora_te2_")
_KOHYA_KINDS = ("lora_down.weight", "lora_up.weight", "alpha")


def _file(path, *, create: bool = False) -> str:
  """A directory means the file diffusers would write in it; a .safetensors path itself."""
  path = os.fspath(path)
  file = path if path.endswith(".safetensors") else os.path.join(path, WEIGHT_NAME)
  if create:
    os.makedirs(os.path.dirname(file) or ".", exist_ok=True)
  elif not os.path.isfile(file):
    raise FileNotFoundError(f"no LoRA file at {file!r}")
  return file


def peft_state_dict(lora, scale=1.0, prefix: str | None = "unet") -> dict[str, np.ndarray]:
  """The torch state dict (float32 numpy) diffusers saves for this adapter, `scale` folded
  into lora_B so that it loads with diffusers' default alpha = r (scale 1)."""
  pre = f"{prefix}." if prefix else ""
  out = {}
  for path, (a, b) in lora_modules(lora).items():
    a = np.asarray(a, np.float32)
    up = np.ascontiguousarray((np.asarray(b, np.float32) * np.float32(scale)).T)  # (out, r)
    name = pre + torch_key(path)
    out[name + ".lora_A.weight"] = from_flax("kernel", a)  # A is the kernel of an in -> r layer
    out[name + ".lora_B.weight"] = up[:, :, None, None] if a.ndim == 4 else up
  return out


def save_lora_file(path, lora, scale=1.0) -> str:
  """Writes the PEFT / diffusers file (a directory gets `pytorch_lora_weights.safetensors`
  inside it) through a temporary file, so a crash leaves no half-written file. Returns it."""
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  file = _file(path, create=True)
  tmp = file + ".tmp"
  save_file(peft_state_dict(lora, float(scale)), tmp, metadata={"format": "pt"})
  os.replace(tmp, file)
  return file


def _read(file: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
  from safetensors import SafetensorError, safe_open  # pylint: disable=g-import-not-at-top
  tensors: dict[str, np.ndarray | None] = {}
  try:
    with safe_open(file, framework="np") as f:
      metadata = f.metadata() or {}
      for key in f.keys():
        try:
          tensors[key] = f.get_tensor(key)
        except TypeError:  # bfloat16, which numpy lacks: read below through jax
          tensors[key] = None
    late = [k for k, v in tensors.items() if v is None]
    if late:
      with safe_open(file, framework="flax") as f:
        for key in late:
          tensors[key] = np.asarray(f.get_tensor(key).astype(np.float32))
  except (SafetensorError, OSError) as e:
    raise ValueError(f"{file}: not a readable .safetensors file "
                     f"({(str(e).splitlines() or [''])[0][:120]})") from e
  return tensors, metadata


def _squeeze_1x1(shape: tuple) -> tuple:
  return shape[2:] if len(shape) == 4 and shape[:2] == (1, 1) else shape


def _factors(file, key, down, up, kernel_shape, name):
  """Torch lora_A / lora_B (or lora_down / lora_up) -> Flax (A, B) shaped for the kernel; a
  1x1 conv and a linear layer take each other's factors (same map)."""
  if down.ndim not in (2, 4) or up.ndim not in (2, 4) or up.shape[2:] not in ((), (1, 1)):
    raise ValueError(f"{file}: tensors of {key!r} have shapes {down.shape} and {up.shape}, "
                     f"not LoRA factors of a Linear or Conv2d")
  rank = down.shape[0]
  a = to_flax("kernel", np.asarray(down, np.float32))
  b = np.asarray(up, np.float32).reshape(up.shape[:2]).T
  want_a = tuple(kernel_shape[:-1]) + (rank,)
  if _squeeze_1x1(a.shape) != _squeeze_1x1(want_a) or b.shape != (rank, kernel_shape[-1]):
    raise ValueError(f"{file}: tensors of {key!r} have shapes {down.shape} and {up.shape}, which "
                     f"do not fit {name} (Flax kernel {tuple(kernel_shape)}); the LoRA file is for "
                     f"another architecture")
  return a.reshape(want_a), b


def _alpha_for(name: str, patterns: dict, default):
  """PEFT's alpha_pattern lookup: a key matches a module name it ends (at a "." boundary)."""
  for pattern, alpha in patterns.items():
    if re.match(rf"(.*\.)?({pattern})$", name):
      return alpha
  return default


def _peft_modules(file, tensors, metadata, kernels):
  """{path: (A, B, scale)} of a PEFT / diffusers file."""
  pairs: dict[tuple, dict] = {}
  prefix = ""
  for key, value in tensors.items():
    if key.startswith(("text_encoder.", "text_encoder_2.")):
      raise ValueError(f"{file}: tensor {key!r} adapts a text encoder; only UNet LoRAs are read")
    body = key.removeprefix("unet.")
    prefix = key[:len(key) - len(body)]
    module, sep, kind = body.rpartition(".lora_")
    if not sep or kind not in ("A.weight", "B.weight"):
      raise ValueError(f"{file}: tensor {key!r} is not a plain LoRA factor (lora_A / lora_B "
                       f"weight); LoRA biases, DoRA and other variants are not read")
    path = module_path(module)
    if path not in kernels:
      raise ValueError(f"{file}: tensor {key!r} names a module the network lacks "
                       f"({'/'.join(path)}); the LoRA file is for another architecture")
    pairs.setdefault(path, {})[kind[0]] = (key, value)
  config = json.loads(metadata[_METADATA_KEY]) if _METADATA_KEY in metadata else {}
  config = {k[len(prefix):]: v for k, v in config.items() if k.startswith(prefix)}
  if config.get("use_dora"):
    raise ValueError(f"{file}: a DoRA adapter (use_dora in its metadata); only LoRA is read")
  out = {}
  for path, pair in pairs.items():
    if len(pair) != 2:
      raise ValueError(f"{file}: {next(iter(pair.values()))[0]!r} has no lora_A / lora_B partner")
    (key, down), (_, up) = pair["A"], pair["B"]
    a, b = _factors(file, key, down, up, kernels[path], torch_key(path))
    if config:  # the LoraConfig diffusers builds from the metadata (LoraConfig's default alpha 8)
      alpha = _alpha_for(torch_key(path), config.get("alpha_pattern") or {},
                         config.get("lora_alpha", 8))
      rank = a.shape[-1] ** 0.5 if config.get("use_rslora") else a.shape[-1]
      out[path] = (a, b, float(alpha) / rank)
    else:  # no metadata: diffusers takes alpha = r
      out[path] = (a, b, 1.0)
  return out


def _kohya_modules(file, tensors, kernels):
  """{path: (A, B, scale)} of a kohya-ss ("lora_unet_") file."""
  names: dict[str, tuple | None] = {}
  for path in kernels:
    name = "lora_unet_" + torch_key(path).replace(".", "_")
    names[name] = None if name in names else path  # None: two modules spell the same
  groups: dict[str, dict] = {}
  for key in tensors:
    name, _, kind = key.partition(".")
    if name.startswith(_KOHYA_TE):
      raise ValueError(f"{file}: tensor {key!r} adapts a text encoder; only UNet LoRAs are read")
    if not name.startswith("lora_unet_") or kind not in _KOHYA_KINDS:
      raise ValueError(f"{file}: tensor {key!r} is not a plain kohya LoRA tensor (lora_unet_* "
                       f"lora_down / lora_up / alpha); LyCORIS / DoRA variants are not read")
    if name not in names:
      raise ValueError(f"{file}: tensor {key!r} names a module the network lacks; the LoRA "
                       f"file is for another architecture")
    if names[name] is None:
      raise ValueError(f"{file}: tensor {key!r} could name more than one module of the network")
    groups.setdefault(name, {})[kind] = key
  out = {}
  for name, kinds in groups.items():
    if "lora_down.weight" not in kinds or "lora_up.weight" not in kinds:
      raise ValueError(f"{file}: {next(iter(kinds.values()))!r} has no lora_down / lora_up partner")
    key, path = kinds["lora_down.weight"], names[name]
    a, b = _factors(file, key, tensors[key], tensors[kinds["lora_up.weight"]], kernels[path],
                    torch_key(path))
    alpha = tensors[kinds["alpha"]] if "alpha" in kinds else a.shape[-1]
    if np.size(alpha) != 1:
      raise ValueError(f"{file}: {kinds['alpha']!r} has shape {np.shape(alpha)}, not a scalar")
    out[path] = (a, b, float(np.asarray(alpha).reshape(())) / a.shape[-1])
  return out


def load_lora_file(path, base_params) -> tuple[dict, float]:
  """(lora tree, scale) from a PEFT / diffusers or kohya-ss LoRA file (or a directory holding
  `pytorch_lora_weights.safetensors`) for the network of `base_params` (arrays or
  ShapeDtypeStructs). Modules with different scales get them folded into B (scale 1.0)."""
  file = _file(path)
  tensors, metadata = _read(file)
  if not tensors:
    raise ValueError(f"{file}: holds no tensors; not a LoRA file")
  kernels = {p[:-1]: tuple(v.shape) for p, v in traverse_util.flatten_dict(base_params).items()
             if p[-1] == "kernel" and len(v.shape) in (2, 4)}
  keys = list(tensors)
  if any(k.startswith(("lora_unet_",) + _KOHYA_TE) for k in keys):
    modules = _kohya_modules(file, tensors, kernels)
  elif any(".lora_A." in k or ".lora_B." in k for k in keys):
    modules = _peft_modules(file, tensors, metadata, kernels)
  else:
    raise ValueError(f"{file}: not a LoRA file (no lora_A / lora_B or lora_down / lora_up "
                     f"tensors; the first is {keys[0]!r})")
  scales = {s for _, _, s in modules.values()}
  common = scales.pop() if len(scales) == 1 else None
  flat = {}
  for path, (a, b, s) in modules.items():
    flat[path + ("lora_A",)] = a
    flat[path + ("lora_B",)] = b if common is not None else b * np.float32(s)
  return traverse_util.unflatten_dict(flat), (common if common is not None else 1.0)
