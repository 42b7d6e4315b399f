"""Parameter names and layouts: PyTorch state dicts <-> cm_jax Flax parameter trees.

Everything here is numpy in, numpy out, exact (transposes and permutations only), so
import(export(params)) gives the parameters back bit for bit.

Leaf layouts (torch -> Flax):
  Conv2d weight (O, I, kh, kw)          -> kernel (kh, kw, I, O)
  Conv1d 1x1 weight (O, I, 1)            -> kernel (1, 1, I, O)   (guided-diffusion attention)
  Linear weight (O, I)                   -> kernel (I, O)
  GroupNorm weight                       -> scale
  Embedding weight (N, D)                -> embedding (N, D)
  bias                                   -> bias

Three checkpoint families map onto the two cm_jax networks:

* openai/consistency_models `UNetModel` (cm/unet.py) -> cm_jax.nets.adm.ADMUNet, a mechanical
  rename (see the adm.py docstring): every Sequential/ModuleList index is joined to its
  container's name with "_"; `openai_key_to_path` / `path_to_openai_key`.
* NVlabs/edm `SongUNet` (DDPM++ / NCSN++) -> cm_jax.nets.ncsnpp.NCSNppUNet: the ModuleDict
  entries `enc.<name>` / `dec.<name>` become `enc_<name>` / `dec_<name>`; the rest keeps its
  name. Attention qkv keeps EDM's channel layout (see below).
* NVlabs/edm `DhariwalUNet` (its ADM) -> ADMUNet, by the structural table
  `dhariwal_adm_rules` (EDM names blocks by resolution, ADM by position).

Attention qkv channel layouts (the 3C output channels of the fused 1x1 qkv conv), named by
the order of their factors, slowest first:
  'three_heads'  (3, heads, head_dim): openai/consistency_models (QKVFlashAttention's
                 "b (three h d) s" and its QKVAttentionLegacy, which rearranges the same way),
                 diffusers' chunk(3) into to_q/to_k/to_v, and cm_jax's ADMUNet.
  'heads_three'  (heads, 3, head_dim): guided-diffusion / improved-diffusion
                 QKVAttentionLegacy (reshape to (B*heads, 3*ch, T), then split q, k, v).
  'edm'          (heads, head_dim, 3): NVlabs/edm UNetBlock (reshape to
                 (B*heads, C/heads, 3, T)), and cm_jax's NCSNppUNet.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
from flax import traverse_util

Path = Tuple[str, ...]
FlatParams = Dict[Path, np.ndarray]

QKV_LAYOUTS = {
    "three_heads": ("three", "heads", "dim"),
    "heads_three": ("heads", "three", "dim"),
    "edm": ("heads", "dim", "three"),
}


# ---- leaves ----------------------------------------------------------------------------------

def conv_to_flax(w: np.ndarray) -> np.ndarray:
  """(O, I, kh, kw) -> (kh, kw, I, O); a 1-D 1x1 conv (O, I, 1) -> (1, 1, I, O)."""
  w = np.asarray(w)
  if w.ndim == 3:
    if w.shape[2] != 1:
      raise ValueError(f"only 1x1 Conv1d weights map onto a 2-D conv, got {w.shape}")
    return np.ascontiguousarray(w.transpose(2, 1, 0)[None])
  if w.ndim != 4:
    raise ValueError(f"conv weight must be 3-D or 4-D, got {w.shape}")
  return np.ascontiguousarray(w.transpose(2, 3, 1, 0))


def conv_from_flax(k: np.ndarray, ndim: int = 4) -> np.ndarray:
  """(kh, kw, I, O) -> (O, I, kh, kw), or (O, I, 1) with ndim=3 (1x1 kernels only)."""
  k = np.asarray(k)
  w = np.ascontiguousarray(k.transpose(3, 2, 0, 1))
  if ndim == 3:
    if w.shape[2:] != (1, 1):
      raise ValueError(f"only 1x1 kernels can be written as Conv1d, got {k.shape}")
    return np.ascontiguousarray(w[:, :, :, 0])
  return w


def linear_to_flax(w: np.ndarray) -> np.ndarray:
  return np.ascontiguousarray(np.asarray(w).T)


linear_from_flax = linear_to_flax


def permute_qkv(a: np.ndarray, heads: int, src: str, dst: str, axis: int = -1) -> np.ndarray:
  """Reorders the 3C qkv channels along `axis` from layout `src` to layout `dst`."""
  a = np.asarray(a)
  if src == dst:
    return a
  for name in (src, dst):
    if name not in QKV_LAYOUTS:
      raise ValueError(f"unknown qkv layout {name!r}; choose from {sorted(QKV_LAYOUTS)}")
  axis = axis % a.ndim
  n = a.shape[axis]
  if n % (3 * heads):
    raise ValueError(f"qkv axis of size {n} does not split into 3 x {heads} heads")
  sizes = {"three": 3, "heads": heads, "dim": n // (3 * heads)}
  order_src, order_dst = QKV_LAYOUTS[src], QKV_LAYOUTS[dst]
  moved = np.moveaxis(a, axis, -1)
  lead = moved.shape[:-1]
  split = moved.reshape(lead + tuple(sizes[f] for f in order_src))
  perm = tuple(range(len(lead))) + tuple(len(lead) + order_src.index(f) for f in order_dst)
  out = split.transpose(perm).reshape(lead + (n,))
  return np.ascontiguousarray(np.moveaxis(out, -1, axis))


# ---- flat trees -------------------------------------------------------------------------------

def flatten(tree, to_numpy: bool = True) -> FlatParams:
  """Nested dict of arrays -> {path tuple: leaf} (flax.traverse_util.flatten_dict); leaves
  become numpy arrays (jax arrays are copied to host) unless `to_numpy` is False."""
  flat = traverse_util.flatten_dict(tree)
  return {p: np.asarray(v) for p, v in flat.items()} if to_numpy else flat


def unflatten(flat: FlatParams) -> dict:
  return traverse_util.unflatten_dict(flat)


def check_against(flat: FlatParams, expected: FlatParams, what: str) -> None:
  """Raise one ValueError naming every missing, unexpected or mis-shaped parameter."""
  missing = sorted(set(expected) - set(flat))
  extra = sorted(set(flat) - set(expected))
  shapes = [(p, flat[p].shape, tuple(expected[p].shape)) for p in sorted(set(flat) & set(expected))
            if tuple(flat[p].shape) != tuple(expected[p].shape)]
  if not (missing or extra or shapes):
    return
  lines = [f"{what} does not fit the network of this config:"]
  show = lambda ps: ", ".join("/".join(p) for p in ps[:8]) + (" ..." if len(ps) > 8 else "")
  if missing:
    lines.append(f"  {len(missing)} missing: {show(missing)}")
  if extra:
    lines.append(f"  {len(extra)} unexpected: {show(extra)}")
  for p, got, want in shapes[:8]:
    lines.append(f"  {'/'.join(p)}: shape {got}, network wants {want}")
  raise ValueError("\n".join(lines))


# ---- openai/consistency_models UNetModel <-> ADMUNet ------------------------------------------

def _join_indices(tokens: Sequence[str]) -> List[str]:
  """['input_blocks', '1', '0', 'in_layers', '2'] -> ['input_blocks_1_0', 'in_layers_2']."""
  out: List[str] = []
  for t in tokens:
    if t.isdigit():
      if not out:
        raise ValueError(f"a key cannot start with an index: {tokens}")
      out[-1] = f"{out[-1]}_{t}"
    else:
      out.append(t)
  return out


def openai_key_to_path(key: str, ndim: int) -> Path:
  """torch state-dict key -> ADMUNet parameter path (the leaf name depends on the rank)."""
  *mods, leaf = key.split(".")
  mods = _join_indices(mods)
  if leaf == "bias":
    name = "bias"
  elif leaf != "weight":
    raise ValueError(f"unexpected parameter {key!r}")
  elif mods == ["label_emb"]:
    name = "embedding"
  elif ndim == 1:
    name = "scale"  # every 1-D weight of UNetModel is a GroupNorm's
  else:
    name = "kernel"
  return tuple(mods) + (name,)


def path_to_openai_key(path: Path) -> str:
  """ADMUNet parameter path -> torch key ('input_blocks_1_0/in_layers_2/kernel' ->
  'input_blocks.1.0.in_layers.2.weight')."""
  *mods, leaf = path
  parts: List[str] = []
  for m in mods:
    words: List[str] = []
    for t in m.split("_"):
      if t.isdigit():
        if words:
          parts.append("_".join(words))
          words = []
        parts.append(t)
      else:
        words.append(t)
    if words:
      parts.append("_".join(words))
  name = "bias" if leaf == "bias" else "weight"
  return ".".join(parts + [name])


def openai_to_flax_leaf(key: str, w: np.ndarray) -> np.ndarray:
  w = np.asarray(w)
  if key.endswith(".bias") or w.ndim == 1 or key == "label_emb.weight":
    return w
  if w.ndim == 2:
    return linear_to_flax(w)
  return conv_to_flax(w)


def flax_to_openai_leaf(path: Path, k: np.ndarray, conv_ndim: int = 4) -> np.ndarray:
  k = np.asarray(k)
  if path[-1] in ("bias", "scale", "embedding"):
    return k
  if k.ndim == 2:
    return linear_from_flax(k)
  return conv_from_flax(k, conv_ndim)


def adm_heads(channels: int, num_head_channels: int, num_heads: int) -> int:
  """Heads of an ADM attention block with `channels` channels (as UNetModel decides)."""
  if num_head_channels and num_head_channels > 0:
    return channels // num_head_channels
  if not num_heads or num_heads <= 0:
    raise ValueError("set num_head_channels or num_heads")
  return num_heads


def is_qkv(path: Path) -> bool:
  return len(path) >= 2 and path[-2] == "qkv"


# ---- NVlabs/edm SongUNet <-> NCSNppUNet --------------------------------------------------------

_EDM_BUFFERS_IGNORED = ("resample_filter",)  # fixed FIR taps; the config's resample sets them


def song_key_to_path(key: str, ndim: int) -> Optional[Path]:
  """EDM SongUNet key (without the precond's 'model.') -> NCSNppUNet path; None = skip."""
  parts = key.split(".")
  if parts[-1] in _EDM_BUFFERS_IGNORED:
    return None
  if parts[0] in ("enc", "dec"):
    parts = [f"{parts[0]}_{parts[1]}"] + parts[2:]
  *mods, leaf = parts
  if mods == ["map_noise"] and leaf == "freqs":
    return ("map_noise", "freqs")
  if leaf == "bias":
    name = "bias"
  elif leaf != "weight":
    raise ValueError(f"unexpected EDM parameter {key!r}")
  else:
    name = "scale" if ndim == 1 else "kernel"
  return tuple(mods) + (name,)


def path_to_song_key(path: Path) -> str:
  *mods, leaf = path
  first = mods[0]
  if first.startswith(("enc_", "dec_")):
    mods = [first[:3], first[4:]] + list(mods[1:])
  if tuple(path) == ("map_noise", "freqs"):
    return "map_noise.freqs"
  return ".".join(list(mods) + ["bias" if leaf == "bias" else "weight"])


def edm_to_flax_leaf(w: np.ndarray) -> np.ndarray:
  w = np.asarray(w)
  if w.ndim <= 1:
    return w
  return linear_to_flax(w) if w.ndim == 2 else conv_to_flax(w)


def flax_to_edm_leaf(path: Path, k: np.ndarray) -> np.ndarray:
  k = np.asarray(k)
  if k.ndim <= 1:
    return k
  return linear_from_flax(k) if k.ndim == 2 else conv_from_flax(k)


# ---- module tables (block-structured mappings) -------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Rule:
  """One torch module <-> one Flax module. kind: conv | linear | norm | embed | embed_linear |
  qkv (fused 1x1 conv, layout permuted by `heads`) | qkv_split (diffusers to_q/to_k/to_v
  Linear layers) | conv1x1_linear (a 1x1 conv stored as a torch Linear)."""
  torch: str
  flax: Path
  kind: str
  heads: int = 0


_RES_SUBS_EDM = (("norm0", "in_layers_0", "norm"), ("conv0", "in_layers_2", "conv"),
                 ("affine", "emb_layers_1", "linear"), ("norm1", "out_layers_0", "norm"),
                 ("conv1", "out_layers_3", "conv"), ("skip", "skip_connection", "conv"))
_ATTN_SUBS_EDM = (("norm2", "norm", "norm"), ("qkv", "qkv", "qkv"), ("proj", "proj_out", "conv"))


def _adm_levels(image_size: int, channel_mult, attention_resolutions):
  """(level, resolution, channels multiplier, attention?) of an ADM / DhariwalUNet."""
  attn = set(int(r) for r in attention_resolutions)
  return [(lvl, image_size >> lvl, m, (image_size >> lvl) in attn)
          for lvl, m in enumerate(channel_mult)]


def adm_block_pairs(image_size: int, channel_mult, num_res_blocks: int,
                    attention_resolutions) -> List[Tuple[str, str, Optional[str], int]]:
  """(EDM DhariwalUNet block, ADM res-block module, ADM attention module or None, channels
  multiplier) in forward order. EDM's `_up` block is the trailing resampling block of the
  previous ADM output block."""
  levels = _adm_levels(image_size, channel_mult, attention_resolutions)
  out = []
  i = 1
  for lvl, res, mult, attn in levels:
    if lvl > 0:
      out.append((f"enc.{res}x{res}_down", f"input_blocks_{i}_0", None, levels[lvl - 1][2]))
      i += 1
    for b in range(num_res_blocks):
      out.append((f"enc.{res}x{res}_block{b}", f"input_blocks_{i}_0",
                  f"input_blocks_{i}_1" if attn else None, mult))
      i += 1
  low = levels[-1]
  out.append((f"dec.{low[1]}x{low[1]}_in0", "middle_block_0", "middle_block_1", low[2]))
  out.append((f"dec.{low[1]}x{low[1]}_in1", "middle_block_2", None, low[2]))
  i = 0
  prev_attn = None
  for lvl, res, mult, attn in reversed(levels):
    if lvl != len(levels) - 1:
      j = 2 if prev_attn else 1
      out.append((f"dec.{res}x{res}_up", f"output_blocks_{i - 1}_{j}", None,
                  levels[lvl + 1][2]))
    for b in range(num_res_blocks + 1):
      out.append((f"dec.{res}x{res}_block{b}", f"output_blocks_{i}_0",
                  f"output_blocks_{i}_1" if attn else None, mult))
      i += 1
    prev_attn = attn
  return out


def dhariwal_adm_rules(image_size: int, model_channels: int, channel_mult, num_res_blocks: int,
                       attention_resolutions, num_head_channels: int = 64,
                       num_heads: int = -1) -> List[Rule]:
  """EDM DhariwalUNet module names (under the precond's 'model.') -> ADMUNet modules."""
  rules = [Rule(f"enc.{image_size}x{image_size}_conv", ("input_blocks_0_0",), "conv"),
           Rule("map_layer0", ("time_embed_0",), "linear"),
           Rule("map_layer1", ("time_embed_2",), "linear"),
           Rule("map_label", ("label_emb",), "embed_linear"),
           Rule("out_norm", ("out_0",), "norm"), Rule("out_conv", ("out_2",), "conv")]
  for edm, res_mod, attn_mod, mult in adm_block_pairs(image_size, channel_mult, num_res_blocks,
                                                       attention_resolutions):
    for e, a, kind in _RES_SUBS_EDM:
      rules.append(Rule(f"{edm}.{e}", (res_mod, a), kind))
    if attn_mod:
      heads = adm_heads(int(mult * model_channels), num_head_channels, num_heads)
      for e, a, kind in _ATTN_SUBS_EDM:
        rules.append(Rule(f"{edm}.{e}", (attn_mod, a), kind, heads))
  return rules


# ---- ADMUNet <-> diffusers UNet2DModel ---------------------------------------------------------
# The same correspondence as diffusers' scripts/convert_consistency_to_diffusers.py: ResBlock
# -> ResnetBlock2D, AttentionBlock -> Attention (qkv split into to_q/to_k/to_v Linear layers,
# proj_out -> to_out.0), resampling ResBlocks -> downsamplers.0 / upsamplers.0.

_RES_SUBS_DIFFUSERS = (("norm1", "in_layers_0", "norm"), ("conv1", "in_layers_2", "conv"),
                       ("time_emb_proj", "emb_layers_1", "linear"),
                       ("norm2", "out_layers_0", "norm"), ("conv2", "out_layers_3", "conv"),
                       ("conv_shortcut", "skip_connection", "conv"))


def _diffusers_res(torch_prefix: str, flax_mod: str) -> List[Rule]:
  return [Rule(f"{torch_prefix}.{d}", (flax_mod, a), kind) for d, a, kind in _RES_SUBS_DIFFUSERS]


def _diffusers_attn(torch_prefix: str, flax_mod: str, heads: int) -> List[Rule]:
  return [Rule(f"{torch_prefix}.group_norm", (flax_mod, "norm"), "norm"),
          Rule(torch_prefix, (flax_mod, "qkv"), "qkv_split", heads),
          Rule(f"{torch_prefix}.to_out.0", (flax_mod, "proj_out"), "conv1x1_linear")]


def adm_diffusers_rules(image_size: int, model_channels: int, channel_mult, num_res_blocks: int,
                        attention_resolutions, num_head_channels: int = 64,
                        num_heads: int = -1) -> List[Rule]:
  """diffusers UNet2DModel module names -> ADMUNet modules (resblock_updown=True nets)."""
  rules = [Rule("conv_in", ("input_blocks_0_0",), "conv"),
           Rule("time_embedding.linear_1", ("time_embed_0",), "linear"),
           Rule("time_embedding.linear_2", ("time_embed_2",), "linear"),
           Rule("class_embedding", ("label_emb",), "embed"),
           Rule("conv_norm_out", ("out_0",), "norm"), Rule("conv_out", ("out_2",), "conv")]
  levels = _adm_levels(image_size, channel_mult, attention_resolutions)
  heads = lambda mult: adm_heads(int(mult * model_channels), num_head_channels, num_heads)
  i = 1
  for lvl, _, mult, attn in levels:
    for j in range(num_res_blocks):
      rules += _diffusers_res(f"down_blocks.{lvl}.resnets.{j}", f"input_blocks_{i}_0")
      if attn:
        rules += _diffusers_attn(f"down_blocks.{lvl}.attentions.{j}", f"input_blocks_{i}_1",
                                 heads(mult))
      i += 1
    if lvl != len(levels) - 1:
      rules += _diffusers_res(f"down_blocks.{lvl}.downsamplers.0", f"input_blocks_{i}_0")
      i += 1
  low = levels[-1][2]
  rules += _diffusers_res("mid_block.resnets.0", "middle_block_0")
  rules += _diffusers_attn("mid_block.attentions.0", "middle_block_1", heads(low))
  rules += _diffusers_res("mid_block.resnets.1", "middle_block_2")
  i = 0
  for u, (lvl, _, mult, attn) in enumerate(reversed(levels)):
    for j in range(num_res_blocks + 1):
      rules += _diffusers_res(f"up_blocks.{u}.resnets.{j}", f"output_blocks_{i}_0")
      if attn:
        rules += _diffusers_attn(f"up_blocks.{u}.attentions.{j}", f"output_blocks_{i}_1",
                                 heads(mult))
      i += 1
    if lvl > 0:
      rules += _diffusers_res(f"up_blocks.{u}.upsamplers.0",
                              f"output_blocks_{i - 1}_{2 if attn else 1}")
  return rules


# ---- applying tables -------------------------------------------------------------------------

_TORCH_LEAVES = {"conv": (("weight", "kernel"), ("bias", "bias")),
                 "linear": (("weight", "kernel"), ("bias", "bias")),
                 "norm": (("weight", "scale"), ("bias", "bias")),
                 "embed": (("weight", "embedding"),),
                 "embed_linear": (("weight", "embedding"),),
                 "qkv": (("weight", "kernel"), ("bias", "bias")),
                 "conv1x1_linear": (("weight", "kernel"), ("bias", "bias"))}


def _leaf_to_flax(kind: str, tleaf: str, w: np.ndarray, heads: int, qkv_src: str,
                  qkv_dst: str) -> np.ndarray:
  w = np.asarray(w)
  if tleaf == "bias" or kind in ("norm", "embed"):
    out = w
  elif kind in ("linear", "embed_linear"):
    out = linear_to_flax(w)
  elif kind == "conv1x1_linear":
    out = linear_to_flax(w)[None, None]
  else:  # conv, qkv
    out = conv_to_flax(w)
  if kind == "qkv":
    out = permute_qkv(out, heads, qkv_src, qkv_dst, axis=-1)
  return out


def _leaf_from_flax(kind: str, fleaf: str, k: np.ndarray, heads: int, qkv_src: str,
                    qkv_dst: str) -> np.ndarray:
  k = np.asarray(k)
  if kind == "qkv":
    k = permute_qkv(k, heads, qkv_src, qkv_dst, axis=-1)
  if fleaf == "bias" or kind in ("norm", "embed"):
    return np.ascontiguousarray(k)
  if kind in ("linear", "embed_linear"):
    return linear_from_flax(k)
  if kind == "conv1x1_linear":
    return linear_from_flax(k[0, 0])
  return conv_from_flax(k)


def apply_rules_to_flax(state: Dict[str, np.ndarray], rules: Iterable[Rule], *,
                        qkv_src: str = "three_heads", qkv_dst: str = "three_heads",
                        prefix: str = "") -> Tuple[FlatParams, List[str]]:
  """torch state dict -> flat Flax params by `rules`; returns (params, torch keys used)."""
  flat: FlatParams = {}
  used: List[str] = []
  for r in rules:
    if r.kind == "qkv_split":
      for fleaf, tleaf in (("kernel", "weight"), ("bias", "bias")):
        keys = [f"{prefix}{r.torch}.to_{c}.{tleaf}" for c in "qkv"]
        if all(k in state for k in keys):
          parts = [np.asarray(state[k]) for k in keys]
          joined = np.concatenate(parts, axis=0)  # (3C, C) / (3C,): the 'three_heads' layout
          joined = joined if tleaf == "bias" else linear_to_flax(joined)[None, None]
          flat[r.flax + (fleaf,)] = permute_qkv(joined, r.heads, "three_heads", qkv_dst)
          used += keys
      continue
    for tleaf, fleaf in _TORCH_LEAVES[r.kind]:
      key = f"{prefix}{r.torch}.{tleaf}"
      if key in state:
        flat[r.flax + (fleaf,)] = _leaf_to_flax(r.kind, tleaf, state[key], r.heads, qkv_src,
                                                qkv_dst)
        used.append(key)
  return flat, used


def apply_rules_from_flax(flat: FlatParams, rules: Iterable[Rule], *,
                          qkv_src: str = "three_heads", qkv_dst: str = "three_heads",
                          prefix: str = "") -> Tuple[Dict[str, np.ndarray], List[Path]]:
  """flat Flax params -> torch state dict by `rules`; returns (state dict, paths used)."""
  state: Dict[str, np.ndarray] = {}
  used: List[Path] = []
  for r in rules:
    if r.kind == "qkv_split":
      for fleaf, tleaf in (("kernel", "weight"), ("bias", "bias")):
        path = r.flax + (fleaf,)
        if path not in flat:
          continue
        k = permute_qkv(flat[path], r.heads, qkv_src, "three_heads", axis=-1)
        w = k if fleaf == "bias" else linear_from_flax(k[0, 0])
        for c, part in zip("qkv", np.split(w, 3, axis=0)):
          state[f"{prefix}{r.torch}.to_{c}.{tleaf}"] = np.ascontiguousarray(part)
        used.append(path)
      continue
    for tleaf, fleaf in _TORCH_LEAVES[r.kind]:
      path = r.flax + (fleaf,)
      if path in flat:
        state[f"{prefix}{r.torch}.{tleaf}"] = _leaf_from_flax(r.kind, fleaf, flat[path], r.heads,
                                                              qkv_src, qkv_dst)
        used.append(path)
  return state, used


def strip_prefix(state: Dict[str, np.ndarray], prefixes=("module.",)) -> Dict[str, np.ndarray]:
  """Drop a DataParallel/DDP 'module.' prefix if every key has it."""
  for p in prefixes:
    if state and all(k.startswith(p) for k in state):
      state = {k[len(p):]: v for k, v in state.items()}
  return state

