"""Random-access data sources: digits, TFDS (array_record), npz and image folders.

Every source is a sequence (``__len__`` + ``__getitem__``) whose elements are
``{'image': HWC array, 'label': int32 scalar}``, already at the requested
``image_size``. Images are either uint8 in [0, 255] (TFDS, npz, folder) or float32
already in [-1, 1] (digits, whose native range 0..16 is not a byte); the
pipeline (``pipeline.py``) turns both into float32 in [-1, 1].

Grain reads these sources by index, so they can be sharded per process, shuffled
deterministically and resumed exactly.
"""

from __future__ import annotations

import logging
import os
import zipfile
from typing import Any, NamedTuple

import numpy as np
from PIL import Image

NAMES = ("digits", "tfds", "npz", "folder", "caption_folder", "webdataset", "tfds_captions",
         "digits_captions", "latent_cache")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif")
DIGITS_NATIVE_SIZE = 8


class DatasetInfo(NamedTuple):
  """What a network needs to know about a data set.

  image_size: side of the (square) images the pipeline yields (after any resize).
  channels: 1 (grey) or 3 (RGB).
  num_classes: classes present in the data (0 = unlabelled). The model's own
    ``num_classes`` comes from the config; 0 there means unconditional.
  num_examples: examples in the split (the whole data set, not one process' shard).
  """

  image_size: int
  channels: int
  num_classes: int
  num_examples: int


def cfg_get(cfg, key: str, default: Any = None) -> Any:
  """cfg.get that also works for plain dicts / ConfigDicts missing the key."""
  try:
    value = cfg.get(key, default)
  except AttributeError:
    value = getattr(cfg, key, default)
  return default if value is None else value


def check_name(cfg) -> str:
  name = cfg_get(cfg, "name")
  if name not in NAMES:
    raise ValueError(
        f"Unknown data set name {name!r}: data.name must be one of {NAMES}."
    )
  return name


def default_random_flip(cfg) -> bool:
  """Horizontal flips: on for natural images (CIFAR, ImageNet, folders), off for digits."""
  flip = cfg_get(cfg, "random_flip")
  if flip is None:
    return check_name(cfg) != "digits"
  return bool(flip)


# ----------------------------------------------------------------------------
# Image helpers (PIL only: these run in Grain's reader threads, never touch JAX).
# ----------------------------------------------------------------------------


def center_crop_square(image: np.ndarray) -> np.ndarray:
  h, w = image.shape[:2]
  if h == w:
    return image
  s = min(h, w)
  top, left = (h - s) // 2, (w - s) // 2
  return image[top : top + s, left : left + s]


def resize_uint8(image: np.ndarray, size: int) -> np.ndarray:
  """HWC uint8 -> (size, size, C) uint8; centre-crops to a square first, then bilinear."""
  image = center_crop_square(image)
  if image.shape[0] == size:
    return image
  channels = image.shape[-1]
  pil = Image.fromarray(image[..., 0] if channels == 1 else image)
  out = np.asarray(pil.resize((size, size), resample=Image.BILINEAR))
  return out.reshape(size, size, channels)


def resize_float(images: np.ndarray, size: int) -> np.ndarray:
  """NHWC float32 -> (N, size, size, C) float32, bilinear per channel (PIL mode 'F')."""
  n, h, w, c = images.shape
  if h == size and w == size:
    return images.astype(np.float32, copy=False)
  out = np.empty((n, size, size, c), np.float32)
  for i in range(n):
    for k in range(c):
      pil = Image.fromarray(np.ascontiguousarray(images[i, :, :, k], np.float32), mode="F")
      out[i, :, :, k] = np.asarray(pil.resize((size, size), resample=Image.BILINEAR))
  return out


def _as_hwc(image: np.ndarray) -> np.ndarray:
  image = np.asarray(image)
  if image.ndim == 2:
    image = image[..., None]
  return image


# ----------------------------------------------------------------------------
# In-memory source (digits, npz).
# ----------------------------------------------------------------------------


class ArraySource:
  """Random access over in-memory arrays: images (N, H, W, C), labels (N,)."""

  def __init__(self, images: np.ndarray, labels: np.ndarray | None):
    self.images = images
    self.labels = (
        np.zeros((len(images),), np.int32) if labels is None else np.asarray(labels, np.int32)
    )
    if len(self.labels) != len(images):
      raise ValueError(f"{len(images)} images but {len(self.labels)} labels.")

  def __len__(self) -> int:
    return len(self.images)

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    return {"image": self.images[index], "label": self.labels[index]}

  def __repr__(self) -> str:
    return f"ArraySource(images={self.images.shape}, dtype={self.images.dtype})"


# ----------------------------------------------------------------------------
# Digits: scikit-learn's 1,797 8x8 grey digits (ships with scikit-learn, no download).
# ----------------------------------------------------------------------------


def image_size_or(cfg, native: int | None) -> int | None:
  """data.image_size, or the native size when it is unset (None or 0)."""
  size = cfg_get(cfg, "image_size")
  if not size:
    return native
  size = int(size)
  if size <= 0:
    raise ValueError(f"data.image_size must be positive, got {size}.")
  return size


def _digits_size(cfg) -> int:
  return image_size_or(cfg, DIGITS_NATIVE_SIZE)


def digits_source(cfg) -> ArraySource:
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top

  digits = load_digits()
  images = digits.images.astype(np.float32)[..., None] / 8.0 - 1.0  # 0..16 -> [-1, 1]
  images = np.clip(resize_float(images, _digits_size(cfg)), -1.0, 1.0)
  return ArraySource(images, digits.target.astype(np.int32))


def digits_info(cfg) -> DatasetInfo:
  return DatasetInfo(image_size=_digits_size(cfg), channels=1, num_classes=10, num_examples=1797)


# ----------------------------------------------------------------------------
# npz: OpenAI's sample/reference format, arr_0 uint8 NHWC, optional arr_1 labels.
# ----------------------------------------------------------------------------


def _require_path(cfg, what: str) -> str:
  path = cfg_get(cfg, "path")
  if not path:
    raise ValueError(f"data.name={cfg_get(cfg, 'name')!r} needs data.path ({what}).")
  path = os.path.expanduser(str(path))
  if not os.path.exists(path):
    raise FileNotFoundError(
        f"data.path={path!r} does not exist: point --config.data.path at {what}."
    )
  return path


def _npz_header(path: str, key: str):
  """(shape, dtype) of one array in an .npz without reading its data."""
  fmt = np.lib.format
  with zipfile.ZipFile(path) as zf:
    with zf.open(key + ".npy") as f:
      version = fmt.read_magic(f)
      reader = {(1, 0): fmt.read_array_header_1_0, (2, 0): fmt.read_array_header_2_0}.get(version)
      if reader is not None:
        shape, _, dtype = reader(f)
        return tuple(shape), dtype
  with np.load(path) as data:  # unusual .npy version: read the array itself
    array = data[key]
  return array.shape, array.dtype


def _npz_keys(path: str) -> list[str]:
  with zipfile.ZipFile(path) as zf:
    return [n[: -len(".npy")] for n in zf.namelist() if n.endswith(".npy")]


def _npz_size(cfg, native: int) -> int:
  return image_size_or(cfg, native)


def _npz_check(path: str) -> tuple[tuple[int, ...], bool]:
  keys = _npz_keys(path)
  if "arr_0" not in keys:
    raise ValueError(f"{path}: expected an .npz with arr_0 (uint8 NHWC images); found {keys}.")
  shape, dtype = _npz_header(path, "arr_0")
  if np.dtype(dtype) != np.uint8 or len(shape) not in (3, 4):
    raise ValueError(
        f"{path}: arr_0 must be uint8 NHWC (or NHW) images, got {np.dtype(dtype)} {shape}."
    )
  if len(shape) == 3:
    shape = tuple(shape) + (1,)
  return tuple(shape), "arr_1" in keys


def npz_source(cfg) -> ArraySource:
  path = _require_path(cfg, "an .npz file with arr_0 = uint8 NHWC images (arr_1 = labels)")
  shape, _ = _npz_check(path)
  with np.load(path) as data:
    images = data["arr_0"]
    labels = data["arr_1"].astype(np.int32) if "arr_1" in data.files else None
  if images.ndim == 3:
    images = images[..., None]
  size = _npz_size(cfg, shape[1])
  if images.shape[1] != size or images.shape[2] != size:
    images = np.stack([resize_uint8(im, size) for im in images])
  return ArraySource(images, labels)


def npz_info(cfg) -> DatasetInfo:
  path = _require_path(cfg, "an .npz file with arr_0 = uint8 NHWC images (arr_1 = labels)")
  shape, has_labels = _npz_check(path)
  num_classes = 0
  if has_labels:
    with np.load(path) as data:
      labels = data["arr_1"]
    num_classes = int(labels.max()) + 1 if labels.size else 0
  return DatasetInfo(
      image_size=_npz_size(cfg, shape[1]),
      channels=int(shape[3]),
      num_classes=num_classes,
      num_examples=int(shape[0]),
  )


# ----------------------------------------------------------------------------
# Folder of images; one sub-directory per class gives labels.
# ----------------------------------------------------------------------------


def _is_image(name: str) -> bool:
  return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")


def scan_folder(root: str) -> tuple[list[str], np.ndarray, list[str]]:
  """(files, labels, class_names). Flat folder -> labels all 0 and no class names."""
  entries = sorted(os.listdir(root))
  top_files = [os.path.join(root, e) for e in entries if _is_image(e) and os.path.isfile(os.path.join(root, e))]
  class_dirs = [e for e in entries if os.path.isdir(os.path.join(root, e)) and not e.startswith(".")]
  class_files: list[list[str]] = []
  for d in class_dirs:
    found = []
    for dirpath, dirnames, filenames in os.walk(os.path.join(root, d)):
      dirnames.sort()
      found.extend(os.path.join(dirpath, f) for f in sorted(filenames) if _is_image(f))
    class_files.append(found)
  # Only sub-directories that hold images are classes.
  classes = [(d, f) for d, f in zip(class_dirs, class_files) if f]
  if classes and top_files:
    raise ValueError(
        f"{root} mixes images at the top level with class sub-directories "
        f"({[d for d, _ in classes][:5]}...): use either a flat folder (unlabelled) or "
        "one sub-directory per class."
    )
  if classes:
    files = [f for _, fs in classes for f in fs]
    labels = np.concatenate([np.full(len(fs), i, np.int32) for i, (_, fs) in enumerate(classes)])
    return files, labels, [d for d, _ in classes]
  if not top_files:
    raise FileNotFoundError(
        f"No images ({', '.join(IMAGE_EXTENSIONS)}) found in {root}: point data.path at a "
        "folder of images, optionally one sub-directory per class."
    )
  return top_files, np.zeros(len(top_files), np.int32), []


def _pil_channels(mode: str) -> int:
  return 1 if mode in ("L", "1", "I", "I;16", "F") else 3


class FolderSource:
  """Reads (and centre-crops / resizes) one image file per __getitem__."""

  def __init__(self, files: list[str], labels: np.ndarray, image_size: int, channels: int):
    self.files = list(files)
    self.labels = np.asarray(labels, np.int32)
    self.image_size = int(image_size)
    self.channels = int(channels)

  def __len__(self) -> int:
    return len(self.files)

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    with Image.open(self.files[index]) as im:
      im = im.convert("L" if self.channels == 1 else "RGB")
      image = _as_hwc(np.asarray(im, np.uint8))
    return {"image": resize_uint8(image, self.image_size), "label": self.labels[index]}

  def __repr__(self) -> str:
    return f"FolderSource({len(self.files)} files, {self.image_size}px, {self.channels}ch)"


def _folder_meta(cfg):
  root = _require_path(cfg, "a directory of PNG/JPEG images (optionally one sub-directory per class)")
  if not os.path.isdir(root):
    raise FileNotFoundError(f"data.path={root!r} is not a directory of images.")
  files, labels, classes = scan_folder(root)
  with Image.open(files[0]) as im:
    native_channels = _pil_channels(im.mode)
    native_size = min(im.size)
  channels = int(cfg_get(cfg, "channels", native_channels))
  size = image_size_or(cfg, native_size)
  return files, labels, classes, size, channels


def folder_source(cfg) -> FolderSource:
  files, labels, _, size, channels = _folder_meta(cfg)
  return FolderSource(files, labels, size, channels)


def folder_info(cfg) -> DatasetInfo:
  files, _, classes, size, channels = _folder_meta(cfg)
  return DatasetInfo(image_size=size, channels=channels, num_classes=len(classes), num_examples=len(files))


# ----------------------------------------------------------------------------
# TFDS, read with tfds.data_source (array_record files, no TensorFlow needed).
# ----------------------------------------------------------------------------


def _tfds_args(cfg):
  name = cfg_get(cfg, "tfds_name")
  if not name:
    raise ValueError("data.name='tfds' needs data.tfds_name (e.g. 'cifar10', 'imagenet_resized/64x64').")
  data_dir = cfg_get(cfg, "data_dir")
  data_dir = os.path.expanduser(str(data_dir)) if data_dir else None
  return name, str(cfg_get(cfg, "split", "train")), data_dir


def _tfds_missing(name, split, data_dir, err) -> FileNotFoundError:
  where = data_dir or os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets")
  return FileNotFoundError(
      f"TFDS data set {name!r} (split {split!r}) is not prepared in array_record format "
      f"under data_dir={where!r} ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}). "
      f"Prepare it once, on a machine with tensorflow installed: `tfds build {name} "
      f"--file_format=array_record --data_dir={where}` and set --config.data.data_dir to "
      "that directory (or set --config.data.download=True to let TFDS prepare it)."
  )


class TfdsSource:
  """Wraps a TFDS data source: keeps only image + label, resizes to image_size."""

  def __init__(self, source, image_key: str, label_key: str | None, image_size: int):
    self.source = source
    self.image_key = image_key
    self.label_key = label_key
    self.image_size = int(image_size)

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    example = self.source[index]
    image = _as_hwc(example[self.image_key])
    if image.dtype != np.uint8:
      raise ValueError(f"TFDS feature {self.image_key!r} is {image.dtype}, expected uint8 images.")
    label = np.int32(example[self.label_key]) if self.label_key else np.int32(0)
    return {"image": resize_uint8(image, self.image_size), "label": label}

  def __repr__(self) -> str:
    return f"TfdsSource({self.source!r})"


def _tfds_features(cfg):
  """(image_key, label_key or None, native (H, W, C), num_classes, builder)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  name, _, data_dir = _tfds_args(cfg)
  builder = tfds.builder(name, data_dir=data_dir)
  features = builder.info.features
  image_key = str(cfg_get(cfg, "image_key", "image"))
  if image_key not in features:
    raise ValueError(f"TFDS data set {name!r} has no feature {image_key!r}; features: {list(features)}. Set data.image_key.")
  label_key = str(cfg_get(cfg, "label_key", "label"))
  num_classes = 0
  if label_key in features and hasattr(features[label_key], "num_classes"):
    num_classes = int(features[label_key].num_classes)
  else:
    label_key = None
  shape = tuple(features[image_key].shape)
  return image_key, label_key, shape, num_classes, builder


def _tfds_size_channels(cfg, shape) -> tuple[int, int]:
  native = shape[0] if shape and shape[0] is not None and shape[0] == shape[1] else None
  size = image_size_or(cfg, native)
  if size is None:
    raise ValueError(f"TFDS images have variable size {shape}: set data.image_size.")
  channels = shape[-1] if shape and shape[-1] is not None else 3
  return int(size), int(channels)


def _open_tfds(cfg):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  name, split, data_dir = _tfds_args(cfg)
  download = bool(cfg_get(cfg, "download", False))
  try:
    return tfds.data_source(name, split=split, data_dir=data_dir, download=download)
  except (NotImplementedError, FileNotFoundError, AssertionError) as err:
    raise _tfds_missing(name, split, data_dir, err) from err
  except ValueError as err:
    if "split" in str(err).lower():
      raise
    raise _tfds_missing(name, split, data_dir, err) from err


def tfds_source(cfg) -> TfdsSource:
  image_key, label_key, shape, _, _ = _tfds_features(cfg)
  size, _ = _tfds_size_channels(cfg, shape)
  return TfdsSource(_open_tfds(cfg), image_key, label_key, size)


def tfds_info(cfg) -> DatasetInfo:
  _, _, shape, num_classes, builder = _tfds_features(cfg)
  size, channels = _tfds_size_channels(cfg, shape)
  _, split, _ = _tfds_args(cfg)
  try:
    num_examples = int(builder.info.splits[split].num_examples)
  except (KeyError, ValueError, AssertionError):  # metadata not on disk (e.g. tfds.testing.mock_data)
    num_examples = 0
  if num_examples <= 0:
    num_examples = len(_open_tfds(cfg))
  return DatasetInfo(image_size=size, channels=channels, num_classes=num_classes, num_examples=num_examples)


# ----------------------------------------------------------------------------
# Dispatch.
# ----------------------------------------------------------------------------

def _tokenize_fn(cfg):
  """data.tokenizer: '' (captions are not tokenized), 'digits' (the built-in tokenizer of
  the digits captions) or a tokenizer folder (a diffusers pipeline's tokenizer/): the
  captions are tokenized once, as the text-to-image methods read them (input_ids)."""
  name = cfg_get(cfg, "tokenizer", "")
  if not name:
    return None
  from cm_jax.data import text_tokenizer  # pylint: disable=g-import-not-at-top
  tok = (text_tokenizer.builtin_tokenizer(name) if name in text_tokenizer.BUILTIN
         else text_tokenizer.load_tokenizer(name))
  return lambda captions: text_tokenizer.tokenize(tok, list(captions))


def caption_source(cfg):
  from cm_jax.data import captions  # pylint: disable=g-import-not-at-top
  return captions.make_caption_source(cfg, tokenize=_tokenize_fn(cfg))


def caption_info(cfg) -> DatasetInfo:
  from cm_jax.data import captions  # pylint: disable=g-import-not-at-top
  source = caption_source(cfg)
  labelled = cfg_get(cfg, "name") == "digits_captions"  # the only captioned set with classes
  return DatasetInfo(image_size=int(source.image_size), channels=3,
                     num_classes=len(captions.DIGIT_WORDS) if labelled else 0,
                     num_examples=len(source))


def latent_cache_source(cfg):
  """A latent cache (cm_jax.data.latent_cache) of data.image_size images."""
  from cm_jax.data import latent_cache  # pylint: disable=g-import-not-at-top
  return latent_cache.LatentCacheSource(_require_path(cfg, "a latent cache directory"),
                                        expected_resolution=image_size_or(cfg, None))


def latent_cache_info(cfg) -> DatasetInfo:
  source = latent_cache_source(cfg)
  return DatasetInfo(image_size=source.resolution, channels=int(cfg_get(cfg, "channels", 3)),
                     num_classes=int(source.meta.get("num_classes", 0)),
                     num_examples=len(source))


_CAPTION_NAMES = ("caption_folder", "webdataset", "tfds_captions", "digits_captions")
_SOURCES = {"digits": digits_source, "tfds": tfds_source, "npz": npz_source, "folder": folder_source,
            "latent_cache": latent_cache_source, **{n: caption_source for n in _CAPTION_NAMES}}
_INFOS = {"digits": digits_info, "tfds": tfds_info, "npz": npz_info, "folder": folder_info,
          "latent_cache": latent_cache_info, **{n: caption_info for n in _CAPTION_NAMES}}


def make_source(cfg):
  """The whole split as a random-access source (all processes; sharding is the pipeline's)."""
  return _SOURCES[check_name(cfg)](cfg)


def dataset_info(cfg) -> DatasetInfo:
  """Image size, channels, classes and size of a data set, reading as little as possible."""
  info = _INFOS[check_name(cfg)](cfg)
  logging.debug("dataset_info(%s) = %s", cfg_get(cfg, "name"), info)
  return info
