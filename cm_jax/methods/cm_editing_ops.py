"""The linear operators A and masks Omega of zero-shot editing with a consistency model.

Song, Dhariwal, Chen, Sutskever 2023, "Consistency Models", Algorithm 4
(Appendix D): a task is an invertible linear map A of the image and a binary
mask Omega in A's coefficient space; the coefficients where Omega = 0 are
taken from the reference image y, those where Omega = 1 are generated. Each
step replaces

    x <- A^{-1}[ (A y) (1 - Omega) + (A x) Omega ].

Here, as in openai/consistency_models (cm/karras_diffusion.py, `replacement`),
the mask is given as `keep = 1 - Omega` (1 = coefficient known / kept from y).
Every A below is orthogonal, so A^{-1} = A^T and the replacement is the
orthogonal projection of y onto the kept subspace plus the projection of x on
its complement. Images are NHWC float arrays.

* inpainting:      A = I, keep = the pixel mask (1 = known pixel).
* colorization:    A applies, at each pixel, the 3x3 orthogonal Q whose first
                   column is the unit luma vector (0.2989, 0.5870, 0.1140)/norm;
                   keep = (1, 0, 0): the luma coefficient is kept, chroma generated.
* super-resolution: A applies, to each channel of each non-overlapping
                   p x p patch (flattened, p^2 values), the p^2 x p^2 orthogonal
                   Q whose first column is the constant vector 1/p; keep = e_0:
                   the block mean is kept, the rest generated.
Both Q are built the reference's way: the identity with its first column
replaced by the unit vector, a QR decomposition, and a sign flip so that the
first column is positive.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

# ITU-R BT.601 luma weights, as in the reference `obtain_orthogonal_matrix`.
LUMA_WEIGHTS = (0.2989, 0.5870, 0.1140)


def _orthogonal_with_first_column(vector) -> np.ndarray:
  """Orthogonal Q (float64) with Q[:, 0] = vector / |vector|, the reference's recipe."""
  v = np.asarray(vector, np.float64)
  v = v / np.linalg.norm(v)
  m = np.eye(v.size)
  m[:, 0] = v
  q = np.linalg.qr(m)[0]
  if np.sum(q[:, 0]) < 0:
    q = -q
  return q


def luma_orthogonal_matrix() -> np.ndarray:
  """3x3 orthogonal Q: column 0 is the unit luma direction, columns 1, 2 span chroma."""
  return _orthogonal_with_first_column(LUMA_WEIGHTS)


def block_mean_orthogonal_matrix(patch_size: int) -> np.ndarray:
  """(p^2, p^2) orthogonal Q: column 0 is the constant 1/p (the scaled block mean)."""
  p = int(patch_size)
  if p < 1:
    raise ValueError(f"patch_size must be >= 1, got {patch_size}")
  return _orthogonal_with_first_column(np.ones(p * p))


@dataclasses.dataclass(frozen=True)
class EditOperator:
  """A (`forward`), A^{-1} (`inverse`) and keep = 1 - Omega in A's coefficient space.

  `keep` broadcasts against forward(x). `replace(y, x)` is the line of
  Algorithm 4: A^{-1}[(A y) keep + (A x) (1 - keep)].
  """
  forward: Callable[[jax.Array], jax.Array]
  inverse: Callable[[jax.Array], jax.Array]
  keep: jax.Array

  def replace(self, y, x):
    keep = jnp.asarray(self.keep, jnp.float32)
    return self.inverse(self.forward(y) * keep + self.forward(x) * (1.0 - keep))

  def reference(self, y):
    """Algorithm 4's first line: y <- A^{-1}[(A y) (1 - Omega) + 0 Omega]."""
    return self.replace(y, jnp.zeros_like(y))


def normalize_mask(mask, ndim: int = 4) -> jax.Array:
  """A pixel mask as float32 broadcastable to NHWC: (H, W) -> (1, H, W, 1),
  (H, W, C) -> (1, H, W, C); (B, H, W, C) is returned as is."""
  m = jnp.asarray(mask, jnp.float32)
  if m.ndim == 2:
    m = m[None, :, :, None]
  elif m.ndim == 3:
    m = m[None]
  if m.ndim != ndim:
    raise ValueError(f"mask must be (H, W), (H, W, C) or (B, H, W, C); got shape {mask.shape}")
  return m


def inpainting_operator(mask) -> EditOperator:
  """A = I; keep = mask (1 where the pixel is known). Binary masks keep pixels exactly."""
  keep = normalize_mask(mask)
  ident = lambda x: x
  return EditOperator(forward=ident, inverse=ident, keep=keep)


def colorization_operator() -> EditOperator:
  """Per-pixel RGB -> (luma, chroma, chroma) with the orthogonal Q; the luma is kept."""
  q = jnp.asarray(luma_orthogonal_matrix(), jnp.float32)
  forward = lambda x: jnp.einsum("bhwc,cd->bhwd", x, q)
  inverse = lambda a: jnp.einsum("bhwd,cd->bhwc", a, q)
  keep = jnp.asarray([1.0, 0.0, 0.0], jnp.float32)
  return EditOperator(forward=forward, inverse=inverse, keep=keep)


def to_patches(x, patch_size: int):
  """(B, H, W, C) -> (B, H/p, W/p, p*p, C), each patch flattened row-major."""
  b, h, w, c = x.shape
  p = int(patch_size)
  x = x.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, h // p, w // p, p * p, c)


def from_patches(x, patch_size: int):
  """Inverse of `to_patches`."""
  b, hp, wp, _, c = x.shape
  p = int(patch_size)
  x = x.reshape(b, hp, wp, p, p, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, hp * p, wp * p, c)


def check_patch_size(height: int, width: int, patch_size: int) -> None:
  p = int(patch_size)
  if p < 1 or height % p or width % p:
    raise ValueError(f"patch size {patch_size} must divide the image size {height}x{width}")


def superres_operator(patch_size: int) -> EditOperator:
  """Per channel and p x p patch, the orthogonal Q with a block-mean column; the mean is kept."""
  p = int(patch_size)
  q = jnp.asarray(block_mean_orthogonal_matrix(p), jnp.float32)
  forward = lambda x: jnp.einsum("bhwdc,de->bhwec", to_patches(x, p), q)
  inverse = lambda a: from_patches(jnp.einsum("bhwec,de->bhwdc", a, q), p)
  keep = jnp.zeros((p * p, 1), jnp.float32).at[0, 0].set(1.0)
  return EditOperator(forward=forward, inverse=inverse, keep=keep)


def block_mean(x, patch_size: int):
  """Each p x p block replaced by its mean (the reference's `average_image_patches`):
  the low-resolution image, upsampled by repetition to the original size."""
  check_patch_size(x.shape[1], x.shape[2], patch_size)
  patches = to_patches(x, patch_size)
  return from_patches(jnp.broadcast_to(patches.mean(axis=3, keepdims=True), patches.shape),
                      patch_size)


def upsample_nearest(x, factor: int):
  """(B, h, w, C) -> (B, h f, w f, C) by repetition (a low-res input for super-resolution)."""
  return jnp.repeat(jnp.repeat(x, factor, axis=1), factor, axis=2)


def luma(x):
  """0.2989 R + 0.5870 G + 0.1140 B of NHWC RGB images -> (B, H, W)."""
  w = jnp.asarray(LUMA_WEIGHTS, jnp.float32)
  return jnp.einsum("bhwc,c->bhw", x, w)


def center_box_mask(height: int, width: int) -> np.ndarray:
  """(H, W) float32: 1 (known) everywhere but the centre box [H/4, 3H/4) x [W/4, 3W/4),
  the box of the reference notebook (rows/cols 8:24 of 32x32 CIFAR-10 images)."""
  m = np.ones((height, width), np.float32)
  m[height // 4: height - height // 4, width // 4: width - width // 4] = 0.0
  return m


def slerp(z1, z2, alpha):
  """Spherical linear interpolation (Consistency Models, Appendix D, "Interpolation";
  Shoemake 1985) between latents of any shape, at a scalar alpha in [0, 1]:

    psi = arccos(<z1, z2> / (|z1| |z2|)),
    z = sin((1 - alpha) psi)/sin(psi) z1 + sin(alpha psi)/sin(psi) z2.

  Falls back to linear interpolation when z1 and z2 are (nearly) parallel.
  """
  z1 = jnp.asarray(z1, jnp.float32)
  z2 = jnp.asarray(z2, jnp.float32)
  a = jnp.asarray(alpha, jnp.float32)
  n1 = jnp.sqrt(jnp.sum(z1 * z1))
  n2 = jnp.sqrt(jnp.sum(z2 * z2))
  cos = jnp.clip(jnp.sum(z1 * z2) / (n1 * n2), -1.0, 1.0)
  psi = jnp.arccos(cos)
  sin = jnp.sin(psi)
  small = sin < 1e-6
  safe = jnp.where(small, 1.0, sin)
  w1 = jnp.where(small, 1.0 - a, jnp.sin((1.0 - a) * psi) / safe)
  w2 = jnp.where(small, a, jnp.sin(a * psi) / safe)
  return w1 * z1 + w2 * z2
