"""Text-to-image sampling from a diffusers folder against diffusers' own pipeline.

The same tiny random-weight Stable Diffusion folder (tests/sd_tiny.py) is sampled by
diffusers' `StableDiffusionPipeline` (PyTorch, DDIMScheduler with SD 1.5's settings) and by
cm_jax (`configs/sd15_ldm.from_folder` + `LatentDiffusion`, Flax networks read from the
safetensors), with the same initial latents and prompt: 20 DDIM steps with classifier-free
guidance (diffusers guidance_scale = 1 + w) give the same latents and the same decoded
images within 1e-4.
"""
import numpy as np
import pytest
import torch

from cm_jax.diffusion import discrete_timesteps
from cm_jax.nets import sd_folder
from cm_jax.train import builders
from configs import sd15_ldm
import sd_tiny

PROMPT = "a red cat"


@pytest.fixture(scope="module")
def folder(tiny_sd_folder):
  return tiny_sd_folder


@pytest.fixture(scope="module")
def cm(folder):
  config = sd15_ldm.from_folder(str(folder))
  method = builders.build_parts(config).method
  unet = sd_folder.load_sd_folder(str(folder), components=("unet",)).unet_params
  return method, method.sampling_params(unet)


def _diffusers(folder, latents_nchw, w, steps, output_type):
  from diffusers import StableDiffusionPipeline  # pylint: disable=g-import-not-at-top
  pipe = StableDiffusionPipeline.from_pretrained(str(folder), safety_checker=None,
                                                 requires_safety_checker=False)
  pipe.set_progress_bar_config(disable=True)
  out = pipe([PROMPT] * len(latents_nchw), num_inference_steps=steps, guidance_scale=1.0 + w,
             latents=torch.from_numpy(latents_nchw), output_type=output_type)
  return np.asarray(out.images)


def test_timesteps_match_diffusers_ddim():
  from diffusers import DDIMScheduler  # pylint: disable=g-import-not-at-top
  for spacing in discrete_timesteps.SPACINGS:
    for steps in (1, 4, 20, 50):
      sched = DDIMScheduler(**sd_tiny.scheduler_kwargs(), timestep_spacing=spacing)
      sched.set_timesteps(steps)
      ours = discrete_timesteps.inference_timesteps(1000, steps, spacing, 1)
      np.testing.assert_array_equal(ours, sched.timesteps.numpy())


@pytest.mark.parametrize("w", [0.0, 3.0])
def test_ddim_text_to_image_matches_stable_diffusion_pipeline(folder, cm, w):
  method, params = cm
  rng = np.random.default_rng(0)
  noise = rng.standard_normal((2, 8, 8, 4)).astype(np.float32)
  ids = method.parts.tokenize([PROMPT])
  ours = np.asarray(method.sample_latents(params, noise, None, None, 20, sampler="ddim",
                                          guidance=w, prompt_ids=ids))
  theirs = _diffusers(folder, noise.transpose(0, 3, 1, 2), w, 20, "latent")
  np.testing.assert_allclose(ours, theirs.transpose(0, 2, 3, 1), atol=1e-4, rtol=0)
  if not w:
    return
  # Decoded images (the guided case): diffusers' "np" output is (x + 1) / 2 clipped to [0, 1].
  images = np.asarray(method.sample(params, noise, None, None, 20, sampler="ddim",
                                    guidance=w, prompt_ids=ids))
  theirs_img = _diffusers(folder, noise.transpose(0, 3, 1, 2), w, 20, "np")
  np.testing.assert_allclose((images + 1) / 2, theirs_img, atol=1e-4, rtol=0)
