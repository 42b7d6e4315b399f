"""Grain training pipeline: per-process shard, per-epoch shuffle, seeded flips, exact resume.

    source (whole split, random access)
      [process_index::process_count]     disjoint strided shard per process
      .shuffle(seed)  .repeat()          a fresh permutation every epoch (seed folded with epoch)
      .random_map(flip, seed)            flip decided by (seed, element index): deterministic
      .to_iter_dataset(ReadOptions)      reader threads (0 for in-memory sources)
      .batch(B / process_count)          batches may straddle epochs: no example is dropped
      .map(to [-1, 1] float32)
      [.mp_prefetch(worker_count)]       optional worker processes

Everything before ``to_iter_dataset`` is index-addressed, so the iterator's state is
one integer (the next element index): ``get_state()`` / ``set_state()`` resume exactly.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import grain
import numpy as np

from cm_jax.data import sources
from cm_jax.data.sources import DatasetInfo, cfg_get
from cm_jax.utils import images as images_lib

STATE_VERSION = 1


class RandomFlip(grain.transforms.RandomMap):
  """Horizontal flip with probability 1/2, from Grain's per-element seeded rng."""

  def random_map(self, element, rng: np.random.Generator):
    if rng.random() < 0.5:
      element = dict(element, image=np.ascontiguousarray(element["image"][:, ::-1]))
    return element


def to_model_range(images: np.ndarray) -> np.ndarray:
  """uint8 [0, 255] -> float32 x / 127.5 - 1; float sources are already in [-1, 1]."""
  if images.dtype == np.uint8:
    return images.astype(np.float32) / np.float32(127.5) - np.float32(1.0)
  return images.astype(np.float32, copy=False)


# Inverse of ``to_model_range`` for float images; uint8 passes through (cm_jax.utils.images).
to_uint8 = images_lib.to_uint8


class FinalizeBatch(grain.transforms.Map):
  """Model-ready arrays: images in [-1, 1], int32 labels and caption token ids, float32
  latents (a latent cache); anything else a source carries (caption strings) is dropped."""

  def map(self, batch):
    out = {}
    if "image" in batch:
      out["image"] = to_model_range(batch["image"])
    if "latent" in batch:
      out["latent"] = np.asarray(batch["latent"], np.float32)
    for key in ("label", "input_ids"):
      if key in batch:
        out[key] = np.asarray(batch[key], np.int32)
    return out


def _seeds(seed: int, process_index: int) -> tuple[int, int]:
  """(shuffle seed, flip seed) in [0, 2**32), distinct per process."""
  state = np.random.SeedSequence([int(seed) % 2**32, int(process_index)]).generate_state(2)
  return int(state[0]), int(state[1])


def _read_options(cfg, name: str) -> grain.ReadOptions:
  in_memory = name in ("digits", "npz")
  num_threads = int(cfg_get(cfg, "num_threads", 0 if in_memory else 16))
  buffer = int(cfg_get(cfg, "prefetch_buffer_size", 500))
  return grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=buffer)


def _ensure_absl_flags_parsed() -> None:
  """Grain's worker processes read absl flags; outside an absl app, take their defaults."""
  from absl import flags  # pylint: disable=g-import-not-at-top

  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def _check_labels(cfg, info: DatasetInfo) -> None:
  wanted = int(cfg_get(cfg, "num_classes", 0))
  if wanted <= 0:
    return
  if info.num_classes == 0:
    raise ValueError(
        f"data.num_classes={wanted} asks for a class-conditional model but the data set "
        f"({cfg_get(cfg, 'name')!r}) has no labels: set data.num_classes=0 or use labelled data."
    )
  if wanted < info.num_classes:
    raise ValueError(
        f"data.num_classes={wanted} but the data set has {info.num_classes} classes: labels "
        f"would overflow the class embedding."
    )


class TrainIterator:
  """Infinite iterator of this process' batches, with JSON-serialisable state.

  ``next(it)`` -> {'image': float32 (B_local, H, W, C) in [-1, 1], 'label': int32 (B_local,)}.
  """

  def __init__(self, iterator, *, fingerprint: dict[str, Any], info: DatasetInfo, local_batch_size: int):
    self._iterator = iterator
    self._fingerprint = fingerprint
    self.info = info
    self.local_batch_size = local_batch_size

  def __iter__(self) -> "TrainIterator":
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    batch = next(self._iterator)
    if self._fingerprint.get("worker_count"):
      # Own the memory: worker outputs arrive as shared-memory arrays.
      batch = {k: np.array(v, copy=True, subok=False) for k, v in batch.items()}
    return batch

  def get_state(self) -> dict[str, Any]:
    grain_state = copy.deepcopy(self._iterator.get_state())
    return {"version": STATE_VERSION, **self._fingerprint, "grain": grain_state}

  def set_state(self, state: dict[str, Any]) -> None:
    state = dict(state)
    grain_state = state.pop("grain", None)
    if grain_state is None:
      raise ValueError(f"Not a TrainIterator state (no 'grain' entry): {sorted(state)}")
    state.pop("version", None)
    mismatched = {
        k: (state.get(k), v) for k, v in self._fingerprint.items() if state.get(k) != v
    }
    if mismatched:
      raise ValueError(
          "The data iterator state was saved by a different pipeline and cannot resume this "
          f"one exactly; (saved, now): {mismatched}"
      )
    self._iterator.set_state(grain_state)

  def close(self) -> None:
    """Stops reader threads / worker processes (call before exit when worker_count > 0)."""
    close = getattr(self._iterator, "close", None)
    if close is not None:
      close()

  def __enter__(self) -> "TrainIterator":
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def __repr__(self) -> str:
    return f"TrainIterator({self._fingerprint})"


def build_train_iterator(
    data_cfg,
    *,
    global_batch_size: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
) -> TrainIterator:
  """This process' infinite, shuffled, resumable stream of training batches.

  Each process reads the disjoint strided shard ``source[process_index::process_count]``
  and yields ``global_batch_size // process_count`` examples per batch.
  """
  name = sources.check_name(data_cfg)
  global_batch_size, process_count, process_index = int(global_batch_size), int(process_count), int(process_index)
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(f"Need 0 <= process_index < process_count, got {process_index}, {process_count}.")
  if global_batch_size < 1 or global_batch_size % process_count:
    raise ValueError(
        f"global_batch_size={global_batch_size} must be a positive multiple of "
        f"process_count={process_count} (each process loads an equal share)."
    )
  local_batch_size = global_batch_size // process_count

  source = sources.make_source(data_cfg)
  info = sources.dataset_info(data_cfg)
  _check_labels(data_cfg, info)
  if len(source) < process_count:
    raise ValueError(f"{len(source)} examples cannot be sharded over {process_count} processes.")

  shuffle_seed, flip_seed = _seeds(seed, process_index)
  ds = grain.MapDataset.source(source)[process_index::process_count]
  ds = ds.shuffle(seed=shuffle_seed).repeat()
  flip = sources.default_random_flip(data_cfg)
  if flip:
    ds = ds.random_map(RandomFlip(), seed=flip_seed)
  it_ds = ds.to_iter_dataset(_read_options(data_cfg, name))
  it_ds = it_ds.batch(local_batch_size, drop_remainder=True).map(FinalizeBatch())
  workers = int(cfg_get(data_cfg, "worker_count", 0))
  if workers > 0:
    _ensure_absl_flags_parsed()
    it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))

  fingerprint = {
      "name": name,
      "num_examples": len(source),
      "seed": int(seed),
      "global_batch_size": global_batch_size,
      "process_index": process_index,
      "process_count": process_count,
      "random_flip": flip,
      "worker_count": workers,
  }
  logging.info("Train pipeline: %s, %s, local batch %d", info, fingerprint, local_batch_size)
  return TrainIterator(iter(it_ds), fingerprint=fingerprint, info=info, local_batch_size=local_batch_size)


def load_reference_images(data_cfg, num: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """``min(num, N)`` distinct training images, uint8 NHWC at ``image_size``, and int32 labels.

  A seeded random subset of the whole split (same on every process), no flips: the
  real images for FID reference statistics and side-by-side grids.
  """
  name = sources.check_name(data_cfg)
  source = sources.make_source(data_cfg)
  n = len(source)
  num = int(num)
  if num < 1:
    raise ValueError(f"num must be positive, got {num}.")
  if num > n:
    logging.warning("Asked for %d reference images but %s has only %d: returning %d.", num, name, n, n)
    num = n
  indices = np.random.default_rng(int(seed)).permutation(n)[:num]
  # Index-addressed read of the chosen examples (threaded for file-backed sources).
  ds = grain.MapDataset.range(num).map(lambda i: source[int(indices[i])])
  it = iter(ds.to_iter_dataset(_read_options(data_cfg, name)))
  images = np.empty((num,) + tuple(np.shape(source[0]["image"])), np.uint8)
  labels = np.empty((num,), np.int32)
  for i, example in enumerate(it):
    images[i] = to_uint8(np.asarray(example["image"]))
    labels[i] = example["label"]
  return images, labels
