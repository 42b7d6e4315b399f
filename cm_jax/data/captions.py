"""Random-access image-caption sources for latent text-to-image training.

Every source is a sequence (``__len__`` + ``__getitem__``, read by Grain like the
sources of ``sources.py``) whose items are

    {'image': uint8 (S, S, 3), 'caption': str}        + 'input_ids': int32 (L,) with a tokenizer
                                                       + 'label': int32 ()   (digits only)

with the image centre-cropped to a square and resized (bilinear) to the training
resolution S by ``sources.resize_uint8``. Four layouts:

  * ``CaptionFolderSource``: a folder of images with ``metadata.jsonl`` at its root
    (``{"file_name": "a/b.png", "text": "..."}`` per line: the layout of Hugging Face's
    ``imagefolder`` and of diffusers' ``train_text_to_image.py``) or a ``.txt`` caption
    beside each image (the kohya / LoRA-trainer convention);
  * ``WebDatasetSource``: webdataset ``.tar`` shards (samples grouped by key, the member
    name up to the first dot of its base name), indexed once and then read by offset;
  * ``tfds_caption_source``: a TFDS data set in array_record format (``tfds.data_source``,
    no TensorFlow), e.g. ``coco_captions`` with ``caption_key='captions/text'``;
  * ``DigitsCaptionSource``: scikit-learn's digits with captions "a handwritten digit
    seven", the project's embedded, download-free data for latent-model tests.

A ``tokenize`` callable (``list[str] -> int (N, L)``, e.g. a CLIP tokenizer padded to 77)
is called ONCE, at construction, on the distinct captions: tokenizing inside Grain's
reader threads would redo the same work every epoch.
"""

from __future__ import annotations

import glob
import io
import json
import logging
import os
import re
import tarfile
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image, ImageOps

from cm_jax.data import sources
from cm_jax.data.sources import cfg_get, image_size_or, resize_uint8
from cm_jax.utils.images import to_uint8

Tokenize = Callable[[list], Any]

NAMES = ("caption_folder", "webdataset", "tfds_captions", "digits_captions")
CAPTION_IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")
METADATA_FILE = "metadata.jsonl"
# Preference order when a webdataset sample holds several images / captions.
WDS_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
WDS_JSON_CAPTION_KEYS = ("caption", "text")
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


# ----------------------------------------------------------------------------
# Shared helpers.
# ----------------------------------------------------------------------------


def digit_caption(label: int) -> str:
  """0..9 -> 'a handwritten digit zero' .. 'a handwritten digit nine'."""
  label = int(label)
  if not 0 <= label < len(DIGIT_WORDS):
    raise ValueError(f"digit label must be in 0..9, got {label}.")
  return f"a handwritten digit {DIGIT_WORDS[label]}"


def tokenize_once(tokenize: Tokenize, captions: Sequence[str]) -> np.ndarray:
  """int32 (len(captions), L): one call of ``tokenize`` on the distinct captions."""
  first: dict[str, int] = {}
  inverse = np.asarray([first.setdefault(c, len(first)) for c in captions], np.int64)
  ids = np.asarray(tokenize(list(first)))
  if ids.ndim != 2 or ids.shape[0] != len(first) or not np.issubdtype(ids.dtype, np.integer):
    raise ValueError(
        f"tokenize(list of {len(first)} captions) must return integer ids of shape "
        f"({len(first)}, L); got {ids.dtype} {ids.shape}."
    )
  return ids.astype(np.int32)[inverse]


def _check_size(image_size) -> int:
  size = int(image_size)
  if size <= 0:
    raise ValueError(f"image_size must be positive, got {size}.")
  return size


def _decode_rgb(fp, size: int) -> np.ndarray:
  """Image file / file object -> uint8 (size, size, 3), EXIF rotation applied."""
  with Image.open(fp) as im:
    # Phone JPEGs store rotation in EXIF; diffusers' training scripts apply it too.
    im = ImageOps.exif_transpose(im).convert("RGB")
    image = np.asarray(im, np.uint8)
  return resize_uint8(image, size)


def _one_line(text: str) -> str:
  return " ".join(str(text).split())


class _CaptionedSource:
  """Items from ``_image(index)`` + in-memory captions (+ ids tokenized once)."""

  image_size: int
  captions: list[str]
  input_ids: np.ndarray | None

  def _set_captions(self, captions: list[str], tokenize: Tokenize | None) -> None:
    self.captions = captions
    self.input_ids = None if tokenize is None else tokenize_once(tokenize, captions)

  def __len__(self) -> int:
    return len(self.captions)

  def _image(self, index: int) -> np.ndarray:
    raise NotImplementedError

  def __getitem__(self, index: int) -> dict[str, Any]:
    index = _check_index(index, len(self))
    item = {"image": self._image(index), "caption": self.captions[index]}
    if self.input_ids is not None:
      item["input_ids"] = self.input_ids[index]
    return item


def _check_index(index, length: int) -> int:
  index = int(index)
  if index < 0:
    index += length
  if not 0 <= index < length:
    raise IndexError(f"index {index} out of range for a source of {length} items.")
  return index


# ----------------------------------------------------------------------------
# Folder of images with metadata.jsonl or .txt captions.
# ----------------------------------------------------------------------------


def _scan_images(root: str) -> list[str]:
  """Relative POSIX paths of every image under root, sorted, hidden entries skipped."""
  found = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
    for f in sorted(filenames):
      if f.lower().endswith(CAPTION_IMAGE_EXTENSIONS) and not f.startswith("."):
        rel = os.path.relpath(os.path.join(dirpath, f), root)
        found.append(rel.replace(os.sep, "/"))
  return sorted(found)  # by whole relative path, independent of the walk order


def _first_caption(value, where: str) -> str:
  # A list of captions (several per image, as in COCO): the first, so items are deterministic.
  if isinstance(value, (list, tuple)) and value:
    value = value[0]
  if not isinstance(value, str):
    raise ValueError(f"{where}: the caption must be a string, got {type(value).__name__}.")
  return value.strip()


def _read_metadata(root: str, caption_column: str) -> dict[str, str]:
  """{normalised relative path: caption} from root/metadata.jsonl."""
  path = os.path.join(root, METADATA_FILE)
  captions: dict[str, str] = {}
  with open(path, encoding="utf-8") as f:
    for number, line in enumerate(f, 1):
      if not line.strip():
        continue
      where = f"{path} line {number}"
      try:
        record = json.loads(line)
      except json.JSONDecodeError as err:
        raise ValueError(f"{where} is not JSON ({err.msg}).") from None
      if not isinstance(record, dict) or "file_name" not in record or caption_column not in record:
        keys = sorted(record) if isinstance(record, dict) else type(record).__name__
        raise ValueError(
            f"{where} needs 'file_name' and the caption column {caption_column!r}; has {keys}."
        )
      rel = os.path.normpath(str(record["file_name"])).replace(os.sep, "/")
      if not os.path.isfile(os.path.join(root, rel)):
        raise FileNotFoundError(f"{where} names {os.path.join(root, rel)}, which does not exist.")
      if rel in captions:
        raise ValueError(f"{where} repeats file_name {rel!r}.")
      captions[rel] = _first_caption(record[caption_column], where)
  return captions


class CaptionFolderSource(_CaptionedSource):
  """A folder of images (recursive) captioned by ``metadata.jsonl`` or ``.txt`` files.

  With ``root/metadata.jsonl`` every image needs a line there (``caption_column`` names
  the caption field, "text" by default); without it, ``a/b.png`` is captioned by
  ``a/b.txt``. Items are in sorted path order (``self.files``).
  """

  def __init__(self, root: str, image_size: int, tokenize: Tokenize | None = None,
               caption_column: str = "text"):
    root = os.path.expanduser(str(root))
    if not os.path.isdir(root):
      raise FileNotFoundError(f"caption folder {root} does not exist or is not a directory.")
    self.root = root
    self.image_size = _check_size(image_size)
    rel_files = _scan_images(root)
    if not rel_files:
      raise FileNotFoundError(
          f"No images ({', '.join(CAPTION_IMAGE_EXTENSIONS)}) found under {root}."
      )
    self.metadata = os.path.isfile(os.path.join(root, METADATA_FILE))
    if self.metadata:
      captions = self._metadata_captions(rel_files, caption_column)
    else:
      captions = [self._txt_caption(rel) for rel in rel_files]
    self.files = [os.path.join(root, rel) for rel in rel_files]
    self._set_captions(captions, tokenize)

  def _metadata_captions(self, rel_files: list[str], caption_column: str) -> list[str]:
    table = _read_metadata(self.root, caption_column)
    for rel in rel_files:
      if rel not in table:
        raise FileNotFoundError(
            f"image {os.path.join(self.root, rel)} has no caption: no line with "
            f"file_name {rel!r} in {os.path.join(self.root, METADATA_FILE)}."
        )
    return [table[rel] for rel in rel_files]

  def _txt_caption(self, rel: str) -> str:
    image = os.path.join(self.root, rel)
    txt = os.path.splitext(image)[0] + ".txt"
    if not os.path.isfile(txt):
      raise FileNotFoundError(
          f"image {image} has no caption: expected {txt} beside it (or a "
          f"{METADATA_FILE} at {self.root})."
      )
    with open(txt, encoding="utf-8") as f:
      return f.read().strip()

  def _image(self, index: int) -> np.ndarray:
    return _decode_rgb(self.files[index], self.image_size)

  def __repr__(self) -> str:
    how = METADATA_FILE if self.metadata else ".txt captions"
    return f"CaptionFolderSource({self.root!r}, {len(self)} images, {how}, {self.image_size}px)"


# ----------------------------------------------------------------------------
# Webdataset .tar shards.
# ----------------------------------------------------------------------------

_BRACE = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"^(\d+)\.\.(\d+)$")
# webdataset's own split: key = directory + base name up to its first dot; ext = the rest.
_KEY_EXT = re.compile(r"^((?:.*/|)[^./][^/]*?)\.([^/]*)$")


def expand_braces(pattern: str) -> list[str]:
  """'a/{00..02}.tar' -> ['a/00.tar', 'a/01.tar', 'a/02.tar']; '{x,y}' -> alternatives."""
  match = _BRACE.search(pattern)
  if match is None:
    return [pattern]
  body = match.group(1)
  numeric = _RANGE.match(body)
  if numeric:
    lo, hi = numeric.groups()
    # Zero padding as in braceexpand: a leading zero pads to the longer bound's width.
    width = max(len(lo), len(hi)) if (lo.startswith("0") or hi.startswith("0")) else 0
    step = 1 if int(hi) >= int(lo) else -1
    choices = [str(i).zfill(width) for i in range(int(lo), int(hi) + step, step)]
  else:
    choices = body.split(",")
  head, tail = pattern[: match.start()], pattern[match.end():]
  return [path for c in choices for path in expand_braces(head + c + tail)]


def resolve_shards(shards: str | Sequence[str]) -> list[str]:
  """Paths (or brace / glob patterns) -> the existing shard files, in order."""
  patterns = [shards] if isinstance(shards, (str, os.PathLike)) else list(shards)
  paths: list[str] = []
  for pattern in patterns:
    for path in expand_braces(os.path.expanduser(str(pattern))):
      if any(c in path for c in "*?["):
        matches = sorted(glob.glob(path))
        if not matches:
          raise FileNotFoundError(f"webdataset pattern {path} matches no file.")
        paths.extend(matches)
      elif not os.path.isfile(path):
        raise FileNotFoundError(f"webdataset shard {path} does not exist.")
      else:
        paths.append(path)
  if not paths:
    raise FileNotFoundError(f"no webdataset shards in {shards!r}.")
  return paths


def _wds_caption(members: dict[str, bytes]) -> str | None:
  if "txt" in members:
    return members["txt"].decode("utf-8", errors="replace").strip()
  if "json" in members:
    try:
      record = json.loads(members["json"])
    except (json.JSONDecodeError, UnicodeDecodeError):
      return None
    if isinstance(record, dict):
      for key in WDS_JSON_CAPTION_KEYS:
        if isinstance(record.get(key), str):
          return record[key].strip()
  return None


def _index_shard(path: str):
  """Yields (key, image (ext, offset, size) or None, caption or None) per sample."""
  samples: dict[str, dict[str, Any]] = {}
  try:
    # 'r:' = uncompressed only: reading by offset later needs the raw bytes in the file.
    with tarfile.open(path, mode="r:") as tar:
      for member in tar:
        match = _KEY_EXT.match(member.name) if member.isfile() else None
        if match is None:
          continue
        key, ext = match.group(1), match.group(2).lower()
        entry = samples.setdefault(key, {"images": {}, "text": {}})
        if ext in WDS_IMAGE_EXTS:
          entry["images"][ext] = (member.offset_data, member.size)
        elif ext in ("txt", "json"):
          entry["text"][ext] = tar.extractfile(member).read()
  except tarfile.ReadError as err:
    raise ValueError(f"webdataset shard {path} is not an uncompressed tar ({_one_line(err)}).") from None
  for key, entry in samples.items():
    ext = next((e for e in WDS_IMAGE_EXTS if e in entry["images"]), None)
    image = None if ext is None else (ext,) + entry["images"][ext]
    yield key, image, _wds_caption(entry["text"])


class WebDatasetSource(_CaptionedSource):
  """Random access over webdataset ``.tar`` shards, indexed once at construction.

  Sample key = member name up to the first dot of its base name (webdataset's rule);
  image from the jpg/jpeg/png/webp member, caption from txt or json's "caption"/"text".
  Samples lacking either are skipped and counted (``num_skipped``, logged once).
  """

  def __init__(self, shards: str | Sequence[str], image_size: int, tokenize: Tokenize | None = None):
    self.image_size = _check_size(image_size)
    self.shards = resolve_shards(shards)
    shard_ids, offsets, sizes, exts, keys, captions = [], [], [], [], [], []
    self.num_skipped = 0
    for shard_id, path in enumerate(self.shards):
      for key, image, caption in _index_shard(path):
        if image is None or caption is None:
          self.num_skipped += 1
          continue
        ext, offset, size = image
        shard_ids.append(shard_id)
        offsets.append(offset)
        sizes.append(size)
        exts.append(ext)
        keys.append(key)
        captions.append(caption)
    if self.num_skipped:
      logging.warning(
          "webdataset: skipped %d of %d samples without an image (%s) or a caption "
          "(txt, or json with %s) in %d shards.", self.num_skipped,
          self.num_skipped + len(keys), "/".join(WDS_IMAGE_EXTS),
          " or ".join(WDS_JSON_CAPTION_KEYS), len(self.shards),
      )
    if not keys:
      raise ValueError(f"no sample with both an image and a caption in {len(self.shards)} "
                       f"webdataset shards ({self.shards[0]}, ...).")
    self.shard_ids = np.asarray(shard_ids, np.int32)
    self.offsets = np.asarray(offsets, np.int64)
    self.sizes = np.asarray(sizes, np.int64)
    self.exts = exts
    self.keys = keys
    self._set_captions(captions, tokenize)

  def _image(self, index: int) -> np.ndarray:
    path = self.shards[self.shard_ids[index]]
    # Plain seek + read: no tarfile state, so reader threads never share a handle.
    with open(path, "rb") as f:
      f.seek(int(self.offsets[index]))
      data = f.read(int(self.sizes[index]))
    try:
      return _decode_rgb(io.BytesIO(data), self.image_size)
    except (OSError, ValueError) as err:
      raise ValueError(
          f"{path}: cannot decode {self.keys[index]}.{self.exts[index]} ({_one_line(err)})."
      ) from None

  def __repr__(self) -> str:
    return (f"WebDatasetSource({len(self.shards)} shards, {len(self)} samples, "
            f"{self.num_skipped} skipped, {self.image_size}px)")


# ----------------------------------------------------------------------------
# TFDS (array_record via tfds.data_source, no TensorFlow).
# ----------------------------------------------------------------------------


def _feature(example, key: str, name: str):
  value = example
  for part in key.split("/"):
    if not isinstance(value, dict) or part not in value:
      have = sorted(value) if isinstance(value, dict) else type(value).__name__
      raise KeyError(f"TFDS data set {name!r} has no feature {key!r} (at {part!r}: {have}).")
    value = value[part]
  return value


def _text(value, where: str) -> str:
  """A TFDS Text feature (bytes; a list / array of them for Sequence features) -> str."""
  if isinstance(value, (list, tuple, np.ndarray)) and not isinstance(value, (bytes, str)):
    if len(value) == 0:
      raise ValueError(f"{where}: empty caption list.")
    value = value[0]  # several captions per image (COCO): the first, deterministically
  if isinstance(value, np.ndarray):
    value = value.item()
  if isinstance(value, bytes):
    return value.decode("utf-8").strip()
  if isinstance(value, str):
    return value.strip()
  raise ValueError(f"{where}: expected a text feature, got {type(value).__name__}.")


class TfdsCaptionSource:
  """Image + caption from a ``tfds.data_source``; captions are read at construction
  (images skipped, so no decoding) only when a tokenizer needs them all."""

  def __init__(self, source, name: str, image_key: str, caption_key: str, image_size: int,
               captions: list[str] | None, input_ids: np.ndarray | None):
    self.source = source
    self.name = name
    self.image_key = image_key
    self.caption_key = caption_key
    self.image_size = _check_size(image_size)
    self.captions = captions
    self.input_ids = input_ids

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, index: int) -> dict[str, Any]:
    index = _check_index(index, len(self))
    example = self.source[index]
    image = np.asarray(_feature(example, self.image_key, self.name))
    if image.dtype != np.uint8 or image.ndim not in (2, 3):
      raise ValueError(f"TFDS feature {self.image_key!r} is {image.dtype} {image.shape}, expected uint8 images.")
    if image.ndim == 2:
      image = image[..., None]
    if image.shape[-1] == 1:  # grey -> RGB, so 3-channel autoencoders apply
      image = np.repeat(image, 3, axis=-1)
    elif image.shape[-1] == 4:
      image = image[..., :3]
    if self.captions is not None:
      caption = self.captions[index]
    else:
      caption = _text(_feature(example, self.caption_key, self.name), f"{self.name}[{index}]")
    item = {"image": resize_uint8(image, self.image_size), "caption": caption}
    if self.input_ids is not None:
      item["input_ids"] = self.input_ids[index]
    return item

  def __repr__(self) -> str:
    return f"TfdsCaptionSource({self.name!r}, {len(self)} examples, {self.image_size}px)"


def _all_tfds_captions(name, split, data_dir, image_key, caption_key) -> list[str]:
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  # SkipDecoding leaves the image as encoded bytes: scanning captions decodes no image.
  raw = tfds.data_source(name, split=split, data_dir=data_dir, download=False,
                         decoders={image_key: tfds.decode.SkipDecoding()})
  captions = []
  chunk = 1024
  for start in range(0, len(raw), chunk):
    indices = list(range(start, min(start + chunk, len(raw))))
    for i, example in zip(indices, raw.__getitems__(indices)):
      captions.append(_text(_feature(example, caption_key, name), f"{name}[{i}]"))
  return captions


def tfds_caption_source(name: str, split: str = "train", data_dir: str | None = None, *,
                        image_size: int, image_key: str = "image", caption_key: str = "caption",
                        tokenize: Tokenize | None = None, download: bool = False) -> TfdsCaptionSource:
  """A prepared TFDS data set (array_record) as a caption source.

  ``caption_key`` may be a path into nested features, e.g. 'captions/text' for
  ``coco_captions``; of several captions per image the first is used.
  """
  data_dir = os.path.expanduser(str(data_dir)) if data_dir else None
  cfg = {"name": "tfds", "tfds_name": name, "split": split, "data_dir": data_dir, "download": download}
  source = sources._open_tfds(cfg)  # pylint: disable=protected-access  (its one-line "prepare it" error)
  if len(source) == 0:
    raise ValueError(f"TFDS data set {name!r} split {split!r} is empty.")
  _feature(source[0], caption_key, name)  # a wrong key fails here, in one line, not in a reader thread
  _feature(source[0], image_key, name)
  captions = input_ids = None
  if tokenize is not None:
    captions = _all_tfds_captions(name, split, data_dir, image_key, caption_key)
    input_ids = tokenize_once(tokenize, captions)
  return TfdsCaptionSource(source, name, image_key, caption_key, image_size, captions, input_ids)


# ----------------------------------------------------------------------------
# Digits with captions.
# ----------------------------------------------------------------------------


class DigitsCaptionSource(_CaptionedSource):
  """scikit-learn's 1,797 digits, grey replicated to RGB, captioned by their class.

  Upscaled exactly like the project's pixel-space digits (``sources.digits_source``:
  bilinear on the [-1, 1] floats, then rounded to uint8 as ``to_uint8`` does), so latent
  and pixel models see the same images, and bilinear strokes are smooth like the natural
  images SD's autoencoder was trained on (nearest would give 4x4 blocks at 32 px). At
  image_size 8 the images are exactly the digits classifier's inputs.
  """

  def __init__(self, image_size: int = 32, tokenize: Tokenize | None = None):
    self.image_size = _check_size(image_size)
    digits = sources.digits_source({"image_size": self.image_size})
    self.images = to_uint8(digits.images)  # (N, S, S, 1): replicated per item, saves 2/3 memory
    self.labels = np.asarray(digits.labels, np.int32)
    self._set_captions([digit_caption(y) for y in self.labels], tokenize)

  def _image(self, index: int) -> np.ndarray:
    return np.repeat(self.images[index], 3, axis=-1)

  def __getitem__(self, index: int) -> dict[str, Any]:
    item = super().__getitem__(index)
    item["label"] = self.labels[_check_index(index, len(self))]
    return item

  def __repr__(self) -> str:
    return f"DigitsCaptionSource({len(self)} digits, {self.image_size}px)"


# ----------------------------------------------------------------------------
# Dispatch from a config.
# ----------------------------------------------------------------------------


def _required_size(cfg, name: str) -> int:
  size = image_size_or(cfg, None)
  if size is None:
    raise ValueError(f"data.name={name!r} needs data.image_size (the training resolution).")
  return size


def make_caption_source(cfg, tokenize: Tokenize | None = None):
  """The caption source named by ``cfg.name`` (one of NAMES), configured from cfg's fields.

  caption_folder: path, image_size, caption_column ("text").  webdataset: path (a shard,
  list, or brace / glob pattern), image_size.  tfds_captions: tfds_name, split, data_dir,
  image_key, caption_key, image_size, download.  digits_captions: image_size (32).
  """
  name = cfg_get(cfg, "name")
  if name not in NAMES:
    raise ValueError(f"Unknown caption data set name {name!r}: data.name must be one of {NAMES}.")
  if name == "digits_captions":
    return DigitsCaptionSource(image_size_or(cfg, 32), tokenize=tokenize)
  size = _required_size(cfg, name)
  if name == "caption_folder":
    root = sources._require_path(cfg, "a folder of images with metadata.jsonl or .txt captions")  # pylint: disable=protected-access
    return CaptionFolderSource(root, size, tokenize=tokenize,
                               caption_column=str(cfg_get(cfg, "caption_column", "text")))
  if name == "webdataset":
    shards = cfg_get(cfg, "path")
    if not shards:
      raise ValueError("data.name='webdataset' needs data.path (shards, e.g. 'data/{00000..00009}.tar').")
    return WebDatasetSource(shards if isinstance(shards, str) else list(shards), size, tokenize=tokenize)
  tfds_name = cfg_get(cfg, "tfds_name")
  if not tfds_name:
    raise ValueError("data.name='tfds_captions' needs data.tfds_name (e.g. 'coco_captions').")
  return tfds_caption_source(
      str(tfds_name), str(cfg_get(cfg, "split", "train")), cfg_get(cfg, "data_dir"),
      image_size=size, image_key=str(cfg_get(cfg, "image_key", "image")),
      caption_key=str(cfg_get(cfg, "caption_key", "caption")), tokenize=tokenize,
      download=bool(cfg_get(cfg, "download", False)),
  )
