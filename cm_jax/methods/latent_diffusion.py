"""Text-conditioned latent diffusion (Rombach et al. 2022, "High-Resolution Image Synthesis
with Latent Diffusion Models"; Stable Diffusion) on a discrete DDPM schedule.

Training (Ho et al. 2020, Algorithm 1, in the autoencoder's latent space, LDM eq. 2 with
the text condition of Sec. 3.3):
  z = scaling_factor * E(x) (a posterior sample; or read from a latent cache),
  t ~ U{0, ..., T-1}, eps ~ N(0, I), z_t = sqrt(abar_t) z + sqrt(1 - abar_t) eps,
  loss = || F(z_t, t, tau(y)) - target ||^2 / d,  target = eps (eps-prediction) or
  v = sqrt(abar_t) eps - sqrt(1 - abar_t) z (v-prediction, Salimans & Ho 2022),
with tau the frozen text encoder's token states. For classifier-free guidance (Ho &
Salimans 2022) the caption is replaced by the empty prompt with probability
`method.caption_dropout` (what Stable Diffusion trained with: the empty string's encoding
is its unconditional input).

Sampling: diffusers' schedulers' timestep grids (`cm_jax.diffusion.discrete_timesteps`)
read as VE noise levels, so every sampler of `cm_jax.diffusion.samplers` runs on them
(`ddim`, `euler`, `dpmpp_2m`, ...); DDIM on that grid is diffusers' DDIMScheduler step for
step, including its last step to abar = final_alpha_cumprod. Guidance
x^w = (1 + w) x(c) - w x(empty prompt) (cm_jax.conditioning; diffusers'
guidance_scale = 1 + w). The latents are decoded by the frozen autoencoder.
"""
from __future__ import annotations

import functools
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cm_jax import conditioning as cond_lib
from cm_jax.data import captions as captions_lib
from cm_jax.data import latent_cache
from cm_jax.diffusion import discrete_timesteps
from cm_jax.diffusion import parameterization as param_lib
from cm_jax.diffusion import samplers, schedules
from cm_jax.methods.base import LossContext, network_fn
from cm_jax.methods.latent_parts import LatentParts, latent_shape

PREDICTIONS = ("eps", "v")


class LatentDiffusion:
  """A text-conditioned latent diffusion model (eps- or v-prediction, DDPM schedule)."""

  name = "ldm"
  # w costs a second evaluation per step, on the empty prompt.
  guidance_kind = "classifier_free"
  # sampling.guidance_options asks for a null class: here it is the empty prompt.
  null_class = "empty prompt"

  def __init__(self, net, config):
    self.net = net
    self.cfg = config.method
    self.sample_cfg = config.sample
    self.data_cfg = config.data
    if self.cfg.prediction not in PREDICTIONS:
      raise ValueError(f"unknown method.prediction {self.cfg.prediction!r} for latent "
                       f"diffusion; choose from {PREDICTIONS}")
    self.param = param_lib.get_parameterization(self.cfg.prediction)
    self.schedule = schedules.build_schedule(config.schedule)
    if not isinstance(self.schedule, schedules.DiscreteDDPM):
      raise ValueError("latent diffusion trains on a discrete DDPM schedule: set "
                       "config.schedule.name='ddpm'")
    rate = float(self.cfg.get("caption_dropout", 0.0) or 0.0)
    if not 0.0 <= rate < 1.0:
      raise ValueError(f"method.caption_dropout must be in [0, 1), got {rate}")
    self.caption_dropout = rate

  @classmethod
  def network_input_shape(cls, config):
    return latent_shape(config.method, int(config.data.image_size))

  @functools.cached_property
  def parts(self) -> LatentParts:
    return LatentParts(self.cfg)

  # -- frozen networks ---------------------------------------------------------------------

  def load_teacher(self):
    """The frozen autoencoder and text encoder: passed to every step as ctx.teacher_params
    (the trainer places them); a missing pretrained folder or autoencoder run, or a latent
    cache made with another autoencoder, is a one-line error before anything is compiled."""
    if self.data_cfg.name == "latent_cache":
      latent_cache.read_cache_record(self.data_cfg.path,
                                     expected_meta={"frozen_weights": self.parts.identity})
    return self.parts.params

  def abstract_frozen(self) -> dict:
    """Shapes of the frozen networks (jax.eval_shape: nothing read or allocated), for
    train.py --dry_run."""
    parts = self.parts
    size = int(self.data_cfg.image_size)
    vae = jax.eval_shape(parts.vae.init, jax.random.key(0),
                         jnp.zeros((1, size, size, int(self.data_cfg.channels))))["params"]
    ids = jnp.zeros((1, int(parts.text_config.get("max_position_embeddings", 77))), jnp.int32)
    text = jax.eval_shape(parts.text_encoder.init, jax.random.key(0), ids)["params"]
    return {"vae": vae, "text_encoder": text}

  @property
  def teacher_identity(self) -> str:
    return self.parts.identity

  def initial_params(self, params, frozen):
    """A fresh UNet, or the pretrained folder's UNet with `method.init_unet_from_pretrained`
    (fine-tuning Stable Diffusion)."""
    if frozen is None or not self.cfg.get("init_unet_from_pretrained", False):
      return params
    from cm_jax.nets import sd_folder  # pylint: disable=g-import-not-at-top
    folder = sd_folder.load_sd_folder(self.cfg.pretrained, components=("unet",))
    return jax.tree.map(lambda a, b: jnp.asarray(b, a.dtype), params, folder.unet_params)

  @functools.cached_property
  def empty_prompt_ids(self) -> np.ndarray:
    return self.parts.tokenize([""])

  @functools.cached_property
  def class_prompt_ids(self) -> Optional[np.ndarray]:
    """Token ids of each class's caption (digits: "a handwritten digit seven"), so class
    labels can stand for prompts when sampling the digits teacher; None otherwise."""
    data = self.data_cfg.name
    if data == "latent_cache":  # what the cache was made from
      data = latent_cache.read_cache_record(self.data_cfg.path)["meta"].get("data")
    if data != "digits_captions":
      return None
    return self.parts.tokenize([captions_lib.digit_caption(c)
                                for c in range(int(self.data_cfg.num_classes))])

  # -- training ------------------------------------------------------------------------------

  def latents(self, frozen, batch, rng):
    if "latent" in batch:
      return jnp.asarray(batch["latent"], jnp.float32)
    return jax.lax.stop_gradient(self.parts.encode_images(frozen["vae"], batch["image"], rng))

  def loss(self, params, batch, rng, ctx: LossContext):
    frozen = ctx.teacher_params
    k_vae, k_t, k_eps, k_drop, k_dropout = jax.random.split(rng, 5)
    z = self.latents(frozen, batch, k_vae)
    b = z.shape[0]
    ids = jnp.asarray(batch["input_ids"], jnp.int32)
    if self.caption_dropout:
      drop = jax.random.bernoulli(k_drop, self.caption_dropout, (b,))
      ids = jnp.where(drop[:, None], jnp.asarray(self.empty_prompt_ids, jnp.int32), ids)
    context = jax.lax.stop_gradient(self.parts.encode_text(frozen["text_encoder"], ids))
    t = jax.random.randint(k_t, (b,), 0, self.schedule.num_train_timesteps)
    eps = jax.random.normal(k_eps, z.shape, jnp.float32)
    abar = jnp.asarray(self.schedule.alphas_cumprod, jnp.float32)[t].reshape((b, 1, 1, 1))
    alpha, sigma = jnp.sqrt(abar), jnp.sqrt(1.0 - abar)
    z_t = alpha * z + sigma * eps
    apply = network_fn(self.net, params, train=True, dropout_rng=k_dropout)
    out = apply(z_t, t.astype(jnp.float32), cond_lib.Conditioning(context=context))
    target = self.param.target(z, eps, alpha, sigma)
    loss = jnp.mean(jnp.square(out.astype(jnp.float32) - target))
    return loss, {"loss": loss}

  def uses_target(self) -> bool:
    return False

  def target_decay(self, step):
    return jnp.zeros((), jnp.float32)

  # -- sampling --------------------------------------------------------------------------------

  def sampling_params(self, params):
    """The UNet's parameters with the frozen autoencoder and text encoder beside them."""
    return {"unet": params, **self.parts.params}

  def scheduler_config(self) -> dict:
    """The diffusers scheduler fields the timestep grid follows: the pretrained folder's
    `scheduler_config.json`, else Stable Diffusion's DDIM settings on this schedule."""
    return discrete_timesteps.scheduler_settings(self.parts.scheduler_config, self.schedule)

  def denoiser(self, unet_params):
    """D(x; sigma_ve, cond) in VE coordinates; the network sees the integer timestep."""
    return param_lib.make_schedule_denoiser(
        network_fn(self.net, unet_params), self.schedule, self.param,
        discrete_timesteps.snap_to_integer, time_input="t")

  def sampling_setup(self, params, noise, num_steps: int, guidance: float = 0.0,
                     prompt_ids=None, negative_prompt_ids=None, sampler: str = "ddim"):
    """(denoise, x_T, grid, cond, alpha_final): `params` from sampling_params. DDIM ends
    where diffusers' DDIMScheduler does (final_alpha_cumprod), the others at sigma = 0."""
    grid, alpha_final = discrete_timesteps.ve_grid(self.schedule, self.scheduler_config(),
                                                   int(num_steps),
                                                   final_zero=sampler != "ddim")
    b = noise.shape[0]
    context = self.parts.encode_text(params["text_encoder"],
                                     jnp.broadcast_to(jnp.asarray(prompt_ids, jnp.int32),
                                                      (b, prompt_ids.shape[-1])))
    denoise = self.denoiser(params["unet"])
    if guidance:
      negative = self.empty_prompt_ids if negative_prompt_ids is None else negative_prompt_ids
      null_context = self.parts.encode_text(params["text_encoder"], jnp.asarray(negative))[:1]
      denoise = cond_lib.guided_denoiser(denoise, guidance, null_context=null_context)
    # z_T ~ N(0, I) at the first timestep is x_T = z_T / alpha_T in VE coordinates.
    x_T = noise * jnp.sqrt(1.0 + grid[0] ** 2)
    return denoise, x_T, grid, cond_lib.Conditioning(context=context), alpha_final

  def prompt_ids_for(self, labels, b: int, prompt_ids=None):
    if prompt_ids is not None:
      return np.asarray(prompt_ids, np.int32)
    if labels is not None and self.class_prompt_ids is not None:
      return jnp.asarray(self.class_prompt_ids)[labels]
    return np.broadcast_to(self.empty_prompt_ids, (b, self.empty_prompt_ids.shape[-1]))

  def sample_latents(self, params, noise, keys, labels, num_steps: int,
                     sampler: Optional[str] = None, guidance: float = 0.0, prompt_ids=None,
                     negative_prompt_ids=None, callback=None):
    """Scaled latents z_0 (what diffusers' pipelines hand to the VAE decoder)."""
    sampler = sampler or self.sample_cfg.sampler
    if sampler not in samplers.SAMPLERS:
      raise ValueError(f"unknown sampler {sampler!r}; choose from {sorted(samplers.SAMPLERS)}")
    ids = self.prompt_ids_for(labels, noise.shape[0], prompt_ids)
    denoise, x_T, grid, cond, alpha_final = self.sampling_setup(
        params, noise, num_steps, guidance, ids, negative_prompt_ids, sampler)
    x = samplers.SAMPLERS[sampler](denoise, x_T, grid, keys, cond, callback)
    return alpha_final * x

  def sample(self, params, noise, keys, labels, num_steps: int, **options):
    """Images in [-1, 1] decoded from the sampled latents; `params` from sampling_params.
    Options: sampler, guidance, prompt_ids / negative_prompt_ids ((1 or B, 77) token ids;
    default: the class captions of the digits data, else the empty prompt)."""
    z = self.sample_latents(params, noise, keys, labels, num_steps, **options)
    return self.parts.decode_latents(params["vae"], z)
