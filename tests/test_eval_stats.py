"""Statistics and metrics of cm_jax.eval against independent computations."""
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from cm_jax.eval import fid, inception_score, kid, precision_recall, stats

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_frechet_distance_matches_closed_form_for_diagonal_covariances():
  rng = np.random.default_rng(0)
  d = 16
  mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
  v1, v2 = rng.uniform(0.1, 3.0, d), rng.uniform(0.1, 3.0, d)
  # W2^2 between diagonal Gaussians: |mu1 - mu2|^2 + sum (sqrt v1 - sqrt v2)^2.
  expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(v1) - np.sqrt(v2)) ** 2)
  got = fid.frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2))
  assert got == pytest.approx(expected, rel=1e-10)


def test_frechet_distance_is_rotation_invariant_and_zero_on_itself():
  rng = np.random.default_rng(1)
  d = 12
  a = rng.normal(size=(d, d))
  s1 = a @ a.T / d + 0.1 * np.eye(d)
  b = rng.normal(size=(d, d))
  s2 = b @ b.T / d + 0.1 * np.eye(d)
  mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
  q, _ = np.linalg.qr(rng.normal(size=(d, d)))
  base = fid.frechet_distance(mu1, s1, mu2, s2)
  rotated = fid.frechet_distance(q @ mu1, q @ s1 @ q.T, q @ mu2, q @ s2 @ q.T)
  assert rotated == pytest.approx(base, rel=1e-8)
  assert abs(fid.frechet_distance(mu1, s1, mu1, s1)) < 1e-8
  # Commuting covariances (same eigenvectors): tr(S1 + S2 - 2 sqrt(S1 S2)) in closed form.
  e1, e2 = rng.uniform(0.1, 2, d), rng.uniform(0.1, 2, d)
  c1, c2 = q @ np.diag(e1) @ q.T, q @ np.diag(e2) @ q.T
  assert fid.frechet_distance(mu1, c1, mu2, c2) == pytest.approx(
      np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(e1) - np.sqrt(e2)) ** 2), rel=1e-8)


def test_fid_of_a_feature_set_with_itself_is_zero():
  feats = np.random.default_rng(2).normal(size=(500, 32)) * 3 + 1
  s = stats.FeatureStats()
  s.update(feats)
  assert abs(fid.fid_from_stats(s, s)) < 1e-6


def test_batched_accumulation_equals_np_cov_in_any_batching():
  rng = np.random.default_rng(3)
  # A large common offset: naive float32 / uncentred sums would lose digits here.
  feats = (rng.normal(size=(1003, 24)) * rng.uniform(0.5, 2, 24) + 1e3).astype(np.float32)
  ref_mu = feats.astype(np.float64).mean(0)
  ref_cov = np.cov(feats.astype(np.float64), rowvar=False)
  for sizes in ([1003], [1, 2, 1000], [250] * 4 + [3], [7] * 143 + [2]):
    s, start = stats.FeatureStats(), 0
    for b in sizes:
      s.update(feats[start:start + b])
      start += b
    assert s.n == 1003
    np.testing.assert_allclose(s.mean(), ref_mu, rtol=1e-12, atol=1e-9)
    np.testing.assert_allclose(s.cov(), ref_cov, rtol=1e-9, atol=1e-9)
  # Merging per-shard accumulators (per-process statistics) gives the same.
  parts = [stats.FeatureStats() for _ in range(3)]
  for i, p in enumerate(parts):
    p.update(feats[i::3])
  merged = parts[0].merge(parts[1]).merge(parts[2])
  np.testing.assert_allclose(merged.mean(), ref_mu, rtol=1e-12, atol=1e-9)
  np.testing.assert_allclose(merged.cov(), ref_cov, rtol=1e-9, atol=1e-9)


def test_stats_round_trip_edm_format(tmp_path):
  rng = np.random.default_rng(4)
  mu, sigma = rng.normal(size=8), np.eye(8) * 2
  path = str(tmp_path / "ref.npz")
  stats.save_stats(path, mu, sigma, detector="digits")
  mu2, sigma2, meta = stats.load_stats(path)
  np.testing.assert_array_equal(mu, mu2)
  np.testing.assert_array_equal(sigma, sigma2)
  assert meta == {"detector": "digits"}


_SHARDED_SCRIPT = textwrap.dedent("""
    import os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    import jax, jax.numpy as jnp, numpy as np
    from cm_jax.eval import features
    from cm_jax.train import parallel
    assert jax.device_count() == 8, jax.devices()
    w = np.random.default_rng(0).normal(size=(48, 16)).astype(np.float32)
    def apply(params, images):
      x = images.reshape(images.shape[0], -1).astype(jnp.float32) / 255.0
      f = jnp.tanh(x @ params)
      return {"features": f, "logits": f[:, :10]}
    det = features.Detector("toy", apply, jnp.asarray(w), 16, 10, {"name": "toy"})
    images = np.random.default_rng(1).integers(0, 256, (101, 4, 4, 3)).astype(np.uint8)
    mesh = parallel.make_mesh()
    s, logits = features.extract(det, images, batch_size=20, mesh=mesh)   # 24 per batch, padded
    direct = np.tanh(images.reshape(101, -1).astype(np.float64) / 255.0 @ w.astype(np.float64))
    assert s.n == 101 and logits.shape == (101, 10)
    np.testing.assert_allclose(s.mean(), direct.mean(0), atol=1e-5)
    np.testing.assert_allclose(s.cov(), np.cov(direct, rowvar=False), atol=1e-5)
    np.testing.assert_allclose(s.features(), direct, atol=1e-5)
    print("SHARDED_OK")
""")


def test_features_sharded_over_8_devices_give_single_pass_statistics():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu")
  r = subprocess.run([sys.executable, "-c", _SHARDED_SCRIPT], cwd=ROOT, env=env,
                     capture_output=True, text=True, timeout=300)
  assert "SHARDED_OK" in r.stdout, r.stdout + r.stderr


def test_inception_score_bounds():
  n, k = 1000, 10
  uniform = np.zeros((n, k))                               # every p(y|x) uniform
  assert inception_score.inception_score(uniform)[0] == pytest.approx(1.0, abs=1e-12)
  confident = np.full((n, k), -1e4)
  confident[np.arange(n), np.arange(n) % k] = 0.0          # one-hot, classes balanced
  mean, std = inception_score.inception_score(confident, num_splits=10)
  assert mean == pytest.approx(k, rel=1e-9) and std == pytest.approx(0.0, abs=1e-9)
  # Exact zeros in probabilities are allowed (p log p = 0).
  probs = np.eye(k)[np.arange(n) % k]
  assert inception_score.inception_score(probs=probs)[0] == pytest.approx(k, rel=1e-9)
  # A sample set collapsed on one confident class scores 1.
  collapsed = np.zeros((n, k))
  collapsed[:, 3] = 50.0
  assert inception_score.inception_score(collapsed)[0] == pytest.approx(1.0, abs=1e-6)


def test_precision_recall_identical_sets_and_disjoint_sets():
  rng = np.random.default_rng(5)
  a = rng.normal(size=(300, 8)).astype(np.float32)
  assert precision_recall.precision_recall(a, a.copy(), k=3) == (1.0, 1.0)
  far = a + 100.0
  assert precision_recall.precision_recall(a, far, k=3) == (0.0, 0.0)
  # A generator covering only half of the real modes: high precision, low recall.
  real = np.concatenate([rng.normal(size=(200, 2)), rng.normal(size=(200, 2)) + 20])
  fake = rng.normal(size=(200, 2)).astype(np.float32)
  p, r = precision_recall.precision_recall(real, fake, k=3, block=64)
  assert p > 0.9 and r < 0.55


def test_knn_radii_match_brute_force():
  rng = np.random.default_rng(6)
  x = rng.normal(size=(130, 5)).astype(np.float32)
  d = ((x[:, None] - x[None]) ** 2).sum(-1)
  expected = np.sort(d, axis=1)[:, 3]  # k = 3, the point itself is the 0-th
  np.testing.assert_allclose(precision_recall.knn_radii(x, 3, block=50), expected,
                             rtol=1e-4, atol=1e-4)


def test_kid_identical_sets_near_zero_and_shift_positive():
  rng = np.random.default_rng(7)
  a = rng.normal(size=(400, 16)).astype(np.float32)
  b = rng.normal(size=(400, 16)).astype(np.float32)
  same = kid.kernel_inception_distance(a, a, num_subsets=20, subset_size=200)
  iid = kid.kernel_inception_distance(a, b, num_subsets=20, subset_size=200)
  shifted = kid.kernel_inception_distance(a, b + 1.0, num_subsets=20, subset_size=200)
  assert abs(same) < 0.05 and abs(iid) < 0.05
  assert shifted > 10 * max(abs(iid), 1e-3)


def test_kid_matches_unbiased_mmd_on_full_sets():
  rng = np.random.default_rng(8)
  x = rng.normal(size=(50, 6)).astype(np.float32)
  y = (rng.normal(size=(50, 6)) + 0.3).astype(np.float32)
  k = lambda a, b: (a @ b.T / 6 + 1.0) ** 3
  m = 50
  kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
  expected = ((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy))
              / (m * (m - 1)) - 2 * kxy.mean())
  # With subset size = set size, every subset is the whole set (in some order).
  got = kid.kernel_inception_distance(y, x, num_subsets=3, subset_size=50)
  assert got == pytest.approx(expected, rel=1e-4)
