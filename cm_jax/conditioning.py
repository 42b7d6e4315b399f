"""What a network is conditioned on besides the noise level, as one pytree.

`Conditioning` travels opaquely through losses, denoisers and samplers: only the network
adapter (`cm_jax.methods.base.network_fn`) opens it. Fields:

  labels        (B,) int class labels; the null class (index num_classes) means "no label"
  context       (B, L, D) text-encoder states (latent text-to-image models)
  context_mask  (B, L) 1 = real token
  w             (B,) guidance strength fed to a network that takes it as an input
                (guided distillation students, LCM): embedded by `guidance_embedding`
  vector        (B, cond_dim) any other extra conditioning vector (model.cond_dim)

Classifier-free guidance (Ho & Salimans 2022) is written, as in Meng et al. 2023 ("On
Distillation of Guided Diffusion Models", eq. 2) and Luo et al. 2023 (LCM, eq. 7), as

  x_hat^w = (1 + w) x_hat(z, c) - w x_hat(z, null),

so w = 0 is the plain conditional model. diffusers' `guidance_scale` is 1 + w (its
pipelines compute x_u + s (x_c - x_u)); Ho & Salimans' own w is this w as well.
Guidance is linear in the prediction, so guiding x, eps or v at a fixed z is the same.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import flax.struct
import jax
import jax.numpy as jnp

_F32 = jnp.float32


@flax.struct.dataclass
class Conditioning:
  labels: Optional[jax.Array] = None
  context: Optional[jax.Array] = None
  context_mask: Optional[jax.Array] = None
  w: Optional[jax.Array] = None
  vector: Optional[jax.Array] = None


def as_conditioning(cond=None, vector=None) -> Conditioning:
  """A Conditioning from what older call sites pass: labels (or None) and a cond vector."""
  if isinstance(cond, Conditioning):
    if vector is not None:
      return cond.replace(vector=vector)
    return cond
  return Conditioning(labels=cond, vector=vector)


def drop_labels(cond: Conditioning, rng: jax.Array, rate: float, null_class: int) -> Conditioning:
  """Label dropout for classifier-free guidance (Ho & Salimans 2022, Algorithm 1: with
  probability p_uncond the class is replaced by the null token). Per example."""
  if cond.labels is None or not rate:
    return cond
  drop = jax.random.bernoulli(rng, float(rate), cond.labels.shape)
  return cond.replace(labels=jnp.where(drop, jnp.asarray(null_class, cond.labels.dtype),
                                       cond.labels))


def unconditional(cond: Conditioning, null_class: Optional[int] = None,
                  null_context: Optional[jax.Array] = None) -> Conditioning:
  """The same batch with its condition removed: labels -> the null class, text context ->
  `null_context` (the empty prompt's encoding, broadcast to the batch). w and vector stay."""
  out = cond
  if cond.labels is not None:
    if null_class is None:
      raise ValueError("classifier-free guidance needs a null class: train the model with "
                       "--config.model.null_class=True and --config.method.label_dropout>0")
    out = out.replace(labels=jnp.full_like(cond.labels, null_class))
  if cond.context is not None:
    if null_context is None:
      raise ValueError("classifier-free guidance of a text-conditioned model needs the empty "
                       "prompt's encoding (null_context)")
    out = out.replace(context=jnp.broadcast_to(null_context, cond.context.shape)
                      .astype(cond.context.dtype))
  return out


def _concat(a, b):
  return jax.tree.map(lambda u, v: jnp.concatenate([u, v], axis=0), a, b)


def guided_denoiser(denoise: Callable, w, null_class: Optional[int] = None,
                    null_context: Optional[jax.Array] = None) -> Callable:
  """denoise_w(x, sigma, cond) = (1 + w) D(x; sigma, cond) - w D(x; sigma, null).

  The conditional and unconditional halves go through the network as one batch of 2B
  (one call, as the reference samplers do). `w` is a scalar or (B,).
  """

  def guided(x, sigma, cond=None, vector=None):
    cond = as_conditioning(cond, vector)
    b = x.shape[0]
    w_b = jnp.broadcast_to(jnp.asarray(w, _F32), (b,))
    x_c, x_u = conditional_and_unconditional(denoise, x, sigma, cond, null_class, null_context)
    w_x = w_b.reshape((b,) + (1,) * (x.ndim - 1))
    return (1.0 + w_x) * x_c - w_x * x_u

  return guided


def conditional_and_unconditional(denoise: Callable, x, sigma, cond,
                                  null_class: Optional[int] = None,
                                  null_context: Optional[jax.Array] = None):
  """(D(x; sigma, cond), D(x; sigma, null)) from one call on a batch of 2B: the two halves
  of classifier-free guidance, for callers that need the conditional output on its own
  (multistep CD measures its x_var on it)."""
  cond = as_conditioning(cond)
  b = x.shape[0]
  both_cond = _concat(cond, unconditional(cond, null_class, null_context))
  s = jnp.broadcast_to(jnp.reshape(jnp.asarray(sigma, _F32), (-1,)), (b,))
  out = denoise(jnp.concatenate([x, x], 0), jnp.concatenate([s, s], 0), both_cond)
  return out[:b], out[b:]


def guidance_embedding(w, dim: int, scale: float = 1000.0) -> jax.Array:
  """Sinusoidal features of the guidance strength, (B,) -> (B, dim), float32.

  LCM (Luo et al. 2023, Sec. 4.2; diffusers' `get_guidance_scale_embedding`): the features
  of scale * w at dim/2 geometric frequencies 10000^(-k/(dim/2 - 1)), sines then cosines.
  Meng et al. 2023 embed w with Fourier features the same way (Sec. 4.1).
  """
  w = jnp.asarray(w, _F32).reshape((-1,)) * scale
  half = dim // 2
  step = math.log(10000.0) / max(half - 1, 1)
  freqs = jnp.exp(jnp.arange(half, dtype=_F32) * -step)
  args = w[:, None] * freqs[None, :]
  emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb
