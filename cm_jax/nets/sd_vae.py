"""Stable Diffusion's KL autoencoder (`AutoencoderKL` of diffusers) in Flax Linen.

The first-stage model of latent diffusion (Rombach et al. 2022, "High-Resolution Image
Synthesis with Latent Diffusion Models", Sec. 3.1 and App. G): a convolutional encoder
maps an image to the mean and log-variance of a diagonal Gaussian over a latent with
`latent_channels` channels and 2^(levels-1) times smaller sides; a mirrored decoder maps a
latent back to pixels. The latent diffusion model works on `z * scaling_factor` (Sec. 4.3.2
and D.1 of the paper: the factor gives the latent roughly unit variance).

Layout is NHWC (diffusers is NCHW). The module tree mirrors diffusers'
`AutoencoderKL` (models/autoencoders/autoencoder_kl.py, vae.py, unets/unet_2d_blocks.py,
resnet.py), one Flax submodule per torch module with the same attribute name and every
ModuleList index joined to its container by "_", so a diffusers `vae/` state dict loads
with `cm_jax.utils.torch_names.params_from_state_dict`:

  encoder/conv_in
  encoder/down_blocks_i/resnets_j/{norm1, conv1, norm2, conv2, conv_shortcut}
  encoder/down_blocks_i/downsamplers_0/conv        (all but the last level)
  encoder/mid_block/{resnets_0, attentions_0/{group_norm, to_q, to_k, to_v, to_out_0}, resnets_1}
  encoder/{conv_norm_out, conv_out}
  quant_conv, post_quant_conv                       (1x1 convs)
  decoder/conv_in, decoder/mid_block/...
  decoder/up_blocks_i/resnets_j/...                 (layers_per_block + 1 resnets)
  decoder/up_blocks_i/upsamplers_0/conv             (all but the last level)
  decoder/{conv_norm_out, conv_out}

Facts of the reference this follows: every GroupNorm of the VAE uses eps 1e-6; the
resnets have no time embedding and output_scale_factor 1; the encoder's downsampler pads
the bottom and right edges by one and applies a stride-2 3x3 conv without padding; the
decoder's levels run in reversed channel order; the mid-block attention is one head over
all channels, GroupNorm first, residual added, no rescale; the encoder's conv_out has
2 * latent_channels outputs (mean and log-variance), and the log-variance is clipped to
[-30, 20] before use, as diffusers' DiagonalGaussianDistribution does.

Old diffusers folders name the attention projections `query`/`key`/`value`/`proj_attn`;
`rename_legacy_vae_keys` maps such a state dict onto the current names first.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cm_jax.nets.adm import torch_default_init
from cm_jax.nets.attention import multi_head_attention

NORM_EPS = 1e-6  # every GroupNorm in diffusers' Encoder/Decoder/attention of the VAE
LOGVAR_RANGE = (-30.0, 20.0)  # DiagonalGaussianDistribution's clamp

_DOWN_BLOCK = "DownEncoderBlock2D"
_UP_BLOCK = "UpDecoderBlock2D"
_ACTIVATIONS = ("silu", "swish")  # diffusers' get_activation: both are x * sigmoid(x)


# ----------------------------------------------------------------------------- layers


def _group_norm(x: jax.Array, groups: int, name: str) -> jax.Array:
  """GroupNorm(eps=1e-6) in float32 whatever the compute dtype, cast back after.

  The two-pass variance (use_fast_variance=False) is torch's formula; E[x^2]-E[x]^2
  loses digits on the large-mean activations a trained VAE has.
  """
  y = nn.GroupNorm(num_groups=groups, epsilon=NORM_EPS, dtype=jnp.float32,
                   use_fast_variance=False, name=name)(x.astype(jnp.float32))
  return y.astype(x.dtype)


def _conv(features: int, kernel: int, name: Optional[str], dtype: Any, stride: int = 1,
          padding: Any = None) -> nn.Conv:
  # torch's Conv2d(padding=k//2) unless told otherwise; Flax's "SAME" would pad a
  # stride-2 conv differently.
  if padding is None:
    p = kernel // 2
    padding = ((p, p), (p, p))
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=padding,
                 dtype=dtype, kernel_init=torch_default_init, name=name)


class ResnetBlock2D(nn.Module):
  """diffusers' ResnetBlock2D without a time embedding:
  x + conv2(silu(norm2(conv1(silu(norm1(x)))))), the skip through a 1x1 conv_shortcut
  when the width changes (dropout is 0 in every released VAE, so it is left out)."""
  out_channels: int
  groups: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    h = nn.silu(_group_norm(x, self.groups, "norm1"))
    h = _conv(self.out_channels, 3, "conv1", self.dtype)(h)
    h = nn.silu(_group_norm(h, self.groups, "norm2"))
    h = _conv(self.out_channels, 3, "conv2", self.dtype)(h)
    if x.shape[-1] != self.out_channels:
      x = _conv(self.out_channels, 1, "conv_shortcut", self.dtype)(x)
    return x + h


class Downsample2D(nn.Module):
  """Stride-2 3x3 conv after padding only the bottom and right edges by one
  (diffusers' Downsample2D with padding=0, as the VAE encoder builds it)."""
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
    return _conv(x.shape[-1], 3, "conv", self.dtype, stride=2, padding="VALID")(x)


class Upsample2D(nn.Module):
  """Nearest-neighbour x2, then a 3x3 conv (diffusers' Upsample2D with use_conv)."""
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    return _conv(x.shape[-1], 3, "conv", self.dtype)(x)


class VAEAttention(nn.Module):
  """The mid-block self-attention: x + to_out_0(softmax(q k^T / sqrt(C)) v), one head
  of width C over the H*W positions, q/k/v Linear maps of GroupNorm(x). The softmax is
  float32 in both attention paths (XLA's upcasts, cuDNN's accumulates in float32)."""
  groups: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    b, hgt, wid, c = x.shape
    h = _group_norm(x, self.groups, "group_norm").reshape(b, hgt * wid, 1, c)
    dense = lambda name: nn.Dense(c, dtype=self.dtype, kernel_init=torch_default_init,
                                  name=name)
    q, k, v = dense("to_q")(h), dense("to_k")(h), dense("to_v")(h)
    a = multi_head_attention(q, k, v)
    out = dense("to_out_0")(a.reshape(b, hgt * wid, c))
    return x + out.reshape(b, hgt, wid, c)


class UNetMidBlock2D(nn.Module):
  """resnets_0, then (attentions_0 if add_attention), then resnets_1, at constant width."""
  groups: int
  add_attention: bool = True
  dtype: Any = jnp.float32
  remat: bool = False

  @nn.compact
  def __call__(self, x):
    res = nn.remat(ResnetBlock2D) if self.remat else ResnetBlock2D
    attn = nn.remat(VAEAttention) if self.remat else VAEAttention
    c = x.shape[-1]
    x = res(c, self.groups, self.dtype, name="resnets_0")(x)
    if self.add_attention:
      x = attn(self.groups, self.dtype, name="attentions_0")(x)
    return res(c, self.groups, self.dtype, name="resnets_1")(x)


class _ResnetStack(nn.Module):
  """num_layers resnets to out_channels, then (resample) the block's resampler: what
  diffusers' DownEncoderBlock2D and UpDecoderBlock2D share (subclasses name it)."""
  out_channels: int
  num_layers: int
  groups: int
  resample: bool
  dtype: Any = jnp.float32
  remat: bool = False

  @nn.compact
  def __call__(self, x):
    res = nn.remat(ResnetBlock2D) if self.remat else ResnetBlock2D
    for j in range(self.num_layers):
      x = res(self.out_channels, self.groups, self.dtype, name=f"resnets_{j}")(x)
    return self.resampler()(x) if self.resample else x


class DownEncoderBlock2D(_ResnetStack):
  """Resnets, then (resample) downsamplers_0."""

  def resampler(self):
    return Downsample2D(self.dtype, name="downsamplers_0")


class UpDecoderBlock2D(_ResnetStack):
  """Resnets, then (resample) upsamplers_0."""

  def resampler(self):
    return Upsample2D(self.dtype, name="upsamplers_0")


class Encoder(nn.Module):
  """Image (B, H, W, in_channels) -> (B, H/f, W/f, 2 * latent_channels), f = 2^(levels-1).

  conv_out is float32 (its output is the latent's moments; it is small next to the body).
  """
  block_out_channels: Sequence[int]
  layers_per_block: int
  latent_channels: int
  groups: int
  add_attention: bool = True
  dtype: Any = jnp.float32
  remat: bool = False

  @nn.compact
  def __call__(self, x):
    chans = self.block_out_channels
    h = _conv(chans[0], 3, "conv_in", self.dtype)(x.astype(self.dtype))
    for i, ch in enumerate(chans):
      h = DownEncoderBlock2D(ch, self.layers_per_block, self.groups,
                             resample=i != len(chans) - 1, dtype=self.dtype,
                             remat=self.remat, name=f"down_blocks_{i}")(h)
    h = UNetMidBlock2D(self.groups, self.add_attention, self.dtype, self.remat,
                       name="mid_block")(h)
    h = nn.silu(_group_norm(h.astype(jnp.float32), self.groups, "conv_norm_out"))
    return _conv(2 * self.latent_channels, 3, "conv_out", jnp.float32)(h)


class Decoder(nn.Module):
  """Latent (B, h, w, latent_channels) -> image (B, h*f, w*f, out_channels).

  Levels run deepest first (reversed block_out_channels), layers_per_block + 1 resnets
  each. conv_in and conv_out are float32: they touch the latent and the pixels.
  """
  block_out_channels: Sequence[int]
  layers_per_block: int
  out_channels: int
  groups: int
  add_attention: bool = True
  dtype: Any = jnp.float32
  remat: bool = False

  @nn.compact
  def __call__(self, z):
    chans = tuple(reversed(self.block_out_channels))
    h = _conv(chans[0], 3, "conv_in", jnp.float32)(z.astype(jnp.float32)).astype(self.dtype)
    h = UNetMidBlock2D(self.groups, self.add_attention, self.dtype, self.remat,
                       name="mid_block")(h)
    for i, ch in enumerate(chans):
      h = UpDecoderBlock2D(ch, self.layers_per_block + 1, self.groups,
                           resample=i != len(chans) - 1, dtype=self.dtype,
                           remat=self.remat, name=f"up_blocks_{i}")(h)
    h = nn.silu(_group_norm(h.astype(jnp.float32), self.groups, "conv_norm_out"))
    return _conv(self.out_channels, 3, "conv_out", jnp.float32)(h)


# ----------------------------------------------------------------------------- the VAE


class AutoencoderKL(nn.Module):
  """diffusers' AutoencoderKL, NHWC. Fields are the keys of a diffusers `vae/config.json`
  (build one from that dict with `AutoencoderKL.from_config`), plus:
    dtype: compute dtype of the convolutions and attention; parameters, GroupNorms, the
      softmax, and the four layers that touch the latent or the pixels (encoder conv_out,
      quant_conv, post_quant_conv, decoder conv_in/conv_out) stay float32, and every
      method returns float32.
    remat: rematerialise each resnet / attention block in the backward pass (diffusers'
      gradient checkpointing).
  `scaling_factor`/`shift_factor` are not used inside the network: they are what a latent
  diffusion pipeline applies around it (`to_latents`, `from_latents`). `force_upcast` and
  `sample_size` are kept as metadata (diffusers uses them for fp16 pipelines and tiling).

  Methods (use through `apply(..., method=AutoencoderKL.encode)`):
    encode(x) -> (mean, logvar), decode(z) -> x,
    __call__(x, rng=None, sample_posterior=False) -> (reconstruction, mean, logvar).
  """
  in_channels: int = 3
  out_channels: int = 3
  down_block_types: Sequence[str] = (_DOWN_BLOCK,)
  up_block_types: Sequence[str] = (_UP_BLOCK,)
  block_out_channels: Sequence[int] = (64,)
  layers_per_block: int = 1
  act_fn: str = "silu"
  latent_channels: int = 4
  norm_num_groups: int = 32
  sample_size: Any = 32
  scaling_factor: float = 0.18215
  shift_factor: Optional[float] = None
  latents_mean: Optional[Sequence[float]] = None
  latents_std: Optional[Sequence[float]] = None
  force_upcast: bool = True
  use_quant_conv: bool = True
  use_post_quant_conv: bool = True
  mid_block_add_attention: bool = True
  dtype: Any = jnp.float32
  remat: bool = False

  def __post_init__(self):
    _check_supported(self)
    super().__post_init__()

  @classmethod
  def from_config(cls, config: Mapping[str, Any], **overrides) -> "AutoencoderKL":
    """The module a diffusers `vae/config.json` dict describes; `overrides` (e.g. dtype,
    remat) win over the dict. Keys starting with "_" are diffusers' metadata and are
    skipped, except that `_class_name` must be AutoencoderKL; any other key this module
    lacks is a one-line ValueError naming it."""
    fields = {f.name for f in dataclasses.fields(cls)} - {"parent", "name"}
    kwargs = {}
    for key, value in {**dict(config), **overrides}.items():
      if key == "_class_name" and value != "AutoencoderKL":
        raise ValueError(f"AutoencoderKL config: _class_name={value!r} is not AutoencoderKL")
      if key.startswith("_"):
        continue
      if key not in fields:
        raise ValueError(f"AutoencoderKL config: unsupported key {key!r} (value {value!r})")
      if isinstance(value, list):
        value = tuple(value)  # module fields must be hashable
      if key == "dtype" and isinstance(value, str):
        value = jnp.dtype(value)
      kwargs[key] = value
    return cls(**kwargs)

  def setup(self):
    self.encoder = Encoder(tuple(self.block_out_channels), self.layers_per_block,
                           self.latent_channels, self.norm_num_groups,
                           self.mid_block_add_attention, self.dtype, self.remat)
    self.decoder = Decoder(tuple(self.block_out_channels), self.layers_per_block,
                           self.out_channels, self.norm_num_groups,
                           self.mid_block_add_attention, self.dtype, self.remat)
    # Flax names a submodule made in setup after its attribute, hence name=None.
    two_z = 2 * self.latent_channels
    self.quant_conv = (_conv(two_z, 1, None, jnp.float32) if self.use_quant_conv else None)
    self.post_quant_conv = (_conv(self.latent_channels, 1, None, jnp.float32)
                            if self.use_post_quant_conv else None)

  def encode(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Images (B, H, W, in_channels), in [-1, 1] for SD -> the posterior's (mean, logvar),
    each (B, H/f, W/f, latent_channels) float32, logvar clipped to [-30, 20]."""
    moments = self.encoder(x)
    if self.quant_conv is not None:
      moments = self.quant_conv(moments)
    # torch.chunk(2, dim=1): the first half of the channels is the mean.
    mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
    return mean, jnp.clip(logvar, *LOGVAR_RANGE)

  def decode(self, z: jax.Array) -> jax.Array:
    """Latents (B, h, w, latent_channels), unscaled (see `from_latents`) -> images, float32."""
    z = z.astype(jnp.float32)
    if self.post_quant_conv is not None:
      z = self.post_quant_conv(z)
    return self.decoder(z).astype(jnp.float32)

  def __call__(self, x: jax.Array, rng: Optional[jax.Array] = None,
               sample_posterior: bool = False):
    """Reconstruction of x through the posterior's mode (or, with sample_posterior, one
    sample drawn with rng), with the posterior's (mean, logvar)."""
    mean, logvar = self.encode(x)
    if sample_posterior:
      if rng is None:
        raise ValueError("AutoencoderKL: sample_posterior=True needs rng")
      z = latent_sample(mean, logvar, rng)
    else:
      z = mean
    return self.decode(z), mean, logvar


def _check_supported(m: AutoencoderKL) -> None:
  """One-line ValueError naming the first config value this implementation lacks."""
  def bad(key, value, why):
    raise ValueError(f"AutoencoderKL config: unsupported {key}={value!r} ({why})")

  for t in m.down_block_types:
    if t != _DOWN_BLOCK:
      bad("down_block_types", t, f"only {_DOWN_BLOCK!r} is implemented")
  for t in m.up_block_types:
    if t != _UP_BLOCK:
      bad("up_block_types", t, f"only {_UP_BLOCK!r} is implemented")
  levels = len(m.block_out_channels)
  if not levels:
    bad("block_out_channels", m.block_out_channels, "needs at least one level")
  if len(m.down_block_types) != levels:
    bad("down_block_types", m.down_block_types, f"needs one per block_out_channels ({levels})")
  if len(m.up_block_types) != levels:
    bad("up_block_types", m.up_block_types, f"needs one per block_out_channels ({levels})")
  for ch in m.block_out_channels:
    if ch % m.norm_num_groups:
      bad("block_out_channels", m.block_out_channels,
          f"{ch} is not a multiple of norm_num_groups={m.norm_num_groups}")
  if m.act_fn not in _ACTIVATIONS:
    bad("act_fn", m.act_fn, f"only {' / '.join(_ACTIVATIONS)} is implemented")
  # Per-channel latent statistics replace scaling_factor in some later VAEs; nothing
  # here would apply them, so refuse rather than produce wrongly scaled latents.
  if m.latents_mean is not None:
    bad("latents_mean", m.latents_mean, "per-channel latent statistics are not supported")
  if m.latents_std is not None:
    bad("latents_std", m.latents_std, "per-channel latent statistics are not supported")


# ----------------------------------------------------------------------------- posterior


def latent_sample(mean: jax.Array, logvar: jax.Array, rng: jax.Array) -> jax.Array:
  """One reparameterised sample of N(mean, exp(logvar)): mean + exp(logvar / 2) * eps."""
  eps = jax.random.normal(rng, mean.shape, mean.dtype)
  return mean + jnp.exp(0.5 * logvar) * eps


def kl_to_standard_normal(mean: jax.Array, logvar: jax.Array) -> jax.Array:
  """KL(N(mean, exp(logvar)) || N(0, I)) per example: 0.5 sum(mean^2 + var - 1 - logvar)
  over every non-batch axis (diffusers' DiagonalGaussianDistribution.kl(), the VAE's
  training regulariser)."""
  terms = jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar
  return 0.5 * jnp.sum(terms, axis=tuple(range(1, mean.ndim)))


def to_latents(z: jax.Array, scaling_factor: float,
               shift_factor: Optional[float] = None) -> jax.Array:
  """The VAE latent (mean or sample) -> what the diffusion model sees:
  (z - shift_factor) * scaling_factor, as diffusers' pipelines do after encoding."""
  if shift_factor is not None:
    z = z - shift_factor
  return z * scaling_factor


def from_latents(latents: jax.Array, scaling_factor: float,
                 shift_factor: Optional[float] = None) -> jax.Array:
  """The inverse of `to_latents`, applied before `decode`."""
  z = latents / scaling_factor
  if shift_factor is not None:
    z = z + shift_factor
  return z


# ----------------------------------------------------------------------------- checkpoints

_LEGACY_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
# A key inside a mid-block attention: (<prefix>.attentions.<i>.)(<projection>).(weight|bias)
_ATTENTION_KEY = re.compile(r"^(.*\battentions\.\d+\.)(query|key|value|proj_attn|to_q|to_k|"
                            r"to_v|to_out\.0)\.(weight|bias)$")


def rename_legacy_vae_keys(state: Mapping[str, Any]) -> dict:
  """A VAE state dict with the old attention names (`query`, `key`, `value`, `proj_attn`,
  as some released SD folders still have) renamed to diffusers' current `to_q`, `to_k`,
  `to_v`, `to_out.0`, the rename diffusers itself applies on load. Projection weights
  stored as 1x1 convs (O, I, 1, 1) become Linear (O, I). Other keys pass unchanged; a new
  dict is returned."""
  out = {}
  for key, value in state.items():
    m = _ATTENTION_KEY.match(key)
    if m is not None:
      prefix, proj, leaf = m.groups()
      key = f"{prefix}{_LEGACY_ATTENTION.get(proj, proj)}.{leaf}"
      if leaf == "weight" and np.ndim(value) == 4 and tuple(np.shape(value)[2:]) == (1, 1):
        value = value[:, :, 0, 0]
    if key in out:
      raise ValueError(f"VAE state dict: {key!r} appears under both its old and new name")
    out[key] = value
  return out


def sd15_vae_config() -> dict:
  """Stable Diffusion 1.5's `vae/config.json` (runwayml/stable-diffusion-v1-5; SD 1.x and
  2.x share the architecture), scaling_factor written out."""
  return {
      "_class_name": "AutoencoderKL",
      "act_fn": "silu",
      "block_out_channels": [128, 256, 512, 512],
      "down_block_types": [_DOWN_BLOCK] * 4,
      "in_channels": 3,
      "latent_channels": 4,
      "layers_per_block": 2,
      "norm_num_groups": 32,
      "out_channels": 3,
      "sample_size": 512,
      "scaling_factor": 0.18215,
      "up_block_types": [_UP_BLOCK] * 4,
  }
