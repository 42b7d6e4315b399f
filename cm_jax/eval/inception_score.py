"""Inception Score (Salimans et al. 2016): exp E_x KL(p(y|x) || p(y)), over 10 splits.

As the original code (openai/improved-gan) and StyleGAN's metric: the samples are cut in
order into `num_splits` equal parts, the score is computed per part, and the mean and
standard deviation over parts are reported. The original feeds the softmax with the
Inception logits *without* the fc bias; use InceptionV3's 'logits_unbiased' to match it.
"""
from __future__ import annotations

import numpy as np


def _log_softmax(logits: np.ndarray) -> np.ndarray:
  z = logits - logits.max(axis=1, keepdims=True)
  return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def inception_score(logits=None, *, probs=None, num_splits: int = 10) -> tuple[float, float]:
  """(mean, std) over splits, from logits (preferred: exact for confident predictions) or
  probabilities. Scores lie in [1, num_classes]."""
  if (logits is None) == (probs is None):
    raise ValueError("pass exactly one of logits= or probs=")
  if logits is not None:
    log_p = _log_softmax(np.asarray(logits, np.float64))
  else:
    with np.errstate(divide="ignore"):
      log_p = np.log(np.asarray(probs, np.float64))
  n = log_p.shape[0]
  if n < num_splits:
    raise ValueError(f"{n} samples cannot be cut into {num_splits} splits")
  p = np.exp(log_p)
  scores = []
  for i in range(num_splits):
    part_p = p[i * n // num_splits:(i + 1) * n // num_splits]
    part_log_p = log_p[i * n // num_splits:(i + 1) * n // num_splits]
    with np.errstate(divide="ignore", invalid="ignore"):
      log_py = np.log(part_p.mean(axis=0, keepdims=True))
      # p log p is 0 where p is 0 (a class the softmax rules out entirely).
      kl = np.where(part_p > 0, part_p * (part_log_p - log_py), 0.0).sum(axis=1).mean()
    scores.append(np.exp(kl))
  return float(np.mean(scores)), float(np.std(scores))
