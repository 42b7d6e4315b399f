"""Latent consistency models against diffusers: sampling, export, sample.py, LCM-LoRA files.

The tiny random LCM folder (tests/sd_tiny.py: SD's layout at toy widths, an 8-wide
guidance embedding, an LCMScheduler) is sampled by cm_jax (`configs/sd15_lcd.from_folder`,
`LatentConsistencyDistillation.sample_latents`) and by diffusers'
`LatentConsistencyModelPipeline` from the same initial latents, prompt and guidance
(guidance_scale = 1 + w), with diffusers' re-noising draws replaced by cm_jax's (step i of
image j: normal(fold_in(keys[j], i))): the latents agree within 1e-4 at 1, 2 and 4 steps.
An lcd run written from the folder's weights, with another skipping-step grid and
timestep scaling, exports to a folder the pipeline samples the same way; an LCM-LoRA run's
adapters export to the file `load_lora_weights` reads, and Stable Diffusion with that file
and an LCMScheduler samples what cm_jax samples from the run and from `sample.py --lora`.
"""
import inspect
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch

from cm_jax import runs
from cm_jax.cli import sample_request
from cm_jax.interop import runs as interop_runs
from cm_jax.interop.__main__ import main as interop_main
from cm_jax.nets import lora as lora_lib
from cm_jax.nets import lora_files, sd_folder
from cm_jax.train import builders
from configs import sd15_lcd, sd15_lcm_lora

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPT = "a red cat"
W = 3.0
NOISE = np.random.default_rng(0).standard_normal((2, 8, 8, 4)).astype(np.float32)


def _keys():
  return jax.random.split(jax.random.key(5), NOISE.shape[0])


def _cli_all(*commands):
  """Runs each argument list as `python ...` at once (they are independent) and returns
  their CompletedProcesses in order."""
  procs = [subprocess.Popen([sys.executable, *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True) for args in commands]
  done = []
  for args, p in zip(commands, procs):
    out, err = p.communicate(timeout=600)
    done.append(subprocess.CompletedProcess(args, p.returncode, out, err))
  return done


def _other_lora_file(path):
  """A PEFT LoRA file for SD 1.5's widths (320 channels), not the tiny UNet's."""
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  name = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
  save_file({f"{name}.lora_A.weight": np.zeros((4, 320), np.float32),
             f"{name}.lora_B.weight": np.zeros((320, 4), np.float32)}, str(path))
  return str(path)


def _one_line_error(proc, *words):
  assert proc.returncode != 0
  err = proc.stderr.strip().splitlines()
  assert len(err) == 1 and "Traceback" not in proc.stderr, proc.stderr
  for w in words:
    assert w in err[0], err[0]


def _nchw(x):
  return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


def _diffusers_latents(monkeypatch, pipe, steps, guidance_scale):
  """pipe(...) latents (NHWC) from NOISE, every LCMScheduler re-noising draw replaced by
  cm_jax's: the i-th draw of a call is normal(fold_in(keys[j], i)) for image j."""
  from diffusers.schedulers import scheduling_lcm  # pylint: disable=g-import-not-at-top
  keys, calls = _keys(), []

  def draws(shape, generator=None, device=None, dtype=None, **_):
    i = len(calls)
    calls.append(i)
    z = np.stack([np.asarray(jax.random.normal(jax.random.fold_in(k, i), NOISE.shape[1:]))
                  for k in keys])
    assert tuple(shape) == (len(keys), NOISE.shape[3]) + NOISE.shape[1:3]
    return _nchw(z).to(dtype)

  monkeypatch.setattr(scheduling_lcm, "randn_tensor", draws)
  pipe.set_progress_bar_config(disable=True)
  out = pipe([PROMPT] * len(NOISE), num_inference_steps=steps, guidance_scale=guidance_scale,
             output_type="latent", latents=_nchw(NOISE)).images
  assert len(calls) == steps - 1  # no noise after the last step
  return out.numpy().transpose(0, 2, 3, 1)


def _cm_latents(method, params, steps, guidance):
  ids = method.parts.tokenize([PROMPT])
  return np.asarray(method.sample_latents(params, NOISE, _keys(), None, steps,
                                          guidance=guidance, prompt_ids=ids))


@pytest.fixture(scope="module")
def lcm(tiny_lcm_folder):
  """(config, method, sampling params) of the tiny LCM folder, as sample.py reads it."""
  config = sd15_lcd.from_folder(str(tiny_lcm_folder))
  method = builders.build_parts(config).method
  unet = sd_folder.load_sd_folder(str(tiny_lcm_folder), components=("unet",)).unet_params
  return config, method, method.sampling_params(unet)


def test_from_folder_reads_an_lcm_folder(tiny_lcm_folder, tiny_sd_folder, lcm):
  from diffusers import LatentConsistencyModelPipeline  # pylint: disable=g-import-not-at-top
  config = lcm[0]
  assert sd15_lcd.is_lcm_folder(str(tiny_lcm_folder))
  assert not sd15_lcd.is_lcm_folder(str(tiny_sd_folder))
  m = config.method
  assert (m.name, m.pretrained, m.w_embedding, m.num_ddim_timesteps, m.timestep_scaling,
          m.lora_rank) == ("lcd", str(tiny_lcm_folder), True, 50, 10.0, 0)
  assert config.model.time_cond_proj_dim == 8
  assert (config.sample.sampler, config.sample.num_steps) == ("lcm", 4)
  # The default w is the pipeline's default guidance_scale less one.
  default = inspect.signature(LatentConsistencyModelPipeline.__call__).parameters
  assert config.sample.guidance + 1.0 == default["guidance_scale"].default == 8.5
  with pytest.raises(ValueError, match="not an LCM folder") as err:
    sd15_lcd.from_folder(str(tiny_sd_folder))
  assert "\n" not in str(err.value)


@pytest.mark.parametrize("module", [sd15_lcd, sd15_lcm_lora])
def test_tiny_configs_trace_their_loss_on_the_tiny_folder(module, tiny_sd_folder):
  """sd15_lcd:tiny / sd15_lcm_lora:tiny with the tiny SD folder as teacher: the teacher
  loads, the student (w layer / adapters) starts from it and the LCD loss traces (shapes
  only: tests/test_latent_consistency.py trains the method)."""
  from cm_jax.methods.base import LossContext  # pylint: disable=g-import-not-at-top
  config = module.get_config("tiny")
  config.method.pretrained = str(tiny_sd_folder)
  config.data.tokenizer = os.path.join(str(tiny_sd_folder), "tokenizer")
  parts = builders.build_parts(config)
  method = parts.method
  frozen = method.load_teacher()
  state = jax.eval_shape(lambda: builders.new_train_state(parts, config, jax.random.key(0),
                                                          frozen))
  lora = config.method.lora_rank > 0
  assert lora == (module is sd15_lcm_lora) and method.w_embedding != lora
  leaves = jax.tree_util.tree_flatten_with_path(state.params)[0]
  names = {jax.tree_util.keystr(p) for p, _ in leaves}
  if lora:  # adapters only, rank 4
    assert all("lora_" in n for n in names)
    assert {x.shape[-1] for (p, x) in leaves if "lora_A" in jax.tree_util.keystr(p)} == {4}
  else:  # the whole UNet, with the guidance-embedding layer
    assert any("cond_proj" in n for n in names)
  batch = {"image": np.zeros((2, 16, 16, 3), np.float32),
           "input_ids": method.parts.tokenize(["a handwritten digit one", "a red cat"])}
  loss = jax.eval_shape(
      lambda p: method.loss(p, batch, jax.random.key(1), LossContext(
          step=np.zeros((), np.int32), target_params=None if lora else p,
          teacher_params=frozen))[0], state.params)
  assert loss.shape == () and loss.dtype == np.float32


@pytest.fixture(scope="module")
def lcm_pipe(tiny_lcm_folder):
  from diffusers import LatentConsistencyModelPipeline  # pylint: disable=g-import-not-at-top
  return LatentConsistencyModelPipeline.from_pretrained(
      str(tiny_lcm_folder), safety_checker=None, requires_safety_checker=False)


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_lcm_sampling_matches_latent_consistency_pipeline(lcm, lcm_pipe, monkeypatch, steps):
  _, method, params = lcm
  ours = _cm_latents(method, params, steps, W)
  theirs = _diffusers_latents(monkeypatch, lcm_pipe, steps, 1.0 + W)
  np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)


def test_exported_lcd_run_samples_the_same_in_diffusers(tiny_lcm_folder, monkeypatch,
                                                        tmp_path):
  """An lcd run -> `python -m cm_jax.interop export --format diffusers` -> a
  LatentConsistencyModelPipeline folder that samples what cm_jax samples from the run. The
  run's grid (25 points, k = 40) and timestep scaling (5) are not LCMScheduler's defaults,
  so the exported scheduler must carry them."""
  from diffusers import LatentConsistencyModelPipeline  # pylint: disable=g-import-not-at-top
  config = sd15_lcd.from_folder(str(tiny_lcm_folder))
  config.method.update(num_ddim_timesteps=25, timestep_scaling=5.0)
  unet = sd_folder.load_sd_folder(str(tiny_lcm_folder), components=("unet",)).unet_params
  workdir, out = str(tmp_path / "run"), str(tmp_path / "hf")
  interop_runs.save_imported_run(workdir, unet, config)
  assert interop_main(["export", "--workdir", workdir, "--format", "diffusers",
                       "--out", out]) == 0
  read = lambda *p: json.load(open(os.path.join(out, *p), encoding="utf-8"))
  assert read("model_index.json")["_class_name"] == "LatentConsistencyModelPipeline"
  sched = read("scheduler", "scheduler_config.json")
  assert (sched["_class_name"], sched["original_inference_steps"],
          sched["timestep_scaling"]) == ("LCMScheduler", 25, 5.0)
  assert read("unet", "config.json")["time_cond_proj_dim"] == 8

  run = runs.load_run(workdir)
  method = builders.build_parts(run.config).method
  ours = _cm_latents(method, method.sampling_params(run.params), 2, W)
  pipe = LatentConsistencyModelPipeline.from_pretrained(out)
  np.testing.assert_allclose(ours, _diffusers_latents(monkeypatch, pipe, 2, 1.0 + W),
                             atol=1e-4, rtol=0)
  # sample.py reads the exported folder as an LCM again (its grid and scaling included).
  back = sd15_lcd.from_folder(out)
  assert (back.method.num_ddim_timesteps, back.method.timestep_scaling) == (25, 5.0)


def test_sample_py_on_an_lcm_folder(tiny_lcm_folder, tiny_sd_folder, tmp_path):
  """sample.py --pretrained <LCM folder> samples with the LCM sampler; --guidance < 0 and a
  --lora file made for another network are one line each."""
  out = str(tmp_path / "cats.npz")
  ok, negative, other = _cli_all(
      ["sample.py", "--pretrained", str(tiny_lcm_folder), "--prompt", PROMPT, "--steps", "2",
       "--num", "2", "--out", out],
      ["sample.py", "--pretrained", str(tiny_lcm_folder), "--guidance", "-1", "--out",
       str(tmp_path / "x.npz")],
      ["sample.py", "--pretrained", str(tiny_sd_folder), "--lora",
       _other_lora_file(tmp_path / "other.safetensors"), "--out", str(tmp_path / "y.npz")])
  assert ok.returncode == 0, ok.stderr
  assert "(lcm, 2 steps)" in ok.stdout, ok.stdout
  with np.load(out) as f:
    assert f["arr_0"].shape == (2, 16, 16, 3) and f["arr_0"].dtype == np.uint8
  assert os.path.exists(out[:-4] + ".png")
  _one_line_error(negative, "--guidance", ">= 0")
  _one_line_error(other, "--lora", "to_q")


def test_sample_request_checks(lcm, tiny_sd_folder):
  """--guidance < 0 for any method, --prompt for any text-to-image method, no negative
  prompt for a w-embedding LCM: each one line before anything is read."""
  config, method, _ = lcm
  kw = dict(steps=None, ts=None, grid_points=None, sampler=None)
  with pytest.raises(sample_request.RequestError, match="--guidance must be >= 0"):
    sample_request.plan_sampling(config, method, guidance=-1.0, **kw)
  from configs import sd15_ldm  # pylint: disable=g-import-not-at-top
  ldm_config = sd15_ldm.from_folder(str(tiny_sd_folder))
  ldm = builders.build_parts(ldm_config).method
  with pytest.raises(sample_request.RequestError, match="--guidance must be >= 0"):
    sample_request.plan_sampling(ldm_config, ldm, guidance=-0.5, **kw)
  plan = sample_request.plan_sampling(config, method, guidance=None, **kw)
  assert (plan.sampler, plan.num_steps, plan.options) == ("lcm", 4, {"guidance": 7.5})
  ids = sample_request.prompt_options(method, PROMPT, None)["prompt_ids"]
  np.testing.assert_array_equal(ids, method.parts.tokenize([PROMPT]))
  with pytest.raises(sample_request.RequestError, match="negative prompt") as err:
    sample_request.prompt_options(method, PROMPT, "blue")
  assert "\n" not in str(err.value)


# ---- LCM-LoRA -------------------------------------------------------------------------------


def _write_lora_run(workdir, lora, config):
  """A run directory whose online weights are `lora` (what train.py saves for LCM-LoRA)."""
  # pylint: disable=g-import-not-at-top
  from cm_jax.train import ema as ema_lib
  from cm_jax.train.checkpoint import RunCheckpoints
  from cm_jax.train.state import create_train_state
  parts = builders.build_parts(config)
  state = create_train_state(lora, parts.optimizer, ema_lib.ema_names(config.ema),
                             parts.method.uses_target())
  ckpts = RunCheckpoints(workdir, max_to_keep=None, async_save=False)
  try:
    ckpts.save(0, state, {"imported": True}, config, wait=True)
  finally:
    ckpts.close()


@pytest.fixture(scope="module")
def lora_run(tiny_sd_folder, tmp_path_factory):
  """An LCM-LoRA run on the tiny SD folder (sd15_lcm_lora:tiny, rank 4, alpha 2: scale 0.5)
  whose adapters are random, B included (a fresh B is zero), and its exported file."""
  config = sd15_lcm_lora.get_config("tiny")
  config.method.update(pretrained=str(tiny_sd_folder), lora_alpha=2)
  base = sd_folder.load_sd_folder(str(tiny_sd_folder), components=("unet",)).unet_params
  lora = lora_lib.init_lora(jax.random.key(0), base, 4, tuple(config.method.lora_targets))
  lora = jax.tree.map(lambda a: np.asarray(a) + 0.1 * np.random.default_rng(a.size)
                      .standard_normal(a.shape).astype(np.float32), lora)
  tmp = tmp_path_factory.mktemp("lora_run")
  workdir, out = str(tmp / "run"), str(tmp / "export")
  _write_lora_run(workdir, lora, config)
  assert interop_main(["export", "--workdir", workdir, "--format", "lora", "--out", out]) == 0
  return config, workdir, os.path.join(out, lora_files.WEIGHT_NAME)


def test_lcm_lora_export_loads_in_diffusers_and_sample_py(tiny_sd_folder, lora_run,
                                                          monkeypatch):
  """The exported file in diffusers (StableDiffusionPipeline + LCMScheduler +
  load_lora_weights, guidance_scale 1) samples what cm_jax samples from the run; sample.py
  --lora merges the same UNet."""
  # pylint: disable-next=g-import-not-at-top
  from diffusers import LCMScheduler, StableDiffusionPipeline
  config, workdir, file = lora_run
  run = runs.load_run(workdir)
  method = builders.build_parts(run.config).method
  params = method.sampling_params(run.params)
  ours = _cm_latents(method, params, 2, 0.0)
  pipe = StableDiffusionPipeline.from_pretrained(str(tiny_sd_folder), safety_checker=None,
                                                 requires_safety_checker=False)
  pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
  pipe.load_lora_weights(os.path.dirname(file))
  np.testing.assert_allclose(ours, _diffusers_latents(monkeypatch, pipe, 2, 1.0),
                             atol=1e-4, rtol=0)
  # sample.py --pretrained DIR --lora FILE: the config and the merged UNet.
  merged = sample_request.read_pretrained(str(tiny_sd_folder), file).params
  for a, b in zip(jax.tree.leaves(merged), jax.tree.leaves(params["unet"])):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=0)
  cli_config = sd15_lcm_lora.from_folder(str(tiny_sd_folder))
  m = cli_config.method
  assert (m.name, m.w_embedding, m.lora_rank, cli_config.sample.sampler,
          cli_config.sample.guidance) == ("lcd", False, 0, "lcm", 0.0)


def test_lora_and_export_errors_are_one_line(tiny_sd_folder, tiny_lcm_folder, lora_run,
                                             tmp_path, capsys):
  _, workdir, _ = lora_run
  # A LoRA made for another network: its kernels have other shapes.
  other = _other_lora_file(tmp_path / "other.safetensors")
  with pytest.raises(sample_request.RequestError, match="--lora") as err:
    sample_request.read_pretrained(str(tiny_sd_folder), other)
  assert "\n" not in str(err.value)
  # An LCM without a w input (LCM-LoRA merged) samples in StableDiffusionPipeline.
  from cm_jax.interop import export_sd  # pylint: disable=g-import-not-at-top
  assert export_sd.pipeline_class(sd15_lcm_lora.from_folder(str(tiny_sd_folder))) == \
      "StableDiffusionPipeline"
  assert export_sd.pipeline_class(sd15_lcd.from_folder(str(tiny_lcm_folder))) == \
      "LatentConsistencyModelPipeline"
  # An LCM-LoRA run is not a pipeline folder; an lcd run with a w-embedding has no LoRA.
  assert interop_main(["export", "--workdir", workdir, "--format", "diffusers",
                       "--out", str(tmp_path / "hf")]) == 1
  assert "--format lora" in capsys.readouterr().err
  lcd_dir = str(tmp_path / "lcd")
  interop_runs.save_imported_run(
      lcd_dir, sd_folder.load_sd_folder(str(tiny_lcm_folder), components=("unet",)).unet_params,
      sd15_lcd.from_folder(str(tiny_lcm_folder)))
  assert interop_main(["export", "--workdir", lcd_dir, "--format", "lora",
                       "--out", str(tmp_path / "l")]) == 1
  err = capsys.readouterr().err.strip()
  assert "\n" not in err and "lora_rank" in err, err


def test_sd15_lcd_tiny_trains_on_the_tiny_folder(tiny_sd_folder, tmp_path):
  """The issue's check: `sd15_lcd.py:tiny` runs a few steps with the tiny random SD folder as
  teacher, frozen autoencoder and text encoder."""
  from cm_jax.train import loop  # pylint: disable=g-import-not-at-top
  config = sd15_lcd.get_config("tiny")
  config.method.pretrained = str(tiny_sd_folder)
  config.data.tokenizer = os.path.join(str(tiny_sd_folder), "tokenizer")
  state = loop.train(config, str(tmp_path / "run"), progress=False)
  assert int(state.step) == config.training.num_steps == 2
  assert all(bool(np.isfinite(np.asarray(x)).all()) for x in jax.tree.leaves(state.params))
