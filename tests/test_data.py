"""Tests for cm_jax.data: digits, npz and folder sources, sharding, resume, flips, errors."""

import json
import os

import ml_collections
import numpy as np
import pytest
from PIL import Image

from cm_jax import data


def make_cfg(**overrides):
  cfg = ml_collections.ConfigDict({
      "name": "digits",
      "tfds_name": None,
      "data_dir": None,
      "split": "train",
      "path": None,
      "image_size": 8,
      "random_flip": False,
      "num_classes": 0,
  })
  cfg.update(overrides)
  return cfg


def take(it, n):
  return [next(it) for _ in range(n)]


def assert_same_batches(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert set(x) == set(y) == {"image", "label"}
    np.testing.assert_array_equal(x["image"], y["image"])
    np.testing.assert_array_equal(x["label"], y["label"])


def write_indexed_npz(path, n, size=4, channels=3, labels=True):
  """Image i is a left-to-right ramp plus i (so flips are visible); label i identifies it."""
  ramp = np.arange(size, dtype=np.uint8)[None, :, None] * 10
  images = np.stack([np.broadcast_to(ramp + i, (size, size, channels)) for i in range(n)])
  arrays = {"arr_0": images.astype(np.uint8)}
  if labels:
    arrays["arr_1"] = np.arange(n, dtype=np.int64)
  np.savez(path, **arrays)
  return images


# ----------------------------------------------------------------------------- digits


@pytest.mark.parametrize("size", [8, 16, 32])
def test_digits_shapes_range_labels(size):
  cfg = make_cfg(image_size=size, num_classes=10)
  info = data.dataset_info(cfg)
  assert info == data.DatasetInfo(image_size=size, channels=1, num_classes=10, num_examples=1797)
  it = data.build_train_iterator(cfg, global_batch_size=64, seed=0)
  batch = next(it)
  assert batch["image"].shape == (64, size, size, 1)
  assert batch["image"].dtype == np.float32
  assert batch["label"].shape == (64,) and batch["label"].dtype == np.int32
  assert batch["image"].min() >= -1.0 and batch["image"].max() <= 1.0
  assert batch["image"].min() == -1.0  # digit backgrounds are 0 -> -1
  assert 0 <= batch["label"].min() and batch["label"].max() <= 9


def test_digits_values_are_sklearn_scaled():
  from sklearn.datasets import load_digits

  ref = load_digits().images.astype(np.float32) / 8.0 - 1.0  # 0..16 -> [-1, 1]
  it = data.build_train_iterator(make_cfg(), global_batch_size=16, seed=3)
  batch = next(it)
  flat_ref = ref.reshape(len(ref), -1)
  for image in batch["image"]:
    assert np.min(np.abs(flat_ref - image.reshape(1, -1)).max(axis=1)) == 0.0


def test_digits_epoch_covers_all_and_reshuffles():
  n = 1797
  it = data.build_train_iterator(make_cfg(), global_batch_size=n, seed=0)
  first, second = next(it), next(it)
  key = lambda b: [x.tobytes() for x in b["image"]]  # noqa: E731
  assert sorted(key(first)) == sorted(key(second))  # each epoch is the whole set
  assert key(first) != key(second)  # in a fresh order
  assert np.bincount(first["label"], minlength=10).sum() == n


def test_digits_reference_images():
  images, labels = data.load_reference_images(make_cfg(image_size=16), num=20, seed=0)
  assert images.shape == (20, 16, 16, 1) and images.dtype == np.uint8
  assert labels.shape == (20,) and labels.dtype == np.int32
  assert images.min() == 0 and images.max() == 255
  again, _ = data.load_reference_images(make_cfg(image_size=16), num=20, seed=0)
  np.testing.assert_array_equal(images, again)
  other, _ = data.load_reference_images(make_cfg(image_size=16), num=20, seed=1)
  assert not np.array_equal(images, other)
  all_images, _ = data.load_reference_images(make_cfg(), num=10**6, seed=0)
  assert len(all_images) == 1797  # capped at the data set size


# ----------------------------------------------------------------------------- determinism / resume


def test_deterministic_given_seed():
  cfg = make_cfg(random_flip=True)
  a = take(data.build_train_iterator(cfg, global_batch_size=32, seed=7), 3)
  b = take(data.build_train_iterator(cfg, global_batch_size=32, seed=7), 3)
  c = take(data.build_train_iterator(cfg, global_batch_size=32, seed=8), 3)
  assert_same_batches(a, b)
  assert not np.array_equal(a[0]["image"], c[0]["image"])


@pytest.mark.parametrize("flip", [False, True])
def test_resume_from_state(tmp_path, flip):
  path = tmp_path / "d.npz"
  write_indexed_npz(path, n=13)
  cfg = make_cfg(name="npz", path=str(path), image_size=4, random_flip=flip)
  it = data.build_train_iterator(cfg, global_batch_size=4, seed=1)
  take(it, 5)  # 20 examples: past the first epoch boundary (13)
  state = it.get_state()
  saved = json.dumps(state)  # JSON-serialisable
  expected = take(it, 6)

  fresh = data.build_train_iterator(cfg, global_batch_size=4, seed=1)
  fresh.set_state(json.loads(saved))
  assert_same_batches(take(fresh, 6), expected)

  # Restoring into the same iterator rewinds it.
  it.set_state(state)
  assert_same_batches(take(it, 6), expected)


def test_set_state_rejects_other_pipeline():
  it = data.build_train_iterator(make_cfg(), global_batch_size=8, seed=0)
  state = it.get_state()
  other = data.build_train_iterator(make_cfg(), global_batch_size=16, seed=0)
  with pytest.raises(ValueError, match="global_batch_size"):
    other.set_state(state)
  with pytest.raises(ValueError, match="grain"):
    other.set_state({"next_index": 3})


# ----------------------------------------------------------------------------- sharding


@pytest.mark.parametrize("n", [10, 11])
def test_process_shards_disjoint_and_cover(tmp_path, n):
  path = tmp_path / "d.npz"
  write_indexed_npz(path, n=n)
  cfg = make_cfg(name="npz", path=str(path), image_size=4)
  count = 2
  seen = []
  for index in range(count):
    it = data.build_train_iterator(
        cfg, global_batch_size=2, seed=0, process_index=index, process_count=count
    )
    shard_len = len(range(index, n, count))
    epochs = [
        np.concatenate([b["label"] for b in take(it, shard_len)]) for _ in range(2)
    ]
    assert len(set(epochs[0])) == shard_len  # one epoch = the shard, each once
    assert sorted(epochs[0]) == sorted(epochs[1])
    seen.append(set(epochs[0].tolist()))
  assert not seen[0] & seen[1]
  assert seen[0] | seen[1] == set(range(n))


def test_local_batch_size_and_divisibility():
  it = data.build_train_iterator(make_cfg(), global_batch_size=12, seed=0, process_index=2, process_count=3)
  assert next(it)["image"].shape == (4, 8, 8, 1)
  assert it.local_batch_size == 4
  with pytest.raises(ValueError, match="multiple of process_count"):
    data.build_train_iterator(make_cfg(), global_batch_size=10, seed=0, process_count=3)
  with pytest.raises(ValueError, match="process_index"):
    data.build_train_iterator(make_cfg(), global_batch_size=8, seed=0, process_index=2, process_count=2)


# ----------------------------------------------------------------------------- flips


def test_random_flip_deterministic_and_mixed(tmp_path):
  path = tmp_path / "d.npz"
  originals = write_indexed_npz(path, n=16, size=4)
  cfg = make_cfg(name="npz", path=str(path), image_size=4, random_flip=True)
  a = take(data.build_train_iterator(cfg, global_batch_size=16, seed=5), 4)
  b = take(data.build_train_iterator(cfg, global_batch_size=16, seed=5), 4)
  assert_same_batches(a, b)
  flipped = []
  for batch in a:
    for image, label in zip(batch["image"], batch["label"]):
      orig = originals[label].astype(np.float32) / 127.5 - 1.0
      if np.array_equal(image, orig):
        flipped.append(False)
      else:
        np.testing.assert_array_equal(image, orig[:, ::-1])
        flipped.append(True)
  assert 0.2 < np.mean(flipped) < 0.8


def test_flip_defaults():
  from cm_jax.data import sources

  assert not sources.default_random_flip(ml_collections.ConfigDict({"name": "digits"}))
  assert sources.default_random_flip(ml_collections.ConfigDict({"name": "tfds"}))
  assert sources.default_random_flip(make_cfg(name="npz", random_flip=None))


# ----------------------------------------------------------------------------- npz


def test_npz_source_and_resize(tmp_path):
  path = tmp_path / "samples.npz"
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (6, 8, 8, 3), dtype=np.uint8)
  np.savez(path, arr_0=images, arr_1=np.array([0, 1, 2, 0, 1, 2]))
  cfg = make_cfg(name="npz", path=str(path), image_size=8, num_classes=3)
  assert data.dataset_info(cfg) == data.DatasetInfo(8, 3, 3, 6)
  batch = next(data.build_train_iterator(cfg, global_batch_size=6, seed=0))
  assert batch["image"].shape == (6, 8, 8, 3)
  order = batch["label"]
  assert sorted(order.tolist()) == [0, 0, 1, 1, 2, 2]
  # Exact uint8 -> [-1, 1] scaling.
  matches = [
      any(np.array_equal(im, ref.astype(np.float32) / 127.5 - 1.0) for ref in images)
      for im in batch["image"]
  ]
  assert all(matches)

  cfg16 = make_cfg(name="npz", path=str(path), image_size=16)
  assert data.dataset_info(cfg16).image_size == 16
  assert next(data.build_train_iterator(cfg16, global_batch_size=2, seed=0))["image"].shape == (2, 16, 16, 3)
  ref, labels = data.load_reference_images(cfg, num=6, seed=0)
  assert ref.dtype == np.uint8 and ref.shape == (6, 8, 8, 3)
  for im, label in zip(ref, labels):
    assert any(np.array_equal(im, x) for x in images)


def test_npz_without_labels(tmp_path):
  path = tmp_path / "u.npz"
  write_indexed_npz(path, n=5, labels=False)
  cfg = make_cfg(name="npz", path=str(path), image_size=4)
  assert data.dataset_info(cfg).num_classes == 0
  batch = next(data.build_train_iterator(cfg, global_batch_size=5, seed=0))
  np.testing.assert_array_equal(batch["label"], np.zeros(5, np.int32))
  with pytest.raises(ValueError, match="no labels"):
    data.build_train_iterator(make_cfg(name="npz", path=str(path), num_classes=10), global_batch_size=5, seed=0)


# ----------------------------------------------------------------------------- folder


def _write_image(path, size, value, mode="RGB"):
  shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
  Image.fromarray(np.full(shape, value, np.uint8), mode=mode).save(path)


def test_folder_with_classes(tmp_path):
  for c, cls in enumerate(["cat", "dog"]):
    os.makedirs(tmp_path / cls)
    for i in range(3):
      ext = "png" if i else "jpg"
      _write_image(tmp_path / cls / f"{i}.{ext}", (12, 10), 40 * c + 10 * i)
  (tmp_path / "cat" / "notes.txt").write_text("not an image")
  cfg = make_cfg(name="folder", path=str(tmp_path), image_size=8, random_flip=True, num_classes=2)
  assert data.dataset_info(cfg) == data.DatasetInfo(8, 3, 2, 6)
  batch = next(data.build_train_iterator(cfg, global_batch_size=6, seed=0))
  assert batch["image"].shape == (6, 8, 8, 3)
  assert sorted(batch["label"].tolist()) == [0, 0, 0, 1, 1, 1]
  assert batch["image"].min() >= -1 and batch["image"].max() <= 1
  ref, labels = data.load_reference_images(cfg, num=4, seed=0)
  assert ref.shape == (4, 8, 8, 3) and ref.dtype == np.uint8


def test_flat_grey_folder(tmp_path):
  for i in range(4):
    _write_image(tmp_path / f"{i}.png", (8, 8), 60 * i, mode="L")
  cfg = make_cfg(name="folder", path=str(tmp_path), image_size=None)
  assert data.dataset_info(cfg) == data.DatasetInfo(8, 1, 0, 4)
  batch = next(data.build_train_iterator(cfg, global_batch_size=4, seed=0))
  assert batch["image"].shape == (4, 8, 8, 1)
  np.testing.assert_array_equal(batch["label"], np.zeros(4, np.int32))
  values = sorted(float(x[0, 0, 0]) for x in batch["image"])
  np.testing.assert_allclose(values, [60 * i / 127.5 - 1 for i in range(4)], atol=1e-6)


# ----------------------------------------------------------------------------- errors


def test_unknown_name():
  with pytest.raises(ValueError, match="digits.*tfds.*npz.*folder"):
    data.dataset_info(make_cfg(name="mnist"))
  with pytest.raises(ValueError, match="one of"):
    data.build_train_iterator(make_cfg(name="mnist"), global_batch_size=8, seed=0)


def test_missing_files(tmp_path):
  with pytest.raises(FileNotFoundError, match="data.path"):
    data.dataset_info(make_cfg(name="npz", path=str(tmp_path / "nope.npz")))
  with pytest.raises(FileNotFoundError, match="data.path"):
    data.build_train_iterator(make_cfg(name="folder", path=str(tmp_path / "nope")), global_batch_size=2, seed=0)
  with pytest.raises(FileNotFoundError, match="No images"):
    data.dataset_info(make_cfg(name="folder", path=str(tmp_path)))
  with pytest.raises(ValueError, match="needs data.path"):
    data.dataset_info(make_cfg(name="npz"))


def test_bad_npz_and_label_overflow(tmp_path):
  path = tmp_path / "f.npz"
  np.savez(path, arr_0=np.zeros((2, 4, 4, 3), np.float32))
  with pytest.raises(ValueError, match="uint8"):
    data.dataset_info(make_cfg(name="npz", path=str(path)))
  with pytest.raises(ValueError, match="overflow"):
    data.build_train_iterator(make_cfg(num_classes=5), global_batch_size=8, seed=0)
