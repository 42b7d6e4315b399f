"""Latent cache (cm_jax.data.latent_cache) with a numpy "encoder": 4x4 average pooling.

23 captioned digits at 16 px, batches of 4, shards of 8 -> shards of 8, 8, 7 items and
2 encoder calls per shard (the last batch padded to full size).
"""

import json
import os
import pickle

import grain
import numpy as np
import pytest

from cm_jax.data import captions as cap
from cm_jax.data import latent_cache as lc

N, SIZE, BATCH, SHARD = 23, 16, 4, 8
META = {"vae_sha256": "abc", "scaling_factor": 0.18215}


class Subset:
  def __init__(self, source, n):
    self.source, self.n = source, n

  def __len__(self):
    return self.n

  def __getitem__(self, i):
    return self.source[i]


def tokenize(texts):
  return np.asarray([[len(t), ord(t[-1])] for t in texts], np.int32)


@pytest.fixture(scope="module")
def source():
  return Subset(cap.DigitsCaptionSource(image_size=SIZE, tokenize=tokenize), N)


def pool4(images):
  b, s = images.shape[0], images.shape[1]
  x = images.astype(np.float32).reshape(b, s // 4, 4, s // 4, 4, 3).mean(axis=(2, 4))
  return x / np.float32(127.5) - np.float32(1.0)


class Encoder:
  """pool4, counting calls; raises on call number `fail_at` (1-based) to simulate a crash."""

  def __init__(self, fail_at=None):
    self.calls, self.fail_at, self.shapes = 0, fail_at, []

  def __call__(self, images):
    self.calls += 1
    self.shapes.append(images.shape)
    if self.calls == self.fail_at:
      raise KeyboardInterrupt("simulated interruption")
    return pool4(images)


def build(source, out_dir, encoder, **overrides):
  kwargs = dict(batch_size=BATCH, shard_size=SHARD, resolution=SIZE, meta=META, num_workers=2, progress=False)
  kwargs.update(overrides)
  return lc.build_latent_cache(source, encoder, str(out_dir), **kwargs)


def shard_arrays(out_dir):
  out = {}
  for name in sorted(os.listdir(out_dir)):
    if name.endswith(".npz"):
      with np.load(os.path.join(out_dir, name)) as data:
        out[name] = {k: data[k] for k in data.files}
  return out


def assert_one_line(err, *names):
  message = str(err.value)
  assert "\n" not in message, message
  for name in names:
    assert str(name) in message, (name, message)


@pytest.fixture(scope="module")
def full_cache(source, tmp_path_factory):
  out = tmp_path_factory.mktemp("full") / "cache"
  encoder = Encoder()
  record = build(source, out, encoder, latent_shape_hint=(4, 4, 3))
  return out, record, encoder


def test_cache_values_and_layout(source, full_cache):
  out, record, encoder = full_cache
  assert encoder.calls == 6 and set(encoder.shapes) == {(BATCH, SIZE, SIZE, 3)}
  assert sorted(os.listdir(out)) == ["cache.json", "shard_00000.npz", "shard_00001.npz", "shard_00002.npz"]
  on_disk = json.loads((out / "cache.json").read_text())
  assert on_disk == record
  assert (record["resolution"], record["count"], record["num_shards"], record["latent_shape"]) == (SIZE, N, 3, [4, 4, 3])
  assert record["meta"] == META and record["keys"] == ["input_ids", "label", "caption"]
  assert [len(a["latents"]) for a in shard_arrays(out).values()] == [8, 8, 7]

  cached = lc.LatentCacheSource(str(out), expected_resolution=SIZE, expected_meta={"vae_sha256": "abc"})
  assert len(cached) == N
  for i in range(N):
    item, want = cached[i], source[i]
    assert set(item) == {"latent", "input_ids", "label", "caption"}
    assert item["latent"].dtype == np.float32
    np.testing.assert_allclose(item["latent"], pool4(want["image"][None])[0], rtol=0, atol=1e-6)
    np.testing.assert_array_equal(item["input_ids"], want["input_ids"])
    assert item["label"] == want["label"] and item["caption"] == want["caption"]
  np.testing.assert_array_equal(cached[-1]["latent"], cached[N - 1]["latent"])
  with pytest.raises(IndexError):
    cached[N]

  # A finished cache is not encoded again.
  again = Encoder()
  assert build(source, out, again) == record and again.calls == 0


def test_interrupted_build_resumes_and_matches(source, full_cache, tmp_path):
  out = tmp_path / "cache"
  crashing = Encoder(fail_at=4)  # shard 0 (calls 1, 2) written, shard 1 half done
  with pytest.raises(KeyboardInterrupt):
    build(source, out, crashing)
  assert sorted(os.listdir(out)) == ["cache.pending.json", "shard_00000.npz"]
  with pytest.raises(FileNotFoundError) as err:
    lc.LatentCacheSource(str(out))
  assert_one_line(err, f"latent cache {out} is incomplete; rerun the caching command")

  (out / "shard_00001.npz.tmp-999").write_bytes(b"half")  # a temp left by a killed run
  rerun = Encoder()
  record = build(source, out, rerun)
  assert rerun.calls == 4  # shards 1 and 2 only: shard 0 was kept
  assert record == full_cache[1]
  assert sorted(os.listdir(out)) == sorted(os.listdir(full_cache[0]))
  want, got = shard_arrays(full_cache[0]), shard_arrays(out)
  for name in want:
    assert set(got[name]) == set(want[name])
    for key in want[name]:
      np.testing.assert_array_equal(got[name][key], want[name][key])


def test_truncated_shard_is_encoded_again(source, tmp_path):
  out = tmp_path / "cache"
  with pytest.raises(KeyboardInterrupt):
    build(source, out, Encoder(fail_at=5))  # shards 0 and 1 written
  data = (out / "shard_00001.npz").read_bytes()
  (out / "shard_00001.npz").write_bytes(data[: len(data) // 2])
  rerun = Encoder()
  build(source, out, rerun)
  assert rerun.calls == 4  # shard 1 (corrupt) and shard 2
  cached = lc.LatentCacheSource(str(out))
  np.testing.assert_allclose(cached[9]["latent"], pool4(source[9]["image"][None])[0], atol=1e-6)


def test_mismatches_are_one_line_errors(source, full_cache, tmp_path):
  out = full_cache[0]
  big = Subset(cap.DigitsCaptionSource(image_size=32), 3)
  with pytest.raises(ValueError) as err:
    build(big, out, Encoder(), resolution=32)
  assert_one_line(err, out, "16", "32")
  with pytest.raises(ValueError) as err:
    build(source, out, Encoder(), meta=dict(META, vae_sha256="def"))
  assert_one_line(err, out, "'abc'", "'def'")
  untokenized = Subset(cap.DigitsCaptionSource(image_size=SIZE), N)  # no input_ids
  with pytest.raises(ValueError) as err:
    build(untokenized, out, Encoder())
  assert_one_line(err, out, "keys=['input_ids', 'label', 'caption']", "['label', 'caption']")
  with pytest.raises(ValueError) as err:
    lc.LatentCacheSource(str(out), expected_resolution=32)
  assert_one_line(err, out, "16", "32")
  with pytest.raises(ValueError) as err:
    lc.LatentCacheSource(str(out), expected_meta={"vae_sha256": "def"})
  assert_one_line(err, out, "'abc'", "'def'")
  with pytest.raises(FileNotFoundError) as err:
    lc.LatentCacheSource(str(tmp_path / "nowhere"))
  assert_one_line(err, tmp_path / "nowhere")

  # A build in progress is resumed only with the same resolution and meta.
  partial = tmp_path / "partial"
  with pytest.raises(KeyboardInterrupt):
    build(source, partial, Encoder(fail_at=3))
  with pytest.raises(ValueError) as err:
    build(source, partial, Encoder(), meta={"vae_sha256": "def"})
  assert_one_line(err, partial, "'abc'", "'def'")
  with pytest.raises(ValueError) as err:
    build(source, partial, Encoder(), shard_size=4)
  assert_one_line(err, partial, "shard_size=8")

  with pytest.raises(ValueError) as err:
    build(source, tmp_path / "hint", Encoder(), latent_shape_hint=(2, 2, 4))
  assert_one_line(err, "(4, 4, 3)", "(2, 2, 4)")
  with pytest.raises(ValueError) as err:
    build(big, tmp_path / "size", Encoder())  # 32 px images, resolution 16
  assert_one_line(err, "(32, 32, 3)", "resolution=16")
  with pytest.raises(ValueError) as err:
    build(source, tmp_path / "nan", lambda x: np.full(pool4(x).shape, np.nan, np.float32))
  assert_one_line(err, "non-finite", "0..3")


def test_lru_pickle_and_grain(full_cache, source):
  out = full_cache[0]
  cached = lc.LatentCacheSource(str(out), max_shards=1)
  for i in (0, 9, 17, 1):
    cached[i]
    assert len(cached._shards) == 1  # pylint: disable=protected-access
  clone = pickle.loads(pickle.dumps(cached))  # Grain's worker processes pickle sources
  np.testing.assert_array_equal(clone[20]["latent"], cached[20]["latent"])
  batch = next(iter(grain.MapDataset.source(cached).batch(5)))
  assert batch["latent"].shape == (5, 4, 4, 3)
  np.testing.assert_array_equal(batch["label"], [source[i]["label"] for i in range(5)])
