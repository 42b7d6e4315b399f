"""The latent text-to-image path end to end on the tiny configs: the autoencoder and latent
diffusion objectives against independent formulas (diffusers' DDPMScheduler for the noising
and the v target), sampling with prompts and guidance, latent caching and training on the
cache, text-to-image from a diffusers folder through sample.py, the SD 1.5 dry run, and the
one-line errors."""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from cm_jax import sampling
from cm_jax.cli import cache_latents
from cm_jax.conditioning import Conditioning
from cm_jax.data import latent_cache
from cm_jax.diffusion import discrete_timesteps, schedules
from cm_jax.diffusion import parameterization as param_lib
from cm_jax.eval import digits_classifier
from cm_jax.methods.base import LossContext, network_fn
from cm_jax.train import builders, loop
from configs import digits32_vae

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cli(*args, timeout=600):
  return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                        timeout=timeout)


def _one_line_error(proc, *words):
  assert proc.returncode != 0
  err = proc.stderr.strip().splitlines()
  assert len(err) == 1 and "Traceback" not in proc.stderr, proc.stderr
  for w in words:
    assert w in err[0], err[0]


@pytest.fixture(scope="module")
def ldm(tiny_latent_runs):
  vae_dir, config, ldm_dir = tiny_latent_runs
  parts = builders.build_parts(config)
  return config, parts, parts.method.load_teacher()


def test_ldm_loss_is_ddpm_noising_and_target_of_diffusers(ldm):
  """LDM eq. 2 (Ho et al. Alg. 1) in latent space: the loss is the network's squared error
  at diffusers' DDPMScheduler.add_noise(z, eps, t) against eps, for the same t and eps; the
  v target is diffusers' get_velocity."""
  from diffusers import DDPMScheduler  # pylint: disable=g-import-not-at-top
  config, parts, frozen = ldm
  config = config.copy_and_resolve_references()
  config.method.update(caption_dropout=0.0)
  method = builders.build_parts(config).method
  params = builders.init_params(parts, config, jax.random.key(1))
  b = 3
  z = jax.random.normal(jax.random.key(2), (b,) + parts.image_shape)
  ids = method.parts.tokenize(["a handwritten digit two", "", "a handwritten digit nine"])
  rng = jax.random.key(3)
  loss, _ = jax.jit(method.loss)(params, {"latent": z, "input_ids": ids}, rng,
                                 LossContext(step=jnp.zeros((), jnp.int32),
                                             teacher_params=frozen))
  # The same draws, in the order LatentDiffusion.loss splits its key.
  _, k_t, k_eps, _, _ = jax.random.split(rng, 5)
  t = np.array(jax.random.randint(k_t, (b,), 0, 1000))
  eps = np.asarray(jax.random.normal(k_eps, z.shape))
  sched = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                        num_train_timesteps=1000)
  tz = lambda a: torch.from_numpy(np.array(a).transpose(0, 3, 1, 2))
  nhwc = lambda a: a.numpy().transpose(0, 2, 3, 1)
  z_t = nhwc(sched.add_noise(tz(z), tz(eps), torch.from_numpy(t)))
  context = method.parts.encode_text(frozen["text_encoder"], ids)

  def forward(p, z, t, c):
    apply = network_fn(method.net, p, train=True, dropout_rng=jax.random.key(0))
    return apply(z, t, Conditioning(context=c))

  out = jax.jit(forward)(params, jnp.asarray(z_t), jnp.asarray(t, jnp.float32), context)
  np.testing.assert_allclose(float(loss), np.mean((np.asarray(out) - eps) ** 2), rtol=2e-5)
  # v-prediction's target (Salimans & Ho 2022) at the same draws.
  abar = sched.alphas_cumprod.numpy()[t].reshape(b, 1, 1, 1)
  v = param_lib.get_parameterization("v").target(z, eps, np.sqrt(abar), np.sqrt(1 - abar))
  np.testing.assert_allclose(np.asarray(v), nhwc(sched.get_velocity(
      tz(z), tz(eps), torch.from_numpy(t))), atol=1e-6)


def test_autoencoder_loss_is_l1_plus_weighted_kl():
  """LDM App. G: rec + kl_weight * KL / d, KL of a diagonal Gaussian in closed form."""
  config = digits32_vae.get_config("tiny")
  parts = builders.build_parts(config)
  params = builders.init_params(parts, config, jax.random.key(0))
  x = jax.random.uniform(jax.random.key(1), (2, 16, 16, 3), minval=-1, maxval=1)
  rng = jax.random.key(2)
  loss, metrics = jax.jit(lambda p: parts.method.loss(p, {"image": x}, rng, None))(params)
  x_hat, mean, logvar = jax.jit(lambda p: parts.method.reconstruct(p, x, rng))(params)
  mean, logvar = np.asarray(mean, np.float64), np.asarray(logvar, np.float64)
  kl = 0.5 * np.sum(mean ** 2 + np.exp(logvar) - 1.0 - logvar, axis=(1, 2, 3))
  want = np.mean(np.abs(np.asarray(x_hat) - np.asarray(x))) + \
      config.method.kl_weight * np.mean(kl) / (16 * 16 * 3)
  np.testing.assert_allclose(float(loss), want, rtol=1e-5)
  np.testing.assert_allclose(float(metrics["kl"]), np.mean(kl), rtol=1e-5)


def test_ddim_grid_ends_where_diffusers_ddim_does():
  sched = schedules.DiscreteDDPM("scaled_linear", 0.00085, 0.012, 1000)
  settings = discrete_timesteps.scheduler_settings(None, sched)
  grid, alpha = discrete_timesteps.ve_grid(sched, settings, 4)
  ac = sched.alphas_cumprod
  t = [751, 501, 251, 1]  # leading spacing, steps_offset 1
  want = np.sqrt((1 - ac[t]) / ac[t])
  np.testing.assert_allclose(np.asarray(grid[:4]), want, rtol=1e-6)
  np.testing.assert_allclose(float(grid[4]), np.sqrt((1 - ac[0]) / ac[0]), rtol=1e-6)
  assert alpha == pytest.approx(np.sqrt(ac[0]))
  grid0, alpha0 = discrete_timesteps.ve_grid(sched, settings, 4, final_zero=True)
  assert float(grid0[-1]) == 0.0 and alpha0 == 1.0
  snapped = discrete_timesteps.snap_to_integer(jnp.asarray([950.99994, 3.5, 12.0002]))
  np.testing.assert_array_equal(np.asarray(snapped), [951.0, 3.5, 12.0])


def test_digits_detector_reads_upscaled_digits_by_block_means():
  x = np.random.default_rng(0).uniform(-1, 1, (2, 32, 32, 1)).astype(np.float32)
  want = x.reshape(2, 8, 4, 8, 4, 1).mean(axis=(2, 4))
  np.testing.assert_allclose(np.asarray(digits_classifier.to_digits_resolution(x)), want,
                             rtol=1e-6)


def test_prompts_steer_the_samples(ldm, tiny_latent_runs):
  from cm_jax import runs  # pylint: disable=g-import-not-at-top
  _, config, ldm_dir = tiny_latent_runs
  method = ldm[1].method
  unet = runs.load_run(ldm_dir, "ema").params
  parts = ldm[1]
  kwargs = dict(num=4, seed=0, batch_size=4, num_steps=2, image_shape=parts.image_shape,
                num_classes=config.data.num_classes)
  three = method.parts.tokenize(["a handwritten digit three"])
  seven = method.parts.tokenize(["a handwritten digit seven"])
  a, labels = sampling.generate(method, unet, prompt_ids=three, guidance=2.0, **kwargs)
  b, _ = sampling.generate(method, unet, prompt_ids=seven, guidance=2.0, **kwargs)
  assert a.shape == (4, 16, 16, 3) and a.dtype == np.uint8 and labels.shape == (4,)
  assert not np.array_equal(a, b)


def test_latent_cache_trains_and_is_checked_against_the_autoencoder(ldm, tmp_path):
  config, parts, _ = ldm
  out = str(tmp_path / "cache")
  record = cache_latents.build(config, out, batch_size=64, shard_size=1024, progress=False)
  assert record["count"] == 1797 and tuple(record["latent_shape"]) == parts.image_shape
  src = latent_cache.LatentCacheSource(out)
  item = src[5]
  assert item["latent"].shape == parts.image_shape and item["input_ids"].shape == (77,)
  cached = config.copy_and_resolve_references()
  cached.data.update(name="latent_cache", path=out)
  cached.training.update(num_steps=2)
  state = loop.train(cached, str(tmp_path / "run"), progress=False)
  assert int(state.step) == 2
  # Another resolution, and another autoencoder's cache: one line each, nothing trained.
  with pytest.raises(ValueError, match="resolution") as err:
    latent_cache.LatentCacheSource(out, expected_resolution=32)
  assert "\n" not in str(err.value)
  stale = cached.copy_and_resolve_references()
  stale.method.text_encoder_seed = 1  # other frozen weights -> another identity
  with pytest.raises(ValueError) as err:
    builders.build_parts(stale).method.load_teacher()
  assert "frozen_weights" in str(err.value) and "\n" not in str(err.value)


def test_missing_autoencoder_run_is_one_line(tmp_path):
  from configs import digits32_ldm  # pylint: disable=g-import-not-at-top
  config = digits32_ldm.get_config("tiny")
  config.method.vae_workdir = str(tmp_path / "nope")
  with pytest.raises(FileNotFoundError) as err:
    builders.build_parts(config).method.load_teacher()
  assert "nope" in str(err.value) and "\n" not in str(err.value)


def test_sample_py_text_to_image_from_a_diffusers_folder(tiny_sd_folder, tmp_path):
  out = str(tmp_path / "cats.npz")
  proc = _cli("sample.py", "--pretrained", str(tiny_sd_folder), "--prompt", "a red cat",
              "--guidance", "2", "--steps", "3", "--num", "2", "--out", out)
  assert proc.returncode == 0, proc.stderr
  with np.load(out) as f:
    assert f["arr_0"].shape == (2, 16, 16, 3) and f["arr_0"].dtype == np.uint8
  assert os.path.exists(out[:-4] + ".png")
  broken = tmp_path / "broken"
  os.makedirs(broken)
  _one_line_error(_cli("sample.py", "--pretrained", str(broken), "--out", out), "missing")


def test_prompt_on_a_run_without_text_is_one_line():
  from cm_jax.cli import sample_request  # pylint: disable=g-import-not-at-top
  method = builders.build_parts(digits32_vae.get_config("tiny")).method
  with pytest.raises(sample_request.RequestError) as err:
    sample_request.prompt_options(method, "a cat", None)
  assert "--prompt" in str(err.value) and "autoencoder_kl" in str(err.value)


def test_sd15_dry_run_counts_every_network(capsys):
  import train  # pylint: disable=g-import-not-at-top
  from configs import sd15_ldm  # pylint: disable=g-import-not-at-top
  config = sd15_ldm.get_config()
  config.mesh.fsdp = 8
  config.model.dtype = "bfloat16"
  train.dry_run(config)
  out = capsys.readouterr().out
  assert "params: 859520964" in out
  assert "frozen vae params: 83653863" in out
  assert "frozen text_encoder params: 123060480" in out
  assert "per device under FSDP over 8 devices" in out


def test_exported_run_samples_the_same_in_diffusers(ldm, tiny_latent_runs, tmp_path):
  """A trained run -> `python -m cm_jax.interop export --format diffusers` -> diffusers'
  StableDiffusionPipeline gives the latents cm_jax samples from the run itself."""
  from diffusers import StableDiffusionPipeline  # pylint: disable=g-import-not-at-top
  from cm_jax import runs  # pylint: disable=g-import-not-at-top
  _, config, ldm_dir = tiny_latent_runs
  out = str(tmp_path / "hf")
  proc = _cli("-m", "cm_jax.interop", "export", "--workdir", ldm_dir, "--format", "diffusers",
              "--out", out)
  assert proc.returncode == 0, proc.stderr
  method = ldm[1].method
  params = method.sampling_params(runs.load_run(ldm_dir, "ema").params)
  noise = np.random.default_rng(0).standard_normal((2, 8, 8, 4)).astype(np.float32)
  prompt = "a handwritten digit four"
  ours = method.sample_latents(params, noise, None, None, 3, sampler="ddim", guidance=2.0,
                               prompt_ids=method.parts.tokenize([prompt]))
  pipe = StableDiffusionPipeline.from_pretrained(out)
  pipe.set_progress_bar_config(disable=True)
  theirs = pipe([prompt] * 2, num_inference_steps=3, guidance_scale=3.0, output_type="latent",
                latents=torch.from_numpy(noise.transpose(0, 3, 1, 2).copy())).images
  np.testing.assert_allclose(np.asarray(ours), theirs.numpy().transpose(0, 2, 3, 1),
                             atol=1e-4, rtol=0)
