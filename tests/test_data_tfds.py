"""TFDS path of cm_jax.data, without TensorFlow and without downloads.

Two ways, both TF-free in tensorflow-datasets 4.9.x:
  * a real tiny TFDS data set written to tmp (array_record + dataset_info.json) by a
    GeneratorBasedBuilder whose images are given as PIL images (encoding numpy images
    would need TensorFlow; PIL-encoded PNG bytes do not), read back by
    ``tfds.data_source`` exactly as CIFAR-10 / ImageNet64 are read in training;
  * ``tfds.testing.mock_data`` for the real 'cifar10' metadata (random examples).
"""

import json

import ml_collections
import numpy as np
import pytest
from PIL import Image

tfds = pytest.importorskip("tensorflow_datasets")

from cm_jax import data  # pylint: disable=g-import-not-at-top

N = 12
SIZE = 8


class CmJaxTinyImages(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """12 RGB 8x8 images; image i is a horizontal ramp + 8 i, label i % 3."""

  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(SIZE, SIZE, 3)),
            "label": tfds.features.ClassLabel(num_classes=3),
        }),
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"train": self._generate_examples()}

  def _generate_examples(self):
    for i in range(N):
      yield i, {"image": Image.fromarray(tiny_image(i)), "label": i % 3}


def tiny_image(i):
  ramp = np.arange(SIZE, dtype=np.uint8)[None, :, None] * 12
  return np.ascontiguousarray(np.broadcast_to(ramp + 8 * i, (SIZE, SIZE, 3)))


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
  data_dir = tmp_path_factory.mktemp("tfds")
  CmJaxTinyImages(data_dir=str(data_dir), file_format="array_record").download_and_prepare()
  return str(data_dir)


def tfds_cfg(data_dir, **overrides):
  cfg = ml_collections.ConfigDict({
      "name": "tfds",
      "tfds_name": "cm_jax_tiny_images",
      "data_dir": data_dir,
      "split": "train",
      "path": None,
      "image_size": SIZE,
      "random_flip": False,
      "num_classes": 3,
      # Small read-ahead: the default (16 threads, 500 examples) decodes far ahead.
      "num_threads": 2,
      "prefetch_buffer_size": 16,
  })
  cfg.update(overrides)
  return cfg


def image_id(image):
  """Recovers i from a [-1, 1] batch image (unflipped: left column is 8 i)."""
  return int(round((float(image[0, 0, 0]) + 1.0) * 127.5)) // 8


def test_tiny_tfds_info_and_batches(tiny_dir):
  cfg = tfds_cfg(tiny_dir)
  assert data.dataset_info(cfg) == data.DatasetInfo(SIZE, 3, 3, N)
  it = data.build_train_iterator(cfg, global_batch_size=N, seed=0)
  batch = next(it)
  assert batch["image"].shape == (N, SIZE, SIZE, 3) and batch["image"].dtype == np.float32
  assert batch["label"].dtype == np.int32
  ids = [image_id(x) for x in batch["image"]]
  assert sorted(ids) == list(range(N))  # one epoch, every example once
  for x, i, label in zip(batch["image"], ids, batch["label"]):
    np.testing.assert_array_equal(x, tiny_image(i).astype(np.float32) / 127.5 - 1.0)
    assert label == i % 3


def test_tiny_tfds_resize_flip_resume_shards(tiny_dir):
  cfg = tfds_cfg(tiny_dir, image_size=16, random_flip=True)
  assert data.dataset_info(cfg).image_size == 16
  it = data.build_train_iterator(cfg, global_batch_size=4, seed=2)
  assert next(it)["image"].shape == (4, 16, 16, 3)
  state = json.loads(json.dumps(it.get_state()))
  expected = [next(it) for _ in range(4)]
  again = data.build_train_iterator(cfg, global_batch_size=4, seed=2)
  again.set_state(state)
  for want, got in zip(expected, (next(again) for _ in range(4))):
    np.testing.assert_array_equal(want["image"], got["image"])
    np.testing.assert_array_equal(want["label"], got["label"])

  seen = []
  for index in range(2):
    shard_it = data.build_train_iterator(
        tfds_cfg(tiny_dir), global_batch_size=2 * N // 2, seed=0, process_index=index, process_count=2
    )
    seen.append({image_id(x) for x in next(shard_it)["image"]})
  assert not seen[0] & seen[1] and seen[0] | seen[1] == set(range(N))


def test_tiny_tfds_reference_images(tiny_dir):
  images, labels = data.load_reference_images(tfds_cfg(tiny_dir), num=5, seed=0)
  assert images.shape == (5, SIZE, SIZE, 3) and images.dtype == np.uint8
  for im, label in zip(images, labels):
    i = int(im[0, 0, 0]) // 8
    np.testing.assert_array_equal(im, tiny_image(i))
    assert label == i % 3


def test_unprepared_tfds_is_a_clear_error(tmp_path):
  cfg = tfds_cfg(str(tmp_path), tfds_name="cifar10", image_size=32)
  with pytest.raises(FileNotFoundError, match="tfds build cifar10"):
    data.build_train_iterator(cfg, global_batch_size=4, seed=0)
  with pytest.raises(FileNotFoundError, match="array_record"):
    data.dataset_info(cfg)


def test_cifar10_with_mock_data(tmp_path):
  cfg = tfds_cfg(str(tmp_path), tfds_name="cifar10", image_size=32, random_flip=True, num_classes=10)
  with tfds.testing.mock_data(num_examples=20):
    info = data.dataset_info(cfg)
    assert info == data.DatasetInfo(32, 3, 10, 20)
    batch = next(data.build_train_iterator(cfg, global_batch_size=8, seed=0, process_index=1, process_count=2))
  assert batch["image"].shape == (4, 32, 32, 3)
  assert batch["image"].min() >= -1 and batch["image"].max() <= 1
  assert batch["label"].max() < 10
