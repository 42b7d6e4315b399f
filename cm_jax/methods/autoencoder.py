"""Training a KL-regularised autoencoder, the first stage of latent diffusion (Rombach et
al. 2022, "High-Resolution Image Synthesis with Latent Diffusion Models", Sec. 3.1 and
App. G), small enough to train on a CPU (`configs/digits32_vae.py`).

  (mean, logvar) = E(x), z = mean + exp(logvar / 2) eps (reparameterised, Kingma & Welling
  2014), x_hat = D(z),
  loss = rec(x, x_hat) + kl_weight * KL(q(z|x) || N(0, I)) / d,

rec the per-pixel L1 (LDM's choice) or squared error, both sides averaged over the
d = H W C pixel values, which is LDM's sum-over-pixels loss divided by d (so `kl_weight`
keeps its meaning there: 1e-6 for SD's f=8 autoencoder). The LPIPS and patch-GAN terms of
the full recipe sharpen 256 px natural images; on 32 px digits the plain reconstruction
is already sharp, and leaving them out keeps the stage one network. The network is
`cm_jax.nets.sd_vae.AutoencoderKL`, diffusers' layout, so a trained autoencoder exports
to a diffusers `vae/` folder.

`sample` decodes z ~ N(0, I) drawn at the latent shape: what the KL term makes the prior
look like (the training loop's grids); reconstructions are what `evaluate` scores.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from cm_jax.nets import sd_vae

RECONSTRUCTIONS = ("l1", "l2")


class AutoencoderKLTraining:
  name = "autoencoder_kl"

  def __init__(self, net, config):
    self.net = net
    self.cfg = config.method
    if self.cfg.reconstruction not in RECONSTRUCTIONS:
      raise ValueError(f"unknown method.reconstruction {self.cfg.reconstruction!r}; choose "
                       f"from {RECONSTRUCTIONS}")
    self.kl_weight = float(self.cfg.kl_weight)
    downsampling = 2 ** (len(config.model.block_out_channels) - 1)
    self.latent_size = int(config.data.image_size) // downsampling
    self.latent_channels = int(config.model.latent_channels)

  def reconstruct(self, params, x, rng=None):
    """(x_hat, mean, logvar): a posterior sample decoded (or the mean, without `rng`)."""
    mean, logvar = self.net.apply({"params": params}, x, method=sd_vae.AutoencoderKL.encode)
    z = mean if rng is None else sd_vae.latent_sample(mean, logvar, rng)
    x_hat = self.net.apply({"params": params}, z, method=sd_vae.AutoencoderKL.decode)
    return x_hat.astype(jnp.float32), mean, logvar

  def loss(self, params, batch, rng, ctx):
    del ctx
    x = jnp.asarray(batch["image"], jnp.float32)
    x_hat, mean, logvar = self.reconstruct(params, x, rng)
    err = x_hat - x
    rec = jnp.mean(jnp.abs(err) if self.cfg.reconstruction == "l1" else jnp.square(err))
    d = x[0].size
    kl = jnp.mean(sd_vae.kl_to_standard_normal(mean, logvar))
    loss = rec + self.kl_weight * kl / d
    return loss, {"loss": loss, "rec": rec, "kl": kl, "mse": jnp.mean(jnp.square(err))}

  def uses_target(self) -> bool:
    return False

  def target_decay(self, step):
    return jnp.zeros((), jnp.float32)

  def sample(self, params, noise, keys, labels, num_steps: int, **options):
    """Decoded prior samples z ~ N(0, I) (one per key), in [-1, 1]."""
    del noise, labels, num_steps, options
    shape = (self.latent_size, self.latent_size, self.latent_channels)
    z = jax.vmap(lambda k: jax.random.normal(k, shape))(keys)
    x = self.net.apply({"params": params}, z, method=sd_vae.AutoencoderKL.decode)
    return jnp.clip(x.astype(jnp.float32), -1.0, 1.0)
