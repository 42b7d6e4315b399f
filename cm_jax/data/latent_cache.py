"""Latent cache: a data set encoded once by a frozen autoencoder, read back by index.

Latent diffusion (Rombach et al. 2022) trains in the latent space of a frozen VAE; since
the encoder never changes, encoding every image once (as diffusers' and LCM's latent
training scripts recommend for small data sets) removes the encoder from the training
step. Layout of a cache directory:

    shard_00000.npz ...   latents float32 (n, h, w, c), index int64 (n,) = source indices,
                          + input_ids int32 (n, L) / label int32 (n,) / caption str (n,)
                          when the source items carry them
    cache.json            resolution, latent shape, count, shards, meta (e.g. the VAE
                          weights' SHA-256): written LAST, so its presence means complete
    cache.pending.json    the plan of a build in progress (what a rerun must match)

Every file is written to a temporary name and renamed (os.replace), so a crash never
leaves a half-written shard under a name that is read; a rerun keeps the shards that
load with the expected indices and encodes only the rest.
"""

from __future__ import annotations

import collections
import concurrent.futures
import json
import os
import threading
import zipfile
from typing import Any, Callable, Mapping

import numpy as np
from tqdm.auto import tqdm

FORMAT = "cm_jax.latent_cache"
VERSION = 1
CACHE_FILE = "cache.json"
PENDING_FILE = "cache.pending.json"
# Per-item keys copied from the source into the shards (besides the encoded image).
OPTIONAL_KEYS = ("input_ids", "label", "caption")
# What np.load raises on a missing, truncated or foreign .npz.
_UNREADABLE = (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile)


def shard_name(k: int) -> str:
  return f"shard_{k:05d}.npz"


def _jsonable(meta: Mapping[str, Any] | None) -> dict:
  """meta as it reads back from JSON (tuples -> lists), so comparisons are like for like."""
  return json.loads(json.dumps(dict(meta or {}), sort_keys=True))


def _meta_diff(cached: dict, wanted: dict, *, subset: bool) -> dict:
  keys = sorted(wanted) if subset else sorted(set(cached) | set(wanted))
  return {k: (cached.get(k, "<absent>"), wanted.get(k, "<absent>"))
          for k in keys if cached.get(k, "<absent>") != wanted.get(k, "<absent>")}


def _check_same(out_dir: str, what: str, record: dict, resolution: int | None,
                meta: dict | None, *, subset: bool) -> None:
  """One-line ValueError when a cache (or a build in progress) was made differently."""
  if resolution is not None and int(record["resolution"]) != int(resolution):
    raise ValueError(
        f"latent cache {out_dir} {what} resolution {record['resolution']}, not the requested "
        f"{resolution}: use another directory (or delete it to rebuild)."
    )
  if meta is not None:
    diff = _meta_diff(record.get("meta", {}), meta, subset=subset)
    if diff:
      shown = ", ".join(f"{k}: {a!r} (cached) vs {b!r} (requested)" for k, (a, b) in diff.items())
      raise ValueError(
          f"latent cache {out_dir} {what} other meta: {shown}; use another directory (or delete it to rebuild)."
      )


def _write_atomic(path: str, write: Callable[[Any], None]) -> None:
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "wb") as f:
    write(f)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def _write_json(path: str, record: dict) -> None:
  _write_atomic(path, lambda f: f.write((json.dumps(record, indent=2, sort_keys=True) + "\n").encode()))


def _read_json(path: str) -> dict:
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def _load_shard(path: str) -> dict[str, np.ndarray]:
  """Reads a whole shard into memory (no pickles: captions are stored as unicode arrays)."""
  with np.load(path, allow_pickle=False) as data:
    return {k: data[k] for k in data.files}


def _complete_shard_shape(path: str, lo: int, hi: int, keys: tuple[str, ...]) -> tuple | None:
  """Latent shape of a shard holding exactly source items lo..hi-1 with every key, else None."""
  try:
    data = _load_shard(path)
  except _UNREADABLE:
    return None  # missing, truncated or foreign: encode it again
  if "latents" not in data or not np.array_equal(data.get("index"), np.arange(lo, hi)):
    return None
  if not all(k in data and len(data[k]) == hi - lo for k in ("latents",) + keys):
    return None
  return tuple(data["latents"].shape[1:])


# ----------------------------------------------------------------------------
# Building.
# ----------------------------------------------------------------------------


def _stack_items(items: list[dict], keys: tuple[str, ...]) -> dict[str, np.ndarray]:
  out = {"image": np.stack([np.asarray(it["image"]) for it in items])}
  for k in keys:
    if k == "caption":
      out[k] = np.asarray([str(it[k]) for it in items], dtype=str)
    else:
      out[k] = np.stack([np.asarray(it[k]) for it in items]).astype(np.int32)
  return out


def _encode(encode_fn, images: np.ndarray, batch_size: int, lo: int) -> np.ndarray:
  """encode_fn on a full batch (the last one padded by repetition: one jit shape)."""
  n = len(images)
  if n < batch_size:
    images = np.concatenate([images, np.repeat(images[-1:], batch_size - n, axis=0)])
  latents = np.asarray(encode_fn(images), np.float32)
  if latents.ndim != 4 or latents.shape[0] != batch_size:
    raise ValueError(
        f"encode_fn must map ({batch_size}, S, S, 3) uint8 images to (B, h, w, c) latents; "
        f"got shape {latents.shape}."
    )
  latents = latents[:n]
  if not np.all(np.isfinite(latents)):
    raise ValueError(f"encode_fn returned non-finite latents for source items {lo}..{lo + n - 1}.")
  return latents


class _Reader:
  """Reads batches of source items with a thread pool, one batch ahead of the encoder."""

  def __init__(self, source, num_workers: int):
    self.source = source
    self.pool = concurrent.futures.ThreadPoolExecutor(max(1, num_workers)) if num_workers > 0 else None

  def submit(self, lo: int, hi: int):
    if self.pool is None:
      return [self.source[i] for i in range(lo, hi)]
    return [self.pool.submit(self.source.__getitem__, i) for i in range(lo, hi)]

  @staticmethod
  def result(pending) -> list[dict]:
    return [p if isinstance(p, dict) else p.result() for p in pending]

  def close(self) -> None:
    if self.pool is not None:
      self.pool.shutdown(wait=True, cancel_futures=True)


def _plan(source, *, shard_size: int, resolution: int, meta: dict) -> dict:
  first = source[0]
  image = np.asarray(first["image"])
  if image.dtype != np.uint8 or image.shape != (resolution, resolution, 3):
    raise ValueError(
        f"the source's images are {image.dtype} {image.shape}; the cache needs uint8 "
        f"({resolution}, {resolution}, 3) (resolution={resolution})."
    )
  count = len(source)
  return {
      "format": FORMAT, "version": VERSION, "resolution": int(resolution),
      "count": count, "shard_size": int(shard_size),
      "num_shards": (count + shard_size - 1) // shard_size,
      "keys": [k for k in OPTIONAL_KEYS if k in first],
      "meta": meta,
  }


def _check_pending(out_dir: str, pending: dict, plan: dict) -> None:
  _check_same(out_dir, "was started with", pending, plan["resolution"], plan["meta"], subset=False)
  for field in ("count", "shard_size", "keys"):
    if pending.get(field) != plan[field]:
      raise ValueError(
          f"latent cache {out_dir} was started with {field}={pending.get(field)!r}, now "
          f"{plan[field]!r}: rerun with the same source and shard_size, or delete it to rebuild."
      )


def build_latent_cache(source, encode_fn: Callable[[np.ndarray], Any], out_dir: str, *,
                       batch_size: int, shard_size: int, resolution: int,
                       latent_shape_hint: tuple[int, int, int] | None = None,
                       meta: Mapping[str, Any] | None = None, num_workers: int = 8,
                       progress: bool = True) -> dict:
  """Encodes every item of ``source`` once into ``out_dir``; returns cache.json's record.

  source: random access, items {'image': uint8 (S, S, 3), ...} with S == resolution
    (e.g. a cm_jax.data.captions source); 'input_ids' / 'label' / 'caption' are kept.
  encode_fn: uint8 (batch_size, S, S, 3) -> float32 latents (batch_size, h, w, c), e.g.
    a jitted VAE encode times the scaling factor; always called with full batches.
  shard_size: items per shard file (a multiple of batch_size wastes no encoder work).
  latent_shape_hint: (h, w, c) the encoder should produce; a mismatch is an error.
  meta: JSON-serialisable facts the latents depend on (VAE weight hash, scaling factor,
    mean vs sample of the posterior); a cache built with other meta is never reused.
  Resumable: a rerun after an interruption keeps the complete shards and encodes the rest.
  """
  out_dir = os.path.expanduser(str(out_dir))
  batch_size, shard_size, resolution = int(batch_size), int(shard_size), int(resolution)
  if batch_size <= 0 or shard_size <= 0:
    raise ValueError(f"batch_size and shard_size must be positive, got {batch_size}, {shard_size}.")
  if len(source) == 0:
    raise ValueError("cannot cache an empty source.")
  meta = _jsonable(meta)
  cache_path, pending_path = os.path.join(out_dir, CACHE_FILE), os.path.join(out_dir, PENDING_FILE)
  plan = _plan(source, shard_size=shard_size, resolution=resolution, meta=meta)
  if os.path.isfile(cache_path):
    record = _read_json(cache_path)
    _check_same(out_dir, "holds", record, resolution, meta, subset=False)
    for field in ("count", "keys"):
      if record.get(field) != plan[field]:
        raise ValueError(
            f"latent cache {out_dir} holds {field}={record.get(field)!r} but the source gives "
            f"{plan[field]!r}: use another directory (or delete it to rebuild)."
        )
    return record  # complete already: nothing to encode

  os.makedirs(out_dir, exist_ok=True)
  if os.path.isfile(pending_path):
    _check_pending(out_dir, _read_json(pending_path), plan)
  else:
    _write_json(pending_path, plan)
  for name in os.listdir(out_dir):  # temporaries of an interrupted run
    if ".tmp-" in name:
      os.remove(os.path.join(out_dir, name))

  count, keys = plan["count"], tuple(plan["keys"])
  bounds = [(k * shard_size, min(count, (k + 1) * shard_size)) for k in range(plan["num_shards"])]
  latent_shape = tuple(latent_shape_hint) if latent_shape_hint is not None else None
  done = []
  for k, (lo, hi) in enumerate(bounds):
    shape = _complete_shard_shape(os.path.join(out_dir, shard_name(k)), lo, hi, keys)
    if shape is not None:
      latent_shape = _same_shape(out_dir, latent_shape, shape, f"existing {shard_name(k)}")
    done.append(shape is not None)

  bar = tqdm(total=count, initial=sum(hi - lo for (lo, hi), d in zip(bounds, done) if d),
             desc="latent cache", unit="img", disable=not progress)
  reader = _Reader(source, num_workers)
  try:
    todo = [(lo2, min(hi, lo2 + batch_size)) for (lo, hi), d in zip(bounds, done) if not d
            for lo2 in range(lo, hi, batch_size)]
    pending = reader.submit(*todo[0]) if todo else None
    shard_parts: dict[int, list[dict]] = collections.defaultdict(list)
    for b, (lo, hi) in enumerate(todo):
      items = reader.result(pending)
      if b + 1 < len(todo):
        pending = reader.submit(*todo[b + 1])  # decode the next batch while this one encodes
      batch = _stack_items(items, keys)
      latents = _encode(encode_fn, batch.pop("image"), batch_size, lo)
      latent_shape = _same_shape(out_dir, latent_shape, tuple(latents.shape[1:]), "encode_fn output")
      batch["latents"] = latents
      batch["index"] = np.arange(lo, hi, dtype=np.int64)
      k = lo // shard_size
      shard_parts[k].append(batch)
      bar.update(hi - lo)
      if hi == bounds[k][1]:
        parts = shard_parts.pop(k)
        arrays = {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}
        _write_atomic(os.path.join(out_dir, shard_name(k)), lambda f, a=arrays: np.savez(f, **a))
  finally:
    reader.close()
    bar.close()

  record = dict(plan, latent_shape=list(latent_shape), latent_dtype="float32")
  _write_json(cache_path, record)  # last: from now on the cache is complete
  os.remove(pending_path)
  return record


def _same_shape(out_dir: str, known, shape: tuple, what: str) -> tuple:
  if known is not None and tuple(known) != tuple(shape):
    raise ValueError(
        f"latent cache {out_dir}: {what} has latent shape {tuple(shape)}, expected {tuple(known)}."
    )
  return tuple(shape)


# ----------------------------------------------------------------------------
# Reading.
# ----------------------------------------------------------------------------


def read_cache_record(out_dir: str, expected_resolution: int | None = None,
                      expected_meta: Mapping[str, Any] | None = None) -> dict:
  """cache.json of a complete cache, checked against what the caller expects."""
  out_dir = os.path.expanduser(str(out_dir))
  if not os.path.isdir(out_dir):
    raise FileNotFoundError(f"latent cache {out_dir} does not exist; run the caching command first.")
  path = os.path.join(out_dir, CACHE_FILE)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"latent cache {out_dir} is incomplete; rerun the caching command.")
  record = _read_json(path)
  if record.get("format") != FORMAT or record.get("version") != VERSION:
    raise ValueError(
        f"{path} is not a {FORMAT} v{VERSION} cache (format {record.get('format')!r}, "
        f"version {record.get('version')!r})."
    )
  _check_same(out_dir, "holds", record, expected_resolution,
              None if expected_meta is None else _jsonable(expected_meta), subset=True)
  return record


class LatentCacheSource:
  """Random access over a complete latent cache: items {'latent': float32 (h, w, c)} plus
  'input_ids' / 'label' / 'caption' when cached.

  Memory-light: a shard is loaded when an index in it is first read and the
  ``max_shards`` most recently used stay in memory (Grain reads shuffled indices, so
  size shards so that a few fit). ``expected_meta`` is checked key by key (a subset of
  the cached meta suffices).
  """

  def __init__(self, out_dir: str, expected_resolution: int | None = None,
               expected_meta: Mapping[str, Any] | None = None, max_shards: int = 4):
    self.out_dir = os.path.expanduser(str(out_dir))
    self.record = read_cache_record(self.out_dir, expected_resolution, expected_meta)
    self.resolution = int(self.record["resolution"])
    self.latent_shape = tuple(self.record["latent_shape"])
    self.meta = self.record["meta"]
    self.count = int(self.record["count"])
    self.shard_size = int(self.record["shard_size"])
    self.keys = tuple(self.record["keys"])
    self.max_shards = max(1, int(max_shards))
    for k in range(int(self.record["num_shards"])):
      if not os.path.isfile(os.path.join(self.out_dir, shard_name(k))):
        raise FileNotFoundError(
            f"latent cache {self.out_dir} is incomplete ({shard_name(k)} is missing); rerun the caching command."
        )
    self._init_cache()

  def _init_cache(self) -> None:
    self._shards: collections.OrderedDict[int, dict] = collections.OrderedDict()
    self._lock = threading.Lock()

  def __getstate__(self):  # Grain worker processes pickle sources: drop the lock and shards
    state = dict(self.__dict__)
    state.pop("_shards")
    state.pop("_lock")
    return state

  def __setstate__(self, state) -> None:
    self.__dict__.update(state)
    self._init_cache()

  def __len__(self) -> int:
    return self.count

  def _shard(self, k: int) -> dict[str, np.ndarray]:
    with self._lock:
      if k in self._shards:
        self._shards.move_to_end(k)
        return self._shards[k]
    path = os.path.join(self.out_dir, shard_name(k))
    lo, hi = k * self.shard_size, min(self.count, (k + 1) * self.shard_size)
    try:
      data = _load_shard(path)
    except _UNREADABLE as err:
      raise ValueError(
          f"latent cache shard {path} cannot be read ({' '.join(str(err).split())}); rerun the caching command."
      ) from None
    if not np.array_equal(data.get("index"), np.arange(lo, hi)):
      raise ValueError(f"latent cache shard {path} does not hold items {lo}..{hi - 1}; rebuild the cache.")
    with self._lock:
      self._shards[k] = data
      self._shards.move_to_end(k)
      while len(self._shards) > self.max_shards:
        self._shards.popitem(last=False)
    return data

  def __getitem__(self, index: int) -> dict[str, Any]:
    index = int(index)
    if index < 0:
      index += self.count
    if not 0 <= index < self.count:
      raise IndexError(f"index {index} out of range for a latent cache of {self.count} items.")
    k, offset = divmod(index, self.shard_size)
    data = self._shard(k)
    item = {"latent": data["latents"][offset]}
    for key in self.keys:
      item[key] = str(data[key][offset]) if key == "caption" else data[key][offset]
    return item

  def __repr__(self) -> str:
    return (f"LatentCacheSource({self.out_dir!r}, {self.count} items, latents {self.latent_shape}, "
            f"{self.resolution}px)")
