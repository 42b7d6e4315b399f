"""Batched generation with per-image seeds.

Image i of a run with seed s is drawn from its own key fold_in(key(s), i): its
noise, its class label and any sampler noise come from that key alone, so the
image is the same whatever the batch size, the device count or which other
images are generated with it.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from cm_jax.diffusion.noise import per_image_keys
from cm_jax.utils import sharding
from cm_jax.utils.images import to_uint8

_NOISE, _LABEL, _SAMPLER = 0, 1, 2


def image_keys(seed: int, indices: jax.Array) -> jax.Array:
  """fold_in(key(seed), i) for every image index i (cm_jax.diffusion.noise.per_image_keys)."""
  return per_image_keys(jax.random.key(seed), indices)


def draw_inputs(keys, image_shape, num_classes: int, class_label: Optional[int]):
  """(unit noise, labels or None, sampler keys), each row from its image's key alone."""
  sub = lambda k, j: jax.vmap(lambda key: jax.random.fold_in(key, j))(k)
  noise = jax.vmap(lambda k: jax.random.normal(k, image_shape))(sub(keys, _NOISE))
  labels = None
  if num_classes > 0:
    if class_label is None:
      labels = jax.vmap(lambda k: jax.random.randint(k, (), 0, num_classes))(sub(keys, _LABEL))
    else:
      labels = jnp.full((keys.shape[0],), class_label, jnp.int32)
  return noise, labels, sub(keys, _SAMPLER)


def make_sample_fn(method, image_shape, num_classes: int, num_steps: int,
                   class_label: Optional[int] = None, mesh=None, **sampler_options):
  """jit-compiled (params, image indices, seed) -> images in [-1, 1], labels."""

  def sample(params, indices, seed):
    keys = image_keys(seed, indices)
    noise, labels, sampler_keys = draw_inputs(keys, image_shape, num_classes, class_label)
    images = method.sample(params, noise, sampler_keys, labels, num_steps, **sampler_options)
    decode = getattr(method, "decode", None)  # latent methods: back to pixels
    if decode is not None:
      images = decode(images)
    return images, (labels if labels is not None else jnp.zeros_like(indices))

  if mesh is None:
    return jax.jit(sample)
  rep, split = sharding.replicated(mesh), sharding.batch_sharding(mesh)
  return jax.jit(sample, in_shardings=(rep, split, None), out_shardings=(split, split))


class NonFiniteSamplesError(ValueError):
  """The sampler produced NaN/inf: refuse to write them as images."""


def generate(method, params, *, num: int, seed: int, batch_size: int, num_steps: int,
             image_shape, num_classes: int, class_label: Optional[int] = None,
             mesh=None, progress: bool = False, **sampler_options):
  """`num` images as uint8 NHWC and their labels (None when unconditional).

  Raises NonFiniteSamplesError (a ValueError) when any image is not finite."""
  if num < 1 or batch_size < 1 or num_steps < 1:
    raise ValueError(f"num, batch_size and num_steps must be >= 1, got {num}, {batch_size}, "
                     f"{num_steps}")
  if mesh is not None:
    devices = sharding.batch_divisor(mesh)  # rows split over (data, fsdp)
    batch_size = max(devices, batch_size - batch_size % devices)
  check = getattr(method, "check_sample_options", None)
  if check is not None:  # refused before any weights are read or anything is compiled
    check(num_steps, **sampler_options)
  prepare = getattr(method, "sampling_params", None)
  if prepare is not None:  # e.g. OLSS: the fitted coefficients and the teacher they drive
    params = prepare(params)
  fn = make_sample_fn(method, tuple(image_shape), num_classes, num_steps, class_label, mesh,
                      **sampler_options)
  # Traced once before the progress bar opens, so a sampler name or option the method
  # refuses is one line on its own (the call below reuses this trace: nothing twice).
  fn.trace(params, jnp.arange(batch_size, dtype=jnp.int32), seed)
  images, labels = [], []
  for start in tqdm(range(0, num, batch_size), desc="sampling", disable=not progress,
                    unit="batch"):
    # The last batch is filled up with the images that follow; they are dropped.
    indices = jnp.arange(start, start + batch_size, dtype=jnp.int32)
    x, y = fn(params, indices, seed)
    x = np.asarray(jax.device_get(x))
    if not np.all(np.isfinite(x)):
      # uint8 conversion would turn NaN into black images that look like a result.
      bad = int(np.sum(~np.all(np.isfinite(x.reshape(len(x), -1)), axis=1)))
      raise NonFiniteSamplesError(
          f"{bad} of the images {start}..{start + len(x) - 1} came out NaN/inf: the weights "
          f"are not finite or the sampler diverged; nothing was written")
    images.append(to_uint8(x))
    labels.append(np.asarray(jax.device_get(y)))
  images = np.concatenate(images)[:num]
  labels = np.concatenate(labels)[:num].astype(np.int32)
  return images, (labels if num_classes > 0 else None)


def ts_num_steps(config, ts, grid_points: Optional[int] = None) -> int:
  """The step count a consistency model's `--ts` means: its network evaluations under CM
  Algorithm 1 (cm_sampling.evaluated_levels) on the `grid_points` grid (default
  config.sample.grid_points). A `ts` that is not a valid index list gives len(ts) - 1, so
  the sampler's own check names it in one line."""
  from cm_jax.methods import cm_sampling  # pylint: disable=g-import-not-at-top
  grid = grid_points or config.sample.get("grid_points", 0) or 40
  try:
    return cm_sampling.ts_evaluations([int(t) for t in ts], grid)
  except ValueError:
    return len(ts) - 1


def checkpoint_step_for(config, num_steps: int, requested: Optional[int]) -> Optional[int]:
  """The checkpoint a reader should sample `num_steps` from: `requested` when given; for a
  method whose run keeps one student per step count (progressive distillation:
  `checkpoint_step_for(config, num_steps)` on its class) that student's step; else None,
  the latest. ValueError (one line) when the run has no student of that many steps."""
  if requested is not None:
    return requested
  from cm_jax.methods import method_class  # pylint: disable=g-import-not-at-top
  hook = getattr(method_class(config), "checkpoint_step_for", None)
  return None if hook is None else int(hook(config, int(num_steps)))


def guidance_options(method, guidance: float) -> tuple[dict, Optional[str]]:
  """({'guidance': w} for method.sample, or {} for w = 0; a one-line warning or None).

  Diffusion models guide by two evaluations (classifier-free: they need a null class);
  distilled students take w as an input (they warn outside their trained range). Any
  other method, or a diffusion model without a null class, is a one-line ValueError."""
  if not guidance:
    return {}, None
  kind = getattr(method, "guidance_kind", None)
  if kind is None:
    raise ValueError(f"--guidance applies to diffusion models trained with label dropout "
                     f"and to students that take w (guided distillation), not to this "
                     f"{getattr(method, 'name', '?')!r} run")
  if kind == "classifier_free" and getattr(method, "null_class", None) is None:
    raise ValueError("--guidance needs a model trained for classifier-free guidance "
                     "(model.null_class=True, method.label_dropout > 0); this run has no "
                     "null class")
  warn = getattr(method, "guidance_warning", None)
  return {"guidance": float(guidance)}, (warn(guidance) if warn is not None else None)
