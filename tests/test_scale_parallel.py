"""Parallel layouts of the one train step: jit meshes, FSDP, pmap, accumulation, bf16, remat.

The multi-device checks run in a subprocess with 8 simulated CPU devices
(tests/scale_worker.py `layouts`), once for the module: one train step of the
same global batch of 16 from the same initial state under

  single        jit on a 1-device mesh               (the reference)
  jit_8x1       jit, mesh data=8, fsdp=1             (data parallel)
  jit_4x2       jit, mesh data=4, fsdp=2             (FSDP: params, moments sharded)
  pmap          jax.pmap over 8 devices, lax.pmean
  single_accum4 / jit_4x2_accum2   4 / 2 microbatches inside the step (lax.scan)

Randomness. The EDM loss draws every example's sigma and noise from ONE key for
the whole batch: under jit the batch is one global array and JAX's
partitionable threefry makes those draws independent of the sharding, so every
jit layout sees the same noise (checked with the real EDM loss: edm_single vs
edm_4x2). Under pmap each device only sees its slice and draws for its slice
(the step folds the device index into the key so devices do not repeat each
other's noise), and with microbatches each microbatch draws for itself: the
same distribution, different numbers, so no layout-equality test could pass
with that loss. The comparisons therefore use a per-example-keyed variant of
the EDM loss (scale_worker.per_example_method): example i's sigma and noise
come from fold_in(key(step), global index i), so every layout computes the
same per-example losses and any difference left is float summation order.
The first Adam update is lr * m / (sqrt(v) + eps), so the checks compare the
moments (linear and quadratic in the gradient) and the parameters.
"""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from cm_jax.train import checkpoint, parallel
from cm_jax.train.step import split_microbatches

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "scale_worker.py")


def run_worker(*args, timeout=900):
  result = subprocess.run([sys.executable, WORKER, *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)
  if result.returncode != 0:
    raise AssertionError(f"scale_worker {args} failed:\n{result.stdout[-3000:]}\n"
                         f"{result.stderr[-5000:]}")
  return result


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
  out = tmp_path_factory.mktemp("layouts") / "layouts.npz"
  run_worker("layouts", out)
  data = np.load(out)
  runs = {}
  for key in data.files:
    name, _, leaf = key.partition("/")
    runs.setdefault(name, {})[leaf] = data[key]
  return runs


def _max_diff(a, b, prefix):
  keys = [k for k in a if k.startswith(prefix)]
  assert keys, prefix
  return max(float(np.max(np.abs(a[k] - b[k]))) for k in keys)


def _assert_same_update(a, b, tol=1e-6):
  # mu = 0.1 g (|mu| up to ~1e-2 here), nu = 0.001 g^2, params moved by ~lr = 1e-3.
  assert _max_diff(a, b, "['opt'][0].mu") < tol * 1e-1
  assert _max_diff(a, b, "['opt'][0].nu") < tol * 1e-4
  assert _max_diff(a, b, "['params']") < tol
  np.testing.assert_allclose(a["__loss"], b["__loss"], rtol=1e-6)


@pytest.mark.parametrize("name", ["jit_8x1", "jit_4x2", "pmap"])
def test_one_step_is_the_same_under_every_layout(layouts, name):
  _assert_same_update(layouts[name], layouts["single"])


@pytest.mark.parametrize("name", ["single_accum4", "jit_4x2_accum2"])
def test_accumulated_microbatches_equal_one_big_batch(layouts, name):
  _assert_same_update(layouts[name], layouts["single"])


def test_real_edm_loss_is_layout_invariant_under_jit(layouts):
  _assert_same_update(layouts["edm_4x2"], layouts["edm_single"])
  # ...and the comparisons above are sensitive: another loss moves the moments a lot.
  assert _max_diff(layouts["edm_single"], layouts["single"], "['opt'][0].mu") > 1e-3


def test_fsdp_shards_the_state_and_pmap_stacks_it(layouts):
  assert list(layouts["spec"]["single"]) == ["P()"]
  assert list(layouts["spec"]["jit_8x1"]) == ["P()"]
  fsdp = set(layouts["spec"]["jit_4x2"])
  assert "P()" in fsdp and any("fsdp" in s for s in fsdp)
  assert list(layouts["spec"]["pmap"]) == ["P('batch',)"]


def test_remat_changes_nothing_but_memory(layouts):
  _assert_same_update(layouts["single_remat"], layouts["single"], tol=1e-7)


def test_bf16_compute_keeps_fp32_master_weights(layouts):
  bf16 = layouts["single_bf16"]
  assert set(bf16["__dtypes"]) == {"float32", "int32"}  # params, moments, EMA: fp32
  assert bf16["__loss"].dtype == np.float32
  # bf16 activations change the gradient a little, not a lot.
  mu = _max_diff(bf16, layouts["single"], "['opt'][0].mu")
  assert 0 < mu < 1e-3


def test_pmap_loop_checkpoints_resumes_and_samples(layouts):
  # Asserted inside the worker (scale_worker.pmap_loop); these are the checks it passed.
  assert set(layouts["pmap_loop"]["checked"]) == {
      "resume_exact", "checkpoint_unreplicated", "grid_written"}


# ------------------------------------------------------------ in-process, no compiling


def test_remat_wraps_the_unet_blocks():
  from configs import digits_edm
  from cm_jax.train import builders

  def prims(remat):
    c = digits_edm.get_config("tiny")
    c.model.remat = remat
    parts = builders.build_parts(c)
    shapes = jax.eval_shape(lambda r: builders.init_params(parts, c, r), jax.random.key(0))
    params = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    x = builders.example_inputs(parts, c, 2)
    f = lambda q: parts.net.apply({"params": q}, *x, train=True).sum()
    return str(jax.make_jaxpr(jax.grad(f))(params))

  assert "remat" in prims(True) and "remat" not in prims(False)


def test_fsdp_rule():
  assert parallel.fsdp_spec((3, 3, 64, 128), 2) == jax.P(None, None, None, "fsdp")
  assert parallel.fsdp_spec((3, 3, 128, 128), 2) == jax.P(None, None, None, "fsdp")  # ties: later
  assert parallel.fsdp_spec((1000, 30), 8) == jax.P("fsdp", None)
  assert parallel.fsdp_spec((3, 3, 63, 129), 2) == jax.P()  # nothing divides
  assert parallel.fsdp_spec((128,), 2) == jax.P()  # small: replicated
  assert parallel.fsdp_spec((), 2) == jax.P()
  assert parallel.fsdp_spec((512, 512), 1) == jax.P()  # fsdp = 1: plain data parallel
  assert parallel.fsdp_spec((256,), 2, min_size=16) == jax.P("fsdp")


def test_mesh_shape_from_config():
  cfg = lambda **kw: ml_collections.ConfigDict(dict(dict(data=-1, fsdp=1), **kw))
  assert parallel.mesh_shape(cfg(), 8) == (8, 1)
  assert parallel.mesh_shape(cfg(fsdp=2), 8) == (4, 2)
  assert parallel.mesh_shape(cfg(data=2, fsdp=2), 8) == (2, 2)
  assert parallel.mesh_shape(None, 4) == (4, 1)
  with pytest.raises(ValueError, match="does not divide"):
    parallel.mesh_shape(cfg(fsdp=3), 8)
  with pytest.raises(ValueError, match="needs 16 devices"):
    parallel.mesh_shape(cfg(data=8, fsdp=2), 8)


def test_batch_must_split_over_shards_and_microbatches():
  parallel.check_batch_size(16, 8)
  parallel.check_batch_size(16, 4, grad_accum_steps=4)
  with pytest.raises(ValueError, match="4 batch shards x 8 microbatches"):
    parallel.check_batch_size(16, 4, grad_accum_steps=8)


def test_microbatch_j_takes_every_kth_row():
  batch = {"x": jnp.arange(12).reshape(6, 2), "y": jnp.arange(6)}
  micro = split_microbatches(batch, 3)
  np.testing.assert_array_equal(micro["y"], [[0, 3], [1, 4], [2, 5]])
  np.testing.assert_array_equal(micro["x"][1], [[2, 3], [8, 9]])


def test_pmap_cannot_shard():
  from configs import digits_edm
  c = digits_edm.get_config("tiny")
  c.parallel, c.mesh.fsdp = "pmap", 2
  with pytest.raises(ValueError, match="fsdp must be 1"):
    parallel.build_parallel(c)
  c.parallel = "spmd"
  with pytest.raises(ValueError, match="unknown config.parallel"):
    parallel.build_parallel(c)


def test_data_positions_are_kept_per_process():
  states = [{"grain": {"next_index": 8}}, {"grain": {"next_index": 8}, "process_index": 1}]
  item = checkpoint.process_data_states(states)
  assert checkpoint.data_state_for_process(item, 1, 2) == states[1]
  with pytest.raises(ValueError, match="written by 2 process"):
    checkpoint.data_state_for_process(item, 0, 1)
  legacy = {"grain": {"next_index": 3}}  # single-process checkpoints before per-process states
  assert checkpoint.data_state_for_process(legacy, 0, 1) == legacy
  assert parallel.gather_process_states({"a": 1}) == [{"a": 1}]
