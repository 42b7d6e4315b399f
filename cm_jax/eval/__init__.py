"""Sample-quality metrics: FID, Inception Score, precision/recall, KID, and the digits metric.

  inception.py          the FID Inception-v3 (TF 2015-12-05 graph) in Flax; user-supplied weights
  inception_convert.py  pytorch-fid .pth -> .npz (python -m cm_jax.eval.inception_convert)
  stats.py              float64 mean/covariance accumulated over (sharded) batches; EDM .npz
  fid.py                Frechet distance (scipy.linalg.sqrtm)
  inception_score.py    Inception Score, 10 splits
  precision_recall.py   improved precision/recall, k = 3 (Kynkaanniemi et al. 2019)
  kid.py                Kernel Inception Distance, unbiased cubic-kernel MMD over subsets
  features.py           detectors and batched, mesh-sharded feature extraction
  digits_classifier.py  the project's small digits CNN (trained once, cached)
  digits_metric.py      FD-digits, class coverage, label accuracy on the 8x8 digits
  evaluator.py          references and every metric with its protocol (evaluate.py's core)
"""
