"""Samples from a trained run into `.npz` (arr_0 uint8 NHWC, arr_1 labels) and a PNG grid.

  python sample.py --workdir runs/digits_edm --num 1000 --steps 18 --seed 0 --out samples.npz

Image i depends only on (--seed, i): the same whatever --batch_size or device count.
"""
import os
import sys

import jax
from absl import app, flags, logging

from cm_jax import runs, sampling
from cm_jax.cli import editing as editing_cli
from cm_jax.train import builders, parallel
from cm_jax.utils.images import save_grid_png, save_samples_npz

_WORKDIR = flags.DEFINE_string("workdir", None, "run directory written by train.py")
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
    "guidance", None, "classifier-free guidance strength w: (1 + w) x_cond - w x_uncond "
    "(diffusers' guidance_scale = 1 + w; needs a model trained with label dropout; "
    "default: config.sample.guidance)")
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
  if not _WORKDIR.value:
    sys.exit("sample.py: --workdir is required")
  if not _OUT.value.endswith(".npz"):  # the PNG grid goes beside it: never over it
    sys.exit(f"sample.py: --out must be a .npz file (the grid is written beside it as "
             f".png, or to --grid), got {_OUT.value!r}")
  for name, value in (("--num", _NUM.value), ("--steps", _STEPS.value),
                      ("--batch_size", _BATCH.value)):
    if value is not None and value < 1:  # checked before anything is loaded or compiled
      sys.exit(f"sample.py: {name} must be >= 1, got {value}")
  try:
    config = runs.load_config(_WORKDIR.value, _STEP.value)
  except FileNotFoundError as e:
    sys.exit(f"sample.py: {e}")
  parts = builders.build_parts(config)
  num_classes = config.data.num_classes
  if _CLASS.value is not None and not 0 <= _CLASS.value < max(num_classes, 1):
    sys.exit(f"sample.py: --class_label must be in [0, {num_classes}) for this run")
  edit_job = None
  if _EDIT.value:  # check the editing inputs before loading any checkpoint
    try:
      edit_job = editing_cli.plan(editing_cli.request_from_flags(flags.FLAGS), config,
                                  parts.image_shape)
    except editing_cli.EditError as e:
      sys.exit(f"sample.py: {e}")

  num_steps = _STEPS.value or config.sample.num_steps
  if _TS.value:
    num_steps = _STEPS.value or sampling.ts_num_steps(config, _TS.value, _GRID_POINTS.value)
  try:  # only the chosen copy of the weights is read (cm_jax.runs)
    # A progressive-distillation run keeps one student per step count: read that one.
    ckpt_step = sampling.checkpoint_step_for(config, num_steps, _STEP.value)
    run = runs.load_run(_WORKDIR.value, _PARAMS.value or config.sample.params, ckpt_step)
  except (ValueError, FileNotFoundError) as e:
    sys.exit(f"sample.py: {e}")
  params, step = run.params, run.step
  if edit_job is not None:
    editing_cli.run_and_save(edit_job, config, parts, params, _OUT.value, _GRID.value,
                             _GRID_MAX.value)
    return

  options = {}
  sampler = _SAMPLER.value or config.sample.sampler
  if sampler != config.sample.sampler:
    options["sampler"] = sampler
  if _TS.value:
    if "ts" not in config.sample:
      sys.exit("sample.py: --ts applies to consistency models (cd, ct, ict) only")
    options["ts"] = tuple(int(t) for t in _TS.value)
  guidance = _GUIDANCE.value if _GUIDANCE.value is not None else config.sample.get("guidance", 0.0)
  try:
    guided, warning = sampling.guidance_options(parts.method, guidance)
  except ValueError as e:
    sys.exit(f"sample.py: {e}")
  if warning:
    print(f"sample.py: warning: {warning}", file=sys.stderr)
  options.update(guided)
  if _GRID_POINTS.value and "grid_points" in config.sample:
    options["grid_points"] = _GRID_POINTS.value
  try:
    images, labels = sampling.generate(
        parts.method, params, num=_NUM.value, seed=_SEED.value,
        batch_size=_BATCH.value or config.sample.batch_size, num_steps=num_steps,
        image_shape=parts.image_shape, num_classes=num_classes, class_label=_CLASS.value,
        mesh=parallel.make_mesh(config.get("mesh")), progress=True, **options)
  except sampling.NonFiniteSamplesError as e:
    sys.exit(f"sample.py: step {step}, weights {run.which!r}: {e}")
  except ValueError as e:  # e.g. a sampler or step count the method refuses, in one line
    sys.exit(f"sample.py: {e}")

  save_samples_npz(_OUT.value, images, labels)
  grid = _GRID.value or os.path.splitext(_OUT.value)[0] + ".png"
  save_grid_png(images[:_GRID_MAX.value], grid)
  print(f"wrote {len(images)} images from step {step} ({sampler}, {num_steps} steps) "
        f"to {_OUT.value} and {grid}")


if __name__ == "__main__":
  jax.config.parse_flags_with_absl()
  app.run(main)
