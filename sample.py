"""Samples from a trained run into `.npz` (arr_0 uint8 NHWC, arr_1 labels) and a PNG grid.

  python sample.py --workdir runs/digits_edm --num 1000 --steps 18 --seed 0 --out samples.npz
  python sample.py --pretrained /path/to/stable-diffusion-v1-5 --prompt "a red cat" \
      --guidance 6.5 --sampler dpmpp_2m --steps 25 --num 4 --out cats.npz
  python sample.py --pretrained /path/to/LCM_Dreamshaper_v7 --prompt "a red cat" \
      --guidance 7.5 --steps 4 --num 4 --out lcm.npz        # an LCM folder: the LCM sampler
  python sample.py --pretrained /path/to/stable-diffusion-v1-5 --lora lcm-lora-sdv1-5 \
      --prompt "a red cat" --steps 4 --num 4 --out lcm_lora.npz   # LCM-LoRA merged in

Image i depends only on (--seed, i): the same whatever --batch_size or device count.
"""
import os
import sys

import jax
from absl import app, flags, logging

from cm_jax import runs, sampling
from cm_jax.cli import editing as editing_cli
from cm_jax.cli import sample_request
from cm_jax.train import builders, parallel
from cm_jax.utils.images import save_grid_png, save_samples_npz

_WORKDIR = flags.DEFINE_string("workdir", None, "run directory written by train.py")
_PRETRAINED = flags.DEFINE_string(
    "pretrained", None, "a diffusers text-to-image folder (Stable Diffusion layout: unet/, "
    "vae/, text_encoder/, tokenizer/, scheduler/) to sample directly, instead of --workdir; "
    "an LCM folder (LCMScheduler, e.g. LCM_Dreamshaper_v7) samples with the LCM sampler")
_LORA = flags.DEFINE_string(
    "lora", None, "with --pretrained: a LoRA file (PEFT / diffusers or kohya-ss "
    ".safetensors, or a folder holding pytorch_lora_weights.safetensors), e.g. an LCM-LoRA, "
    "merged into the folder's UNet; sampled with the LCM sampler (no guidance by default)")
_PROMPT = flags.DEFINE_string("prompt", None, "text-to-image runs: the prompt (default: the "
                              "digits run's class captions, else the empty prompt)")
_NEGATIVE = flags.DEFINE_string("negative_prompt", None, "text-to-image runs: the prompt "
                                "guidance steers away from (default: the empty prompt)")
_NUM = flags.DEFINE_integer("num", 64, "number of images")
_STEPS = flags.DEFINE_integer("steps", None, "sampler grid points (default: the config's)")
_SEED = flags.DEFINE_integer("seed", 0, "base seed; image i uses fold_in(seed, i)")
_OUT = flags.DEFINE_string("out", "samples.npz", "output .npz path")
_GRID = flags.DEFINE_string("grid", None, "PNG grid path (default: --out with .png)")
_GRID_MAX = flags.DEFINE_integer("grid_max", 100, "at most this many images in the PNG grid")
_BATCH = flags.DEFINE_integer("batch_size", None, "images per batch (default: the config's)")
_SAMPLER = flags.DEFINE_string("sampler", None, "sampler name (default: the config's)")
_PARAMS = flags.DEFINE_string("params", None, "ema | online | an EMA's name (default: config)")
_CLASS = flags.DEFINE_integer("class_label", None, "generate only this class")
_GUIDANCE = flags.DEFINE_float(
    "guidance", None, "guidance strength w >= 0: classifier-free (1 + w) x_cond - w x_uncond "
    "(needs a model trained with label dropout), or the w fed to a distilled student's "
    "guidance embedding (an LCM); diffusers' guidance_scale = w + 1 either way "
    "(default: config.sample.guidance)")
_STEP = flags.DEFINE_integer("checkpoint_step", None, "checkpoint step (default: latest)")
_TS = flags.DEFINE_list("ts", None, "consistency models: grid indices of CM Algorithm 1, e.g. "
                        "0,22,39 (on config.sample.grid_points levels); sets --steps")
_GRID_POINTS = flags.DEFINE_integer("grid_points", None, "consistency models: Karras grid "
                                    "size of --ts (default: config.sample.grid_points)")
# Zero-shot editing with a consistency model (cm_jax/cli/editing.py).
_EDIT = flags.DEFINE_enum("edit", None, list(editing_cli.TASKS),
                          "edit --image instead of sampling (consistency models only)")
flags.DEFINE_string("image", None, "--edit input: PNG of the model's size (or .npz arr_0)")
flags.DEFINE_string("image2", None, "--edit interpolate: second image (with --image)")
flags.DEFINE_string("mask", None, "--edit inpaint: PNG mask, white = keep (default: centre box)")
flags.DEFINE_integer("patch", None, "--edit superres: block size p (block means are kept)")
flags.DEFINE_float("sigma", None, "--edit denoise: noise level; stroke/interpolate: start level")
flags.DEFINE_integer("seed2", None, "--edit interpolate: seed of the second noise (default seed+1)")


def main(argv):
  del argv
  logging.set_verbosity(logging.ERROR)  # Orbax logs every file it writes
  try:
    _sample()
  except sample_request.RequestError as e:
    sys.exit(f"sample.py: {e}")


def _pretrained_config(folder, lora=None):
  """The config of a diffusers folder, or RequestError: an LCM folder's (LCMScheduler:
  configs/sd15_lcd.py from_folder), a folder sampled with an LCM-LoRA merged in
  (configs/sd15_lcm_lora.py from_folder), else a diffusion model's (configs/sd15_ldm.py)."""
  # pylint: disable-next=g-import-not-at-top
  from configs import sd15_lcd, sd15_lcm_lora, sd15_ldm
  try:
    if sd15_lcd.is_lcm_folder(folder):
      return sd15_lcd.from_folder(folder)
    if lora:
      return sd15_lcm_lora.from_folder(folder)
    return sd15_ldm.from_folder(folder)
  except (ValueError, FileNotFoundError) as e:
    raise sample_request.RequestError(str(e)) from None


def _sample():
  if bool(_WORKDIR.value) == bool(_PRETRAINED.value):
    raise sample_request.RequestError("give one of --workdir (a cm_jax run) and --pretrained "
                                      "(a diffusers folder)")
  if _LORA.value and not _PRETRAINED.value:
    raise sample_request.RequestError("--lora merges a LoRA file into a diffusers folder's "
                                      "UNet: give it with --pretrained")
  if not _OUT.value.endswith(".npz"):  # the PNG grid goes beside it: never over it
    raise sample_request.RequestError(
        f"--out must be a .npz file (the grid is written beside it as .png, or to --grid), "
        f"got {_OUT.value!r}")
  # Checked before anything is loaded or compiled.
  sample_request.check_counts(num=_NUM.value, steps=_STEPS.value, batch_size=_BATCH.value,
                              grid_points=_GRID_POINTS.value)
  if _PRETRAINED.value:
    config = _pretrained_config(_PRETRAINED.value, _LORA.value)
  else:
    try:
      config = runs.load_config(_WORKDIR.value, _STEP.value)
    except FileNotFoundError as e:
      raise sample_request.RequestError(str(e)) from None
  try:
    parts = builders.build_parts(config)
  except (ValueError, FileNotFoundError) as e:
    raise sample_request.RequestError(str(e)) from None
  num_classes = config.data.num_classes
  sample_request.check_class_label(_CLASS.value, num_classes)
  edit_job = None
  if _EDIT.value:  # check the editing inputs before loading any checkpoint
    try:
      edit_job = editing_cli.plan(editing_cli.request_from_flags(flags.FLAGS), config,
                                  parts.image_shape)
    except editing_cli.EditError as e:
      raise sample_request.RequestError(str(e)) from None
  if edit_job is not None:  # editing reads --ts / --grid_points itself (its own grid)
    run = sample_request.read_weights(config, _WORKDIR.value, _PARAMS.value,
                                      _STEPS.value or config.sample.num_steps, _STEP.value)
    editing_cli.run_and_save(edit_job, config, parts, run.params, _OUT.value, _GRID.value,
                             _GRID_MAX.value)
    return
  plan = sample_request.plan_sampling(
      config, parts.method, steps=_STEPS.value, ts=_TS.value, grid_points=_GRID_POINTS.value,
      sampler=_SAMPLER.value, guidance=_GUIDANCE.value)
  plan.options.update(sample_request.prompt_options(parts.method, _PROMPT.value,
                                                    _NEGATIVE.value))
  if _PRETRAINED.value:
    run = sample_request.read_pretrained(_PRETRAINED.value, _LORA.value)
  else:
    run = sample_request.read_weights(config, _WORKDIR.value, _PARAMS.value, plan.num_steps,
                                      _STEP.value)
  if plan.warning:
    print(f"sample.py: warning: {plan.warning}", file=sys.stderr)
  try:
    images, labels = sampling.generate(
        parts.method, run.params, num=_NUM.value, seed=_SEED.value,
        batch_size=_BATCH.value or config.sample.batch_size, num_steps=plan.num_steps,
        image_shape=parts.image_shape, num_classes=num_classes, class_label=_CLASS.value,
        mesh=parallel.make_mesh(config.get("mesh")), progress=True, **plan.options)
  except sampling.NonFiniteSamplesError as e:
    raise sample_request.RequestError(f"step {run.step}, weights {run.which!r}: {e}") from None
  except ValueError as e:  # e.g. a sampler or step count the method refuses, in one line
    raise sample_request.RequestError(str(e)) from None

  save_samples_npz(_OUT.value, images, labels)
  grid = _GRID.value or os.path.splitext(_OUT.value)[0] + ".png"
  save_grid_png(images[:_GRID_MAX.value], grid)
  source = _PRETRAINED.value or f"step {run.step}"
  if _LORA.value:
    source += f" + {_LORA.value}"
  print(f"wrote {len(images)} images from {source} ({plan.sampler}, {plan.num_steps} "
        f"steps) to {_OUT.value} and {grid}")


if __name__ == "__main__":
  jax.config.parse_flags_with_absl()
  app.run(main)
