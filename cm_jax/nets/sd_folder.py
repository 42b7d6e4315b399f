"""A local diffusers Stable Diffusion pipeline folder <-> Flax parameters, without torch.

The layout read and written (what `StableDiffusionPipeline.save_pretrained` makes):

  <folder>/model_index.json                          pipeline class and its components
  <folder>/unet/config.json                          UNet2DConditionModel config
  <folder>/unet/diffusion_pytorch_model.safetensors  weights, torch names and layouts
  <folder>/vae/config.json                           AutoencoderKL config
  <folder>/vae/diffusion_pytorch_model.safetensors
  <folder>/text_encoder/config.json                  transformers CLIPTextConfig
  <folder>/text_encoder/model.safetensors
  <folder>/tokenizer/...                             CLIP BPE tokenizer files
  <folder>/scheduler/scheduler_config.json           DDIMScheduler, LCMScheduler, ...

`load_sd_folder` reads the configs and the weights (`safetensors.numpy`; sharded
`*.safetensors.index.json` files too; the `.fp16` variant only when asked; everything
floating becomes float32) and fills the parameter trees of `cm_jax.nets.sd_unet`,
`sd_vae` and `clip_text` through `torch_names.params_from_state_dict`, whose trees are
shaped by `jax.eval_shape` of each module's init (nothing is allocated for them).
PyTorch pickles (`.bin`) are refused unless `allow_pickle=True`, and then read with
`torch.load(weights_only=True)` (`cm_jax.utils.safe_load`), which runs no stored code.

`save_sd_folder` writes the same layout back (single-file safetensors, float32), into a
temporary sibling directory renamed into place at the end, so a failure never leaves a
half-written folder. Loading then saving a float32 folder gives every tensor back bit for
bit: the conversion is transposes only. Two things a checkpoint may hold that are not
parameters are kept aside and written back as they were: CLIP's `position_ids` buffer
(transformers 4 saved it) and the key prefix of the text encoder (`text_model.` in files
written by transformers 4, none in those written by transformers 5; both load in either).
The VAE's legacy attention names (`query/key/value/proj_attn`, diffusers < 0.14) are read
through `sd_vae.rename_legacy_vae_keys` and written in today's names (`to_q`, ...).
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from typing import Callable, Dict, Iterable, Mapping, Optional, Sequence

import numpy as np

COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
NETWORKS = ("unet", "vae", "text_encoder")
MODEL_INDEX = "model_index.json"
CONFIG = "config.json"
SCHEDULER_CONFIG = "scheduler_config.json"
# diffusers models and transformers models name their weight files differently.
WEIGHTS_STEM = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model",
                "text_encoder": "model"}
PICKLE_STEM = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model",
               "text_encoder": "pytorch_model"}
CLASS_NAMES = {"unet": "UNet2DConditionModel", "vae": "AutoencoderKL",
               "text_encoder": "CLIPTextModel"}
LIBRARIES = {"unet": "diffusers", "vae": "diffusers", "text_encoder": "transformers",
             "tokenizer": "transformers", "scheduler": "diffusers"}
# Schedulers a Stable Diffusion pipeline runs with (diffusers' KarrasDiffusionSchedulers
# plus the consistency-model ones): all take the same scaled-linear beta settings.
SCHEDULERS = frozenset({
    "DDIMScheduler", "DDPMScheduler", "PNDMScheduler", "LMSDiscreteScheduler",
    "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler", "HeunDiscreteScheduler",
    "DPMSolverMultistepScheduler", "DPMSolverSinglestepScheduler", "DPMSolverSDEScheduler",
    "KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler", "DEISMultistepScheduler",
    "UniPCMultistepScheduler", "LCMScheduler", "TCDScheduler"})
TOKENIZER_FILES = ("tokenizer.json", "vocab.json")
TEXT_PREFIX = "text_model."
# Torch buffers that are not parameters: skipped on load, written back as they were read.
BUFFERS = {"text_encoder": ("position_ids",)}


@dataclasses.dataclass
class SDFolder:
  """What `load_sd_folder` read. A component that was not asked for is None (its config,
  params or path); `save_sd_folder` then copies it from `path` unchanged."""
  path: str
  model_index: dict
  unet_config: Optional[dict] = None
  unet_params: Optional[dict] = None
  vae_config: Optional[dict] = None
  vae_params: Optional[dict] = None
  text_config: Optional[dict] = None
  text_params: Optional[dict] = None
  tokenizer_dir: Optional[str] = None
  scheduler_config: Optional[dict] = None
  # Checkpoint facts that are not parameters, kept so a save writes what was read:
  # buffers[component] = {torch key: array}; text_key_prefix = 'text_model.' or ''.
  buffers: Dict[str, Dict[str, np.ndarray]] = dataclasses.field(default_factory=dict)
  text_key_prefix: str = ""

  def unet(self, dtype=None):
    """The Flax UNet2DCondition of `unet_config` (compute dtype `dtype`, params float32)."""
    from cm_jax.nets import sd_unet  # pylint: disable=g-import-not-at-top
    return _build(sd_unet.UNet2DCondition, self._config("unet"), dtype)

  def vae(self, dtype=None):
    """The Flax AutoencoderKL of `vae_config`."""
    from cm_jax.nets import sd_vae  # pylint: disable=g-import-not-at-top
    return _build(sd_vae.AutoencoderKL, self._config("vae"), dtype)

  def text_encoder(self, dtype=None):
    """The Flax CLIPTextModel of `text_config`."""
    from cm_jax.nets import clip_text  # pylint: disable=g-import-not-at-top
    return _build(clip_text.CLIPTextModel, self._config("text_encoder"), dtype)

  def tokenizer(self):
    """The CLIP tokenizer of `tokenizer_dir` (cm_jax.data.text_tokenizer.load_tokenizer)."""
    from cm_jax.data import text_tokenizer  # pylint: disable=g-import-not-at-top
    if self.tokenizer_dir is None:
      raise ValueError(f"the tokenizer of {self.path!r} was not loaded "
                       f"(pass components=(..., 'tokenizer'))")
    return text_tokenizer.load_tokenizer(self.tokenizer_dir)

  def params(self, component: str):
    return getattr(self, _PARAMS_FIELD[component])

  def _config(self, component: str) -> dict:
    config = getattr(self, _CONFIG_FIELD[component])
    if config is None:
      raise ValueError(f"the {component} of {self.path!r} was not loaded "
                       f"(pass components=(..., {component!r}))")
    return config


_CONFIG_FIELD = {"unet": "unet_config", "vae": "vae_config", "text_encoder": "text_config"}
_PARAMS_FIELD = {"unet": "unet_params", "vae": "vae_params", "text_encoder": "text_params"}


def _build(cls, config: dict, dtype):
  # dtype only when given, so each module's own default (float32) stands otherwise.
  return cls.from_config(config) if dtype is None else cls.from_config(config, dtype=dtype)


# ----------------------------------------------------------------------------- reading


def _read_json(path: str, what: str) -> dict:
  if not os.path.isfile(path):
    raise FileNotFoundError(f"no {what} at {path!r}")
  try:
    with open(path) as f:
      value = json.load(f)
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ValueError(f"{path!r} is not a readable {what} ({type(e).__name__}: "
                     f"{str(e).splitlines()[0][:120]})") from None
  if not isinstance(value, dict):
    raise ValueError(f"{path!r} is not a {what} (a JSON object), it holds a "
                     f"{type(value).__name__}")
  return value


def _subfolder(root: str, component: str) -> str:
  sub = os.path.join(root, component)
  if not os.path.isdir(sub):
    raise FileNotFoundError(f"{root!r} has no {component}/ subfolder")
  return sub


def _class_of(component: str, config: dict, model_index: dict) -> Optional[str]:
  """The class a component config names: `_class_name` (diffusers), `architectures`
  (transformers), else the model_index entry."""
  if "_class_name" in config:
    return config["_class_name"]
  arch = config.get("architectures")
  if isinstance(arch, list) and arch:
    return arch[0]
  entry = model_index.get(component)
  return entry[1] if isinstance(entry, list) and len(entry) == 2 else None


def _check_class(component: str, config: dict, model_index: dict, path: str) -> None:
  name = _class_of(component, config, model_index)
  known = SCHEDULERS if component == "scheduler" else {CLASS_NAMES[component]}
  if name not in known:
    want = "a diffusers scheduler for Stable Diffusion" if component == "scheduler" \
        else CLASS_NAMES[component]
    raise ValueError(f"{path!r}: unknown {component} class {name!r} (expected {want})")


def _weight_files(sub: str, component: str, variant: Optional[str], allow_pickle: bool):
  """(list of files, loader) for a component's weights: one file or the shards of an
  index, safetensors first; a pickle only with allow_pickle."""
  stem = WEIGHTS_STEM[component]
  tag = f".{variant}" if variant else ""
  candidates = [(f"{stem}{tag}.safetensors", f"{stem}.safetensors.index{tag}.json",
                 _load_safetensors)]
  pickle_stem = PICKLE_STEM[component]
  pickles = (f"{pickle_stem}{tag}.bin", f"{pickle_stem}.bin.index{tag}.json", _load_pickle)
  if allow_pickle:
    candidates.append(pickles)
  for single, index, loader in candidates:
    if os.path.isfile(os.path.join(sub, single)):
      return [os.path.join(sub, single)], loader
    if os.path.isfile(os.path.join(sub, index)):
      return _shards(sub, os.path.join(sub, index)), loader
  if not allow_pickle and any(os.path.isfile(os.path.join(sub, f)) for f in pickles[:2]):
    raise ValueError(f"{sub!r} holds only a PyTorch pickle (.bin); convert it to "
                     f"safetensors or pass allow_pickle=True to read it with "
                     f"torch.load(weights_only=True)")
  other = [f for f in sorted(os.listdir(sub))
           if f.endswith((".safetensors", ".bin", ".json")) and f != CONFIG]
  # 'diffusion_pytorch_model.fp16.safetensors' -> 'fp16': a variant that is there.
  variants = sorted({f.split(".")[-2].split("-")[0] for f in other
                     if f.count(".") >= 2 and f.endswith(".safetensors")})
  hint = f" (it has {', '.join(other)}" if other else ""
  if variants and not variant:
    hint += f"; pass variant={variants[0]!r} to read that"
  raise FileNotFoundError(f"no {component} weight file {candidates[0][0]!r} in {sub!r}"
                          f"{hint}{')' if other else ''}")


def _shards(sub: str, index_path: str) -> list:
  index = _read_json(index_path, "weight index")
  weight_map = index.get("weight_map")
  if not isinstance(weight_map, dict) or not weight_map:
    raise ValueError(f"{index_path!r} has no 'weight_map'")
  files = []
  for name in sorted(set(weight_map.values())):
    path = os.path.join(sub, name)
    if not os.path.isfile(path):
      raise FileNotFoundError(f"shard {name!r} named by {index_path!r} is missing")
    files.append(path)
  return files


def _load_safetensors(path: str) -> Dict[str, np.ndarray]:
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  try:
    return load_file(path)
  except Exception as e:  # pylint: disable=broad-except  (header, dtype and I/O errors)
    if "bfloat16" in str(e):  # numpy has no bfloat16; the file itself is fine
      return _load_bf16_safetensors(path)
    text = (str(e).strip().splitlines() or [""])[0][:120]
    raise ValueError(f"{path!r} is not a readable safetensors file "
                     f"({type(e).__name__}: {text})") from None


_SAFETENSORS_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16,
                       "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8,
                       "U8": np.uint8, "BOOL": np.bool_, "BF16": np.uint16}


def _load_bf16_safetensors(path: str) -> Dict[str, np.ndarray]:
  """A safetensors file with bfloat16 tensors, which `safetensors.numpy` cannot return:
  the format is an 8-byte little-endian header length, a JSON header of
  {name: {dtype, shape, data_offsets}}, then the raw little-endian data. bfloat16 is the
  top half of a float32, so shifting its 16 bits up gives the float32 exactly."""
  with open(path, "rb") as f:
    n = int.from_bytes(f.read(8), "little")
    header = json.loads(f.read(n))
  data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n)
  out = {}
  for key, info in header.items():
    if key == "__metadata__":
      continue
    if info["dtype"] not in _SAFETENSORS_DTYPES:
      raise ValueError(f"{path!r}: tensor {key!r} has dtype {info['dtype']}, which is not "
                       f"read here")
    begin, end = info["data_offsets"]
    raw = np.frombuffer(data[begin:end], dtype=np.dtype(_SAFETENSORS_DTYPES[info["dtype"]])
                        .newbyteorder("<"))
    if info["dtype"] == "BF16":
      raw = (raw.astype(np.uint32) << 16).view(np.float32)
    out[key] = np.array(raw.reshape(info["shape"]))  # a copy: the map closes with the file
  return out


def _load_pickle(path: str) -> Dict[str, np.ndarray]:
  import torch  # pylint: disable=g-import-not-at-top
  from cm_jax.utils import safe_load  # pylint: disable=g-import-not-at-top
  state = safe_load.load_torch(path, what="PyTorch state dict")
  if not isinstance(state, Mapping):
    raise ValueError(f"{path!r} holds a {type(state).__name__}, not a state dict")
  out = {}
  for key, value in state.items():
    if not isinstance(value, torch.Tensor):
      raise ValueError(f"{path!r}: entry {key!r} is a {type(value).__name__}, not a tensor")
    # numpy has no bfloat16: floating tensors go through float32 (lossless for fp16/bf16).
    out[key] = (value.float() if value.is_floating_point() else value).numpy()
  return out


def _read_state(files: Sequence[str], loader: Callable) -> Dict[str, np.ndarray]:
  state: Dict[str, np.ndarray] = {}
  for path in files:
    for key, value in loader(path).items():
      if key in state:
        raise ValueError(f"tensor {key!r} appears in more than one shard ({path!r})")
      if np.issubdtype(value.dtype, np.floating):
        value = value.astype(np.float32, copy=False)
      state[key] = value
  return state


def _abstract_params(component: str, module, config: dict):
  """The parameter tree's shapes (ShapeDtypeStructs) from `jax.eval_shape` of init: the
  smallest inputs that reach every parameter, so the trace is cheap and nothing is
  allocated."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  rng = jax.random.PRNGKey(0)
  if component == "unet":
    # Each of the len(block_out_channels) - 1 downsamplings halves the side.
    side = 2 ** (len(config["block_out_channels"]) - 1)
    x = jnp.zeros((1, side, side, int(config.get("in_channels", 4))), jnp.float32)
    t = jnp.zeros((1,), jnp.float32)
    context = jnp.zeros((1, 1, int(config["cross_attention_dim"])), jnp.float32)
    cond_dim = config.get("time_cond_proj_dim")
    cond = jnp.zeros((1, int(cond_dim)), jnp.float32) if cond_dim else None
    labels = jnp.zeros((1,), jnp.int32) if config.get("num_class_embeds") else None
    init = lambda: module.init(rng, x, t, labels=labels, cond=cond, context=context)
  elif component == "vae":
    side = 2 ** len(config["block_out_channels"])
    x = jnp.zeros((1, side, side, int(config.get("in_channels", 3))), jnp.float32)
    init = lambda: module.init(rng, x)
  else:
    ids = jnp.zeros((1, int(config.get("max_position_embeddings", 77))), jnp.int32)
    init = lambda: module.init(rng, ids)
  return jax.eval_shape(init)["params"]


def _split_buffers(component: str, state: Dict[str, np.ndarray]):
  """(parameters, buffers): torch buffers named in BUFFERS are not parameters."""
  names = BUFFERS.get(component, ())
  buffers = {k: v for k, v in state.items() if k.rpartition(".")[2] in names}
  return {k: v for k, v in state.items() if k not in buffers}, buffers


def _align_text_prefix(state: Dict[str, np.ndarray], abstract) -> tuple:
  """Keys renamed to the Flax tree's root ('text_model/...' or not); returns (state, the
  prefix the checkpoint used) so a save can write the checkpoint's own names back."""
  has = bool(state) and all(k.startswith(TEXT_PREFIX) for k in state)
  wants = set(abstract) == {"text_model"}
  if has and not wants:
    state = {k[len(TEXT_PREFIX):]: v for k, v in state.items()}
  elif wants and not has:
    state = {TEXT_PREFIX + k: v for k, v in state.items()}
  return state, TEXT_PREFIX if has else ""


def _load_network(folder: SDFolder, component: str, variant, allow_pickle: bool) -> None:
  from cm_jax.utils import torch_names  # pylint: disable=g-import-not-at-top
  sub = _subfolder(folder.path, component)
  config = _read_json(os.path.join(sub, CONFIG), f"{component} config")
  _check_class(component, config, folder.model_index, os.path.join(sub, CONFIG))
  files, loader = _weight_files(sub, component, variant, allow_pickle)
  state, buffers = _split_buffers(component, _read_state(files, loader))
  setattr(folder, _CONFIG_FIELD[component], config)
  module = getattr(folder, component)()  # the SDFolder.unet / vae / text_encoder builders
  abstract = _abstract_params(component, module, config)
  if component == "vae":
    from cm_jax.nets import sd_vae  # pylint: disable=g-import-not-at-top
    state = sd_vae.rename_legacy_vae_keys(state)
  if component == "text_encoder":
    # Buffers keep the checkpoint's own names: they are written back verbatim.
    state, folder.text_key_prefix = _align_text_prefix(state, abstract)
  what = f"{component} ({os.path.relpath(files[0], folder.path)})"
  setattr(folder, _PARAMS_FIELD[component],
          torch_names.params_from_state_dict(state, abstract, what=what))
  if buffers:
    folder.buffers[component] = buffers


def load_sd_folder(path: str, components: Iterable[str] = COMPONENTS, *,
                   variant: Optional[str] = None, allow_pickle: bool = False) -> SDFolder:
  """Reads a diffusers Stable Diffusion folder (see the module docstring) into Flax
  parameter trees; only the `components` asked for. `variant='fp16'` reads the
  `*.fp16.safetensors` weights instead (as float32). Errors are one line naming the
  file, folder or tensor at fault."""
  components = tuple(components)
  unknown = [c for c in components if c not in COMPONENTS]
  if unknown:
    raise ValueError(f"unknown component(s) {unknown} (known: {', '.join(COMPONENTS)})")
  path = os.fspath(path)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"no Stable Diffusion folder at {path!r}")
  model_index = _read_json(os.path.join(path, MODEL_INDEX), "model_index.json")
  folder = SDFolder(path=path, model_index=model_index)
  for component in NETWORKS:
    if component in components:
      _load_network(folder, component, variant, allow_pickle)
  if "tokenizer" in components:
    sub = _subfolder(path, "tokenizer")
    if not any(os.path.isfile(os.path.join(sub, f)) for f in TOKENIZER_FILES):
      raise FileNotFoundError(f"{sub!r} has no tokenizer file ({' or '.join(TOKENIZER_FILES)})")
    folder.tokenizer_dir = sub
  if "scheduler" in components:
    config_path = os.path.join(_subfolder(path, "scheduler"), SCHEDULER_CONFIG)
    config = _read_json(config_path, "scheduler config")
    _check_class("scheduler", config, model_index, config_path)
    folder.scheduler_config = config
  return folder


# ----------------------------------------------------------------------------- writing


def _write_json(path: str, obj: dict) -> None:
  # diffusers and transformers both write sorted keys, indent 2, a final newline.
  with open(path, "w") as f:
    f.write(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def _torch_state(folder: SDFolder, component: str) -> Dict[str, np.ndarray]:
  from cm_jax.utils import torch_names  # pylint: disable=g-import-not-at-top
  state = torch_names.state_dict_from_params(folder.params(component))
  if component == "text_encoder":
    flax_prefixed = bool(state) and all(k.startswith(TEXT_PREFIX) for k in state)
    if flax_prefixed and not folder.text_key_prefix:
      state = {k[len(TEXT_PREFIX):]: v for k, v in state.items()}
    elif folder.text_key_prefix and not flax_prefixed:
      state = {folder.text_key_prefix + k: v for k, v in state.items()}
  for key, value in folder.buffers.get(component, {}).items():
    state[key] = value
  return {k: np.ascontiguousarray(v) for k, v in state.items()}


def _copy_component(folder: SDFolder, component: str, tmp: str) -> bool:
  """Copies a component that was not loaded from the source folder; False if absent."""
  src = os.path.join(folder.path, component) if folder.path else ""
  if not src or not os.path.isdir(src):
    return False
  shutil.copytree(src, os.path.join(tmp, component))
  return True


def _write_components(folder: SDFolder, tmp: str) -> dict:
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  model_index = dict(folder.model_index)
  for component in NETWORKS:
    config = getattr(folder, _CONFIG_FIELD[component])
    params = folder.params(component)
    if config is None or params is None:
      if not _copy_component(folder, component, tmp):
        raise ValueError(f"cannot save: the {component} was not loaded and "
                         f"{folder.path!r} has no {component}/ to copy")
      continue
    sub = os.path.join(tmp, component)
    os.makedirs(sub)
    _write_json(os.path.join(sub, CONFIG), config)
    # {'format': 'pt'}: what torch writers put there; transformers checks it on load.
    save_file(_torch_state(folder, component),
              os.path.join(sub, WEIGHTS_STEM[component] + ".safetensors"),
              metadata={"format": "pt"})
    model_index[component] = [LIBRARIES[component], CLASS_NAMES[component]]
  model_index.setdefault("tokenizer", [LIBRARIES["tokenizer"], "CLIPTokenizer"])
  if folder.tokenizer_dir is not None:
    shutil.copytree(folder.tokenizer_dir, os.path.join(tmp, "tokenizer"))
  elif not _copy_component(folder, "tokenizer", tmp):
    raise ValueError(f"cannot save: no tokenizer_dir and {folder.path!r} has no tokenizer/")
  if folder.scheduler_config is not None:
    _check_class("scheduler", folder.scheduler_config, model_index, "scheduler_config")
    os.makedirs(os.path.join(tmp, "scheduler"))
    _write_json(os.path.join(tmp, "scheduler", SCHEDULER_CONFIG), folder.scheduler_config)
    model_index["scheduler"] = ["diffusers", folder.scheduler_config["_class_name"]]
  elif not _copy_component(folder, "scheduler", tmp):
    raise ValueError(f"cannot save: no scheduler_config and {folder.path!r} has no "
                     f"scheduler/")
  # Other components the index names (safety_checker, feature_extractor, ...) are copied
  # when the source has them, else recorded as absent so the pipeline loads without them.
  for name, entry in model_index.items():
    if name.startswith("_") or name in COMPONENTS or not isinstance(entry, list):
      continue
    if entry[:1] != [None] and not _copy_component(folder, name, tmp):
      model_index[name] = [None, None]
  return model_index


def save_sd_folder(out_dir: str, folder: SDFolder) -> str:
  """Writes `folder` as a diffusers Stable Diffusion folder at `out_dir` (which must not
  exist or be empty) that `StableDiffusionPipeline.from_pretrained(out_dir)` loads.
  Components that were not loaded are copied from `folder.path`. Returns out_dir."""
  out_dir = os.path.abspath(os.fspath(out_dir))
  if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
    raise FileExistsError(f"{out_dir!r} already exists and is not an empty directory; "
                          f"pick a new output directory")
  parent = os.path.dirname(out_dir)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.", suffix=".tmp", dir=parent)
  try:
    model_index = _write_components(folder, tmp)
    _write_json(os.path.join(tmp, MODEL_INDEX), model_index)
    os.chmod(tmp, 0o755)  # mkdtemp makes it 0700; a folder others can read like any other
    if os.path.isdir(out_dir):
      os.rmdir(out_dir)  # empty (checked above); rename needs the name free
    os.rename(tmp, out_dir)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return out_dir
