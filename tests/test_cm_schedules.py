"""CM / iCT curricula and noise-level sampling against independently worked-out numbers."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cm_jax.diffusion import grids
from cm_jax.methods import cm_schedules as S


def _n_paper(k, K, s0, s1):
  """CM Appendix C, in float64: ceil(sqrt(k/K ((s1+1)^2 - s0^2) + s0^2) - 1) + 1."""
  return math.ceil(math.sqrt(k / K * ((s1 + 1) ** 2 - s0 ** 2) + s0 ** 2) - 1) + 1


@pytest.mark.parametrize("s0,s1,K", [(2, 150, 800_000), (2, 200, 800_000), (2, 150, 1000)])
def test_ct_num_scales_endpoints_and_middle(s0, s1, K):
  assert int(S.ct_num_scales(0, K, s0, s1)) == s0            # N(0) = s0
  assert int(S.ct_num_scales(K, K, s0, s1)) == s1 + 1        # N(K) = s1 + 1
  for k in (1, K // 10, K // 3, K // 2, (3 * K) // 4, K - 1):
    assert int(S.ct_num_scales(k, K, s0, s1)) == _n_paper(k, K, s0, s1), k
  # By hand, CIFAR-10 at k = K/2: sqrt(0.5 (151^2 - 4) + 4) = 106.78 -> ceil(105.78) + 1 = 107.
  if (s0, s1) == (2, 150):
    assert int(S.ct_num_scales(K // 2, K, s0, s1)) == 107


@pytest.mark.parametrize("s0,s1,K", [(2, 150, 800_000), (2, 200, 800_000), (2, 150, 600_000),
                                     (2, 150, 1_000_000), (2, 40, 1_000_000)])
def test_ct_num_scales_at_every_step_is_the_float64_schedule(s0, s1, K):
  """Every k of a full schedule against the formula in float64 numpy (the reference's
  arithmetic); float32 is one too low at some k (the CIFAR-10 steps named below)."""
  k = np.arange(K + 1, dtype=np.float64)
  want = np.maximum(np.ceil(np.sqrt(k / K * ((s1 + 1) ** 2 - s0 ** 2) + s0 ** 2) - 1), 1) + 1
  got = np.asarray(jax.jit(jax.vmap(lambda i: S.ct_num_scales(i, K, s0, s1)))(
      jnp.arange(K + 1, dtype=jnp.int32)))
  np.testing.assert_array_equal(got, want.astype(np.int32))
  if (s0, s1, K) == (2, 150, 800_000):
    for step in (202553, 316568, 350783, 522174, 620608, 747888, 758170):
      assert int(S.ct_num_scales(step, K, s0, s1)) == _n_paper(step, K, s0, s1), step


def test_ct_num_scales_traced_and_monotone():
  ks = jnp.arange(0, 1001, 7)
  ns = jax.jit(jax.vmap(lambda k: S.ct_num_scales(k, 1000, 2, 150)))(ks)
  assert ns.dtype == jnp.int32
  assert np.all(np.diff(np.asarray(ns)) >= 0)


def test_ct_target_ema_paper_and_reference():
  K, s0, s1, mu0 = 800_000, 2, 150, 0.9
  # Paper: mu(k) = exp(s0 ln mu0 / N(k)): mu(0) = mu0 exactly.
  assert float(S.ct_target_ema(0, K, s0, s1, mu0, "paper")) == pytest.approx(0.9, rel=1e-6)
  assert float(S.ct_target_ema(K, K, s0, s1, mu0, "paper")) == pytest.approx(
      math.exp(2 * math.log(0.9) / 151), rel=1e-6)
  # Reference code: exp(s0 ln mu0 / (N(k) - 1)): mu(0) = 0.9^2 = 0.81.
  assert float(S.ct_target_ema(0, K, s0, s1, mu0, "reference")) == pytest.approx(0.81, rel=1e-6)
  assert float(S.ct_target_ema(K, K, s0, s1, mu0, "reference")) == pytest.approx(
      math.exp(2 * math.log(0.9) / 150), rel=1e-6)
  # ImageNet 64 CT (s1 = 200, mu0 = 0.95), mid-training, reference form.
  k = K // 2
  n = _n_paper(k, K, 2, 200)
  assert float(S.ct_target_ema(k, K, 2, 200, 0.95, "reference")) == pytest.approx(
      math.exp(2 * math.log(0.95) / (n - 1)), rel=1e-6)
  with pytest.raises(ValueError, match="variant"):
    S.ct_target_ema(0, K, s0, s1, mu0, "nope")


def test_ict_curriculum():
  K = 400_000
  assert S.ict_steps_per_doubling(K, 10, 1280) == 50_000     # floor(400k / (log2 128 + 1))
  expect = {0: 11, 49_999: 11, 50_000: 21, 100_000: 41, 200_000: 161, 300_000: 641,
            349_999: 641, 350_000: 1281, K: 1281}
  for k, n in expect.items():
    assert int(S.ict_num_scales(k, K, 10, 1280)) == n, k
  assert S.ict_max_scales(1280) == 1281
  # Fewer steps than doublings: K' is clamped to 1 and N still saturates at s1 + 1.
  assert S.ict_steps_per_doubling(4, 10, 1280) == 1
  assert [int(S.ict_num_scales(k, 4, 10, 1280)) for k in range(12)][-1] == 1281


def test_karras_sigma_matches_grid():
  got = S.karras_sigma(jnp.arange(18), 18)
  np.testing.assert_allclose(np.asarray(got), np.asarray(grids.karras_sigmas(18)), rtol=2e-6)
  assert float(S.karras_sigma(0, 40)) == pytest.approx(80.0, rel=1e-6)
  assert float(S.karras_sigma(39, 40)) == pytest.approx(0.002, rel=1e-5)


def test_lognormal_index_probabilities():
  n_scales, n_max = 11, 21
  logits = np.asarray(S.lognormal_index_logits(n_scales, n_max, p_mean=-1.1, p_std=2.0))
  assert logits.shape == (n_max - 1,)
  assert np.all(np.isneginf(logits[n_scales - 1:]))           # only pairs 0..N-2
  p = np.exp(logits[:n_scales - 1])
  p /= p.sum()
  # Independent float64 computation with math.erf on the same descending grid.
  sig = np.asarray(grids.karras_sigmas(n_scales), np.float64)
  cdf = lambda s: math.erf((math.log(s) + 1.1) / (math.sqrt(2) * 2.0))
  want = np.array([cdf(sig[i]) - cdf(sig[i + 1]) for i in range(n_scales - 1)])
  np.testing.assert_allclose(p, want / want.sum(), rtol=1e-4)
  # Samples stay inside and follow the probabilities.
  idx = np.asarray(S.sample_lognormal_index(jax.random.key(0), 20_000, n_scales, n_max))
  assert idx.min() >= 0 and idx.max() <= n_scales - 2
  freq = np.bincount(idx, minlength=n_scales - 1) / idx.size
  np.testing.assert_allclose(freq, want / want.sum(), atol=0.015)


def test_uniform_index_range():
  idx = np.asarray(S.sample_uniform_index(jax.random.key(1), 5000, 18))
  assert idx.min() == 0 and idx.max() == 16                   # U{0..N-2}


def test_loss_weights():
  t, tn = jnp.asarray([2.0, 0.5]), jnp.asarray([1.0, 0.25])
  np.testing.assert_allclose(S.loss_weight("uniform", t, tn), [1.0, 1.0])
  np.testing.assert_allclose(S.loss_weight("ict", t, tn), [1.0, 4.0])   # 1/(sigma - sigma')
  np.testing.assert_allclose(S.loss_weight("snr", t, tn), [0.25, 4.0])
  np.testing.assert_allclose(S.loss_weight("karras", t, tn, 0.5), [4.25, 8.0])
  np.testing.assert_allclose(S.loss_weight("truncated-snr", t, tn), [1.0, 4.0])
  with pytest.raises(ValueError):
    S.loss_weight("nope", t, tn)
