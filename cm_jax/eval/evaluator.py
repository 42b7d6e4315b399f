"""Sample sets and references -> every metric, with the protocol that produced them.

evaluate.py is a thin shell over this module:

    detector = features.build_detector('inception', weights_path='inception_fid.npz')
    ref = resolve_reference('tfds:cifar10:train', detector, image_size=32)
    result = evaluate_images(images, labels, detector, ref)
    result['metrics']  # fid, is_mean, is_std, precision, recall, kid (+ digits extras)

Reference specs:
  PATH.npz           with `arr_0` (uint8 NHWC images, OpenAI / ADM reference batches):
                     features are computed from the images (every metric available);
                     with only `mu`/`sigma` (EDM's format): Frechet distance only.
  tfds:NAME:SPLIT    a TFDS split via cm_jax.data (e.g. tfds:cifar10:train)
  digits             the embedded 8x8 digits (all 1,797)
  data               the run's own data set (config.data of --workdir)
"""
from __future__ import annotations

import dataclasses
import time
from typing import Optional, Sequence

import ml_collections
import numpy as np

from cm_jax.eval import features as features_lib
from cm_jax.eval.fid import frechet_distance
from cm_jax.eval.inception_score import inception_score
from cm_jax.eval.kid import kernel_inception_distance
from cm_jax.eval.precision_recall import precision_recall
from cm_jax.eval.stats import FeatureStats, load_stats, save_stats
from cm_jax.utils import safe_load

ALL_METRICS = ("fd", "is", "pr", "kid")


@dataclasses.dataclass
class Reference:
  spec: str
  mu: np.ndarray
  sigma: np.ndarray
  features: Optional[np.ndarray]   # None for a stats-only reference
  info: dict


def load_samples_npz(path: str) -> tuple[np.ndarray, Optional[np.ndarray]]:
  """(uint8 NHWC images, labels or None) from OpenAI's sample format (arr_0, arr_1)."""
  with safe_load.open_npz(path, "samples .npz") as f:
    if "arr_0" not in f.files:
      raise ValueError(f"{path!r} has no 'arr_0' (uint8 NHWC images); keys: {f.files}")
    images = f["arr_0"]
    labels = f["arr_1"] if "arr_1" in f.files else None
  if images.dtype != np.uint8 or images.ndim != 4:
    raise ValueError(f"{path!r}: arr_0 must be uint8 NHWC, got {images.dtype} {images.shape}")
  if len(images) == 0:  # every metric of zero images is undefined
    raise ValueError(f"{path!r} holds no images (arr_0 has shape {images.shape})")
  return images, labels


def _data_cfg(**fields) -> ml_collections.ConfigDict:
  """A config.data for cm_jax.data (the fields of configs/base.py that readers consult)."""
  cfg = ml_collections.ConfigDict(dict(
      name="digits", tfds_name="", data_dir="", split="train", path="", image_size=0,
      random_flip=False, num_classes=0, num_threads=0, prefetch_buffer_size=500,
      worker_count=0, download=False))
  cfg.update(**fields)
  return cfg


def _data_cfg_for(spec: str, run_data_cfg=None, image_size: Optional[int] = None,
                  tfds_data_dir: str = ""):
  if spec == "data":
    if run_data_cfg is None:
      raise ValueError("--ref data means the run's own data set: it needs --workdir")
    return ml_collections.ConfigDict(run_data_cfg.to_dict())
  if spec == "digits":
    return _data_cfg(name="digits", image_size=image_size or 8)
  parts = spec.split(":")
  if parts[0] != "tfds" or len(parts) not in (3, 4):
    raise ValueError(f"reference {spec!r}: expected a .npz path, 'digits', 'data' or "
                     f"'tfds:NAME:SPLIT[:SIZE]' (e.g. tfds:cifar10:train)")
  size = int(parts[3]) if len(parts) == 4 else (image_size or 0)
  return _data_cfg(name="tfds", tfds_name=parts[1], split=parts[2], image_size=size,
                   data_dir=tfds_data_dir, num_threads=16)


def reference_images(spec: str, *, num: int, seed: int = 0, run_data_cfg=None,
                     image_size: Optional[int] = None, tfds_data_dir: str = ""):
  """uint8 images of a non-file reference (digits / data / tfds:...), and a description."""
  from cm_jax import data as data_lib  # pylint: disable=g-import-not-at-top
  cfg = _data_cfg_for(spec, run_data_cfg, image_size, tfds_data_dir)
  images, _ = data_lib.load_reference_images(cfg, num, seed)
  info = {"spec": spec, "kind": "images", "num": int(len(images)), "seed": seed,
          "data": {k: cfg.get(k) for k in ("name", "tfds_name", "split", "path", "image_size")}}
  return images, info


def resolve_reference(spec: str, detector: features_lib.Detector, *, num: int = 50_000,
                      seed: int = 0, run_data_cfg=None, image_size: Optional[int] = None,
                      tfds_data_dir: str = "", mesh=None, batch_size: Optional[int] = None,
                      keep_max: Optional[int] = None, progress: bool = False) -> Reference:
  """Statistics (and features, when there are images) of the reference set."""
  if spec.endswith(".npz"):
    with safe_load.open_npz(spec, "reference .npz") as f:
      keys = set(f.files)
      images = f["arr_0"] if "arr_0" in keys else None
    if images is None:
      mu, sigma, meta = load_stats(spec)
      want = detector.fingerprint.get("name")
      if meta.get("detector") and meta["detector"] != want:
        raise ValueError(f"{spec!r} holds {meta['detector']} statistics, not {want}")
      if mu.shape[0] != detector.feature_dim:
        raise ValueError(f"{spec!r}: {mu.shape[0]}-d statistics, the {detector.name} detector "
                         f"gives {detector.feature_dim}-d features")
      return Reference(spec, mu, sigma, None, {"spec": spec, "kind": "stats", "meta": meta})
    if images.dtype != np.uint8 or images.ndim != 4:
      raise ValueError(f"{spec!r}: arr_0 must be uint8 NHWC, got {images.dtype} {images.shape}")
    images = images[:num]
    info = {"spec": spec, "kind": "images", "num": int(len(images))}
  else:
    images, info = reference_images(spec, num=num, seed=seed, run_data_cfg=run_data_cfg,
                                    image_size=image_size, tfds_data_dir=tfds_data_dir)
  stats, _ = features_lib.extract(detector, images, batch_size=batch_size, mesh=mesh,
                                  keep_features=True, max_keep=keep_max, progress=progress,
                                  desc="reference features")
  mu, sigma = stats.mu_sigma()
  return Reference(spec, mu, sigma, stats.features(), info)


def save_reference_stats(path: str, ref: Reference, detector: features_lib.Detector) -> None:
  fp = detector.fingerprint
  save_stats(path, ref.mu, ref.sigma, detector=fp.get("name"), reference=ref.spec,
             num=ref.info.get("num", ""),
             detector_weights_sha256=fp.get("params_sha256", ""),
             detector_source_sha256=fp.get("source_sha256", fp.get("recipe_sha256", "")))


def compute_metrics(sample_stats: FeatureStats, sample_logits: np.ndarray, ref: Reference,
                    detector: features_lib.Detector, *, labels: Optional[np.ndarray] = None,
                    metrics: Sequence[str] = ALL_METRICS, is_splits: int = 10,
                    pr_k: int = 3, pr_max: Optional[int] = 10_000, kid_subsets: int = 100,
                    kid_subset_size: int = 1000, seed: int = 0) -> tuple[dict, dict]:
  """(metrics, protocol of each metric)."""
  unknown = set(metrics) - set(ALL_METRICS)
  if unknown:
    raise ValueError(f"unknown metrics {sorted(unknown)}; choose from {ALL_METRICS}")
  out, protocol = {}, {}
  fd_name = "fid" if detector.name == "inception" else f"fd_{detector.name}"
  n = sample_stats.n
  if "fd" in metrics:
    mu, sigma = sample_stats.mu_sigma()
    out[fd_name] = frechet_distance(mu, sigma, ref.mu, ref.sigma)
    protocol[fd_name] = {"covariance": "unbiased (n-1)", "sqrtm": "scipy.linalg.sqrtm",
                         "num_samples": n}
  if "is" in metrics:
    if n >= is_splits:
      out["is_mean"], out["is_std"] = inception_score(sample_logits, num_splits=is_splits)
      protocol["is"] = {"splits": is_splits, "logits": (
          "fc without bias (original IS code)" if detector.name == "inception" else "logits")}
    else:
      protocol["is"] = f"skipped: {n} samples < {is_splits} splits"
  needs_features = [m for m in ("pr", "kid") if m in metrics]
  if needs_features and ref.features is None:
    for m in needs_features:
      protocol[m] = "skipped: the reference holds statistics only (mu, sigma), no images"
  elif needs_features:
    fake = sample_stats.features()
    if "pr" in metrics:
      out["precision"], out["recall"] = precision_recall(ref.features, fake, k=pr_k,
                                                         max_items=pr_max, seed=seed)
      protocol["pr"] = {"k": pr_k, "max_items_per_set": pr_max, "seed": seed,
                        "distance": "euclidean on detector features"}
    if "kid" in metrics:
      out["kid"] = kernel_inception_distance(ref.features, fake, num_subsets=kid_subsets,
                                             subset_size=kid_subset_size, seed=seed)
      protocol["kid"] = {"num_subsets": kid_subsets, "subset_size": min(
          kid_subset_size, len(fake), len(ref.features)), "kernel": "(x.y/d + 1)^3", "seed": seed}
  if detector.name == "digits":
    from cm_jax.eval.digits_metric import class_metrics  # pylint: disable=g-import-not-at-top
    cm = class_metrics(sample_logits, labels)
    out.update({k: v for k, v in cm.items() if k != "class_histogram"})
    out["class_histogram"] = cm["class_histogram"]
    protocol["classes"] = {"confidence": 0.9, "coverage_min_share": 0.025,
                           "accuracy": "argmax == conditioning label" if labels is not None
                           else "n/a (unconditional)"}
  return out, protocol


def evaluate_images(images: np.ndarray, labels: Optional[np.ndarray],
                    detector: features_lib.Detector, ref: Reference, *, mesh=None,
                    batch_size: Optional[int] = None, progress: bool = False,
                    **metric_options) -> dict:
  """Features of the samples, then every metric against `ref`."""
  t0 = time.perf_counter()
  stats, logits = features_lib.extract(detector, images, batch_size=batch_size, mesh=mesh,
                                       keep_features=True, progress=progress,
                                       desc="sample features")
  t1 = time.perf_counter()
  metrics, protocol = compute_metrics(stats, logits, ref, detector, labels=labels,
                                      **metric_options)
  t2 = time.perf_counter()
  return {"metrics": metrics, "protocol": protocol,
          "wall_time_s": {"sample_features": t1 - t0, "metrics": t2 - t1}}


def versions() -> dict:
  import flax  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  return {"jax": jax.__version__, "flax": flax.__version__, "numpy": np.__version__,
          "backend": jax.default_backend(), "devices": jax.device_count()}


def nfe(method, sampler: Optional[str], num_steps: int, guidance: float = 0.0) -> int:
  """Network evaluations per image of `method` sampling with `sampler` and `num_steps`;
  classifier-free guidance (w != 0 on a diffusion model) evaluates twice per step."""
  fn = getattr(method, "nfe", None)
  if fn is not None:
    return int(fn(num_steps, sampler=sampler))
  if getattr(method, "name", "") in ("edm", "vp", "guided", "pd"):
    from cm_jax.diffusion.samplers import sampler_nfe  # pylint: disable=g-import-not-at-top
    per_pass = sampler_nfe(sampler or method.sample_cfg.sampler, num_steps)
    twice = bool(guidance) and getattr(method, "guidance_kind", None) == "classifier_free"
    return per_pass * (2 if twice else 1)
  return int(num_steps)  # consistency models: one evaluation per step
