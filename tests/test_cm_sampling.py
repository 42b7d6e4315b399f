"""Consistency-model sampling: one-step, CM Algorithm 1 with ts, ternary search, sample.py."""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cm_testlib import micro, save_run, tiny_method, tiny_params
from cm_jax import sampling
from cm_jax.diffusion.noise import per_image_normal
from cm_jax.methods import cm_sampling
from cm_jax.cli.cm_search import build_metric
from cm_jax.eval.fid import pixel_frechet_distance
from cm_jax.methods.cm_search import search_intermediate_index
from cm_jax.methods.consistency import ConsistencyTraining
from configs import digits_ct

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def ct_run():
  """A CT method on the tiny test network and its (random) parameters."""
  config = digits_ct.get_config("tiny")
  m = tiny_method(ConsistencyTraining, config)
  return config, m, tiny_params(m)


def _gen(ct_run, num, batch, steps, **opts):
  config, m, params = ct_run
  images, _ = sampling.generate(m, params, num=num, seed=3, batch_size=batch,
                                num_steps=steps, image_shape=(8, 8, 1),
                                num_classes=config.data.num_classes, **opts)
  return images


def test_sampling_deterministic_and_independent_of_batch(ct_run):
  a = _gen(ct_run, 4, 4, 1)
  assert a.shape == (4, 8, 8, 1) and a.dtype == np.uint8
  np.testing.assert_array_equal(_gen(ct_run, 4, 2, 1), a)        # batch size
  np.testing.assert_array_equal(_gen(ct_run, 4, 4, 1), a)        # same seed, same images
  m4 = _gen(ct_run, 4, 4, 2, ts=(0, 9, 17), grid_points=18)
  np.testing.assert_array_equal(_gen(ct_run, 4, 2, 2, ts=(0, 9, 17), grid_points=18), m4)
  assert not np.array_equal(m4, a)


def test_multistep_to_sigma_min_equals_onestep(ct_run):
  _, m, params = ct_run
  f = m.consistency_fn(params)
  noise = jax.random.normal(jax.random.key(0), (4, 8, 8, 1))
  keys = jax.random.split(jax.random.key(1), 4)
  labels = jnp.arange(4) % 10
  one = jax.jit(lambda z: cm_sampling.sample_onestep(f, z, 80.0, labels))(noise)
  levels = cm_sampling.karras_levels((0, 17), 18)
  multi = jax.jit(lambda z: cm_sampling.sample_multistep(f, z, levels, keys, labels))(noise)
  np.testing.assert_allclose(np.asarray(multi), np.asarray(one), atol=1e-5)
  assert float(jnp.max(jnp.abs(one))) <= 1.0


def test_multistep_algorithm1_by_hand():
  """f = 0.5 x: each step is x0 = clip(f(x, tau_i)), then x = x0 + sqrt(tau'^2 - smin^2) z_i."""
  f = lambda x, s, labels=None, cond=None: 0.5 * x
  noise = jnp.ones((2, 2, 2, 1)) * 0.01
  keys = jax.random.split(jax.random.key(0), 2)
  out = cm_sampling.sample_multistep(f, noise, np.array([80.0, 1.0, 0.002]), keys)
  x0 = jnp.clip(0.5 * 80.0 * noise, -1, 1)
  x = x0 + np.sqrt(1.0 - 0.002 ** 2) * per_image_normal(keys, (2, 2, 1), step=0)
  np.testing.assert_allclose(np.asarray(out), np.asarray(jnp.clip(0.5 * x, -1, 1)), atol=2e-6)


def test_ts_helpers():
  assert cm_sampling.even_ts(1, 40) == (0, 39)
  assert cm_sampling.even_ts(2, 40) == (0, 20, 39)
  assert cm_sampling.check_ts([0, 22, 39], 40) == (0, 22, 39)
  for bad in ((0,), (0, 22, 22), (0, 40), (5, 3)):
    with pytest.raises(ValueError):
      cm_sampling.check_ts(bad, 40)
  lv = cm_sampling.karras_levels((0, 22, 39), 40)
  assert lv[0] == pytest.approx(80.0) and lv[-1] == pytest.approx(0.002)
  assert lv[1] == pytest.approx(1.3823680, rel=1e-6)   # the ImageNet CD middle level


def test_sample_resolves_config_ts(ct_run):
  config, m, _ = ct_run
  assert len(config.sample.ts) == 3
  assert m.resolve_ts(2) == tuple(config.sample.ts)              # the config's two-step ts
  assert m.resolve_ts(3) == cm_sampling.even_ts(3, config.sample.grid_points)
  assert m.resolve_ts(None, ts=(0, 5, 11), grid_points=12) == (0, 5, 11)
  with pytest.raises(ValueError, match="num_steps"):
    m.resolve_ts(1, ts=(0, 5, 11), grid_points=12)
  with pytest.raises(ValueError, match="multistep"):
    m.sample(None, None, None, None, 1, sampler="heun")


def test_sampling_and_editing_share_one_ts_convention(ct_run):
  """CM Algorithm 1: f at every level of ts except a trailing sigma_min (index N - 1), for
  the sampler and for editing alike; a ts ending elsewhere evaluates f there too."""
  from cm_jax.methods import cm_editing  # pylint: disable=g-import-not-at-top
  grid = np.asarray(cm_sampling.karras_levels(range(18), 18), np.float32)
  for ts, evaluated in (((0, 9, 17), (0, 9)), ((0, 9, 12), (0, 9, 12)), ((0, 17), (0,))):
    want = grid[list(evaluated)]
    np.testing.assert_array_equal(cm_sampling.evaluated_levels(ts, 18), want)
    np.testing.assert_array_equal(cm_editing.sigmas_from_indices(ts, 18), want)
    assert cm_sampling.ts_evaluations(ts, 18) == len(evaluated)

  config, m, params = ct_run
  seen = []
  inner = m.consistency_fn

  def recording(p):
    f = inner(p)

    def call(x, sigma, labels=None, cond=None):
      jax.debug.callback(lambda s: seen.append(float(s[0])), sigma)
      return f(x, sigma, labels) if cond is None else f(x, sigma, labels, cond)
    return call

  m.consistency_fn = recording
  try:
    noise = jax.random.normal(jax.random.key(0), (2, 8, 8, 1))
    keys = jax.random.split(jax.random.key(1), 2)
    x = m.sample(params, noise, keys, jnp.arange(2), 3, ts=(0, 9, 12), grid_points=18)
  finally:
    del m.consistency_fn
  np.testing.assert_allclose(seen, grid[[0, 9, 12]], rtol=1e-6)
  assert float(jnp.max(jnp.abs(x))) <= 1.0
  assert sampling.ts_num_steps(config, ("0", "9", "12"), 18) == 3
  assert sampling.ts_num_steps(config, ("0", "9", "17"), 18) == 2


@pytest.mark.parametrize("lo,hi", [(1, 38), (3, 3), (4, 5), (4, 6), (0, 7)])
def test_ternary_search(lo, hi):
  calls = []

  def f(p):
    calls.append(p)
    return (p - 22.3) ** 2

  best, value, hist = cm_sampling.ternary_search(f, lo, hi, log=None)
  assert best == min(range(lo, hi + 1), key=lambda p: (p - 22.3) ** 2)
  assert len(calls) == len(set(calls))           # each index evaluated once
  assert hist[best] == value


def test_search_intermediate_index_and_pixel_metric(ct_run):
  metric, name = build_metric("pixel", ct_run[0], ref_num=200)
  assert "fallback" in name and np.isfinite(metric(_gen(ct_run, 4, 4, 1)))
  ref = np.random.default_rng(0).integers(0, 256, (64, 2, 2, 1)).astype(np.uint8)
  assert abs(pixel_frechet_distance(ref)(ref)) < 1e-6
  best, _, _ = search_intermediate_index(lambda ts: np.full((4, 1, 1, 1), ts[1], np.uint8),
                                         lambda imgs: abs(float(imgs.mean()) - 9), (0,), (17,),
                                         log=None)
  assert best == 9


def test_sample_cli_steps_and_ts(tmp_path):
  """sample.py on a (micro ADM) CT run: one step, and Algorithm 1 with --ts."""
  config = micro(digits_ct.get_config("tiny"))
  workdir, _ = save_run(str(tmp_path / "run"), config)
  for args, steps in ((["--steps", "1"], "1 steps"),
                      (["--ts", "0,9,17", "--grid_points", "18"], "2 steps")):
    out = str(tmp_path / "s.npz")
    res = subprocess.run([sys.executable, "sample.py", "--workdir", workdir, "--num", "4",
                          "--batch_size", "4", "--out", out] + args,
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    assert steps in res.stdout
    with np.load(out) as f:
      assert f["arr_0"].shape == (4, 8, 8, 1) and f["arr_0"].dtype == np.uint8
