"""`python -m cm_jax.interop import|export` end to end, on checkpoints shaped like the
releases' tiny config variants."""
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest

import _interop_util as U
from cm_jax.interop import edm_import, export_openai, export_safetensors, name_maps, presets
from cm_jax.interop.__main__ import main
from cm_jax.train import builders
from cm_jax.train.checkpoint import RunCheckpoints, load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _restore_state(workdir):
  config = load_config(workdir)
  parts = builders.build_parts(config)
  ckpts = RunCheckpoints(workdir, read_only=True, async_save=False)
  try:
    state, data, step = ckpts.restore(builders.abstract_train_state(parts, config))
  finally:
    ckpts.close()
  return config, state, data, step


@pytest.fixture(scope="module")
def openai_cd_run(tmp_path_factory):
  """A tiny CD-shaped openai checkpoint (as cd_imagenet64_*.pt, 10 classes) imported."""
  tmp = tmp_path_factory.mktemp("openai_cd")
  config = presets.build_config("imagenet64", "openai", "cd", num_classes=10, variant="tiny")
  params = U.random_params(builders.build_parts(config).net, num_classes=10, seed=4, scale=0.1)
  ckpt = export_openai.save(str(tmp / "cd_imagenet64_tiny.pt"), params, config.model)
  workdir = str(tmp / "run")
  assert main(["import", "--source", "openai", "--checkpoint", ckpt, "--preset", "imagenet64",
               "--variant", "tiny", "--workdir", workdir, "--step", "7"]) == 0
  return params, workdir, tmp


def test_openai_import_fills_online_ema_and_target(openai_cd_run):
  params, workdir, _ = openai_cd_run
  config, state, data, step = _restore_state(workdir)
  assert step == 7 and int(state.step) == 7
  assert config.method.name == "cd" and config.precond.c_noise == "openai"
  assert config.data.num_classes == 10
  assert data["imported"] and data["source"] == "openai"
  copies = [state.params] + list(state.ema.values())
  if state.target_params is not None:
    copies.append(state.target_params)
  assert len(copies) >= 3
  for copy in copies:
    U.assert_trees_equal(name_maps.unflatten(name_maps.flatten(copy)), params)


def test_exports_round_trip_bit_exact(openai_cd_run):
  params, workdir, tmp = openai_cd_run
  out = str(tmp / "st")
  assert main(["export", "--workdir", workdir, "--format", "safetensors", "--out", out]) == 0
  back, meta = export_safetensors.load(out)
  U.assert_trees_equal(back, params)
  assert meta["model"]["name"] == "adm" and meta["precond"]["c_noise"] == "openai"
  assert meta["data"] == {"image_size": 8, "channels": 3, "num_classes": 10}

  pt = str(tmp / "export" / "cd_again.pt")
  assert main(["export", "--workdir", workdir, "--format", "openai", "--out", pt,
               "--params", "online"]) == 0
  wd2 = str(tmp / "run2")
  assert main(["import", "--source", "openai", "--checkpoint", pt, "--preset", "imagenet64",
               "--variant", "tiny", "--workdir", wd2]) == 0
  _, state2, _, _ = _restore_state(wd2)
  U.assert_trees_equal(name_maps.unflatten(name_maps.flatten(state2.params)), params)

  hf = str(tmp / "hf")
  assert main(["export", "--workdir", workdir, "--format", "diffusers", "--out", hf]) == 0
  for f in ("model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
            "scheduler/scheduler_config.json"):
    assert os.path.isfile(os.path.join(hf, f)), f


def test_sample_py_reads_an_imported_run(openai_cd_run):
  _, workdir, tmp = openai_cd_run
  out = tmp / "samples.npz"
  result = subprocess.run(
      [sys.executable, "sample.py", "--workdir", workdir, "--num", "2", "--steps", "1",
       "--batch_size", "2", "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
      timeout=600)
  assert result.returncode == 0, result.stderr
  assert np.load(out)["arr_0"].shape == (2, 8, 8, 3)


def test_edm_import_serves_as_cd_teacher(tmp_path):
  """An EDM NCSN++ pickle -> run directory -> the teacher of configs/cifar10_cd_lpips.py."""
  from configs import cifar10_cd_lpips  # pylint: disable=g-import-not-at-top
  teacher_cfg = presets.build_config("cifar10-ncsnpp", "edm", "edm", num_classes=0,
                                     variant="tiny")
  params = U.random_params(builders.build_parts(teacher_cfg).net, seed=6)
  state = edm_import.song_state_dict(name_maps.flatten(params))
  taps = np.array([1, 3, 3, 1], np.float32)
  state["model.enc.4x4_down.conv0.resample_filter"] = (np.outer(taps, taps) / 64)[None, None]
  marker = tmp_path / "ran"
  with U.fake_persistence():
    net = U.build_edm_network(state, "EDMPrecond", "SongUNet",
                              f"open({str(marker)!r}, 'w')",
                              dict(img_resolution=8, img_channels=3, label_dim=0, sigma_data=0.5))
    with open(tmp_path / "edm-tiny-uncond-ve.pkl", "wb") as f:
      pickle.dump({"ema": net}, f)
  # The CD teacher check reads the data set's channel count: a tiny .npz stands in for CIFAR-10.
  data = str(tmp_path / "data.npz")
  np.savez(data, arr_0=np.zeros((4, 8, 8, 3), np.uint8))
  workdir = str(tmp_path / "teacher")
  args = ["import", "--source", "edm", "--checkpoint", str(tmp_path / "edm-tiny-uncond-ve.pkl"),
          "--variant", "tiny", "--workdir", workdir, "--set", "data.name=npz",
          "--set", f"data.path={data}"]
  assert main(args + ["--preset", "cifar10-ddpmpp"]) == 1  # the wrong architecture
  assert main(args + ["--preset", "cifar10-ncsnpp"]) == 0
  assert not marker.exists()

  cd = cifar10_cd_lpips.get_config("tiny")
  cd.method.teacher_workdir = workdir
  cd.data.update(name="npz", path=data)
  method = builders.build_parts(cd).method
  teacher = method.load_teacher()["teacher"]
  U.assert_trees_equal(name_maps.unflatten(name_maps.flatten(teacher)), params)
  assert main(args + ["--preset", "cifar10-ncsnpp"]) == 1  # the workdir is taken


def test_cli_errors_are_one_line(tmp_path, capsys):
  assert main(["import", "--source", "edm", "--checkpoint", str(tmp_path / "missing.pkl"),
               "--preset", "imagenet64", "--workdir", str(tmp_path / "w")]) == 1
  assert "no checkpoint file" in capsys.readouterr().err
  assert main(["import", "--source", "openai", "--checkpoint", "x.pt", "--preset",
               "cifar10-ncsnpp", "--workdir", str(tmp_path / "w")]) == 1
  assert "CIFAR-10" in capsys.readouterr().err


def test_openai_edm_teachers_clip_the_denoiser_as_karras_sample_does():
  """openai/consistency_models samples its EDM teachers with clip_denoised=True; EDM's
  own checkpoints (Algorithm 1) and cm_jax's EDM configs do not clip."""
  openai = presets.build_config("imagenet64", "openai", "edm", num_classes=1000)
  assert openai.sample.clip_denoised is True and openai.sample.sampler == "heun"
  assert openai.sample.num_steps == 40
  assert presets.build_config("imagenet64", "edm", "edm", num_classes=1000).sample.clip_denoised \
      is False
  assert presets.build_config("imagenet64", "openai", "cd", num_classes=1000).sample.get(
      "clip_denoised", False) is False


def test_sample_clip_denoised_clamps_every_evaluation(tiny_edm_run):
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from cm_jax import conditioning as cond_lib  # pylint: disable=g-import-not-at-top
  config, _, state = tiny_edm_run
  x = jnp.full((2, 8, 8, 1), 3.0)  # c_skip(0.5) = 0.5: D is about 1.5, outside [-1, 1]
  outs = {}
  for clip in (False, True):
    c = config.copy_and_resolve_references()
    c.sample.clip_denoised = clip
    method = builders.build_parts(c).method
    denoise, _, _ = method.sampling_setup(state.ema["halflife"], x, 4)
    cond = cond_lib.Conditioning(labels=jnp.array([0, 1]))
    outs[clip] = np.asarray(denoise(x, jnp.full((2,), 0.5), cond))
  assert outs[False].max() > 1.0
  np.testing.assert_array_equal(outs[True], np.clip(outs[False], -1.0, 1.0))


@pytest.mark.parametrize("preset,source,method,count", [
    ("imagenet64", "openai", "cd", 295_899_267),
    ("imagenet64", "edm", "edm", 295_899_267),
    ("lsun256-cat", "openai", "ct", None),
    ("cifar10-ncsnpp", "edm", "edm", 56_395_651),
    ("cifar10-ddpmpp", "edm", "edm", 55_732_739),
])
def test_presets_build_the_released_networks(preset, source, method, count):
  import jax  # pylint: disable=g-import-not-at-top
  ncls = {"imagenet64": 1000}.get(preset, 0)
  config = presets.build_config(preset, source, method, num_classes=ncls)
  assert config.method.name == method
  assert config.precond.c_noise == ("openai" if source == "openai" else "edm")
  parts = builders.build_parts(config)
  shapes = jax.eval_shape(lambda: builders.init_params(parts, config, jax.random.key(0)))
  n = sum(int(np.prod(s.shape)) for s in jax.tree.leaves(shapes))
  if count is not None:
    assert n == count
  if preset.startswith("lsun"):
    assert config.data.image_size == 256 and not config.model.use_scale_shift_norm
    assert config.model.channel_mult == (1, 1, 2, 2, 4, 4)
    assert config.sample.ts == (0, 62, 150) and config.sample.grid_points == 151
