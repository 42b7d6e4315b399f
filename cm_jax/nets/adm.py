"""The ADM UNet of Dhariwal & Nichol 2021 ("Diffusion Models Beat GANs on Image
Synthesis", guided-diffusion), as openai/consistency_models configures it.

Layout is NHWC. The module tree mirrors the PyTorch `UNetModel` of
openai/consistency_models (cm/unet.py) one submodule per torch module, so that
the released checkpoints import by a mechanical rename:

  torch state-dict key                      Flax parameter path
  time_embed.{0,2}.{weight,bias}            time_embed_{0,2}/{kernel,bias}
  label_emb.weight                          label_emb/embedding
  input_blocks.I.J.<sub>.K.<leaf>           input_blocks_I_J/<sub>_K/<leaf>
  middle_block.J.<sub>...                   middle_block_J/<sub>...
  output_blocks.I.J.<sub>...                output_blocks_I_J/<sub>...
  out.{0,2}.<leaf>                          out_{0,2}/<leaf>

i.e. every `Sequential`/`ModuleList` index is joined to its container's name
with "_" (keeping torch's own index, so `time_embed.2` is `time_embed_2`: the
SiLU at index 1 has no parameters). Inside a ResBlock: in_layers_0 (norm),
in_layers_2 (conv), emb_layers_1 (linear), out_layers_0 (norm), out_layers_3
(conv), skip_connection; inside an AttentionBlock: norm, qkv, proj_out;
Downsample: op; Upsample: conv. Leaves: conv weight (O,I,kh,kw) ->
kernel (kh,kw,I,O); linear weight (O,I) -> kernel (I,O); GroupNorm weight ->
scale; attention qkv/proj_out are 1x1 convs like in torch. `cond_emb` (the
optional guidance-scale embedding) has no torch counterpart.
"""
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import flax.linen as nn
import numpy as np

from cm_jax.nets.attention import multi_head_attention

# PyTorch's default Linear/Conv weight init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)),
# so a net trained from scratch starts like the reference one (biases start at 0).
torch_default_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
zeros = nn.initializers.zeros


def timestep_embedding(t: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
  """guided-diffusion's sinusoidal embedding: [cos(t f), sin(t f)], f_i = max_period^(-i/half).

  The cos-then-sin order and max_period=10000 (from the Transformer's positional
  encoding, Vaswani et al. 2017) are what the released checkpoints were trained with.
  """
  half = dim // 2
  freqs = jnp.exp(-np.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = t.astype(jnp.float32)[:, None] * freqs[None]
  emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


def group_norm(x: jax.Array, groups: int, name: str) -> jax.Array:
  """GroupNorm(32, eps=1e-5) computed in float32 whatever the compute dtype
  (the reference's GroupNorm32 upcasts the same way under fp16)."""
  y = nn.GroupNorm(num_groups=groups, epsilon=1e-5, dtype=jnp.float32, name=name)(
      x.astype(jnp.float32))
  return y.astype(x.dtype)


def conv(features: int, kernel: int, name: str, dtype: Any, stride: int = 1,
         zero_init: bool = False) -> nn.Conv:
  # Explicit symmetric padding (torch's padding=k//2): Flax's "SAME" pads a
  # stride-2 conv asymmetrically, which would shift the Downsample grid.
  p = kernel // 2
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride),
                 padding=((p, p), (p, p)), dtype=dtype,
                 kernel_init=zeros if zero_init else torch_default_init, name=name)


def upsample_nearest(x: jax.Array) -> jax.Array:
  return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


def downsample_avg(x: jax.Array) -> jax.Array:
  return nn.avg_pool(x, (2, 2), strides=(2, 2))


class Downsample(nn.Module):
  """Plain downsampling (used when resblock_updown=False): strided 3x3 conv or 2x2 average pool."""
  use_conv: bool
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    if self.use_conv:
      return conv(x.shape[-1], 3, "op", self.dtype, stride=2)(x)
    return downsample_avg(x)


class Upsample(nn.Module):
  """Plain upsampling (used when resblock_updown=False): nearest x2, then optionally a 3x3 conv."""
  use_conv: bool
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = upsample_nearest(x)
    if self.use_conv:
      x = conv(x.shape[-1], 3, "conv", self.dtype)(x)
    return x


class ResBlock(nn.Module):
  """BigGAN-style residual block of ADM, optionally resampling (Dhariwal & Nichol 2021, Sec. 3).

  With use_scale_shift_norm the embedding modulates the second norm as
  GroupNorm(h) * (1 + scale) + shift ("AdaGN", Sec. 3 of the paper); else it is added.
  """
  out_channels: int
  dropout: float = 0.0
  use_scale_shift_norm: bool = True
  up: bool = False
  down: bool = False
  num_groups: int = 32
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, emb, train: bool):
    h = nn.silu(group_norm(x, self.num_groups, "in_layers_0"))
    # Resample between the activation and the conv, both on the residual
    # branch (h) and the skip branch (x), as in guided-diffusion.
    if self.up:
      h, x = upsample_nearest(h), upsample_nearest(x)
    elif self.down:
      h, x = downsample_avg(h), downsample_avg(x)
    h = conv(self.out_channels, 3, "in_layers_2", self.dtype)(h)

    # The embedding path stays float32 (the reference's fp16 mode only halves
    # convolutions); its output is cast to the compute dtype.
    width = 2 * self.out_channels if self.use_scale_shift_norm else self.out_channels
    emb_out = nn.Dense(width, kernel_init=torch_default_init, name="emb_layers_1")(nn.silu(emb))
    emb_out = emb_out.astype(h.dtype)[:, None, None, :]
    if self.use_scale_shift_norm:
      scale, shift = jnp.split(emb_out, 2, axis=-1)  # torch chunk(2, dim=1): scale first
      h = group_norm(h, self.num_groups, "out_layers_0") * (1 + scale) + shift
    else:
      h = group_norm(h + emb_out, self.num_groups, "out_layers_0")
    h = nn.silu(h)
    h = nn.Dropout(self.dropout, deterministic=not train)(h)
    # Zero-initialised last conv: each block starts as the identity (guided-diffusion's zero_module).
    h = conv(self.out_channels, 3, "out_layers_3", self.dtype, zero_init=True)(h)

    if x.shape[-1] != self.out_channels:
      x = conv(self.out_channels, 1, "skip_connection", self.dtype)(x)
    return x + h


class AttentionBlock(nn.Module):
  """Spatial self-attention with a residual connection (ADM; from Ho et al. 2020's UNet)."""
  num_heads: int
  num_groups: int = 32
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    b, hgt, wid, c = x.shape
    qkv = conv(3 * c, 1, "qkv", self.dtype)(group_norm(x, self.num_groups, "norm"))
    # Channel order of qkv is (3, heads, head_dim): split into q, k, v first,
    # then into heads. This is the "new" order of openai/consistency_models
    # (QKVFlashAttention's "b (three h d) s" and QKVAttention's chunk(3)), not
    # guided-diffusion's QKVAttentionLegacy "(heads, 3, head_dim)".
    qkv = qkv.reshape(b, hgt * wid, 3, self.num_heads, c // self.num_heads)
    # Scaled by 1/sqrt(head_dim), the reference's (q/d^(1/4)) . (k/d^(1/4)).
    a = multi_head_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2])
    a = a.reshape(b, hgt, wid, c)  # heads then head_dim, as the reference's output
    return x + conv(c, 1, "proj_out", self.dtype, zero_init=True)(a)


class ADMUNet(nn.Module):
  """ADM UNet: (x, noise_cond, labels, cond) -> output, NHWC.

  Attributes mirror guided-diffusion's `UNetModel`/`create_model` arguments:
    out_channels: 3 for the consistency-models nets (learn_sigma=False there);
      guided-diffusion's learn_sigma=True nets use 6.
    attention_resolutions: feature-map resolutions (e.g. 32,16,8) with attention.
    num_head_channels: channels per head; if <= 0, num_heads heads are used instead.
    cond_dim: if > 0, a (B, cond_dim) vector (e.g. a guidance-scale embedding) goes
      through a zero-initialised Dense to the embedding width and is added to it.
      Zero init leaves the function of an imported unconditional net unchanged.
    num_groups: GroupNorm groups (32 in the reference; smaller only for tiny nets).
    dtype: compute dtype of the convolutions; parameters, norms and the
      embedding path stay float32, as in the reference's fp16 mode.
    remat: rematerialise each res/attention block in the backward pass
      (the reference's use_checkpoint).
  """
  image_size: int = 64
  in_channels: int = 3
  out_channels: int = 3
  model_channels: int = 192
  channel_mult: Sequence[float] = (1, 2, 3, 4)
  num_res_blocks: int = 3
  attention_resolutions: Sequence[int] = (32, 16, 8)
  num_head_channels: int = 64
  num_heads: int = -1
  dropout: float = 0.0
  num_classes: Optional[int] = None
  use_scale_shift_norm: bool = True
  resblock_updown: bool = True
  conv_resample: bool = True
  cond_dim: int = 0
  num_groups: int = 32
  dtype: Any = jnp.float32
  remat: bool = False

  def _heads(self, ch: int) -> int:
    if self.num_head_channels > 0:
      assert ch % self.num_head_channels == 0, (ch, self.num_head_channels)
      return ch // self.num_head_channels
    assert self.num_heads > 0, "set num_head_channels or num_heads"
    return self.num_heads

  @nn.compact
  def __call__(self, x, noise_cond, labels=None, cond=None, train: bool = False):
    if (labels is not None) != (self.num_classes is not None):
      raise ValueError("pass labels if and only if num_classes is set")
    if (cond is not None) != (self.cond_dim > 0):
      raise ValueError("pass cond if and only if cond_dim > 0")
    res_block = nn.remat(ResBlock, static_argnums=(3,)) if self.remat else ResBlock
    attn_block = nn.remat(AttentionBlock) if self.remat else AttentionBlock
    mc, groups, dt = self.model_channels, self.num_groups, self.dtype

    def resblock(name, out_ch, **kw):
      return res_block(out_ch, self.dropout, self.use_scale_shift_norm, num_groups=groups,
                       dtype=dt, name=name, **kw)

    def attention(name, ch):
      return attn_block(self._heads(ch), num_groups=groups, dtype=dt, name=name)

    # Embedding of the noise level (+ class, + extra cond), width 4 * model_channels.
    emb_dim = 4 * mc
    noise_cond = jnp.broadcast_to(noise_cond, (x.shape[0],))
    emb = timestep_embedding(noise_cond, mc)
    emb = nn.Dense(emb_dim, kernel_init=torch_default_init, name="time_embed_0")(emb)
    emb = nn.Dense(emb_dim, kernel_init=torch_default_init, name="time_embed_2")(nn.silu(emb))
    if self.num_classes is not None:
      # torch nn.Embedding initialises N(0, 1).
      emb = emb + nn.Embed(self.num_classes, emb_dim, embedding_init=nn.initializers.normal(1.0),
                           name="label_emb")(labels)
    if self.cond_dim > 0:
      emb = emb + nn.Dense(emb_dim, kernel_init=zeros, name="cond_emb")(
          cond.astype(jnp.float32))

    # Attention where the feature map is at one of attention_resolutions;
    # like the reference, decided by the downsampling factor ds for image_size.
    attn_ds = {self.image_size // r for r in self.attention_resolutions}

    # Encoder. input_blocks_I_J: block I, layer J of the reference's ModuleList.
    ch = int(self.channel_mult[0] * mc)
    h = conv(ch, 3, "input_blocks_0_0", dt)(x.astype(dt))
    hs = [h]
    i, ds = 1, 1
    for level, mult in enumerate(self.channel_mult):
      for _ in range(self.num_res_blocks):
        ch = int(mult * mc)
        h = resblock(f"input_blocks_{i}_0", ch)(h, emb, train)
        if ds in attn_ds:
          h = attention(f"input_blocks_{i}_1", ch)(h)
        hs.append(h)
        i += 1
      if level != len(self.channel_mult) - 1:
        if self.resblock_updown:
          h = resblock(f"input_blocks_{i}_0", ch, down=True)(h, emb, train)
        else:
          h = Downsample(self.conv_resample, dt, name=f"input_blocks_{i}_0")(h)
        hs.append(h)
        i, ds = i + 1, ds * 2

    # Middle: res, attention, res (attention at the bottom whatever attention_resolutions says).
    h = resblock("middle_block_0", ch)(h, emb, train)
    h = attention("middle_block_1", ch)(h)
    h = resblock("middle_block_2", ch)(h, emb, train)

    # Decoder: num_res_blocks + 1 blocks per level, each eating one skip (current
    # features first, then the skip, as torch.cat([h, hs.pop()], dim=1)).
    i = 0
    for level, mult in reversed(list(enumerate(self.channel_mult))):
      for r in range(self.num_res_blocks + 1):
        h = jnp.concatenate([h, hs.pop()], axis=-1)
        ch = int(mult * mc)
        h = resblock(f"output_blocks_{i}_0", ch)(h, emb, train)
        j = 1
        if ds in attn_ds:
          h = attention(f"output_blocks_{i}_1", ch)(h)
          j = 2
        if level and r == self.num_res_blocks:
          if self.resblock_updown:
            h = resblock(f"output_blocks_{i}_{j}", ch, up=True)(h, emb, train)
          else:
            h = Upsample(self.conv_resample, dt, name=f"output_blocks_{i}_{j}")(h)
          ds //= 2
        i += 1

    # Output head in float32 (the reference casts back before self.out);
    # zero-initialised conv, so an untrained net outputs 0.
    h = nn.silu(group_norm(h.astype(jnp.float32), groups, "out_0"))
    return conv(self.out_channels, 3, "out_2", jnp.float32, zero_init=True)(h)
