"""Zero-shot image editing with a consistency model (Song, Dhariwal, Chen, Sutskever 2023).

"Consistency Models", Section 5 (zero-shot data editing), Section 6.3 and
Appendix D, Algorithm 4. Every function here takes a consistency function
`consistency_fn(x, sigma, labels=None) -> x0` (e.g. from
`cm_jax.diffusion.preconditioning.make_denoiser(..., parameterization='consistency')`),
images in [-1, 1] NHWC, per-image PRNG keys (B,) and descending noise levels
`sigmas` = (t_1 > t_2 > ... > t_N), and is a pure, jit-able function; the loop
over levels is a `jax.lax.scan`. The noise of step n of image b is
`per_image_normal(keys, ..., step=n)[b]`: it depends on image b's key alone.

Algorithm 4 (zero-shot image editing), with keep = 1 - Omega
(cm_editing_ops.EditOperator):

    y <- A^{-1}[(A y) keep]                       # the reference, unknown part zeroed
    x ~ N(y, t_1^2 I)
    x <- f(x, t_1);   x <- A^{-1}[(A y) keep + (A x)(1 - keep)]
    for n = 2..N:
        x ~ N(x, (t_n^2 - eps^2) I)
        x <- f(x, t_n); x <- A^{-1}[(A y) keep + (A x)(1 - keep)]
    return x

As openai/consistency_models (cm/karras_diffusion.py, `iterative_inpainting`,
`iterative_colorization`, `iterative_superres`) does, each f(x, t_n) is
clipped to [-1, 1] before the replacement (`clip_denoised`); the returned
image is not clipped, so the kept coefficients are exactly the reference's.

Timesteps: the reference code picks levels by index into an N-point Karras
grid (N = 40 for the LSUN/ImageNet CD models, `ts` = 0..39 for editing; the
CIFAR-10 notebook uses N = 18, ts = 0..17) and runs f at ts[0..-2] only: its
last index is the level the final noise is drawn at, and with ts[-1] = N-1
(sigma_min) that noise is zero. `sigmas_from_indices` maps such indices to the
sigmas used here and drops a trailing sigma_min, where f(x, sigma_min) = x
anyway, so the same `ts` gives the same number of network evaluations and the
same result in distribution. (When ts[-1] is not N-1 the reference returns a
still-noisy image; here the last level is evaluated instead, as CM Algorithm 1 does and
as cm_jax's sampler does: cm_sampling.evaluated_levels is the one rule for both.)
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cm_jax.diffusion.noise import per_image_normal
from cm_jax.methods import cm_editing_ops as ops
from cm_jax.methods import cm_sampling

ConsistencyFn = Callable[..., jax.Array]
_F32 = jnp.float32


# ----------------------------------------------------------------------------
# Timesteps


def sigmas_from_indices(ts: Sequence[int], num_points: int = 40, sigma_min: float = 0.002,
                        sigma_max: float = 80.0, rho: float = 7.0) -> np.ndarray:
  """The reference's `ts` (indices into an N-point Karras grid, EDM eq. 5) -> levels t_n.

  t = (s_max^(1/rho) + i/(N-1) (s_min^(1/rho) - s_max^(1/rho)))^rho, clipped to
  [sigma_min, sigma_max], as in `stochastic_iterative_sampler` /
  `iterative_inpainting`. Indices must be strictly increasing in [0, N-1]. A
  trailing level equal to sigma_min is dropped (f(x, sigma_min) = x), unless it
  is the only one. Returns float32 numpy (host) values.
  """
  return cm_sampling.evaluated_levels(ts, num_points, sigma_min, sigma_max, rho)


def _check_sigmas(sigmas) -> jax.Array:
  s = jnp.asarray(sigmas, _F32)
  if s.ndim != 1 or s.shape[0] < 1:
    raise ValueError(f"sigmas must be a non-empty 1-D array; got shape {s.shape}")
  return s


def _check_images(images, name: str = "images") -> jax.Array:
  x = jnp.asarray(images, _F32)
  if x.ndim != 4:
    raise ValueError(f"{name} must be NHWC (B, H, W, C); got shape {x.shape}")
  return x


# ----------------------------------------------------------------------------
# The shared loop


def _iterate(consistency_fn: ConsistencyFn, x_start, keys, sigmas, *, project=None,
             labels=None, sigma_min: float = 0.002, clip_denoised: bool = True):
  """x <- project(clip(f(x, t_1))); then for n >= 2: x <- x + sqrt(t_n^2 - eps^2) z_n,
  x <- project(clip(f(x, t_n))). `x_start` is already at level t_1.

  CM Algorithm 1's loop (cm_sampling.multistep_loop) on the levels (t_1, .., t_N, eps):
  the last pair adds no noise. z_n = per_image_normal(keys, ..., step=n), with step 0
  reserved for the initial noise of the callers.
  """
  sigmas = _check_sigmas(sigmas)
  levels = jnp.concatenate([sigmas, jnp.full((1,), sigma_min, _F32)])
  return cm_sampling.multistep_loop(
      consistency_fn, x_start, keys, levels, labels=labels, project=project,
      sigma_min=sigma_min, clip=clip_denoised, first_noise_step=1)


def zero_shot_edit(consistency_fn: ConsistencyFn, reference, keys, sigmas,
                   operator: ops.EditOperator, *, labels=None, sigma_min: float = 0.002,
                   clip_denoised: bool = True):
  """Consistency Models, Algorithm 4 for any (A, Omega) given as an `EditOperator`.

  Args:
    consistency_fn: f(x, sigma (B,), labels) -> x0.
    reference: y, (B, H, W, C) in [-1, 1]; its coefficients where Omega = 0
      (operator.keep = 1) are kept; the rest of y is ignored.
    keys: per-image PRNG keys (B,) (typed, or raw (B, 2) uint32).
    sigmas: t_1 > ... > t_N, shape (N,).
    operator: A, A^{-1} and keep = 1 - Omega (see cm_editing_ops).
    labels: class labels (B,) or None.
    sigma_min: epsilon of the boundary condition; step n >= 2 adds noise of
      variance t_n^2 - eps^2.
    clip_denoised: clip each f(x, t_n) to [-1, 1] (the reference does).

  Returns:
    (edited images (B, H, W, C), the masked reference A^{-1}[(A y) keep]).
  """
  y = operator.reference(_check_images(reference, "reference"))
  sigmas = _check_sigmas(sigmas)
  x = y + sigmas[0] * per_image_normal(keys, y.shape[1:], step=0)
  out = _iterate(consistency_fn, x, keys, sigmas, project=lambda x0: operator.replace(y, x0),
                 labels=labels, sigma_min=sigma_min, clip_denoised=clip_denoised)
  return out, y


# ----------------------------------------------------------------------------
# The tasks of Section 6.3 / Appendix D


def inpaint(consistency_fn: ConsistencyFn, images, mask, keys, sigmas, *, labels=None,
            sigma_min: float = 0.002, clip_denoised: bool = True):
  """Inpainting: Algorithm 4 with A = I and keep = `mask` (1 where the pixel is known).

  `mask` is (H, W), (H, W, C) or (B, H, W, C) (see cm_editing_ops.normalize_mask);
  with a binary mask the known pixels of the output are exactly the input's.
  Unknown pixels of `images` are ignored (the reference fills them with -1 or 0
  before the loop; Algorithm 4 zeroes them). Use
  `cm_editing_ops.center_box_mask(H, W)` for the reference notebook's centre box.
  Returns (inpainted images, the masked input).
  """
  x = _check_images(images)
  m = ops.normalize_mask(mask)
  if m.shape[1:3] != x.shape[1:3] or m.shape[3] not in (1, x.shape[3]) \
      or m.shape[0] not in (1, x.shape[0]):
    raise ValueError(f"mask shape {tuple(jnp.shape(mask))} does not fit images of shape "
                     f"{tuple(x.shape)}")
  return zero_shot_edit(consistency_fn, x, keys, sigmas, ops.inpainting_operator(m),
                        labels=labels, sigma_min=sigma_min, clip_denoised=clip_denoised)


def colorize(consistency_fn: ConsistencyFn, images, keys, sigmas, *, labels=None,
             sigma_min: float = 0.002, clip_denoised: bool = True):
  """Colorization: Algorithm 4 with A = the per-pixel orthogonal (luma, chroma) transform Q
  (first column: the unit luma vector of (0.2989, 0.5870, 0.1140)) and keep = (1, 0, 0).

  `images` must be RGB (C = 3); a grey image replicated to 3 channels works
  (its luma is the grey value times 0.9999). The output's luma
  0.2989 R + 0.587 G + 0.114 B equals the input's. Returns (colorized images,
  the luma-only reference A^{-1}[(A y) keep]).
  """
  x = _check_images(images)
  if x.shape[-1] != 3:
    raise ValueError(f"colorization needs RGB images (3 channels); got {x.shape[-1]} "
                     "channel(s): a grayscale model has no colour to generate")
  return zero_shot_edit(consistency_fn, x, keys, sigmas, ops.colorization_operator(),
                        labels=labels, sigma_min=sigma_min, clip_denoised=clip_denoised)


def superres(consistency_fn: ConsistencyFn, images, keys, sigmas, patch_size: int, *,
             labels=None, sigma_min: float = 0.002, clip_denoised: bool = True):
  """Super-resolution: Algorithm 4 with A = the per-channel, per-p x p-patch orthogonal
  transform whose first basis vector is the (scaled) block mean, keep = that coefficient.

  `images` are full-size (B, H, W, C); only their p x p block means are used
  (the reference averages the input's patches first). To start from a
  low-resolution image, upsample it with `cm_editing_ops.upsample_nearest`.
  The output's block means equal the input's. Returns (super-resolved images,
  the block-mean image).
  """
  x = _check_images(images)
  ops.check_patch_size(x.shape[1], x.shape[2], patch_size)
  return zero_shot_edit(consistency_fn, x, keys, sigmas, ops.superres_operator(patch_size),
                        labels=labels, sigma_min=sigma_min, clip_denoised=clip_denoised)


def stroke_guided(consistency_fn: ConsistencyFn, strokes, keys, sigmas, *, labels=None,
                  sigma_min: float = 0.002, clip_denoised: bool = True):
  """Stroke-guided generation, SDEdit-style (Meng et al. 2021; Consistency Models Sec. 6.3,
  Appendix D): noise the stroke painting y to t_1, x ~ N(y, t_1^2 I), then multistep
  consistency sampling (Algorithm 1's loop) down the remaining levels:

    x <- f(x, t_1); for n >= 2: x <- f(x + sqrt(t_n^2 - eps^2) z, t_n).

  This is Algorithm 4 with A = I and nothing replaced after the first noising
  (with Omega = 1 Algorithm 4 would zero y before noising it). t_1 sets how
  far the result may stray from the strokes (SDEdit's t_0): smaller keeps
  more of the painting. Returns (images, the strokes).
  """
  y = _check_images(strokes, "strokes")
  sigmas = _check_sigmas(sigmas)
  x = y + sigmas[0] * per_image_normal(keys, y.shape[1:], step=0)
  out = _iterate(consistency_fn, x, keys, sigmas, labels=labels, sigma_min=sigma_min,
                 clip_denoised=clip_denoised)
  return out, y


def interpolate(consistency_fn: ConsistencyFn, z1, z2, alphas, keys, sigmas, *, labels=None,
                sigma_min: float = 0.002, clip_denoised: bool = True):
  """Interpolation (Consistency Models, Appendix D): slerp between unit-variance latents
  z1 and z2 (each (H, W, C), or (B, H, W, C) with one pair per output), then
  generation from x = t_1 * slerp(z1, z2, alpha): one step f(x, t_1) when
  `sigmas` has one level (the paper's Figure), multistep otherwise.

  Args:
    alphas: (B,) interpolation weights in [0, 1] (0 -> z1, 1 -> z2).
    keys: (B,) per-image keys; only used for the noise of steps n >= 2.
  Returns:
    (images (B, H, W, C), the interpolated latents (B, H, W, C)).
  """
  alphas = jnp.asarray(alphas, _F32).reshape(-1)
  z1 = jnp.asarray(z1, _F32)
  z2 = jnp.asarray(z2, _F32)
  if z1.shape != z2.shape or z1.ndim not in (3, 4):
    raise ValueError(f"z1 and z2 must both be (H, W, C) or (B, H, W, C); got {z1.shape}, "
                     f"{z2.shape}")
  if z1.ndim == 3:
    zs = jax.vmap(lambda a: ops.slerp(z1, z2, a))(alphas)
  else:
    if z1.shape[0] != alphas.shape[0]:
      raise ValueError(f"{z1.shape[0]} latent pairs for {alphas.shape[0]} alphas")
    zs = jax.vmap(ops.slerp)(z1, z2, alphas)
  sigmas = _check_sigmas(sigmas)
  out = _iterate(consistency_fn, sigmas[0] * zs, keys, sigmas, labels=labels,
                 sigma_min=sigma_min, clip_denoised=clip_denoised)
  return out, zs


def image_latent(images, keys, sigma):
  """A unit-variance latent for an image at level sigma, z = y/sigma + noise, so that
  sigma z ~ N(y, sigma^2 I) (what `interpolate` between two images slerps: the
  SDEdit-noised images, scaled to unit noise). Noise from step 0 of each key."""
  y = _check_images(images)
  s = jnp.asarray(sigma, _F32)
  return y / s + per_image_normal(keys, y.shape[1:], step=0)


def denoise(consistency_fn: ConsistencyFn, images, keys, sigma, *, labels=None,
            clip_denoised: bool = True):
  """Denoising (Consistency Models, Appendix D / the CIFAR-10 notebook): x_sigma = y + sigma z,
  then one step x0 = f(x_sigma, sigma). `sigma` is a scalar or (B,).

  Returns (denoised images, the noisy images x_sigma).
  """
  y = _check_images(images)
  s = jnp.broadcast_to(jnp.asarray(sigma, _F32).reshape(-1), (y.shape[0],))
  noisy = y + s[:, None, None, None] * per_image_normal(keys, y.shape[1:], step=0)
  x0 = jnp.asarray(consistency_fn(noisy, s, labels), _F32)
  if clip_denoised:
    x0 = jnp.clip(x0, -1.0, 1.0)
  return x0, noisy
