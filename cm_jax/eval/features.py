"""Detectors (image -> features, logits) and batched, mesh-sharded feature extraction.

A detector is a pure function of (params, uint8 NHWC batch) returning
{'features': (B, D), 'logits': (B, K)} plus its identity (`fingerprint`, recorded in every
result so a number always says which network measured it):

  inception  the FID Inception-v3 (cm_jax.eval.inception): 2048-d pool features, IS logits
  digits     the project's small digits classifier (cm_jax.eval.digits_classifier)

`extract` runs a detector over an image array in fixed-size batches (the last one padded,
so there is one compile), split over the mesh's data axis when a mesh is given, and
accumulates the statistics in float64 on the host as the batches come back.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import jax
import numpy as np
from tqdm.auto import tqdm

from cm_jax.eval.stats import FeatureStats, to_host
from cm_jax.utils import sharding as sharding_lib


@dataclasses.dataclass
class Detector:
  name: str
  apply: Callable[[Any, jax.Array], dict]   # (params, uint8 NHWC) -> {'features', 'logits'}
  params: Any
  feature_dim: int
  num_classes: int
  fingerprint: dict
  batch_size: int = 200


def inception_detector(weights_path: str, *, preprocess: str = "tf1",
                       allow_nonstandard: bool = False, batch_size: int = 200) -> Detector:
  from cm_jax.eval import inception  # pylint: disable=g-import-not-at-top
  expected = None if allow_nonstandard else inception.PYTORCH_FID_WEIGHTS_SHA256
  weights = inception.load_weights(weights_path, expected_source_sha256=expected)
  model = inception.InceptionV3(preprocess)

  def apply(params, images):
    out = model.apply({"params": params}, images)
    # IS as the original code: softmax of the logits without the fc bias.
    return {"features": out["pool"], "logits": out["logits_unbiased"]}

  fingerprint = dict(name="inception", preprocess=preprocess, **weights.fingerprint())
  return Detector("inception", apply, weights.params, inception.FEATURE_DIM,
                  inception.NUM_LOGITS, fingerprint, batch_size)


def digits_detector(cache_dir: Optional[str] = None, batch_size: int = 500) -> Detector:
  from cm_jax.eval import digits_classifier  # pylint: disable=g-import-not-at-top
  clf = digits_classifier.load_or_train(cache_dir=cache_dir)
  return Detector("digits", digits_classifier.detector_apply, clf.params,
                  digits_classifier.FEATURE_DIM, digits_classifier.NUM_CLASSES,
                  clf.fingerprint(), batch_size)


def build_detector(name: str, **kwargs) -> Detector:
  if name == "inception":
    if not kwargs.get("weights_path"):
      raise ValueError("the inception detector needs its weights file (--inception_weights)")
    return inception_detector(**kwargs)
  if name == "digits":
    return digits_detector(**kwargs)
  raise ValueError(f"unknown detector {name!r}; choose 'inception' or 'digits'")


def make_apply_fn(detector: Detector, mesh=None):
  if mesh is None:
    return jax.jit(detector.apply)
  split = sharding_lib.batch_sharding(mesh)
  return jax.jit(detector.apply, in_shardings=(sharding_lib.replicated(mesh), split),
                 out_shardings=split)


def extract(detector: Detector, images: np.ndarray, *, batch_size: Optional[int] = None,
            mesh=None, keep_features: bool = True, max_keep: Optional[int] = None,
            progress: bool = False, desc: str = "features",
            apply_fn=None) -> tuple[FeatureStats, np.ndarray]:
  """(statistics of the features, logits (N, K)) of uint8 NHWC `images`."""
  images = np.asarray(images)
  if images.dtype != np.uint8 or images.ndim != 4:
    raise ValueError(f"detectors read uint8 NHWC images, got {images.dtype} {images.shape}")
  n = images.shape[0]
  batch_size = int(batch_size or detector.batch_size)
  params = detector.params
  if mesh is not None:
    devices = sharding_lib.batch_divisor(mesh)
    batch_size = max(devices, batch_size - batch_size % devices)
    params = jax.device_put(params, sharding_lib.replicated(mesh))
    sharding = sharding_lib.batch_sharding(mesh)
  batch_size = min(batch_size, n) if mesh is None else batch_size
  fn = apply_fn or make_apply_fn(detector, mesh)
  stats = FeatureStats(keep_features=keep_features, max_keep=max_keep)
  logits = []
  for start in tqdm(range(0, n, batch_size), desc=desc, disable=not progress, unit="batch"):
    batch = images[start:start + batch_size]
    valid = batch.shape[0]
    if valid < batch_size:  # pad with copies of the last image; dropped below
      batch = np.concatenate([batch, np.repeat(batch[-1:], batch_size - valid, axis=0)])
    if mesh is not None:
      # Every process holds the whole batch; each device takes its rows (multi-host safe).
      x = jax.make_array_from_callback(batch.shape, sharding, lambda idx, b=batch: b[idx])
    else:
      x = batch
    out = fn(params, x)
    features = to_host(out["features"])[:valid]
    stats.update(features)
    logits.append(to_host(out["logits"])[:valid].astype(np.float32))
  return stats, np.concatenate(logits) if logits else np.zeros((0, detector.num_classes))
