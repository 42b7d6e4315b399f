"""Training-time schedules of consistency training: discretisation curricula N(k), target
EMA rates mu(k), noise-level sampling and loss weights.

Sources (k = training step, K = total training steps):

* CM: Song, Dhariwal, Chen, Sutskever 2023, "Consistency Models", Appendix C (the CT
  curriculum below its Table 3):
    N(k)  = ceil( sqrt( k/K ((s1 + 1)^2 - s0^2) + s0^2 ) - 1 ) + 1,
    mu(k) = exp( s0 log(mu0) / N(k) ).
  Both reference implementations (openai/consistency_models `create_ema_and_scales_fn`,
  openai/consistency_models_cifar10 `get_ema_scales_fn`) compute the EMA rate from the
  number of *intervals* N(k) - 1 instead:  mu(k) = exp( s0 log(mu0) / (N(k) - 1) ),
  so their mu(0) = mu0^2 where the paper's is mu0 (0.81 vs 0.9 for mu0 = 0.9).  They also
  clamp N(k) - 1 >= 1, which changes nothing for s0 >= 2.
* iCT: Song & Dhariwal 2023, "Improved Techniques for Training Consistency Models",
  Sec. 3.4-3.5:
    N(k)  = min( s0 2^floor(k/K'), s1 ) + 1,   K' = floor( K / (log2 floor(s1/s0) + 1) ),
    p(sigma_i) propto erf((ln sigma_{i+1} - P_mean)/(sqrt2 P_std)) - erf((ln sigma_i - P_mean)/(sqrt2 P_std)),
    lambda(sigma_i) = 1 / (sigma_{i+1} - sigma_i).

Index convention here: the Karras grid (EDM eq. 5) is DESCENDING, sigma_0 = sigma_max,
sigma_{N-1} = sigma_min, as in the references' training code. A training pair is
(n, n+1) with n in {0, ..., N-2}: the online network sees the larger level sigma_n, the
target the smaller sigma_{n+1}. (The iCT paper indexes ascending; its pair (i, i+1)
is our (n+1, n).)

Every function takes a traced step and a traced N, so the curriculum runs inside the
one jit-compiled train step; shapes never depend on N(k).
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from cm_jax.diffusion.grids import karras_sigma_at

_F32 = jnp.float32

CT_MU_VARIANTS = ("reference", "paper")


# ----------------------------------------------------------------------------- the grid


def karras_sigma(index, num_scales, sigma_min: float = 0.002, sigma_max: float = 80.0,
                 rho: float = 7.0):
  """EDM eq. 5 at (possibly traced) `index` of a (possibly traced) `num_scales`-point grid:

    sigma_i = (sigma_max^(1/rho) + i/(N-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho,

  descending from sigma_max (i = 0) to sigma_min (i = N-1), float32, the form both
  reference trainers evaluate for the CD/CT pairs: grids.karras_sigma_at(i / (N - 1)).
  """
  i = jnp.asarray(index, _F32)
  n = jnp.asarray(num_scales, _F32)
  return karras_sigma_at(i / (n - 1.0), sigma_min, sigma_max, rho)


# ----------------------------------------------------------------------------- CT (CM paper)


def _ct_formula(k, total_steps, s0, s1, ceil, sqrt, maximum):
  """N(k) of CM Appendix C with the reference's clamp, in whatever arithmetic is given."""
  inner = sqrt(k / total_steps * ((s1 + 1.0) ** 2 - float(s0) ** 2) + float(s0) ** 2)
  return maximum(ceil(inner - 1.0), 1.0) + 1.0


@functools.lru_cache(maxsize=32)
def _ct_steps_table(total_steps: int, s0: int, s1: int):
  """(the steps where N(k) changes, N from each of them on; the first entry is step 0):
  the schedule over k = 0..K evaluated in float64 on the host, as the reference does, and
  kept as its at most s1 + 1 change points."""
  k = np.arange(total_steps + 1, dtype=np.float64)
  n = _ct_formula(k, float(total_steps), s0, s1, np.ceil, np.sqrt, np.maximum).astype(np.int64)
  starts = np.concatenate([[0], np.nonzero(np.diff(n))[0] + 1])
  return starts.astype(np.int32), n[starts].astype(np.int32)


def ct_num_scales(step, total_steps: int, s0: int, s1: int):
  """CM paper Appendix C: N(k) = ceil(sqrt(k/K ((s1+1)^2 - s0^2) + s0^2) - 1) + 1 (int32).

  N(0) = s0 and N(K) = s1 + 1. The reference code's clamp max(N - 1, 1) is applied too
  (a no-op for s0 >= 2). The reference evaluates it in float64; float32 is one too low at
  a few steps (N(350783) of 800k for CIFAR-10 came out 100, not 101), so for k <= K the value is read from the
  float64 schedule's change points (_ct_steps_table) by an integer search on the traced
  step. Past K (a run extended beyond its schedule) the curve continues in float32.
  """
  starts, values = _ct_steps_table(int(total_steps), int(s0), int(s1))
  k = jnp.asarray(step, jnp.int32)
  exact = jnp.asarray(values)[jnp.searchsorted(jnp.asarray(starts), k, side="right") - 1]
  beyond = _ct_formula(k.astype(_F32), float(total_steps), s0, s1, jnp.ceil, jnp.sqrt,
                       jnp.maximum).astype(jnp.int32)
  return jnp.where(k <= int(total_steps), exact, beyond)


def ct_target_ema(step, total_steps: int, s0: int, s1: int, mu0: float,
                  variant: str = "reference"):
  """EMA rate mu(k) of the CT target network (float32).

  'paper'     (CM Appendix C):        mu(k) = exp(s0 ln(mu0) / N(k));     mu(0) = mu0.
  'reference' (both OpenAI repos):    mu(k) = exp(s0 ln(mu0) / (N(k)-1)); mu(0) = mu0^(s0/(s0-1)).
  """
  if variant not in CT_MU_VARIANTS:
    raise ValueError(f"unknown mu(k) variant {variant!r}; choose from {CT_MU_VARIANTS}")
  n = ct_num_scales(step, total_steps, s0, s1).astype(_F32)
  denom = n - 1.0 if variant == "reference" else n
  return jnp.exp(s0 * math.log(mu0) / denom).astype(_F32)


# ----------------------------------------------------------------------------- iCT


def ict_steps_per_doubling(total_steps: int, s0: int = 10, s1: int = 1280) -> int:
  """iCT Sec. 3.5: K' = floor(K / (log2 floor(s1/s0) + 1)); 50,000 for K = 400k, s0/s1 = 10/1280.

  Clamped to >= 1 so that a few-step run (K < 8) still has a defined curriculum.
  """
  return max(int(math.floor(total_steps / (math.log2(math.floor(s1 / s0)) + 1))), 1)


def ict_num_scales(step, total_steps: int, s0: int = 10, s1: int = 1280):
  """iCT Sec. 3.5 exponential curriculum: N(k) = min(s0 2^floor(k/K'), s1) + 1 (int32).

  With s0 = 10, s1 = 1280: 11 at k = 0, doubling every K' steps, 1281 from k = 7K' on.
  """
  k_prime = ict_steps_per_doubling(total_steps, s0, s1)
  doublings = jnp.asarray(step, jnp.int32) // k_prime
  # 2^d saturates at s1 anyway; clipping d keeps the shift inside int32.
  max_doublings = int(math.ceil(math.log2(max(s1 / s0, 1.0)))) + 1
  doublings = jnp.clip(doublings, 0, max_doublings)
  return jnp.minimum(s0 * jnp.left_shift(1, doublings), s1).astype(jnp.int32) + 1


def ict_max_scales(s1: int = 1280) -> int:
  """Largest N the iCT curriculum reaches: s1 + 1 (the static size of its index tables)."""
  return int(s1) + 1


def lognormal_index_logits(num_scales, max_scales: int, p_mean: float = -1.1,
                           p_std: float = 2.0, sigma_min: float = 0.002,
                           sigma_max: float = 80.0, rho: float = 7.0):
  """iCT Sec. 3.5 (its eq. for p(sigma_i)): log-probabilities of the pair index n.

  For the descending grid of `num_scales` = N points (traced), pair n in {0, .., N-2}
  joins sigma_n > sigma_{n+1} and gets probability proportional to
    erf((ln sigma_n - P_mean)/(sqrt2 P_std)) - erf((ln sigma_{n+1} - P_mean)/(sqrt2 P_std)),
  the log-normal mass of ln sigma in [ln sigma_{n+1}, ln sigma_n]. The table has the
  static length `max_scales` - 1; entries n >= N - 1 get -inf.
  """
  n = jnp.arange(max_scales - 1)
  hi = karras_sigma(n, num_scales, sigma_min, sigma_max, rho)
  lo = karras_sigma(n + 1, num_scales, sigma_min, sigma_max, rho)
  scale = math.sqrt(2.0) * p_std
  mass = (jax.scipy.special.erf((jnp.log(hi) - p_mean) / scale)
          - jax.scipy.special.erf((jnp.log(lo) - p_mean) / scale))
  valid = n < (jnp.asarray(num_scales) - 1)
  return jnp.where(valid & (mass > 0), jnp.log(jnp.where(mass > 0, mass, 1.0)), -jnp.inf)


def sample_lognormal_index(rng, batch: int, num_scales, max_scales: int, **kwargs):
  """`batch` pair indices n ~ the iCT discretised log-normal (see `lognormal_index_logits`)."""
  logits = lognormal_index_logits(num_scales, max_scales, **kwargs)
  return jax.random.categorical(rng, logits, shape=(batch,)).astype(jnp.int32)


def sample_uniform_index(rng, batch: int, num_scales):
  """`batch` pair indices n ~ U{0, .., N-2}: CM Algorithms 2/3 (the references' randint)."""
  return jax.random.randint(rng, (batch,), 0, jnp.asarray(num_scales, jnp.int32) - 1)


# ----------------------------------------------------------------------------- loss weights

WEIGHTINGS = ("uniform", "snr", "snr+1", "karras", "truncated-snr", "ict")


def loss_weight(kind: str, sigma, sigma_next, sigma_data: float = 0.5):
  """lambda of the consistency losses, per example, for the pair sigma > sigma_next.

  'uniform' (CM paper, lambda = 1; both references' default), the reference code's
  SNR family with snr = sigma^-2 ('snr', 'snr+1', 'karras' = snr + 1/sd^2,
  'truncated-snr' = max(snr, 1)), and iCT Sec. 3.1's 'ict': 1 / (sigma - sigma_next).
  """
  s = jnp.asarray(sigma, _F32)
  snr = s ** -2
  if kind == "uniform":
    return jnp.ones_like(s)
  if kind == "snr":
    return snr
  if kind == "snr+1":
    return snr + 1.0
  if kind == "karras":
    return snr + 1.0 / sigma_data ** 2
  if kind == "truncated-snr":
    return jnp.maximum(snr, 1.0)
  if kind == "ict":
    return 1.0 / (s - jnp.asarray(sigma_next, _F32))
  raise ValueError(f"unknown weighting {kind!r}; choose from {WEIGHTINGS}")
