"""The one trainer: exact resume, metrics on disk, and a clean stop on NaN."""
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cm_jax.methods.edm import EDM
from cm_jax.train import loop
from cm_jax.train.checkpoint import RunCheckpoints


def _assert_trees_equal(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_resume_continues_identically(tiny_edm_run, tmp_path):
  config, _, uninterrupted = tiny_edm_run  # 4 steps in one go
  workdir = str(tmp_path / "resumed")
  loop.train(config, workdir, num_steps=2, progress=False)
  resumed = loop.train(config, workdir, num_steps=4, progress=False)
  assert int(resumed.step) == int(uninterrupted.step) == 4
  _assert_trees_equal(resumed.params, uninterrupted.params)
  _assert_trees_equal(resumed.ema, uninterrupted.ema)
  _assert_trees_equal(resumed.opt_state, uninterrupted.opt_state)


def test_keep_checkpoints_zero_is_refused_and_nothing_is_deleted(tiny_edm_run):
  """Orbax's max_to_keep=0 would delete every checkpoint, the resumed one included."""
  config, workdir, _ = tiny_edm_run
  before = sorted(os.listdir(os.path.join(workdir, "checkpoints")))
  bad = config.copy_and_resolve_references()
  bad.training.keep_checkpoints = 0
  with pytest.raises(ValueError, match="keep_checkpoints must be >= 1") as err:
    loop.train(bad, workdir, num_steps=6, progress=False)
  assert "\n" not in str(err.value)
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == before


def test_metrics_and_checkpoints_written(tiny_edm_run):
  config, workdir, state = tiny_edm_run
  rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  assert [r["step"] for r in rows] == [2, 4]
  for r in rows:
    assert np.isfinite(r["loss"]) and r["loss"] > 0
    assert r["images_per_sec"] > 0 and "grad_norm" in r
  assert RunCheckpoints(workdir, read_only=True).latest_step() == 4
  # The params moved away from their initial values and the EMA tracks them.
  assert int(state.step) == 4
  assert set(state.ema) == {"halflife"}


def test_resume_drops_the_metrics_rows_a_kill_left_after_the_checkpoint(tiny_edm_run, tmp_path):
  """kill -9 after step 6 was logged but before it was saved: the restart from step 4
  replays steps 5-6, so their rows (and a torn last line) go before they are logged again."""
  config, workdir, _ = tiny_edm_run
  copy = str(tmp_path / "killed")
  shutil.copytree(workdir, copy)
  with open(os.path.join(copy, "metrics.jsonl"), "a") as f:
    f.write(json.dumps({"step": 6, "loss": 123.0}) + "\n" + '{"step": 8, "lo')
  loop.train(config, copy, num_steps=6, progress=False)
  rows = [json.loads(line) for line in open(os.path.join(copy, "metrics.jsonl"))]
  assert [r["step"] for r in rows] == [2, 4, 6]
  assert rows[-1]["loss"] != 123.0  # the replayed step's own row


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(tiny_edm_run, tmp_path, monkeypatch):
  config, _, _ = tiny_edm_run
  good_workdir = str(tmp_path / "good")
  good = loop.train(config, good_workdir, num_steps=2, progress=False)

  real_loss = EDM.loss

  def loss_nan_from_step_2(self, params, batch, rng, ctx):
    value, metrics = real_loss(self, params, batch, rng, ctx)
    value = jnp.where(ctx.step >= 2, jnp.nan, value)
    return value, dict(metrics, loss=value)

  monkeypatch.setattr(EDM, "loss", loss_nan_from_step_2)
  bad_workdir = str(tmp_path / "bad")
  with pytest.raises(loop.NonFiniteLossError, match="step 2"):
    loop.train(config, bad_workdir, num_steps=4, progress=False)
  ckpts = RunCheckpoints(bad_workdir, read_only=True)
  assert ckpts.latest_step() == 2
  from cm_jax.train.checkpoint import abstract_like
  restored, _, _ = ckpts.restore(abstract_like(good))
  _assert_trees_equal(restored.params, good.params)


def test_imported_checkpoint_restarts_the_data_from_the_beginning():
  from cm_jax.train.checkpoint import data_state_for_process
  # `python -m cm_jax.interop import` stores weights with no data position.
  assert data_state_for_process({"imported": True, "source": "openai"}, 0, 1) is None
  assert data_state_for_process({"process_count": 1, "processes": [{"a": 1}]}, 0, 1) == {"a": 1}
