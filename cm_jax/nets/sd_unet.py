"""Stable Diffusion's latent UNet (Rombach et al. 2022, "High-Resolution Image Synthesis with
Latent Diffusion Models") in Flax Linen, equivalent to diffusers' `UNet2DConditionModel` as
the SD 1.x / 2.x checkpoints configure it (plus LCM's `time_cond_proj_dim`).

Layout is NHWC. The module tree mirrors the diffusers torch module tree attribute for
attribute, with every ModuleList index joined to its container's name by "_"
(`cm_jax.utils.torch_names`), so a diffusers state dict loads mechanically:

  conv_in, time_embedding/{linear_1, linear_2, cond_proj}, conv_norm_out, conv_out
  down_blocks_I/{resnets_J, attentions_J, downsamplers_0/conv}
  mid_block/{resnets_0, attentions_0, resnets_1}
  up_blocks_I/{resnets_J, attentions_J, upsamplers_0/conv}
  resnets_J:    norm1, conv1, time_emb_proj, norm2, conv2, conv_shortcut (channel change only)
  attentions_J: norm, proj_in, transformer_blocks_K/{norm1, attn1, norm2, attn2, norm3,
                ff/{net_0/proj, net_2}}, proj_out; attnN/{to_q, to_k, to_v, to_out_0}

Facts taken from diffusers 0.42 (unet_2d_condition.py, unet_2d_blocks.py, resnet.py,
transformer_2d.py, attention.py, attention_processor.py, embeddings.py):
- `attention_head_dim` is, for historical reasons, the NUMBER of heads when
  `num_attention_heads` is unset; each block's head width is channels // heads; the up
  blocks take the per-block head counts in reverse order.
- Resnet and output GroupNorms use `norm_eps`; the transformer's input GroupNorm uses 1e-6;
  its LayerNorms 1e-5. Resnets divide by `output_scale_factor` (1 except the mid block,
  which uses `mid_block_scale_factor`).
- The feed-forward is GEGLU (Shazeer 2020) with the exact (erf) GELU and a 4x inner width;
  q/k/v projections have no bias, `to_out.0` has one.
- The time embedding is [sin, cos] (or [cos, sin] with flip_sin_to_cos) of t * f_i,
  f_i = 10000^(-i / (half - freq_shift)), then Linear -> SiLU -> Linear; LCM's
  `cond_proj` (no bias) adds a projection of the guidance embedding before linear_1.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cm_jax.nets.adm import torch_default_init
from cm_jax.nets.attention import multi_head_attention


# ----------------------------------------------------------------------------- primitives

def group_norm(x: jax.Array, groups: int, eps: float, name: str) -> jax.Array:
  """torch GroupNorm, computed in float32 whatever the compute dtype, cast back.
  Two-pass variance (use_fast_variance=False), as torch computes it."""
  y = nn.GroupNorm(num_groups=groups, epsilon=eps, dtype=jnp.float32, use_fast_variance=False,
                   name=name)(x.astype(jnp.float32))
  return y.astype(x.dtype)


def layer_norm(x: jax.Array, name: str, eps: float = 1e-5) -> jax.Array:
  y = nn.LayerNorm(epsilon=eps, dtype=jnp.float32, use_fast_variance=False, name=name)(
      x.astype(jnp.float32))
  return y.astype(x.dtype)


def conv(features: int, kernel: int, name: str, dtype: Any, stride: int = 1,
         padding: Optional[int] = None) -> nn.Conv:
  # Explicit symmetric padding as torch's Conv2d(padding=p): Flax's "SAME" pads a stride-2
  # conv asymmetrically, which would shift the downsampling grid.
  p = kernel // 2 if padding is None else padding
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=((p, p), (p, p)),
                 dtype=dtype, kernel_init=torch_default_init, name=name)


def dense(features: int, name: str, dtype: Any, use_bias: bool = True) -> nn.Dense:
  return nn.Dense(features, use_bias=use_bias, dtype=dtype, kernel_init=torch_default_init,
                  name=name)


def timestep_embedding(t: jax.Array, dim: int, flip_sin_to_cos: bool, freq_shift: float,
                       max_period: float = 10000.0) -> jax.Array:
  """diffusers' `get_timestep_embedding`: sin/cos of t * exp(-log(max_period) i / (half - shift)),
  [sin, cos] or, with flip_sin_to_cos, [cos, sin]; zero-padded to an odd dim. Float32."""
  half = dim // 2
  exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
  args = t.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None]
  parts = [jnp.cos(args), jnp.sin(args)] if flip_sin_to_cos else [jnp.sin(args), jnp.cos(args)]
  emb = jnp.concatenate(parts, axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


def upsample_nearest(x: jax.Array, size: Sequence[int]) -> jax.Array:
  """torch F.interpolate(mode="nearest") to `size` (H, W): source index floor(i * in / out).
  Exact 2x (the usual case) is a plain repeat; other sizes occur when the latent's side is
  not a multiple of 2^(number of upsamplers) and diffusers forwards the skip's size."""
  h, w = x.shape[1:3]
  if tuple(size) == (2 * h, 2 * w):
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)

  def index(n_in, n_out):
    src = np.floor(np.arange(n_out, dtype=np.float32) * np.float32(n_in / n_out))
    return np.minimum(src.astype(np.int64), n_in - 1)
  return x[:, index(h, size[0])][:, :, index(w, size[1])]


# ----------------------------------------------------------------------------- layers

class TimestepEmbedding(nn.Module):
  """Linear -> SiLU -> Linear on the sinusoidal projection (float32: a few vectors per batch).
  With cond_proj_dim, Linear(cond, no bias) is added to the projection first (LCM's w-embedding)."""
  time_embed_dim: int
  cond_proj_dim: Optional[int] = None

  @nn.compact
  def __call__(self, sample, cond=None):
    if self.cond_proj_dim:
      if cond is None:
        # diffusers skips cond_proj without a timestep_cond; a bias-free Linear of zeros is the
        # same, and it keeps the parameter in the tree so that LCM checkpoints always load.
        cond = jnp.zeros((sample.shape[0], self.cond_proj_dim), jnp.float32)
      sample = sample + dense(sample.shape[-1], "cond_proj", jnp.float32, use_bias=False)(
          cond.astype(jnp.float32))
    sample = dense(self.time_embed_dim, "linear_1", jnp.float32)(sample)
    return dense(self.time_embed_dim, "linear_2", jnp.float32)(nn.silu(sample))


class ResnetBlock2D(nn.Module):
  """diffusers' ResnetBlock2D with time_embedding_norm="default": the embedding is added
  between conv1 and norm2; a 1x1 conv_shortcut only when the channel count changes."""
  out_channels: int
  groups: int
  eps: float
  output_scale_factor: float = 1.0
  dropout: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, temb, train: bool = False):
    h = nn.silu(group_norm(x, self.groups, self.eps, "norm1"))
    h = conv(self.out_channels, 3, "conv1", self.dtype)(h)
    t = dense(self.out_channels, "time_emb_proj", self.dtype)(nn.silu(temb).astype(self.dtype))
    h = h + t[:, None, None, :].astype(h.dtype)
    h = nn.silu(group_norm(h, self.groups, self.eps, "norm2"))
    h = nn.Dropout(self.dropout, deterministic=not train)(h)
    h = conv(self.out_channels, 3, "conv2", self.dtype)(h)
    if x.shape[-1] != self.out_channels:
      x = conv(self.out_channels, 1, "conv_shortcut", self.dtype)(x)
    return (x + h) / self.output_scale_factor


class Attention(nn.Module):
  """diffusers' Attention with the default processor: bias-free q/k/v, softmax(q k^T / sqrt(d)) v
  over `heads` heads of width dim // heads, then to_out.0 (Linear with bias). Self-attention
  when context is None. `mask` (B, L) True = attend to that key."""
  heads: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, context=None, mask=None):
    b, n, dim = x.shape
    context = x if context is None else context
    head_dim = dim // self.heads
    inner = head_dim * self.heads

    def split(y):
      return y.reshape(b, y.shape[1], self.heads, head_dim)
    q = split(dense(inner, "to_q", self.dtype, use_bias=False)(x))
    k = split(dense(inner, "to_k", self.dtype, use_bias=False)(context))
    v = split(dense(inner, "to_v", self.dtype, use_bias=False)(context))
    return dense(dim, "to_out_0", self.dtype)(attend(q, k, v, mask).reshape(b, n, inner))


def attend(q, k, v, mask=None):
  """softmax(q k^T / sqrt(d)) v on (B, L, heads, head_dim); mask (B, Lk) True = attend.
  Masked keys get no weight (diffusers adds -10000 to their logits: the same after the
  softmax in float32)."""
  return multi_head_attention(q, k, v, key_mask=mask)


class GEGLU(nn.Module):
  """proj to 2 * inner, split into (hidden, gate), hidden * GELU(gate) with the exact erf GELU."""
  inner_dim: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    hidden, gate = jnp.split(dense(2 * self.inner_dim, "proj", self.dtype)(x), 2, axis=-1)
    return hidden * nn.gelu(gate, approximate=False)


class FeedForward(nn.Module):
  """net.0 = GEGLU(dim -> 4 dim), net.1 = dropout (p = 0 in SD: omitted), net.2 = Linear
  back to dim."""
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    dim = x.shape[-1]
    h = GEGLU(4 * dim, self.dtype, name="net_0")(x)
    return dense(dim, "net_2", self.dtype)(h)


class BasicTransformerBlock(nn.Module):
  """Pre-LayerNorm block: self-attention, cross-attention on the text context, GEGLU MLP,
  each added to the residual stream."""
  heads: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, context, mask=None):
    x = x + Attention(self.heads, self.dtype, name="attn1")(layer_norm(x, "norm1"))
    x = x + Attention(self.heads, self.dtype, name="attn2")(layer_norm(x, "norm2"), context, mask)
    return x + FeedForward(self.dtype, name="ff")(layer_norm(x, "norm3"))


class Transformer2DModel(nn.Module):
  """The spatial transformer: GroupNorm (eps 1e-6), proj_in (1x1 conv, or Linear with
  use_linear_projection, SD 2.x), `num_layers` transformer blocks over the H*W tokens,
  proj_out likewise, plus the input (residual)."""
  heads: int
  groups: int
  num_layers: int = 1
  use_linear_projection: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, context, mask=None):
    b, hgt, wid, c = x.shape
    inner = (c // self.heads) * self.heads
    h = group_norm(x, self.groups, 1e-6, "norm")
    if self.use_linear_projection:
      h = dense(inner, "proj_in", self.dtype)(h.reshape(b, hgt * wid, c))
    else:
      h = conv(inner, 1, "proj_in", self.dtype)(h).reshape(b, hgt * wid, inner)
    for k in range(self.num_layers):
      h = BasicTransformerBlock(self.heads, self.dtype, name=f"transformer_blocks_{k}")(
          h, context, mask)
    if self.use_linear_projection:
      h = dense(c, "proj_out", self.dtype)(h).reshape(b, hgt, wid, c)
    else:
      h = conv(c, 1, "proj_out", self.dtype)(h.reshape(b, hgt, wid, inner))
    return h + x


class Downsample2D(nn.Module):
  """Stride-2 3x3 conv with `padding` on every side; padding 0 pads only bottom/right by 1."""
  padding: int = 1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    if self.padding == 0:
      x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
    return conv(x.shape[-1], 3, "conv", self.dtype, stride=2, padding=self.padding)(x)


class Upsample2D(nn.Module):
  """Nearest upsampling to `size` (2x unless diffusers forwards a skip's odd size), 3x3 conv."""
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, size=None):
    size = (2 * x.shape[1], 2 * x.shape[2]) if size is None else size
    return conv(x.shape[-1], 3, "conv", self.dtype)(upsample_nearest(x, size))


# ----------------------------------------------------------------------------- blocks

class _Block(nn.Module):
  """Fields shared by the down/mid/up blocks (those without attention ignore the attention ones).
  num_layers: resnets in the block (layers_per_block, +1 in up blocks); transformer_layers:
  transformer blocks per attention; resample: add the down/upsampler (all but the last level)."""
  out_channels: int
  num_layers: int = 1
  groups: int = 32
  eps: float = 1e-5
  heads: int = 8
  transformer_layers: int = 1
  use_linear_projection: bool = False
  resample: bool = True
  downsample_padding: int = 1
  output_scale_factor: float = 1.0
  dropout: float = 0.0
  dtype: Any = jnp.float32
  remat: bool = False

  def resnet(self, j: int, out_channels: Optional[int] = None) -> nn.Module:
    cls = nn.remat(ResnetBlock2D, static_argnums=(3,)) if self.remat else ResnetBlock2D
    return cls(out_channels or self.out_channels, self.groups, self.eps,
               self.output_scale_factor, self.dropout, self.dtype, name=f"resnets_{j}")

  def attention(self, j: int) -> nn.Module:
    cls = nn.remat(Transformer2DModel) if self.remat else Transformer2DModel
    return cls(self.heads, self.groups, self.transformer_layers, self.use_linear_projection,
               self.dtype, name=f"attentions_{j}")

  def downsample(self, h):
    return Downsample2D(self.downsample_padding, self.dtype, name="downsamplers_0")(h)

  def upsample(self, h, size):
    return Upsample2D(self.dtype, name="upsamplers_0")(h, size)


class DownBlock2D(_Block):
  """Resnets, then the strided-conv downsampler; every intermediate output is a skip."""

  @nn.compact
  def __call__(self, h, temb, context=None, mask=None, train: bool = False):
    skips = []
    for j in range(self.num_layers):
      h = self.resnet(j)(h, temb, train)
      skips.append(h)
    if self.resample:
      h = self.downsample(h)
      skips.append(h)
    return h, skips


class CrossAttnDownBlock2D(_Block):
  """(resnet, spatial transformer) pairs, then the downsampler; each pair's output is a skip."""

  @nn.compact
  def __call__(self, h, temb, context=None, mask=None, train: bool = False):
    skips = []
    for j in range(self.num_layers):
      h = self.resnet(j)(h, temb, train)
      h = self.attention(j)(h, context, mask)
      skips.append(h)
    if self.resample:
      h = self.downsample(h)
      skips.append(h)
    return h, skips


class UNetMidBlock2DCrossAttn(_Block):
  """resnet, then (spatial transformer, resnet) x num_layers (1 in SD)."""

  @nn.compact
  def __call__(self, h, temb, context=None, mask=None, train: bool = False):
    h = self.resnet(0)(h, temb, train)
    for j in range(self.num_layers):
      h = self.attention(j)(h, context, mask)
      h = self.resnet(j + 1)(h, temb, train)
    return h


class UpBlock2D(_Block):
  """Resnets each eating the last remaining skip (channel concat, current features first),
  then nearest upsampling + conv."""

  @nn.compact
  def __call__(self, h, skips, temb, context=None, mask=None, train: bool = False,
               size=None):
    skips = list(skips)
    for j in range(self.num_layers):
      h = jnp.concatenate([h, skips.pop()], axis=-1)
      h = self.resnet(j)(h, temb, train)
    if self.resample:
      h = self.upsample(h, size)
    return h


class CrossAttnUpBlock2D(_Block):
  """(resnet on [h, skip], spatial transformer) pairs, then the upsampler."""

  @nn.compact
  def __call__(self, h, skips, temb, context=None, mask=None, train: bool = False,
               size=None):
    skips = list(skips)
    for j in range(self.num_layers):
      h = jnp.concatenate([h, skips.pop()], axis=-1)
      h = self.resnet(j)(h, temb, train)
      h = self.attention(j)(h, context, mask)
    if self.resample:
      h = self.upsample(h, size)
    return h


# The diffusers block type names this port implements; any other name is a one-line ValueError.
DOWN_BLOCKS = {"DownBlock2D": DownBlock2D, "CrossAttnDownBlock2D": CrossAttnDownBlock2D}
MID_BLOCKS = {"UNetMidBlock2DCrossAttn": UNetMidBlock2DCrossAttn}
UP_BLOCKS = {"UpBlock2D": UpBlock2D, "CrossAttnUpBlock2D": CrossAttnUpBlock2D}

# diffusers config keys that carry no information for the network.
_BOOKKEEPING = frozenset({"_class_name", "_diffusers_version", "_name_or_path",
                          "_use_default_values"})
# diffusers config keys with no field here: accepted only at the value(s) that leave the
# SD 1.x / 2.x computation unchanged (their diffusers defaults).
_DEFAULT_ONLY = {
    "reverse_transformer_layers_per_block": (None,),
    "encoder_hid_dim": (None,),
    "encoder_hid_dim_type": (None,),
    "addition_time_embed_dim": (None,),
    "num_class_embeds": (None,),
    "resnet_time_scale_shift": ("default",),
    "resnet_skip_time_act": (False,),
    "resnet_out_scale_factor": (1, 1.0),
    "time_embedding_type": ("positional",),
    "time_embedding_dim": (None,),
    "time_embedding_act_fn": (None,),
    "timestep_post_act": (None,),
    "conv_in_kernel": (3,),
    "conv_out_kernel": (3,),
    "projection_class_embeddings_input_dim": (None,),
    "attention_type": ("default",),
    "class_embeddings_concat": (False,),
    "mid_block_only_cross_attention": (None, False),
    "cross_attention_norm": (None,),
    "addition_embed_type_num_heads": (64,),
}


def _unsupported(key: str, value: Any, why: str = "") -> ValueError:
  text = f"UNet2DCondition: unsupported {key}={value!r}" + (f" ({why})" if why else "")
  return ValueError(" ".join(text.split()))  # one line whatever the value's repr


def _per_block(value, n: int, key: str) -> tuple:
  """An int (or None) for every block, or a per-block sequence of length n."""
  if value is None or isinstance(value, (int, np.integer)):
    return (value,) * n
  value = tuple(value)
  if len(value) != n or not all(v is None or isinstance(v, (int, np.integer)) for v in value):
    raise _unsupported(key, value, f"expected an int or {n} ints, one per block")
  return value


def _as_tuples(value):
  """JSON lists -> tuples (module fields must be hashable)."""
  if isinstance(value, (list, tuple)):
    return tuple(_as_tuples(v) for v in value)
  return value


class UNet2DCondition(nn.Module):
  """SD's UNet: (x, noise_cond, labels=None, cond=None, train, context, context_mask) -> output.

  Fields carry diffusers' `UNet2DConditionModel` config names and defaults (build one from a
  diffusers `config.json` dict with `from_config`); `sd15_unet_config()` is SD 1.5's.
    attention_head_dim: the number of heads per block (int or per-block) when
      num_attention_heads is None, as in diffusers.
    time_cond_proj_dim: LCM's guidance-embedding width (`cond` input); cond_dim mirrors it.
    down_block_types, up_block_types, mid_block_type: names from DOWN_BLOCKS, UP_BLOCKS,
      MID_BLOCKS; only_cross_attention, dual_cross_attention, class_embed_type,
      addition_embed_type, act_fn (options of other diffusers nets): only the SD values.
      Anything else is a one-line ValueError naming the key and value.
    context_mask (call): without one, as SD's pipelines, every text token is attended to.
    image_size, num_classes: what `cm_jax.nets.build_network` passes to every network
      (image_size is unused; num_classes must be None/0: SD is text-conditional).
    dtype: compute dtype of convs, linears and attention; parameters, norms, softmax, the
      time embedding and the output conv stay float32.
    remat: rematerialise each resnet and spatial transformer in the backward pass.
  """
  sample_size: Optional[int] = None
  in_channels: int = 4
  out_channels: int = 4
  center_input_sample: bool = False
  flip_sin_to_cos: bool = True
  freq_shift: int = 0
  down_block_types: Sequence[str] = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                     "CrossAttnDownBlock2D", "DownBlock2D")
  mid_block_type: Optional[str] = "UNetMidBlock2DCrossAttn"
  up_block_types: Sequence[str] = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                                   "CrossAttnUpBlock2D")
  only_cross_attention: Any = False
  block_out_channels: Sequence[int] = (320, 640, 1280, 1280)
  layers_per_block: Any = 2
  downsample_padding: int = 1
  mid_block_scale_factor: float = 1.0
  dropout: float = 0.0
  act_fn: str = "silu"
  norm_num_groups: int = 32
  norm_eps: float = 1e-5
  cross_attention_dim: Any = 1280
  transformer_layers_per_block: Any = 1
  attention_head_dim: Any = 8
  num_attention_heads: Any = None
  dual_cross_attention: bool = False
  use_linear_projection: bool = False
  class_embed_type: Optional[str] = None
  addition_embed_type: Optional[str] = None
  upcast_attention: bool = False  # accepted: attention logits and softmax are float32 anyway
  time_cond_proj_dim: Optional[int] = None
  image_size: Optional[int] = None
  num_classes: Optional[int] = None
  dtype: Any = jnp.float32
  remat: bool = False

  def __post_init__(self):
    self._check()
    super().__post_init__()

  def _check(self):
    """One-line ValueErrors for configurations this port does not implement."""
    for key, table in (("down_block_types", DOWN_BLOCKS), ("up_block_types", UP_BLOCKS)):
      for name in getattr(self, key):
        if name not in table:
          raise _unsupported(key, name, f"block type not implemented; known: {sorted(table)}")
    if self.mid_block_type not in MID_BLOCKS:
      raise _unsupported("mid_block_type", self.mid_block_type,
                         f"block type not implemented; known: {sorted(MID_BLOCKS)}")
    n = len(self.block_out_channels)
    if len(self.down_block_types) != n or len(self.up_block_types) != n:
      raise _unsupported("block_out_channels", tuple(self.block_out_channels),
                         f"need one per down block and per up block ({len(self.down_block_types)}"
                         f" down, {len(self.up_block_types)} up)")
    only_cross = self.only_cross_attention
    if (any(only_cross) if isinstance(only_cross, (list, tuple)) else only_cross):
      raise _unsupported("only_cross_attention", only_cross)
    for key, allowed in (("dual_cross_attention", (False,)), ("class_embed_type", (None,)),
                         ("addition_embed_type", (None,)), ("act_fn", ("silu", "swish"))):
      if getattr(self, key) not in allowed:
        raise _unsupported(key, getattr(self, key))
    if self.num_classes:
      raise _unsupported("num_classes", self.num_classes, "SD is text-conditional; no labels")
    if not isinstance(self.norm_num_groups, (int, np.integer)):
      raise _unsupported("norm_num_groups", self.norm_num_groups)
    for key in ("layers_per_block", "transformer_layers_per_block", "attention_head_dim",
                "num_attention_heads", "cross_attention_dim"):
      _per_block(getattr(self, key), n, key)

  @property
  def cond_dim(self) -> int:
    """Width of the `cond` input (LCM's guidance embedding), 0 without one."""
    return int(self.time_cond_proj_dim or 0)

  @classmethod
  def from_config(cls, config: Mapping[str, Any], **overrides) -> "UNet2DCondition":
    """The network a diffusers `UNet2DConditionModel` config dict describes; `overrides` are
    further fields (e.g. dtype, remat). Bookkeeping keys (`_class_name`, ...) are skipped;
    keys this port has no field for are accepted only at their diffusers default."""
    fields = {f.name for f in dataclasses.fields(cls)} - {"parent", "name"}
    kwargs = {}
    for key, value in {**dict(config), **overrides}.items():
      if key in _BOOKKEEPING:
        continue
      value = _as_tuples(value)
      if key in fields:
        kwargs[key] = value
      elif key in _DEFAULT_ONLY:
        if value not in _DEFAULT_ONLY[key]:
          raise _unsupported(key, value, "only the SD 1.x/2.x value "
                             f"{_DEFAULT_ONLY[key][0]!r} is implemented")
      else:
        raise _unsupported(key, value, "unknown UNet2DConditionModel config key")
    return cls(**kwargs)

  @nn.compact
  def __call__(self, x, noise_cond, labels=None, cond=None, train: bool = False, context=None,
               context_mask=None):
    """x: (B, H, W, in_channels) latents; noise_cond: the diffusers timestep, (B,) or scalar;
    cond: (B, time_cond_proj_dim) or None; context: (B, L, cross_attention_dim) text states;
    context_mask: optional (B, L), 1 = attend. Returns (B, H, W, out_channels) float32."""
    if labels is not None:
      raise ValueError("UNet2DCondition takes no labels (SD is conditioned on `context`)")
    if context is None:
      raise ValueError("UNet2DCondition needs context: the (B, L, cross_attention_dim) text "
                       "encoder states")
    if cond is not None and not self.time_cond_proj_dim:
      raise ValueError("cond given but time_cond_proj_dim is unset (no guidance embedding)")
    n = len(self.block_out_channels)
    channels = tuple(self.block_out_channels)
    layers = _per_block(self.layers_per_block, n, "layers_per_block")
    t_layers = _per_block(self.transformer_layers_per_block, n, "transformer_layers_per_block")
    # diffusers' historical naming: attention_head_dim is the head COUNT unless
    # num_attention_heads is given.
    heads = _per_block(self.num_attention_heads or self.attention_head_dim, n,
                       "attention_head_dim")
    cross_dims = set(_per_block(self.cross_attention_dim, n, "cross_attention_dim"))
    if context.shape[-1] not in cross_dims:
      raise ValueError(f"context has width {context.shape[-1]}, the UNet's "
                       f"cross_attention_dim is {self.cross_attention_dim}")
    dt, groups, eps = self.dtype, self.norm_num_groups, self.norm_eps
    common = dict(groups=groups, eps=eps, use_linear_projection=self.use_linear_projection,
                  downsample_padding=self.downsample_padding, dropout=self.dropout, dtype=dt,
                  remat=self.remat)

    # 1. time: sinusoidal projection of width channels[0], MLP to 4 * channels[0].
    noise_cond = jnp.broadcast_to(jnp.asarray(noise_cond, jnp.float32), (x.shape[0],))
    t_emb = timestep_embedding(noise_cond, channels[0], self.flip_sin_to_cos, self.freq_shift)
    emb = TimestepEmbedding(4 * channels[0], self.time_cond_proj_dim, name="time_embedding")(
        t_emb, cond)

    context = context.astype(dt)
    mask = None if context_mask is None else jnp.asarray(context_mask) > 0
    if self.center_input_sample:
      x = 2 * x - 1.0
    h = conv(channels[0], 3, "conv_in", dt)(x.astype(dt))

    # 2. down: every resnet / attention output and every downsampled map is a skip.
    skips = [h]
    for i, block_type in enumerate(self.down_block_types):
      block = DOWN_BLOCKS[block_type](
          channels[i], num_layers=layers[i], heads=heads[i], transformer_layers=t_layers[i],
          resample=i < n - 1, **common, name=f"down_blocks_{i}")
      h, block_skips = block(h, emb, context, mask, train)
      skips.extend(block_skips)

    # 3. mid
    h = MID_BLOCKS[self.mid_block_type](
        channels[-1], num_layers=1, heads=heads[-1], transformer_layers=t_layers[-1],
        output_scale_factor=self.mid_block_scale_factor, **common, name="mid_block")(
            h, emb, context, mask, train)

    # 4. up: per-block settings reversed; layers_per_block + 1 resnets, each eating a skip.
    for i, block_type in enumerate(self.up_block_types):
      r = n - 1 - i
      count = layers[r] + 1
      block_skips, skips = skips[-count:], skips[:-count]
      # Upsample to the next skip's size: 2x, except for odd sizes, like diffusers'
      # forwarded upsample_size.
      size = skips[-1].shape[1:3] if i < n - 1 else None
      block = UP_BLOCKS[block_type](
          channels[r], num_layers=count, heads=heads[r], transformer_layers=t_layers[r],
          resample=i < n - 1, **common, name=f"up_blocks_{i}")
      h = block(h, block_skips, emb, context, mask, train, size)

    # 5. out, in float32 (a 4-channel conv: cheap, and the output is what the loss sees).
    h = nn.silu(group_norm(h.astype(jnp.float32), groups, eps, "conv_norm_out"))
    return conv(self.out_channels, 3, "conv_out", jnp.float32)(h)


def sd15_unet_config() -> dict:
  """Stable Diffusion 1.5's UNet config (the diffusers `unet/config.json` keys that matter;
  859,520,964 parameters)."""
  return {
      "_class_name": "UNet2DConditionModel",
      "act_fn": "silu",
      "attention_head_dim": 8,
      "block_out_channels": [320, 640, 1280, 1280],
      "center_input_sample": False,
      "cross_attention_dim": 768,
      "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                           "CrossAttnDownBlock2D", "DownBlock2D"],
      "downsample_padding": 1,
      "flip_sin_to_cos": True,
      "freq_shift": 0,
      "in_channels": 4,
      "layers_per_block": 2,
      "mid_block_scale_factor": 1,
      "norm_eps": 1e-05,
      "norm_num_groups": 32,
      "out_channels": 4,
      "sample_size": 64,
      "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                         "CrossAttnUpBlock2D"],
  }
