"""`sample.py --edit ...`: zero-shot editing with a trained consistency model (the CLI side).

  python sample.py --workdir runs/digits_ct --edit inpaint  --image x.png [--mask m.png]
  python sample.py --workdir runs/digits_ct --edit colorize --image x.png
  python sample.py --workdir runs/digits_ct --edit superres --image x.png --patch 2
  python sample.py --workdir runs/digits_ct --edit stroke   --image strokes.png --sigma 2
  python sample.py --workdir runs/digits_ct --edit denoise  --image x.png --sigma 0.3
  python sample.py --workdir runs/digits_ct --edit interpolate --seed 0 --seed2 1 --num 8
  python sample.py --workdir runs/digits_ct --edit interpolate --image a.png --image2 b.png

The algorithms are in cm_jax.methods.cm_editing (Consistency Models, Algorithm 4);
this module reads and checks the inputs, builds the consistency function of the
run, picks the timesteps, batches, and writes the `.npz` (arr_0: the edited
images, uint8 NHWC; arr_1: labels when the model is class-conditional) and a
PNG grid: one row per image with (input, degraded reference, result), or the
frames of an interpolation.

Timesteps: `--ts` are indices into a `--grid_points`-level Karras grid (default:
the config's sample.grid_points, else 40, the reference's editing grid for its
CD models); without --ts every index is used, as the reference does for
inpainting, colorization and super-resolution, or with `--steps S` the S + 1
evenly spaced indices multistep sampling uses. A trailing last index
(sigma_min) costs no network call. Interpolation of noises defaults to one step
at sigma_max; stroke guidance (and interpolation of two images) starts at
`--sigma` (default: the level halfway along the grid) and continues down the
grid levels below it; denoising takes one step at `--sigma` (default 0.2955,
the CIFAR-10 notebook's level). Inputs: `--image` is a PNG of the model's
size (or an .npz of uint8 NHWC images, arr_0); with a grey PNG, colorization
of an RGB model replicates it to 3 channels; super-resolution also accepts an
image 1/patch the size, upsampled by repetition. `--mask` is a PNG of the same
height and width, white (>= 128) = known pixel; the default is the centre box.

Every input problem is an `EditError` with a one-line message; sample.py
turns it into `sys.exit("sample.py: <message>")`.
"""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from cm_jax import sampling
from cm_jax.diffusion import preconditioning
from cm_jax.methods import cm_editing, cm_sampling
from cm_jax.methods import cm_editing_ops as ops
from cm_jax.methods.base import network_fn
from cm_jax.utils.images import make_grid, save_samples_npz, to_uint8

TASKS = ("inpaint", "colorize", "superres", "stroke", "interpolate", "denoise")
DEFAULT_GRID_POINTS = 40          # the reference's `--steps 40` editing grid (LSUN / ImageNet CD)
NON_CONSISTENCY_METHODS = ("edm",)


class EditError(ValueError):
  """A problem with the user's editing request; str() is one line."""

  def __init__(self, message: str):
    super().__init__(" ".join(str(message).split()))


@dataclasses.dataclass
class EditRequest:
  task: str
  image: Optional[str] = None
  image2: Optional[str] = None
  mask: Optional[str] = None
  patch: Optional[int] = None
  sigma: Optional[float] = None
  ts: Optional[str] = None            # "0,22,39"
  grid_points: Optional[int] = None   # None: config.sample.grid_points, else 40
  steps: Optional[int] = None         # --steps: that many evenly spaced levels instead of all
  num: Optional[int] = None           # None: one output per input image (8 interpolation frames)
  seed: int = 0
  seed2: Optional[int] = None
  class_label: Optional[int] = None
  batch_size: Optional[int] = None    # None: the config's sample.batch_size


def request_from_flags(flag_values) -> EditRequest:
  """The request sample.py's absl flags describe (`--num` only counts when given)."""
  f = flag_values
  get = lambda name: getattr(f, name) if name in f else None
  ts = get("ts")
  if isinstance(ts, (list, tuple)):
    ts = ",".join(str(t) for t in ts)
  return EditRequest(
      task=f.edit, image=get("image"), image2=get("image2"), mask=get("mask"),
      patch=get("patch"), sigma=get("sigma"), ts=ts, grid_points=get("grid_points"),
      steps=get("steps"),
      num=f.num if f["num"].present else None, seed=f.seed, seed2=get("seed2"),
      class_label=get("class_label"), batch_size=get("batch_size"))


# ----------------------------------------------------------------------------
# The run's consistency function


def check_method(config) -> None:
  """Editing needs a consistency function f(x, sigma) with f(x, sigma_min) = x."""
  name = config.method.name
  if name in NON_CONSISTENCY_METHODS:
    raise EditError(f"--edit needs a consistency model, but this run trained method "
                    f"{name!r}; train a consistency run (e.g. CD or CT) and edit with that")


def consistency_fn_for_run(config, parts, params) -> Callable:
  """f(x, sigma, labels) of a consistency-model run (CM eq. 5 + Appendix C scalings):
  the method's own `consistency_fn(params)` when it has one, else the network with the
  consistency preconditioning of config.precond."""
  check_method(config)
  own = getattr(parts.method, "consistency_fn", None)
  if callable(own):
    return own(params)
  return preconditioning.make_denoiser(
      network_fn(parts.net, params), parameterization="consistency",
      sigma_data=config.precond.sigma_data, sigma_min=config.precond.sigma_min,
      c_noise=config.precond.c_noise)


# ----------------------------------------------------------------------------
# Reading inputs


def _pil_to_array(img: Image.Image, path: str) -> np.ndarray:
  """uint8 HWC with C = 1 (grey) or 3 (RGB); opaque alpha is dropped."""
  mode = img.mode
  if mode == "P":
    img = img.convert("RGBA")
  elif mode == "1":
    img = img.convert("L")
  elif mode in ("I", "I;16", "I;16B", "I;16L", "F"):
    raise EditError(f"{path}: {mode}-mode (16/32-bit) PNGs are not supported; "
                    "save it as 8-bit grey or RGB")
  a = np.asarray(img)
  if a.ndim == 2:
    a = a[:, :, None]
  if a.shape[2] in (2, 4):
    if np.any(a[:, :, -1] != 255):
      raise EditError(f"{path} has transparent pixels; flatten its alpha channel first")
    a = a[:, :, :-1]
  if a.shape[2] not in (1, 3):
    raise EditError(f"{path} has {a.shape[2]} channels; expected grey or RGB")
  return a


def read_image_file(path: str) -> np.ndarray:
  """uint8 NHWC from a PNG (one image) or an .npz (arr_0)."""
  if not path:
    raise EditError("this edit needs --image PATH.png")
  if not os.path.exists(path):
    raise EditError(f"--image {path} does not exist")
  if path.lower().endswith(".npz"):
    with np.load(path) as f:
      if "arr_0" not in f:
        raise EditError(f"{path} has no arr_0 (expected uint8 NHWC images)")
      a = np.asarray(f["arr_0"])
    if a.ndim == 3:
      a = a[..., None]
    if a.ndim != 4 or a.dtype != np.uint8 or a.shape[0] == 0:
      raise EditError(f"{path}: arr_0 must be non-empty uint8 NHWC images; got "
                      f"{a.dtype} {a.shape}")
    return a
  try:
    with Image.open(path) as img:
      img.load()
      return _pil_to_array(img, path)[None]
  except (OSError, SyntaxError) as e:
    raise EditError(f"cannot read image {path}: {e}") from None


def fit_channels(images: np.ndarray, channels: int, path: str, *, allow_grey: bool) -> np.ndarray:
  """Matches the model's channel count: grey RGB (R = G = B) -> 1 channel is accepted;
  grey -> RGB only when `allow_grey` (colorization)."""
  c = images.shape[-1]
  if c == channels:
    return images
  if c == 3 and channels == 1:
    if np.all(images[..., :1] == images):
      return images[..., :1]
    raise EditError(f"{path} is an RGB image but this model generates 1-channel (grey) "
                    "images; convert it to grayscale")
  if c == 1 and channels == 3:
    if allow_grey:
      return np.repeat(images, 3, axis=-1)
    raise EditError(f"{path} is a grey image but this model generates RGB images; "
                    "convert it to RGB (or use --edit colorize)")
  raise EditError(f"{path} has {c} channels but this model generates {channels}")


def load_images(path: str, image_shape, *, task: str, patch: Optional[int] = None) -> np.ndarray:
  """float32 NHWC in [-1, 1] of the model's size and channels, or a clear EditError."""
  h, w, c = image_shape
  a = read_image_file(path)
  a = fit_channels(a, c, path, allow_grey=(task == "colorize"))
  if a.shape[1:3] != (h, w):
    if task == "superres" and patch and a.shape[1] * patch == h and a.shape[2] * patch == w:
      x = a.astype(np.float32) / 127.5 - 1.0
      return np.asarray(ops.upsample_nearest(x, patch))
    extra = (f" (or {h // patch}x{w // patch}, 1/{patch} of it, for --edit superres)"
             if task == "superres" and patch else "")
    raise EditError(f"{path} is {a.shape[1]}x{a.shape[2]} (HxW) but this model takes "
                    f"{h}x{w} images{extra}; resize it first")
  return a.astype(np.float32) / 127.5 - 1.0


def load_mask(path: str, height: int, width: int) -> np.ndarray:
  """(H, W) float32 {0, 1} from a PNG: white (>= 128 in grey) = known pixel."""
  if not os.path.exists(path):
    raise EditError(f"--mask {path} does not exist")
  try:
    with Image.open(path) as img:
      img.load()
      a = _pil_to_array(img, path)
  except (OSError, SyntaxError) as e:
    raise EditError(f"cannot read mask {path}: {e}") from None
  if a.shape[:2] != (height, width):
    raise EditError(f"--mask {path} is {a.shape[0]}x{a.shape[1]} (HxW) but the image is "
                    f"{height}x{width}; they must match")
  grey = a.astype(np.float32).mean(axis=-1)
  m = (grey >= 128).astype(np.float32)
  if m.all():
    raise EditError(f"--mask {path} is white everywhere: nothing to inpaint "
                    "(black = pixels to generate)")
  return m


def parse_ts(text: Optional[str], grid_points: int, default) -> list[int]:
  if text is None or str(text).strip() == "":
    return list(default)
  try:
    ts = [int(t) for t in str(text).replace(" ", "").split(",") if t != ""]
  except ValueError:
    raise EditError(f"--ts must be comma-separated integers like 0,22,39; got {text!r}") \
        from None
  try:  # the one check of grid indices, shared with sampling
    return list(cm_sampling.check_ts(ts, grid_points, min_len=1))
  except ValueError as e:
    raise EditError(f"--{e} (--ts {text}, --grid_points {grid_points})") from None


# ----------------------------------------------------------------------------
# Planning: inputs, timesteps and the function to run, checked before any checkpoint loads


@dataclasses.dataclass
class EditJob:
  task: str
  num: int
  sigmas: np.ndarray            # levels t_1 > ... > t_N for the loop (or (sigma,) for denoise)
  inputs: Optional[np.ndarray]  # (B_in, H, W, C) float32 in [-1, 1], or None
  mask: Optional[np.ndarray] = None
  patch: Optional[int] = None
  inputs2: Optional[np.ndarray] = None
  seed: int = 0
  seed2: int = 1
  class_label: Optional[int] = None
  batch_size: int = 64
  sigma_min: float = 0.002
  description: str = ""


def _grid_sigmas(ts, grid_points, precond):
  return cm_editing.sigmas_from_indices(ts, grid_points, precond.sigma_min, precond.sigma_max,
                                        precond.rho)


def _start_level(request, grid_points, precond, default_index):
  if request.sigma is None:
    return float(_grid_sigmas([default_index], grid_points, precond)[0])
  s = float(request.sigma)
  if not precond.sigma_min <= s <= precond.sigma_max:
    raise EditError(f"--sigma must lie in [{precond.sigma_min}, {precond.sigma_max}]; got {s}")
  return s


def _levels_below(start, ts, grid_points, precond):
  """[start] + the --ts levels strictly below it (SDEdit-style start inside the grid)."""
  rest = _grid_sigmas(ts, grid_points, precond) if ts else np.zeros((0,), np.float32)
  rest = rest[rest < start * (1 - 1e-6)]
  return np.concatenate([np.asarray([start], np.float32), rest]).astype(np.float32)


def plan(request: EditRequest, config, image_shape) -> EditJob:
  """Checks everything about the request that does not need the parameters."""
  task = request.task
  if task not in TASKS:
    raise EditError(f"--edit must be one of {', '.join(TASKS)}; got {task!r}")
  check_method(config)
  precond = config.precond
  h, w, c = image_shape
  n_grid = int(request.grid_points or config.sample.get("grid_points", 0)
               or DEFAULT_GRID_POINTS)
  if n_grid < 2:
    raise EditError(f"--grid_points (the editing grid) must be >= 2; got {n_grid}")
  if request.steps is not None and request.ts:
    raise EditError("give --ts (grid indices) or --steps (evenly spaced levels), not both")
  if request.steps is not None and not 1 <= request.steps <= n_grid - 1:
    raise EditError(f"--steps must be in [1, {n_grid - 1}] for the {n_grid}-point grid; "
                    f"got {request.steps}")
  num_classes = config.data.num_classes
  if request.class_label is not None and not 0 <= request.class_label < max(num_classes, 1):
    raise EditError(f"--class_label must be in [0, {num_classes}) for this run")
  if request.num is not None and request.num < 1:
    raise EditError(f"--num must be >= 1; got {request.num}")
  batch_size = request.batch_size or config.sample.get("batch_size", 64)
  job = EditJob(task=task, num=0, sigmas=np.zeros((0,), np.float32), inputs=None,
                seed=request.seed,
                seed2=request.seed + 1 if request.seed2 is None else request.seed2,
                class_label=request.class_label, batch_size=max(1, int(batch_size)),
                sigma_min=float(precond.sigma_min))
  # Default levels: every grid index (the reference's editing), or with --steps S the
  # S + 1 evenly spaced indices that multistep sampling uses (S network evaluations).
  all_ts = (list(range(n_grid)) if request.steps is None
            else list(cm_sampling.even_ts(request.steps, n_grid)))

  if task == "colorize" and c != 3:
    raise EditError(f"--edit colorize needs an RGB model, but this run generates {c}-channel "
                    "images: there is no colour to generate")

  if task == "interpolate":
    if (request.image is None) != (request.image2 is None):
      raise EditError("--edit interpolate takes both --image and --image2, or neither "
                      "(then it interpolates the noises of --seed and --seed2)")
    job.num = request.num or 8
    if request.image is not None:
      a = load_images(request.image, image_shape, task=task)
      b = load_images(request.image2, image_shape, task=task)
      if a.shape[0] != 1 or b.shape[0] != 1:
        raise EditError("--edit interpolate takes one image in --image and one in --image2")
      job.inputs, job.inputs2 = a, b
      start = _start_level(request, n_grid, precond, (n_grid - 1) // 2)
      job.sigmas = _levels_below(start, parse_ts(request.ts, n_grid, all_ts), n_grid, precond)
    else:
      if request.sigma is not None:
        raise EditError("--sigma only applies to interpolating --image/--image2; noise "
                        "interpolation starts at sigma_max (pick levels with --ts)")
      one_step = [0] if request.steps is None else all_ts
      job.sigmas = _grid_sigmas(parse_ts(request.ts, n_grid, one_step), n_grid, precond)
    job.description = f"{job.num} frames, {len(job.sigmas)} step(s)"
    return job

  job.inputs = load_images(request.image, image_shape, task=task, patch=_patch(request, h, w))
  job.num = request.num or job.inputs.shape[0]

  if task == "inpaint":
    job.mask = (load_mask(request.mask, h, w) if request.mask
                else ops.center_box_mask(h, w))
    job.sigmas = _grid_sigmas(parse_ts(request.ts, n_grid, all_ts), n_grid, precond)
  elif task == "colorize":
    job.sigmas = _grid_sigmas(parse_ts(request.ts, n_grid, all_ts), n_grid, precond)
  elif task == "superres":
    job.patch = _patch(request, h, w)
    job.sigmas = _grid_sigmas(parse_ts(request.ts, n_grid, all_ts), n_grid, precond)
  elif task == "stroke":
    start = _start_level(request, n_grid, precond, (n_grid - 1) // 2)
    job.sigmas = _levels_below(start, parse_ts(request.ts, n_grid, all_ts), n_grid, precond)
  elif task == "denoise":
    if request.ts or request.steps is not None:
      raise EditError("--ts / --steps do not apply to --edit denoise (one step at --sigma)")
    # Default: the CIFAR-10 notebook's level, index 5 from sigma_min on its 18-point grid.
    s = _start_level(request, 18, precond, 12)
    job.sigmas = np.asarray([s], np.float32)
  if task != "inpaint" and request.mask:
    raise EditError(f"--mask only applies to --edit inpaint, not {task}")
  job.description = f"{job.num} image(s), {len(job.sigmas)} step(s)"
  return job


def _patch(request, h, w) -> Optional[int]:
  if request.task != "superres":
    if request.patch is not None:
      raise EditError(f"--patch only applies to --edit superres, not {request.task}")
    return None
  if request.patch is not None:
    p = int(request.patch)
  elif h >= 64 and h % 8 == 0 and w % 8 == 0:
    p = 8   # the reference's patch for its 64x64 and 256x256 models
  else:
    p = 2   # the CIFAR-10 notebook's
  if p < 1 or h % p or w % p:
    raise EditError(f"--patch {p} must divide the image size {h}x{w}")
  return p


# ----------------------------------------------------------------------------
# Running


def _edit_fn(job: EditJob, consistency_fn, image_shape, num_classes):
  """jit-compiled (indices (B,), inputs (B,H,W,C) or latents) -> (results, references, labels)."""
  sig = jnp.asarray(job.sigmas)

  def keys_and_labels(indices):
    keys = sampling.image_keys(job.seed, indices)
    _, labels, sampler_keys = sampling.draw_inputs(keys, image_shape, num_classes,
                                                   job.class_label)
    return sampler_keys, labels

  def run(indices, x, x2):
    keys, labels = keys_and_labels(indices)
    kw = dict(labels=labels, sigma_min=job.sigma_min)
    if job.task == "inpaint":
      out, ref = cm_editing.inpaint(consistency_fn, x, job.mask, keys, sig, **kw)
    elif job.task == "colorize":
      out, ref = cm_editing.colorize(consistency_fn, x, keys, sig, **kw)
    elif job.task == "superres":
      out, ref = cm_editing.superres(consistency_fn, x, keys, sig, job.patch, **kw)
    elif job.task == "stroke":
      out, ref = cm_editing.stroke_guided(consistency_fn, x, keys, sig, **kw)
    elif job.task == "denoise":
      out, ref = cm_editing.denoise(consistency_fn, x, keys, sig[0], labels=labels)
    else:  # interpolate: x = alphas (B,), x2 = (z1, z2); one label and one noise for all frames
      keys0, labels0 = keys_and_labels(jnp.zeros_like(indices))
      z1, z2 = x2
      out, ref = cm_editing.interpolate(consistency_fn, z1, z2, x, keys0, sig, labels=labels0,
                                        sigma_min=job.sigma_min)
      labels = labels0
      ref = jnp.clip(ref, -1.0, 1.0)  # the latents, only for a look
    return out, ref, (labels if labels is not None else jnp.zeros_like(indices))

  return jax.jit(run)


def _latents(job: EditJob, image_shape):
  """(z1, z2) unit-variance latents for interpolation."""
  if job.inputs is None:
    z1 = jax.random.normal(jax.random.key(job.seed), image_shape)
    z2 = jax.random.normal(jax.random.key(job.seed2), image_shape)
    return z1, z2
  k1 = jax.random.key(job.seed)[None]
  k2 = jax.random.key(job.seed2)[None]
  z1 = cm_editing.image_latent(job.inputs, k1, job.sigmas[0])[0]
  z2 = cm_editing.image_latent(job.inputs2, k2, job.sigmas[0])[0]
  return z1, z2


def execute(job: EditJob, consistency_fn, image_shape, num_classes: int) -> dict:
  """Runs the job in batches of job.batch_size: uint8 'results', 'references', 'inputs'
  (each (num, H, W, C)), and 'labels' (None when unconditional)."""
  image_shape = tuple(image_shape)
  fn = _edit_fn(job, consistency_fn, image_shape, num_classes)
  bs = min(job.batch_size, job.num)
  results, refs, labels, inputs = [], [], [], []
  latents = _latents(job, image_shape) if job.task == "interpolate" else None
  alphas = np.linspace(0.0, 1.0, job.num, dtype=np.float32) if latents is not None else None
  for start in range(0, job.num, bs):
    # The last batch is filled with the indices that follow; they are dropped.
    idx = np.arange(start, start + bs, dtype=np.int32)
    if latents is not None:
      a = np.clip(np.pad(alphas, (0, bs))[idx], 0.0, 1.0)
      out, ref, lab = fn(jnp.asarray(idx), jnp.asarray(a), latents)
    else:
      x = job.inputs[idx % job.inputs.shape[0]]
      out, ref, lab = fn(jnp.asarray(idx), jnp.asarray(x), None)
      inputs.append(to_uint8(x))
    results.append(to_uint8(jax.device_get(out)))
    refs.append(to_uint8(jax.device_get(ref)))
    labels.append(np.asarray(jax.device_get(lab)))
  n = job.num
  return dict(results=np.concatenate(results)[:n], references=np.concatenate(refs)[:n],
              inputs=np.concatenate(inputs)[:n] if inputs else None,
              labels=np.concatenate(labels)[:n].astype(np.int32) if num_classes > 0 else None)


def save(job: EditJob, result: dict, out_path: str, grid_path: str, grid_max: int = 100,
         min_size: int = 256) -> None:
  """The .npz of the results and a PNG grid (rows of input | reference | result)."""
  save_samples_npz(out_path, result["results"], result["labels"])
  if job.task == "interpolate":
    tiles = result["results"][:grid_max]
    grid = make_grid(tiles, columns=min(len(tiles), 10))
  else:
    k = max(1, grid_max // 3)
    parts = [result["inputs"][:k], result["references"][:k], result["results"][:k]]
    if job.task == "stroke":
      parts = [parts[0], parts[2]]
    tiles = np.stack(parts, axis=1).reshape((-1,) + result["results"].shape[1:])
    grid = make_grid(tiles, columns=len(parts))
  scale = max(1, int(math.ceil(min_size / max(grid.shape[:2]))))
  grid = grid.repeat(scale, axis=0).repeat(scale, axis=1)
  if grid.shape[2] == 1:
    grid = grid[:, :, 0]
  os.makedirs(os.path.dirname(os.path.abspath(grid_path)), exist_ok=True)
  Image.fromarray(grid).save(grid_path)


def run_and_save(job: EditJob, config, parts, params, out_path: str,
                 grid_path: Optional[str] = None, grid_max: int = 100,
                 consistency_fn: Optional[Callable] = None) -> dict:
  """sample.py's editing path once the parameters are loaded: run, write, report."""
  fn = consistency_fn or consistency_fn_for_run(config, parts, params)
  result = execute(job, fn, parts.image_shape, config.data.num_classes)
  grid_path = grid_path or os.path.splitext(out_path)[0] + ".png"
  save(job, result, out_path, grid_path, grid_max)
  print(f"wrote {len(result['results'])} {job.task} result(s) ({job.description}) "
        f"to {out_path} and {grid_path}")
  return result
