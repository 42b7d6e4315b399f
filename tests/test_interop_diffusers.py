"""ADMUNet <-> diffusers UNet2DModel, and the exported directory in diffusers' pipeline.

diffusers is an independent implementation of the same ADM architecture (its
scripts/convert_consistency_to_diffusers.py maps openai's checkpoints onto it), so equal
outputs on random weights check the name map, the layouts and the network together."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import _interop_util as U
from cm_jax.interop import export_diffusers, presets
from cm_jax.train import builders

diffusers = pytest.importorskip("diffusers")

CASES = {"scale_shift_classes": dict(use_scale_shift_norm=True, num_classes=10),
         "plain_norm_unconditional": dict(use_scale_shift_norm=False, num_classes=0)}


def _unet(cfg, num_classes, size=8):
  ucfg = {k: v for k, v in export_diffusers.unet_config(cfg, size, 3, num_classes).items()
          if not k.startswith("_")}
  return diffusers.UNet2DModel(**ucfg).eval()


def _inputs(num_classes):
  rng = np.random.RandomState(0)
  x = rng.randn(2, 3, 8, 8).astype(np.float32)
  t = np.array([3.5, -700.0], np.float32)  # c_noise values of both conventions
  y = np.array([1, 7]) if num_classes else None
  return x, t, y


def _torch_out(unet, x, t, y):
  with torch.no_grad():
    return unet(torch.from_numpy(x), torch.from_numpy(t),
                class_labels=None if y is None else torch.from_numpy(y)).sample.numpy()


def _jax_out(net, params, x, t, y):
  out = net.apply({"params": params}, jnp.asarray(x.transpose(0, 2, 3, 1)), jnp.asarray(t),
                  None if y is None else jnp.asarray(y))
  return np.asarray(out).transpose(0, 3, 1, 2)


@pytest.mark.parametrize("case", sorted(CASES))
def test_diffusers_and_adm_agree_both_directions(case):
  kw = CASES[case]
  ncls = kw["num_classes"]
  cfg = U.model_cfg(use_scale_shift_norm=kw["use_scale_shift_norm"])
  net = U.net_for(cfg, num_classes=ncls)
  x, t, y = _inputs(ncls)

  # diffusers -> cm_jax: a random UNet2DModel, imported.
  torch.manual_seed(0)
  unet = _unet(cfg, ncls)
  with torch.no_grad():
    for p in unet.parameters():
      p.copy_(0.3 * torch.randn_like(p))
  sd = {k: v.numpy() for k, v in unet.state_dict().items()}
  params = export_diffusers.params_from_diffusers(sd, cfg, 8)
  ref = _torch_out(unet, x, t, y)
  np.testing.assert_allclose(_jax_out(net, params, x, t, y), ref, atol=1e-4, rtol=0)
  assert np.abs(ref).max() > 0.5
  # ... and back, bit for bit.
  back = export_diffusers.diffusers_state_dict(params, cfg, 8)
  assert set(back) == set(sd)
  assert all(np.array_equal(back[k], sd[k]) for k in sd)

  # cm_jax -> diffusers: random ADMUNet params, exported, loaded strictly.
  ours = U.random_params(net, num_classes=ncls, seed=5)
  unet2 = _unet(cfg, ncls)
  unet2.load_state_dict({k: torch.from_numpy(v) for k, v in
                         export_diffusers.diffusers_state_dict(ours, cfg, 8).items()}, strict=True)
  np.testing.assert_allclose(_torch_out(unet2, x, t, y), _jax_out(net, ours, x, t, y),
                             atol=1e-4, rtol=0)
  U.assert_trees_equal(export_diffusers.params_from_diffusers(
      export_diffusers.diffusers_state_dict(ours, cfg, 8), cfg, 8), ours)


@pytest.mark.parametrize("preset", ["imagenet64", "lsun256"])
def test_release_structures_map_every_parameter(preset):
  """The ImageNet 64 / LSUN 256 block structures (at small widths): every UNet2DModel
  parameter has an ADMUNet counterpart of the same size and vice versa."""
  cfg = dict(presets.IMAGENET64_ADM if preset == "imagenet64" else presets.LSUN256_ADM)
  cfg.update(model_channels=16, num_head_channels=8, num_groups=8, cond_dim=0, dropout=0.0,
             dtype="float32", remat=False, num_heads=-1)
  cfg = U.model_cfg(**cfg)
  size, ncls = (64, 1000) if preset == "imagenet64" else (256, 0)
  with torch.device("meta"):
    want = {k: tuple(v.shape) for k, v in _unet(cfg, ncls, size).state_dict().items()}
  net = U.net_for(cfg, image_size=size, num_classes=ncls)
  y = jnp.zeros((1,), jnp.int32) if ncls else None
  shapes = jax.eval_shape(lambda: net.init(jax.random.key(0), jnp.zeros((1, size, size, 3)),
                                           jnp.zeros((1,)), y))["params"]
  zeros = jax.tree.map(lambda s: np.zeros(s.shape, np.float32), shapes)
  got = {k: v.shape for k, v in export_diffusers.diffusers_state_dict(zeros, cfg, size).items()}
  assert got == want


def _tiny_run_config(method, source="openai", num_classes=10):
  return presets.build_config("imagenet64", source, method, num_classes=num_classes,
                              variant="tiny")


def test_consistency_pipeline_one_step_sample_equals_ours(tmp_path):
  config = _tiny_run_config("cd")
  assert config.precond.c_noise == "openai"
  parts = builders.build_parts(config)
  params = U.random_params(parts.net, num_classes=10, seed=7, scale=0.15)
  out = export_diffusers.save(str(tmp_path / "hf"), params, config, "ema")
  pipe = diffusers.ConsistencyModelPipeline.from_pretrained(out)
  pipe.set_progress_bar_config(disable=True)
  assert pipe.scheduler.config.num_train_timesteps == config.sample.grid_points

  rng = np.random.RandomState(11)
  z = rng.randn(3, 8, 8, 3).astype(np.float32)
  labels = np.array([0, 4, 9])
  image = pipe(batch_size=3, class_labels=torch.from_numpy(labels), num_inference_steps=1,
               latents=torch.from_numpy(z.transpose(0, 3, 1, 2).copy()), output_type="pt").images
  theirs = image.numpy().transpose(0, 2, 3, 1) * 2 - 1  # the pipeline maps [-1, 1] to [0, 1]
  keys = jax.random.split(jax.random.key(0), 3)
  ours = np.asarray(parts.method.sample(params, jnp.asarray(z), keys, jnp.asarray(labels), 1))
  np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)
  inside = np.mean(np.abs(ours) < 0.999)
  assert inside > 0.3, inside  # not a comparison of clipped constants


def test_edm_teacher_export_matches_edm_scheduler_preconditioning(tmp_path):
  config = _tiny_run_config("edm", source="edm")
  assert config.precond.c_noise == "edm"
  parts = builders.build_parts(config)
  params = U.random_params(parts.net, num_classes=10, seed=8)
  out = export_diffusers.save(str(tmp_path / "hf"), params, config, "ema")
  unet = diffusers.UNet2DModel.from_pretrained(out, subfolder="unet").eval()
  sched = diffusers.EDMEulerScheduler.from_pretrained(out, subfolder="scheduler")
  x = np.random.RandomState(3).randn(2, 8, 8, 3).astype(np.float32)
  labels = np.array([2, 5])
  sigma = np.float32(1.7)
  xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
  with torch.no_grad():
    f = unet(sched.precondition_inputs(xt, torch.tensor(sigma)),
             sched.precondition_noise(torch.tensor(sigma)).expand(2),
             class_labels=torch.from_numpy(labels)).sample
    d_theirs = sched.precondition_outputs(xt, f, torch.tensor(sigma)).numpy()
  d_ours = parts.method.denoiser(params)(jnp.asarray(x), jnp.full((2,), sigma),
                                         jnp.asarray(labels))
  np.testing.assert_allclose(np.asarray(d_ours).transpose(0, 3, 1, 2), d_theirs, atol=1e-4,
                             rtol=0)


def test_refusals(tmp_path):
  config = _tiny_run_config("cd")
  params = U.random_params(builders.build_parts(config).net, num_classes=10)
  config.precond.c_noise = "edm"
  with pytest.raises(ValueError, match="250 ln"):
    export_diffusers.save(str(tmp_path / "a"), params, config)
  with pytest.raises(ValueError, match="resblock_updown"):
    export_diffusers.check_exportable(U.model_cfg(resblock_updown=False))
  with pytest.raises(ValueError, match="only ADM"):
    export_diffusers.check_exportable(U.model_cfg(name="ncsnpp"))
