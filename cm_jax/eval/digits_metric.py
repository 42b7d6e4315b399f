"""Sample quality on the embedded 8x8 digits, measured on a CPU in seconds.

With the project's digits classifier (cm_jax.eval.digits_classifier) as the detector:

  fd_digits      Frechet distance between the classifier's 64-d penultimate features of
                 the samples and of real digits (FID with this network in place of
                 Inception). Lower is better. Like FID it is biased upwards for small
                 sets: compare numbers at the same sample count (recorded as num_samples).
  coverage       fraction of the 10 classes that receive at least `min_share` (default
                 a quarter of the uniform share, i.e. 2.5%) of the samples as confident
                 predictions (max softmax >= `confidence`, default 0.9). 1.0 = no class missing.
  class_entropy  entropy of the histogram of predicted classes (all samples) divided by
                 log 10: 1.0 = classes equally frequent, 0 = a single class.
  confident      fraction of samples predicted with max softmax >= `confidence`: a
                 per-sample "looks like some digit" score.
  accuracy       for class-conditional samples: fraction whose predicted class is the
                 conditioning label (the classifier's own held-out accuracy, ~0.98, is the
                 ceiling; recorded as classifier_holdout_accuracy).
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from cm_jax.eval import digits_classifier
from cm_jax.eval.fid import frechet_distance
from cm_jax.eval.stats import FeatureStats

NUM_CLASSES = digits_classifier.NUM_CLASSES


def _softmax(logits: np.ndarray) -> np.ndarray:
  z = logits - logits.max(axis=1, keepdims=True)
  e = np.exp(z)
  return e / e.sum(axis=1, keepdims=True)


def class_metrics(logits: np.ndarray, labels: Optional[np.ndarray] = None, *,
                  confidence: float = 0.9, min_share: float = 0.25 / NUM_CLASSES) -> dict:
  probs = _softmax(np.asarray(logits, np.float64))
  pred, conf = probs.argmax(axis=1), probs.max(axis=1)
  n = len(pred)
  confident = conf >= confidence
  counts = np.bincount(pred[confident], minlength=NUM_CLASSES)
  hist = np.bincount(pred, minlength=NUM_CLASSES) / max(n, 1)
  nz = hist[hist > 0]
  out = {
      "coverage": float(np.mean(counts >= max(1.0, min_share * n))),
      "class_entropy": float(-(nz * np.log(nz)).sum() / np.log(NUM_CLASSES)) + 0.0,
      "confident": float(confident.mean()),
      "class_histogram": hist.round(4).tolist(),
  }
  if labels is not None:
    out["accuracy"] = float(np.mean(pred == np.asarray(labels)))
  return out


class DigitsMetric:
  """Scores uint8 (N, 8, 8, 1) sample sets against real digits.

  reference: uint8 real images to compare with (default: all 1,797 digits).
  """

  def __init__(self, reference: Optional[np.ndarray] = None, cache_dir: Optional[str] = None,
               confidence: float = 0.9, min_share: float = 0.25 / NUM_CLASSES):
    self.classifier = digits_classifier.load_or_train(cache_dir=cache_dir)
    if reference is None:
      reference, _ = digits_classifier.digits_uint8()
    self.num_reference = len(reference)
    self.ref_mu, self.ref_sigma = self.statistics(reference).mu_sigma()
    self.confidence, self.min_share = confidence, min_share

  def statistics(self, images: np.ndarray) -> FeatureStats:
    features, _ = self.classifier(images)
    stats = FeatureStats()
    stats.update(features)
    return stats

  def __call__(self, images: np.ndarray, labels: Optional[np.ndarray] = None) -> dict:
    features, logits = self.classifier(np.asarray(images))
    stats = FeatureStats()
    stats.update(features)
    mu, sigma = stats.mu_sigma()
    out = {"fd_digits": frechet_distance(mu, sigma, self.ref_mu, self.ref_sigma)}
    out.update(class_metrics(logits, labels, confidence=self.confidence,
                             min_share=self.min_share))
    out.update(num_samples=int(len(images)), num_reference=self.num_reference,
               detector=self.classifier.fingerprint())
    return out

  def protocol(self) -> dict:
    return {"confidence": self.confidence, "min_share": self.min_share,
            "num_reference": self.num_reference, "detector": self.classifier.fingerprint()}


def blur(images: np.ndarray, amount: float = 1.0) -> np.ndarray:
  """A 3x3 binomial blur (repeated `amount` times, rounded): a degraded-real baseline."""
  x = np.asarray(images, np.float32)
  k = np.array([1.0, 2.0, 1.0]) / 4.0
  for _ in range(int(amount)):
    p = np.pad(x, ((0, 0), (1, 1), (0, 0), (0, 0)), mode="edge")
    x = sum(k[i] * p[:, i:i + x.shape[1]] for i in range(3))
    p = np.pad(x, ((0, 0), (0, 0), (1, 1), (0, 0)), mode="edge")
    x = sum(k[i] * p[:, :, i:i + x.shape[2]] for i in range(3))
  return np.clip(np.round(x), 0, 255).astype(np.uint8)
