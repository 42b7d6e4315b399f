"""Image-caption sources (cm_jax.data.captions) on small data written by the tests.

Images are PNG (or lossless WebP) so every pixel can be checked against a numpy
reference of the centre crop and of PIL's 2x bilinear (antialiased) downscale, whose
separable filter is [1, 3, 3, 1] / 8, renormalised where it leaves the image.
"""

import io
import json
import logging
import os
import tarfile

import ml_collections
import numpy as np
import pytest
from PIL import Image

from cm_jax.data import captions as cap
from cm_jax.data import sources


def image(i, h, w):
  return np.random.default_rng(i).integers(0, 256, (h, w, 3), dtype=np.uint8)


def save(path, array, **kwargs):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(array).save(path, **kwargs)


def center_crop(x):
  h, w = x.shape[:2]
  s = min(h, w)
  return x[(h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]


def down2(x, axis):
  """PIL's bilinear 2x downscale along one axis, in float64."""
  out = []
  for j in range(x.shape[axis] // 2):
    taps = [(i, w) for i, w in zip(range(2 * j - 1, 2 * j + 3), (1, 3, 3, 1)) if 0 <= i < x.shape[axis]]
    out.append(sum(np.take(x, i, axis=axis) * w for i, w in taps) / sum(w for _, w in taps))
  return np.stack(out, axis=axis)


def reference(x, size):
  crop = center_crop(x).astype(np.float64)
  if crop.shape[0] == size:
    return crop
  assert crop.shape[0] == 2 * size
  return down2(down2(crop, 0), 1)


def assert_resized(got, original, size):
  assert got.dtype == np.uint8 and got.shape == (size, size, 3)
  ref = reference(original, size)
  if ref.shape[0] == original.shape[0] or ref.shape[0] == original.shape[1]:
    np.testing.assert_array_equal(got, ref.astype(np.uint8))  # a pure crop is exact
  else:
    np.testing.assert_allclose(got.astype(np.float64), ref, atol=1.0)  # PIL's fixed-point rounding


class CountingTokenizer:
  """list[str] -> int32 (N, 6): [length, first 5 code points, 0-padded]; counts its calls."""

  def __init__(self):
    self.calls = 0

  @staticmethod
  def ids(text):
    codes = [len(text)] + [ord(c) for c in text[:5]]
    return codes + [0] * (6 - len(codes))

  def __call__(self, texts):
    self.calls += 1
    return np.asarray([self.ids(t) for t in texts], np.int32)


def assert_one_line(err, *names):
  message = str(err.value)
  assert "\n" not in message, message
  for name in names:
    assert str(name) in message, (name, message)


# Folder layout shared by the .txt and metadata.jsonl tests: (relative path, image, caption).
FOLDER = [
    ("a/wide.png", image(0, 10, 16), "a wide picture"),
    ("a/sub/square.webp", image(1, 10, 10), "a square picture"),
    ("b/tall.png", image(2, 16, 10), "a tall picture"),
]


def write_images(root):
  for rel, array, _ in FOLDER:
    kwargs = {"lossless": True} if rel.endswith(".webp") else {}
    save(os.path.join(root, rel), array, **kwargs)


@pytest.fixture
def txt_folder(tmp_path):
  root = tmp_path / "txt"
  write_images(str(root))
  for rel, _, text in FOLDER:
    (root / rel).with_suffix(".txt").write_text(text + "\n")
  return root


@pytest.fixture
def metadata_folder(tmp_path):
  root = tmp_path / "meta"
  write_images(str(root))
  with open(root / "metadata.jsonl", "w") as f:
    for rel, _, text in reversed(FOLDER):  # line order must not matter
      f.write(json.dumps({"file_name": rel, "text": "ignored " + text, "prompt": text}) + "\n")
  return root


def test_txt_folder_crop_resize_and_captions(txt_folder):
  order = sorted(FOLDER, key=lambda e: e[0])
  for size in (10, 5):
    src = cap.CaptionFolderSource(str(txt_folder), size)
    assert len(src) == 3 and not src.metadata
    assert [os.path.relpath(f, txt_folder) for f in src.files] == [e[0] for e in order]
    for i, (_, array, text) in enumerate(order):
      item = src[i]
      assert set(item) == {"image", "caption"} and item["caption"] == text
      assert_resized(item["image"], array, size)


def test_metadata_folder_with_caption_column_and_one_tokenize_call(metadata_folder):
  tok = CountingTokenizer()
  src = cap.CaptionFolderSource(str(metadata_folder), 5, tokenize=tok, caption_column="prompt")
  assert tok.calls == 1 and src.metadata
  by_path = {rel: (array, text) for rel, array, text in FOLDER}
  for i in range(len(src)):
    item = src[i]
    array, text = by_path[os.path.relpath(src.files[i], metadata_folder)]
    assert item["caption"] == text
    assert item["input_ids"].dtype == np.int32
    np.testing.assert_array_equal(item["input_ids"], CountingTokenizer.ids(text))
    assert_resized(item["image"], array, 5)
  assert tok.calls == 1  # items read the ids tokenized at construction
  default = cap.CaptionFolderSource(str(metadata_folder), 5)
  assert default[0]["caption"].startswith("ignored ")  # caption_column defaults to "text"


def test_folder_errors_are_one_line_and_name_the_file(txt_folder, metadata_folder, tmp_path):
  os.remove(txt_folder / "b" / "tall.txt")
  with pytest.raises(FileNotFoundError) as err:
    cap.CaptionFolderSource(str(txt_folder), 5)
  assert_one_line(err, txt_folder / "b" / "tall.png", "tall.txt")

  extra = metadata_folder / "c" / "unlisted.png"
  save(str(extra), image(3, 4, 4))
  with pytest.raises(FileNotFoundError) as err:
    cap.CaptionFolderSource(str(metadata_folder), 5)
  assert_one_line(err, extra, "metadata.jsonl")
  os.remove(extra)

  with open(metadata_folder / "metadata.jsonl", "a") as f:
    f.write(json.dumps({"file_name": "gone/missing.png", "text": "x"}) + "\n")
  with pytest.raises(FileNotFoundError) as err:
    cap.CaptionFolderSource(str(metadata_folder), 5)
  assert_one_line(err, os.path.join(str(metadata_folder), "gone/missing.png"), "line 4")

  with pytest.raises(ValueError) as err:
    cap.CaptionFolderSource(str(txt_folder.parent / "meta"), 5, caption_column="nope")
  assert_one_line(err, "'nope'", "line 1")

  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(FileNotFoundError) as err:
    cap.CaptionFolderSource(str(empty), 5)
  assert_one_line(err, empty)


# ----------------------------------------------------------------------------
# Webdataset shards.
# ----------------------------------------------------------------------------


def png_bytes(array):
  buffer = io.BytesIO()
  Image.fromarray(array).save(buffer, format="PNG")
  return buffer.getvalue()


def jpeg_bytes(array):
  buffer = io.BytesIO()
  Image.fromarray(array).save(buffer, format="JPEG", quality=95)
  return buffer.getvalue()


def write_tar(path, members):
  with tarfile.open(path, "w") as tar:
    for name, data in members:
      info = tarfile.TarInfo(name)
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
  """Two shards: 4 complete samples (txt / json caption / jpeg / sub-directory key) and
  2 incomplete ones (no caption; no image)."""
  root = tmp_path_factory.mktemp("wds")
  images = {k: image(10 + i, 10, 16) for i, k in enumerate(["s000", "s001", "dir/s100", "s101"])}
  write_tar(str(root / "00000.tar"), [
      ("s000.png", png_bytes(images["s000"])), ("s000.txt", b"zero zero\n"),
      ("s001.png", png_bytes(images["s001"])), ("s001.json", json.dumps({"caption": "zero one"}).encode()),
      ("s002.png", png_bytes(image(99, 4, 4))),  # no caption: skipped
  ])
  write_tar(str(root / "00001.tar"), [
      ("dir/s100.png", png_bytes(images["dir/s100"])), ("dir/s100.txt", "one zero ü".encode()),
      ("s101.jpg", jpeg_bytes(images["s101"])), ("s101.json", json.dumps({"text": "one one", "w": 16}).encode()),
      ("s102.txt", b"no image"),  # no image: skipped
  ])
  expected = [("s000", "zero zero"), ("s001", "zero one"), ("dir/s100", "one zero ü"), ("s101", "one one")]
  return root, images, expected


def test_webdataset_random_access_and_skips(shards, caplog):
  root, images, expected = shards
  tok = CountingTokenizer()
  with caplog.at_level(logging.WARNING):
    src = cap.WebDatasetSource(str(root / "{00000..00001}.tar"), 5, tokenize=tok)
  warnings = [r for r in caplog.records if "skipped" in r.getMessage()]
  assert len(warnings) == 1 and "skipped 2 of 6" in warnings[0].getMessage()
  assert src.num_skipped == 2 and tok.calls == 1
  assert len(src) == 4 and src.keys == [k for k, _ in expected]
  for i in reversed(range(len(src))):  # random access: any order
    key, text = expected[i]
    item = src[i]
    assert item["caption"] == text
    np.testing.assert_array_equal(item["input_ids"], CountingTokenizer.ids(text))
    if key == "s101":  # JPEG: compare with PIL's own decode of the same bytes
      decoded = np.asarray(Image.open(io.BytesIO(jpeg_bytes(images[key]))).convert("RGB"))
      assert_resized(item["image"], decoded, 5)
    else:
      assert_resized(item["image"], images[key], 5)
  # Same samples from a glob, a list and a single shard.
  assert cap.WebDatasetSource(str(root / "*.tar"), 5).keys == src.keys
  listed = cap.WebDatasetSource([str(root / "00001.tar"), str(root / "00000.tar")], 5)
  assert listed.keys == src.keys[2:] + src.keys[:2]
  assert cap.expand_braces("d/{8..10}-{a,b}.tar") == ["d/8-a.tar", "d/8-b.tar", "d/9-a.tar", "d/9-b.tar", "d/10-a.tar", "d/10-b.tar"]
  assert cap.expand_braces("{0008..0010}") == ["0008", "0009", "0010"]


def test_webdataset_errors(shards, tmp_path):
  root, _, _ = shards
  with pytest.raises(FileNotFoundError) as err:
    cap.WebDatasetSource(str(root / "{00000..00002}.tar"), 5)
  assert_one_line(err, root / "00002.tar")
  with pytest.raises(FileNotFoundError) as err:
    cap.WebDatasetSource(str(tmp_path / "*.tar"), 5)
  assert_one_line(err, tmp_path / "*.tar")
  gz = tmp_path / "shard.tar.gz"
  with tarfile.open(gz, "w:gz") as tar:
    tar.add(root / "00000.tar", arcname="x.txt")
  with pytest.raises(ValueError) as err:
    cap.WebDatasetSource(str(gz), 5)
  assert_one_line(err, gz, "uncompressed")


# ----------------------------------------------------------------------------
# TFDS (array_record written by a tiny builder, read without TensorFlow).
# ----------------------------------------------------------------------------

TFDS_N = 5


def tfds_image(i):
  return image(20 + i, 10, 16) if i % 2 else image(20 + i, 10, 10)


def tiny_captions_builder(tfds):
  """A builder class (defined here so that only the TFDS tests need tensorflow_datasets)."""

  class CmJaxTinyCaptions(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """5 RGB images of varying shape with a Text caption and a COCO-style caption list."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(
          builder=self,
          features=tfds.features.FeaturesDict({
              "image": tfds.features.Image(shape=(None, None, 3)),
              "caption": tfds.features.Text(),
              "captions": tfds.features.Sequence({"text": tfds.features.Text()}),
          }),
      )

    def _split_generators(self, dl_manager):
      del dl_manager
      return {"train": self._generate_examples()}

    def _generate_examples(self):
      for i in range(TFDS_N):
        yield i, {"image": Image.fromarray(tfds_image(i)), "caption": f"picture {i} é",
                  "captions": {"text": [f"first {i}", f"second {i}"]}}

  return CmJaxTinyCaptions


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
  tfds = pytest.importorskip("tensorflow_datasets")
  data_dir = tmp_path_factory.mktemp("tfds")
  tiny_captions_builder(tfds)(data_dir=str(data_dir), file_format="array_record").download_and_prepare()
  return str(data_dir)


def test_tfds_captions(tfds_dir):
  tok = CountingTokenizer()
  src = cap.tfds_caption_source("cm_jax_tiny_captions", "train", tfds_dir, image_size=10, tokenize=tok)
  assert tok.calls == 1 and len(src) == TFDS_N
  ids = []  # TFDS stores examples in shuffled key order: recover i from the caption
  for k in range(TFDS_N):
    item = src[k]
    ids.append(int(item["caption"].split()[1]))
    assert item["caption"] == f"picture {ids[-1]} é"
    np.testing.assert_array_equal(item["input_ids"], CountingTokenizer.ids(item["caption"]))
    assert_resized(item["image"], tfds_image(ids[-1]), 10)
  assert sorted(ids) == list(range(TFDS_N))
  nested = cap.tfds_caption_source("cm_jax_tiny_captions", "train", tfds_dir, image_size=5,
                                   caption_key="captions/text")
  assert [nested[k]["caption"] for k in range(TFDS_N)] == [f"first {i}" for i in ids]
  odd = ids.index(1)  # a 10x16 image: crop + 2x downscale
  assert_resized(nested[odd]["image"], tfds_image(1), 5)
  with pytest.raises(KeyError, match="'captions/label'"):
    cap.tfds_caption_source("cm_jax_tiny_captions", "train", tfds_dir, image_size=5, caption_key="captions/label")
  with pytest.raises(FileNotFoundError, match="tfds build cm_jax_other"):
    cap.tfds_caption_source("cm_jax_other", "train", tfds_dir, image_size=5)


# ----------------------------------------------------------------------------
# Digits with captions.
# ----------------------------------------------------------------------------


def test_digit_captions():
  assert cap.DIGIT_WORDS[7] == "seven" and len(cap.DIGIT_WORDS) == 10
  assert cap.digit_caption(7) == "a handwritten digit seven"
  assert cap.digit_caption(np.int32(0)) == "a handwritten digit zero"
  with pytest.raises(ValueError, match="0..9"):
    cap.digit_caption(10)


def test_digits_caption_source():
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
  from cm_jax.eval import digits_classifier  # pylint: disable=g-import-not-at-top

  target = load_digits().target
  tok = CountingTokenizer()
  src = cap.DigitsCaptionSource(image_size=8, tokenize=tok)
  assert tok.calls == 1 and len(src) == 1797
  classifier_images, _ = digits_classifier.digits_uint8()
  for i in (0, 1, 7, 100, 1796):
    item = src[i]
    assert item["label"].dtype == np.int32 and item["label"] == target[i]
    assert item["caption"] == cap.digit_caption(target[i])
    np.testing.assert_array_equal(item["input_ids"], CountingTokenizer.ids(item["caption"]))
    assert item["image"].shape == (8, 8, 3) and item["image"].dtype == np.uint8
    for c in range(3):  # grey replicated; at 8 px exactly the classifier's inputs
      np.testing.assert_array_equal(item["image"][..., c], classifier_images[i, ..., 0])
  big = cap.DigitsCaptionSource(image_size=32)
  pixel = sources.digits_source({"image_size": 32})  # the project's pixel-space digits
  for i in (3, 500):
    np.testing.assert_array_equal(big[i]["image"][..., 1], np.round((pixel[i]["image"][..., 0] + 1) * 127.5))
    assert big[i]["label"] == target[i] and "input_ids" not in big[i]


# ----------------------------------------------------------------------------
# Dispatch and tokenizer checks.
# ----------------------------------------------------------------------------


def test_make_caption_source(txt_folder, shards, tfds_dir):
  def cfg(**fields):
    return ml_collections.ConfigDict(dict({"path": None, "image_size": 5}, **fields))

  folder = cap.make_caption_source(cfg(name="caption_folder", path=str(txt_folder)))
  assert isinstance(folder, cap.CaptionFolderSource) and folder.image_size == 5
  wds = cap.make_caption_source(cfg(name="webdataset", path=str(shards[0] / "*.tar")))
  assert isinstance(wds, cap.WebDatasetSource) and len(wds) == 4
  tf = cap.make_caption_source(cfg(name="tfds_captions", tfds_name="cm_jax_tiny_captions",
                                   data_dir=tfds_dir, split="train", caption_key="caption"))
  assert tf[2]["caption"].startswith("picture ") and tf.image_size == 5
  tok = CountingTokenizer()
  digits = cap.make_caption_source(cfg(name="digits_captions", image_size=0), tokenize=tok)
  assert digits.image_size == 32 and tok.calls == 1 and "input_ids" in digits[0]

  with pytest.raises(ValueError) as err:
    cap.make_caption_source(cfg(name="coco"))
  assert_one_line(err, "'coco'", *cap.NAMES)
  with pytest.raises(ValueError) as err:
    cap.make_caption_source(cfg(name="caption_folder", path=str(txt_folder), image_size=0))
  assert_one_line(err, "image_size")


def test_tokenizer_output_is_checked(txt_folder):
  with pytest.raises(ValueError) as err:
    cap.CaptionFolderSource(str(txt_folder), 5, tokenize=lambda texts: np.zeros((len(texts),), np.int32))
  assert_one_line(err, "(3, L)")
