"""NCSN++ / DDPM++ UNet of Song et al. 2021, in the form the EDM paper uses for CIFAR-10.

Song, Sohl-Dickstein, Kingma, Kumar, Ermon, Poole, "Score-Based Generative Modeling through
Stochastic Differential Equations" (ICLR 2021, reference code yang-song/score_sde) introduced
two UNets: DDPM++ and NCSN++.  Karras et al. 2022 ("Elucidating the Design Space of
Diffusion-Based Generative Models", EDM, Appendix F.2 and Table 7) re-implemented both as one
network ("SongUNet") and trained them on CIFAR-10 32x32 with channel multipliers (2, 2, 2);
openai/consistency_models_cifar10 (Song et al. 2023) uses the same NCSN++ for CD and CT.  This
module is an independent Flax Linen implementation of that architecture.

What the options select (EDM Table 7, score_sde configs):

=====================  ==================================  ==================================
option                 NCSN++ (default here)               DDPM++
=====================  ==================================  ==================================
embedding_type         'fourier' (Gaussian Fourier, s=16)  'positional' (sinusoidal)
resample               'fir' (kernel [1, 3, 3, 1])         'plain' (box [1, 1]: nearest / avg)
progressive_input      'residual'                          'none'
progressive            'none'                              'none'
resblock_type          'biggan'                            'biggan'
=====================  ==================================  ==================================

Parameter counts for CIFAR-10 (32x32x3, model_channels 128, channel_mult (2, 2, 2), 4 res
blocks, attention at 16x16), checked in tests/test_nets_ncsnpp.py:

* NCSN++ unconditional: 56,395,651 = 56,395,523 trainable + 128 frozen Fourier frequencies.
  EDM's SongUNet counts 56,395,523 (it keeps the frequencies in a buffer) and the JAX NCSNpp of
  openai/consistency_models_cifar10 counts 56,395,651 (it keeps them in a stop-gradient param).
* NCSN++ with 10 classes: 56,398,467 (EDM: 56,398,339 + 128).
* DDPM++: 55,732,739 unconditional, 55,734,147 with 10 classes (same as EDM).

Parameter naming (meant for mapping EDM checkpoints: torch name ``enc.32x32_block0.conv0.weight``
becomes Flax path ``enc_32x32_block0/conv0/kernel`` -- replace the first ``.`` with ``_``;
conv weights go OIHW -> HWIO, linear weights (out, in) -> (in, out), GroupNorm ``weight`` ->
``scale``):

* ``map_noise/freqs``           Fourier frequencies (only with embedding_type='fourier').
* ``map_label``                 Dense, one-hot class (times sqrt(num_classes)) -> noise width.
* ``map_cond``                  Dense without bias, extra conditioning vector -> noise width
                                (cond_dim > 0; plays the part of EDM's ``map_augment``).
* ``map_layer0``, ``map_layer1`` the two-layer embedding MLP (noise width -> 4 * model_channels).
* ``enc_{r}x{r}_conv``          first 3x3 conv at full resolution r.
* ``enc_{r}x{r}_down``          downsampling residual block (or a conv for resblock_type='ddpm').
* ``enc_{r}x{r}_aux_residual``  3x3 conv of the input pyramid (progressive_input='residual').
* ``enc_{r}x{r}_aux_skip``      1x1 conv of the input pyramid (progressive_input='input_skip').
* ``enc_{r}x{r}_block{i}``      encoder residual blocks, i = 0 .. num_res_blocks - 1.
* ``dec_{r}x{r}_in0``, ``dec_{r}x{r}_in1``  the two middle blocks (in0 has attention).
* ``dec_{r}x{r}_up``            upsampling residual block (or a conv for resblock_type='ddpm').
* ``dec_{r}x{r}_block{i}``      decoder residual blocks, i = 0 .. num_res_blocks.
* ``dec_{r}x{r}_aux_norm``, ``dec_{r}x{r}_aux_conv``  output head (GroupNorm, SiLU, 3x3 conv);
                                at every level with progressive='output_skip', else at full res.
* inside a residual block: ``norm0``, ``conv0``, ``affine``, ``norm1``, ``conv1``, ``skip``
  and, with attention, ``norm2``, ``qkv``, ``proj``.  Every conv holds ``kernel`` and ``bias``.

The ``qkv`` 1x1 conv lays its 3C output channels out as (head, channel-in-head, q/k/v), q/k/v
fastest, which is the layout EDM's attention reshape expects; that keeps EDM's ``qkv`` weights
loadable without a permutation.

``map_noise/freqs`` sits in the 'params' collection (so one ``apply({'params': p}, ...)`` is
enough) but is passed through ``stop_gradient``, as in score_sde: the frequencies are a fixed
random draw, never trained.  An optimizer with decoupled weight decay should mask it.

The network knows no noise schedule: ``noise_cond`` is whatever the preconditioning in
``cm_jax/diffusion`` feeds it (EDM: ln(sigma) / 4; consistency models on a VE SDE: the same),
and the output is the raw network output F, not a denoised image.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cm_jax.nets.attention import multi_head_attention

Dtype = Any

# Initialisers, as in score_sde (`default_init` = variance scaling, fan_avg, uniform) and EDM
# (xavier_uniform, which is the same thing).  "Zero" layers (the last conv of each residual
# branch, the attention output projection and the output conv) are xavier scaled by 1e-5 --
# score_sde's init_scale=0 maps to variance scale 1e-10, EDM's init_weight=1e-5 -- so every
# residual block starts as (nearly) the identity.  The qkv projection uses variance scale 0.2
# (EDM's sqrt(0.2) on one fused C->3C conv equals score_sde's scale 0.1 on three C->C convs).
_default_init = nn.initializers.variance_scaling(1.0, "fan_avg", "uniform")
_zero_init = nn.initializers.variance_scaling(1e-10, "fan_avg", "uniform")
_attn_init = nn.initializers.variance_scaling(0.2, "fan_avg", "uniform")

_DIMS = ("NHWC", "HWIO", "NHWC")


def _fir_2d(kernel: Sequence[int]) -> np.ndarray:
  """Separable 2-D FIR kernel outer(k, k) normalised to unit DC gain (StyleGAN2 / score_sde)."""
  k = np.asarray(kernel, dtype=np.float32)
  k = np.outer(k, k)
  return k / k.sum()


def _depthwise(f: np.ndarray, channels: int, dtype: Dtype) -> jax.Array:
  """A (K, K) filter as an HWIO depthwise kernel (K, K, 1, C) for feature_group_count=C."""
  return jnp.tile(jnp.asarray(f, dtype)[:, :, None, None], (1, 1, 1, channels))


def upsample_fir(x: jax.Array, f: np.ndarray, pad: int) -> jax.Array:
  """2x upsampling by zero insertion and FIR filtering (gain 4 keeps the mean).

  Equals a stride-2 transposed convolution with `f` and padding `pad`: a transposed conv is a
  conv of the input dilated by 2 with the flipped kernel and padding K - 1 - pad per side.
  With f = [1, 1] x [1, 1] and pad 0 this is nearest-neighbour upsampling.
  """
  k = f.shape[0]
  w = _depthwise(4.0 * f[::-1, ::-1], x.shape[-1], x.dtype)
  p = k - 1 - pad
  return jax.lax.conv_general_dilated(
      x, w, window_strides=(1, 1), padding=[(p, p), (p, p)], lhs_dilation=(2, 2),
      dimension_numbers=_DIMS, feature_group_count=x.shape[-1])


def downsample_fir(x: jax.Array, f: np.ndarray, pad: int) -> jax.Array:
  """2x downsampling: FIR filter then keep every second sample ([1, 1] = 2x2 average pool)."""
  w = _depthwise(f, x.shape[-1], x.dtype)
  return jax.lax.conv_general_dilated(
      x, w, window_strides=(2, 2), padding=[(pad, pad), (pad, pad)],
      dimension_numbers=_DIMS, feature_group_count=x.shape[-1])


def _conv(x: jax.Array, w: jax.Array, pad: int) -> jax.Array:
  return jax.lax.conv_general_dilated(
      x, w, window_strides=(1, 1), padding=[(pad, pad), (pad, pad)], dimension_numbers=_DIMS)


def _group_norm(channels: int, dtype: Dtype, name: str) -> nn.GroupNorm:
  # 32 groups but at least 4 channels per group (score_sde: min(C // 4, 32)); eps 1e-6 as
  # in score_sde (Flax default) and EDM's SongUNet.
  return nn.GroupNorm(num_groups=min(32, channels // 4), epsilon=1e-6, dtype=dtype, name=name)


class Conv2d(nn.Module):
  """Square conv with optional FIR up/downsampling, in the two orders score_sde uses.

  Not fused (residual blocks): resample, then convolve.  Fused (score_sde's conv Downsample
  and the input pyramid's 'residual' conv; StyleGAN2's conv_downsample_2d / upsample_conv_2d):
  down = convolve with padding w_pad + f_pad, then FIR with stride 2 and no padding;
  up = FIR transposed conv with padding max(f_pad - w_pad, 0), then convolve with padding
  max(w_pad - f_pad, 0).  All four compositions are linear and shift-invariant, so the order
  only changes the border handling and the cost.
  """
  features: int
  kernel_size: int
  up: bool = False
  down: bool = False
  resample_filter: Sequence[int] = (1, 1)
  fused_resample: bool = False
  use_bias: bool = True
  kernel_init: Callable = _default_init
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    assert not (self.up and self.down)
    k = self.kernel_size
    w = self.param("kernel", self.kernel_init, (k, k, x.shape[-1], self.features), jnp.float32)
    w = w.astype(self.dtype)
    x = x.astype(self.dtype)
    f = _fir_2d(self.resample_filter)
    w_pad = k // 2
    f_pad = (f.shape[0] - 1) // 2
    if self.fused_resample and self.up:
      x = upsample_fir(x, f, pad=max(f_pad - w_pad, 0))
      x = _conv(x, w, pad=max(w_pad - f_pad, 0))
    elif self.fused_resample and self.down:
      x = _conv(x, w, pad=w_pad + f_pad)
      x = downsample_fir(x, f, pad=0)
    else:
      if self.up:
        x = upsample_fir(x, f, pad=f_pad)
      if self.down:
        x = downsample_fir(x, f, pad=f_pad)
      x = _conv(x, w, pad=w_pad)
    if self.use_bias:
      b = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
      x = x + b.astype(self.dtype)
    return x


class UNetBlock(nn.Module):
  """Residual block (score_sde ResnetBlockBigGANpp / ResnetBlockDDPMpp) with optional
  up/downsampling and an optional self-attention layer (score_sde AttnBlockpp) after it.

  h = conv0(SiLU(norm0(x)))  (resampled first when up/down)
  h = conv1(dropout(SiLU(norm1(h + affine(emb)))))       additive noise conditioning
  x = (h + skip(x)) * skip_scale                         skip: 1x1 conv when shape changes
  x = (proj(attn(qkv(norm2(x)))) + x) * skip_scale       when attention
  skip_scale = 1/sqrt(2) with skip_rescale (score_sde), which keeps the variance of the sum of
  two unit-variance branches at one.
  """
  out_channels: int
  up: bool = False
  down: bool = False
  attention: bool = False
  num_heads: int = 1
  dropout: float = 0.0
  skip_scale: float = 1.0
  resample_filter: Sequence[int] = (1, 1)
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, emb: jax.Array, train: bool) -> jax.Array:
    cin, cout = x.shape[-1], self.out_channels
    conv = lambda feats, k, name, **kw: Conv2d(feats, k, resample_filter=self.resample_filter,
                                               dtype=self.dtype, name=name, **kw)
    orig = x
    h = nn.silu(_group_norm(cin, self.dtype, "norm0")(x))
    h = conv(cout, 3, "conv0", up=self.up, down=self.down)(h)
    h = h + nn.Dense(cout, kernel_init=_default_init, dtype=self.dtype,
                     name="affine")(emb)[:, None, None, :]
    h = nn.silu(_group_norm(cout, self.dtype, "norm1")(h))
    h = nn.Dropout(self.dropout)(h, deterministic=not train)
    h = conv(cout, 3, "conv1", kernel_init=_zero_init)(h)
    if cout != cin or self.up or self.down:
      # score_sde (BigGAN block) and EDM (resample_proj=True): a 1x1 conv on the skip path
      # whenever the shape changes, including pure resampling.
      orig = conv(cout, 1, "skip", up=self.up, down=self.down)(orig)
    x = (h + orig) * self.skip_scale

    if self.attention:
      b, hh, ww, c = x.shape
      heads = self.num_heads
      qkv = conv(3 * c, 1, "qkv", kernel_init=_attn_init)(_group_norm(c, self.dtype, "norm2")(x))
      # Channel layout (head, channel-in-head, q/k/v) with q/k/v fastest: see module docstring.
      qkv = qkv.reshape(b, hh * ww, heads, c // heads, 3)
      a = multi_head_attention(qkv[..., 0], qkv[..., 1], qkv[..., 2])  # scale 1/sqrt(c/heads)
      a = a.reshape(b, hh, ww, c)
      x = (conv(c, 1, "proj", kernel_init=_zero_init)(a) + x) * self.skip_scale
    return x


class FourierEmbedding(nn.Module):
  """Gaussian Fourier features [sin(2 pi f x), cos(2 pi f x)], f ~ N(0, scale^2) (NCSN++;
  Tancik et al. 2020; score_sde GaussianFourierProjection).  num_freqs frequencies give
  2 * num_freqs features.  The frequencies are stored but never trained (stop_gradient)."""
  num_freqs: int
  scale: float = 16.0

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    freqs = self.param("freqs", nn.initializers.normal(stddev=self.scale), (self.num_freqs,),
                       jnp.float32)
    freqs = jax.lax.stop_gradient(freqs)
    x = x[:, None] * (2 * np.pi * freqs)[None, :]
    return jnp.concatenate([jnp.sin(x), jnp.cos(x)], axis=-1)


def positional_embedding(x: jax.Array, num_channels: int, max_positions: int = 10000) -> jax.Array:
  """Transformer sinusoidal embedding [sin(x w_i), cos(x w_i)], w_i = max_positions^(-i/(n-1)),
  i = 0..n-1, n = num_channels / 2 (DDPM / score_sde get_timestep_embedding; EDM's
  PositionalEmbedding with endpoint=True, sin first after its swap)."""
  half = num_channels // 2
  freqs = (1.0 / max_positions) ** (jnp.arange(half, dtype=jnp.float32) / (half - 1))
  x = x[:, None] * freqs[None, :]
  return jnp.concatenate([jnp.sin(x), jnp.cos(x)], axis=-1)


class NCSNppUNet(nn.Module):
  """NCSN++ / DDPM++ UNet (NHWC).  See the module docstring for options and naming.

  Attributes:
    image_size: input height = width (the resolution names in the parameter tree use it).
    in_channels, out_channels: image channels in and out.
    model_channels: base width; level l has model_channels * channel_mult[l] channels.
    channel_mult: per-resolution width multipliers; len(channel_mult) - 1 downsamplings.
    num_res_blocks: residual blocks per resolution in the encoder (decoder: one more).
    attention_resolutions: resolutions with self-attention (the middle block always has it).
    dropout: dropout rate inside residual blocks, active only with train=True.
    num_classes: None for unconditional; an int adds a class embedding (map_label).
    embedding_type: 'fourier' (NCSN++) or 'positional' (DDPM++) noise embedding.
    fourier_scale: std of the Fourier frequencies (16 in score_sde's and EDM's NCSN++).
    resample: 'fir' (fir_kernel) or 'plain' (box filter [1, 1]).
    fir_kernel: the FIR kernel for resample='fir'.
    skip_rescale: multiply residual sums by 1/sqrt(2).
    progressive_input: 'none', 'input_skip' or 'residual' (score_sde's input pyramid).
    progressive: 'none' or 'output_skip' (score_sde's output pyramid).
    resblock_type: 'biggan' (resampling inside residual blocks) or 'ddpm' (resampling by
      separate 3x3 convs, blocks never resample).
    num_heads: attention heads (1 in score_sde and EDM).
    channel_mult_emb: embedding MLP width = model_channels * channel_mult_emb.
    cond_dim: if > 0, a (B, cond_dim) vector is mapped by Dense (no bias) onto the noise
      embedding and added (e.g. a guidance-scale embedding).
    dtype: compute dtype; parameters stay float32 and the output is float32.
    remat: rematerialise residual blocks in the backward pass (saves activation memory).
  """
  image_size: int
  in_channels: int = 3
  out_channels: int = 3
  model_channels: int = 128
  channel_mult: Sequence[int] = (2, 2, 2)
  num_res_blocks: int = 4
  attention_resolutions: Sequence[int] = (16,)
  dropout: float = 0.1
  num_classes: Optional[int] = None
  embedding_type: str = "fourier"
  fourier_scale: float = 16.0
  resample: str = "fir"
  fir_kernel: Sequence[int] = (1, 3, 3, 1)
  skip_rescale: bool = True
  progressive_input: str = "residual"
  progressive: str = "none"
  resblock_type: str = "biggan"
  num_heads: int = 1
  channel_mult_emb: int = 4
  cond_dim: int = 0
  dtype: Dtype = jnp.float32
  remat: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, noise_cond: jax.Array, labels: Optional[jax.Array] = None,
               cond: Optional[jax.Array] = None, train: bool = False) -> jax.Array:
    """x: (B, H, W, in_channels); noise_cond: (B,) preconditioned noise level; labels: (B,)
    integer classes or (B, num_classes) one-hot / soft rows (an all-zero row is the null
    label that EDM's label dropout feeds; None means all-zero rows; ignored when
    num_classes is None, as in EDM); cond: (B, cond_dim) or None (zeros).  Returns
    (B, H, W, out_channels) float32."""
    if self.embedding_type not in ("fourier", "positional"):
      raise ValueError(f"embedding_type {self.embedding_type!r}")
    if self.resample not in ("fir", "plain"):
      raise ValueError(f"resample {self.resample!r}")
    if self.progressive_input not in ("none", "input_skip", "residual"):
      raise ValueError(f"progressive_input {self.progressive_input!r}")
    if self.progressive not in ("none", "output_skip"):
      raise ValueError(f"progressive {self.progressive!r}")
    if self.resblock_type not in ("biggan", "ddpm"):
      raise ValueError(f"resblock_type {self.resblock_type!r}")
    b = x.shape[0]
    if x.shape[1:] != (self.image_size, self.image_size, self.in_channels):
      raise ValueError(f"input shape {x.shape}, expected (B, {self.image_size}, "
                       f"{self.image_size}, {self.in_channels})")
    if cond is not None and self.cond_dim == 0:
      raise ValueError("cond given but cond_dim == 0")

    mc = self.model_channels
    emb_channels = mc * self.channel_mult_emb
    rf = tuple(self.fir_kernel) if self.resample == "fir" else (1, 1)
    skip_scale = math.sqrt(0.5) if self.skip_rescale else 1.0
    dense = lambda n, name, **kw: nn.Dense(n, kernel_init=_default_init, dtype=self.dtype,
                                           name=name, **kw)
    conv = lambda n, k, name, **kw: Conv2d(n, k, resample_filter=rf, dtype=self.dtype,
                                           name=name, **kw)
    # nn.remat recomputes the block's activations in the backward pass; `train` (argument 3,
    # counting self) is a Python bool and must stay static.
    block_cls = nn.remat(UNetBlock, static_argnums=(3,)) if self.remat else UNetBlock
    block = lambda n, name, **kw: block_cls(n, num_heads=self.num_heads, dropout=self.dropout,
                                            skip_scale=skip_scale, resample_filter=rf,
                                            dtype=self.dtype, name=name, **kw)

    # ---- Mapping: noise level (+ class, + extra cond) -> embedding vector.  The embedding
    # is computed in float32 (high-frequency sinusoids lose precision in half precision).
    noise_cond = jnp.asarray(noise_cond, jnp.float32).reshape(b)
    if self.embedding_type == "fourier":
      # NCSN++: model_channels frequencies -> 2 * model_channels features (EDM
      # channel_mult_noise = 2).
      emb = FourierEmbedding(mc, scale=self.fourier_scale, name="map_noise")(noise_cond)
    else:
      # DDPM++: model_channels features (EDM channel_mult_noise = 1).
      emb = positional_embedding(noise_cond, mc)
    noise_channels = emb.shape[-1]
    if self.num_classes:
      if labels is None:
        onehot = jnp.zeros((b, self.num_classes), jnp.float32)
      elif jnp.ndim(labels) == 1:
        onehot = jax.nn.one_hot(labels, self.num_classes, dtype=jnp.float32)
      else:
        onehot = jnp.asarray(labels, jnp.float32)
      # EDM scales the one-hot vector by sqrt(num_classes), so that the input to map_label
      # has unit mean square, like the noise features.
      emb = emb + dense(noise_channels, "map_label")(onehot * np.sqrt(self.num_classes))
    if self.cond_dim > 0:
      c = jnp.zeros((b, self.cond_dim), jnp.float32) if cond is None else cond
      emb = emb + dense(noise_channels, "map_cond", use_bias=False)(jnp.asarray(c, jnp.float32))
    # Two-layer MLP; the SiLU after the second layer is the one score_sde applies to temb at
    # the input of every residual block's Dense, hoisted here.
    emb = nn.silu(dense(emb_channels, "map_layer0")(emb.astype(self.dtype)))
    emb = nn.silu(dense(emb_channels, "map_layer1")(emb))

    # ---- Encoder.
    x = x.astype(self.dtype)
    skips = []
    aux = x  # the input pyramid (score_sde progressive_input)
    cout = self.in_channels
    for level, mult in enumerate(self.channel_mult):
      res = self.image_size >> level
      pre = f"enc_{res}x{res}"
      if level == 0:
        cout = mc
        x = conv(cout, 3, f"{pre}_conv")(x)
      else:
        if self.resblock_type == "biggan":
          x = block(cout, f"{pre}_down", down=True)(x, emb, train)
        else:
          x = conv(cout, 3, f"{pre}_down", down=True, fused_resample=True)(x)
        if self.progressive_input == "input_skip":
          # score_sde Combine(method='sum'): FIR-downsampled image, 1x1 conv, added.
          aux = downsample_fir(aux, _fir_2d(rf), pad=(len(rf) - 1) // 2)
          x = x + conv(cout, 1, f"{pre}_aux_skip")(aux)
        elif self.progressive_input == "residual":
          # score_sde: pyramid = (conv3x3_down(pyramid) + h) / sqrt(2); h = pyramid.
          x = (x + conv(cout, 3, f"{pre}_aux_residual", down=True, fused_resample=True)(aux))
          x = aux = x * skip_scale
      skips.append(x)
      for i in range(self.num_res_blocks):
        cout = mc * mult
        x = block(cout, f"{pre}_block{i}", attention=res in self.attention_resolutions)(
            x, emb, train)
        skips.append(x)

    # ---- Decoder.
    out = None
    for level in reversed(range(len(self.channel_mult))):
      mult = self.channel_mult[level]
      res = self.image_size >> level
      pre = f"dec_{res}x{res}"
      if level == len(self.channel_mult) - 1:
        x = block(cout, f"{pre}_in0", attention=True)(x, emb, train)
        x = block(cout, f"{pre}_in1")(x, emb, train)
      elif self.resblock_type == "biggan":
        x = block(cout, f"{pre}_up", up=True)(x, emb, train)
      else:
        x = conv(cout, 3, f"{pre}_up", up=True, fused_resample=True)(x)
      for i in range(self.num_res_blocks + 1):
        cout = mc * mult
        attn = i == self.num_res_blocks and res in self.attention_resolutions
        x = block(cout, f"{pre}_block{i}", attention=attn)(
            jnp.concatenate([x, skips.pop()], axis=-1), emb, train)
      if self.progressive == "output_skip" or level == 0:
        # Output head; with 'output_skip' (score_sde output pyramid) one head per level, the
        # running sum FIR-upsampled between levels.
        if out is not None:
          out = upsample_fir(out, _fir_2d(rf), pad=(len(rf) - 1) // 2)
        h = nn.silu(_group_norm(cout, self.dtype, f"{pre}_aux_norm")(x))
        h = conv(self.out_channels, 3, f"{pre}_aux_conv", kernel_init=_zero_init)(h)
        out = h if out is None else out + h
    assert not skips
    return out.astype(jnp.float32)
