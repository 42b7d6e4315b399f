"""LPIPS-VGG (Zhang, Isola, Efros, Shechtman, Wang 2018, "The Unreasonable Effectiveness of
Deep Features as a Perceptual Metric"), the learned metric of the Consistency Models paper.

  LPIPS(x, y) = sum_l mean_{h,w} sum_c w_lc (n(f_l(x))_{hwc} - n(f_l(y))_{hwc})^2,

f_l = VGG16 activations relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 of the scaled input,
n(.) = unit length along channels (eps 1e-10), w_l = the learned non-negative "lin"
weights of PerceptualSimilarity v0.1 (1x1 convolutions without bias).

* Input: NHWC images in [-1, 1]; one channel is repeated to three. Inputs are scaled
  with LPIPS's ScalingLayer, (x - shift) / scale, shift = (-.030, -.088, -.188),
  scale = (.458, .448, .450) (= ImageNet mean/std normalisation of (x + 1)/2, which is
  what piq's LPIPS in openai/consistency_models does).
* Images smaller than 256 pixels are first upsampled bilinearly to 224 x 224, as both
  references do for the consistency losses (openai/consistency_models: F.interpolate(.., 224,
  'bilinear') when the side is < 256; openai/consistency_models_cifar10:
  jax.image.resize(.., 224, 'bilinear')). Set `resize_to=None` to skip.
* `pooling`: 'max' is the VGG16 of the original LPIPS and of the CIFAR-10 JAX reference
  (lpips-j); 'avg' is `piq.LPIPS(replace_pooling=True)`, the metric the PyTorch reference
  (ImageNet 64, LSUN) trained with. Same weights, slightly different values.

No weights are downloaded at run time: convert torchvision's VGG16 and PerceptualSimilarity's
`vgg.pth` once with `python -m cm_jax.nets.lpips_convert` and name the .npz in the config
(`config.method.lpips_weights`).
"""
from __future__ import annotations

import os
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cm_jax.utils.trees import flatten_paths

# (name, output channels) of the VGG16 convolutions; a pool follows each block but the last.
VGG16_BLOCKS = (
    (("conv1_1", 64), ("conv1_2", 64)),
    (("conv2_1", 128), ("conv2_2", 128)),
    (("conv3_1", 256), ("conv3_2", 256), ("conv3_3", 256)),
    (("conv4_1", 512), ("conv4_2", 512), ("conv4_3", 512)),
    (("conv5_1", 512), ("conv5_2", 512), ("conv5_3", 512)),
)
TAP_CHANNELS = (64, 128, 256, 512, 512)  # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
EPS = 1e-10

CONVERT_HINT = ("convert the weights once with `python -m cm_jax.nets.lpips_convert "
                "--vgg16 vgg16-397923af.pth --lin vgg.pth --out lpips_vgg16.npz` (torchvision's "
                "VGG16 and richzhang/PerceptualSimilarity's v0.1 'vgg.pth', downloaded by you) "
                "and set --config.method.lpips_weights=lpips_vgg16.npz")


def _unit_channels(f):
  return f / (jnp.sqrt(jnp.sum(jnp.square(f), axis=-1, keepdims=True)) + EPS)


class LPIPS(nn.Module):
  """(x, y) NHWC in [-1, 1] -> LPIPS distance per example, shape (B,)."""

  pooling: str = "max"
  resize_to: Optional[int] = 224
  resize_below: int = 256

  def _prepare(self, x):
    x = jnp.asarray(x, jnp.float32)
    if x.shape[-1] == 1:
      x = jnp.repeat(x, 3, axis=-1)
    if x.shape[-1] != 3:
      raise ValueError(f"LPIPS takes 1- or 3-channel images, got {x.shape[-1]} channels")
    h, w = x.shape[1:3]
    if self.resize_to is not None and min(h, w) < self.resize_below:
      x = jax.image.resize(x, (x.shape[0], self.resize_to, self.resize_to, 3), "bilinear")
    return (x - jnp.asarray(SHIFT, jnp.float32)) / jnp.asarray(SCALE, jnp.float32)

  def _pool(self, x):
    if self.pooling == "max":
      return nn.max_pool(x, (2, 2), strides=(2, 2))
    if self.pooling == "avg":
      return nn.avg_pool(x, (2, 2), strides=(2, 2))
    raise ValueError(f"unknown LPIPS pooling {self.pooling!r}; choose 'max' or 'avg'")

  def _features(self, x):
    """The five unit-normalised VGG16 taps of a prepared batch (called inside __call__)."""
    taps = []
    for b, block in enumerate(VGG16_BLOCKS):
      if b > 0:
        x = self._pool(x)
      for name, ch in block:
        x = nn.relu(nn.Conv(ch, (3, 3), padding=1, name=name)(x))
      taps.append(_unit_channels(x))
    return taps

  @nn.compact
  def __call__(self, x, y):
    b = x.shape[0]
    # One VGG pass over both images (shared weights), split afterwards.
    taps = self._features(jnp.concatenate([self._prepare(x), self._prepare(y)], axis=0))
    total = jnp.zeros((b,), jnp.float32)
    for i, f in enumerate(taps):
      diff = jnp.square(f[:b] - f[b:])
      lin = nn.Conv(1, (1, 1), use_bias=False, name=f"lin{i}")(diff)
      total = total + jnp.mean(lin, axis=(1, 2, 3))
    return total


def param_shapes() -> dict:
  """{'conv1_1': {'kernel': (3,3,3,64), 'bias': (64,)}, ..., 'lin0': {'kernel': (1,1,64,1)}, ...}."""
  shapes, cin = {}, 3
  for block in VGG16_BLOCKS:
    for name, ch in block:
      shapes[name] = {"kernel": (3, 3, cin, ch), "bias": (ch,)}
      cin = ch
  for i, ch in enumerate(TAP_CHANNELS):
    shapes[f"lin{i}"] = {"kernel": (1, 1, ch, 1)}
  return shapes


def flatten_params(params) -> dict:
  """Nested params -> {'conv1_1/kernel': array, ...} (the .npz layout)."""
  return {name: np.asarray(v) for name, v in flatten_paths(params).items()}


def save_params(path: str, params) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  np.savez(path, **flatten_params(params))


def load_params(path: str) -> dict:
  """LPIPS parameters from a converted .npz; a clear error if it is missing or malformed."""
  if not path:
    raise FileNotFoundError(f"no LPIPS weights file configured: {CONVERT_HINT}")
  if not os.path.exists(path):
    raise FileNotFoundError(f"LPIPS weights file {path!r} not found: {CONVERT_HINT}")
  with np.load(path) as data:
    flat = {k: np.asarray(data[k], np.float32) for k in data.files}
  params = {}
  for layer, leaves in param_shapes().items():
    params[layer] = {}
    for leaf, shape in leaves.items():
      key = f"{layer}/{leaf}"
      if key not in flat:
        raise ValueError(f"LPIPS weights file {path!r} lacks {key!r}: {CONVERT_HINT}")
      if flat[key].shape != shape:
        raise ValueError(f"LPIPS weights file {path!r}: {key} has shape {flat[key].shape}, "
                         f"expected {shape}")
      params[layer][leaf] = flat[key]
  return params


def random_params(rng, lin_positive: bool = True) -> dict:
  """Random LPIPS parameters of the right shapes (tests; never a metric to train with)."""
  x = jnp.zeros((1, 16, 16, 3))
  params = jax.jit(LPIPS(resize_to=None).init)(rng, x, x)
  params = jax.tree.map(np.asarray, params["params"])
  if lin_positive:  # LPIPS clamps its lin weights to >= 0
    for i in range(len(TAP_CHANNELS)):
      params[f"lin{i}"]["kernel"] = np.abs(params[f"lin{i}"]["kernel"])
  return params
