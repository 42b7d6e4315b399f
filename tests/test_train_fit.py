"""Fitting instead of training (cm_jax.train.fit): the result is a run readers restore.

A test-only method with no loss fits the per-channel mean of two data batches; nothing
is compiled beyond a mean, so the module runs in seconds.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cm_jax.train import builders, fit, loop
from cm_jax.train.checkpoint import RunCheckpoints, load_config
from cm_jax.train.optim import build_optimizer
from cm_jax.train.restore import restore_train_state
from cm_testlib import BATCH, TinyNet
from configs import digits_edm


class ChannelMean:
  """Fits the data's per-channel mean from two batches; the frozen 'teacher' offsets it."""
  name = "channel_mean"

  def __init__(self, net, config):
    self.net, self.config = net, config

  def load_teacher(self):
    return {"offset": jnp.float32(0.25)}

  def abstract_fit_params(self):
    c = self.config.data.channels
    return {"mean": jax.ShapeDtypeStruct((c,), jnp.float32),
            "count": jax.ShapeDtypeStruct((), jnp.int32)}

  def fit(self, teacher_params, rng, data_iterator):
    del rng
    images = np.concatenate([next(data_iterator)["image"] for _ in range(2)])
    mean = images.reshape(-1, images.shape[-1]).mean(0) + teacher_params["offset"]
    return {"mean": jnp.asarray(mean, jnp.float32), "count": jnp.int32(len(images))}

  def sample(self, params, noise, keys, labels, num_steps, **options):
    return jnp.broadcast_to(params["mean"], noise.shape)


def _build_parts(config):
  return builders.RunParts(image_shape=(8, 8, 1), net=TinyNet(num_classes=10),
                           method=ChannelMean(TinyNet(num_classes=10), config),
                           optimizer=build_optimizer(config.optim))


def _config():
  c = digits_edm.get_config("tiny")
  c.method.name = ChannelMean.name
  c.training.batch_size = BATCH
  return c


@pytest.fixture
def fitted(tmp_path, monkeypatch):
  monkeypatch.setattr(builders, "build_parts", _build_parts)
  config = _config()
  workdir = str(tmp_path / "fitted")
  return config, workdir, fit.fit_run(config, workdir)


def test_fit_writes_a_run_readers_restore(fitted):
  config, workdir, state = fitted
  from cm_jax import data as data_lib
  it = data_lib.build_train_iterator(config.data, global_batch_size=BATCH, seed=config.seed)
  images = np.concatenate([next(it)["image"] for _ in range(2)])
  expected = images.reshape(-1, 1).mean(0) + 0.25
  np.testing.assert_allclose(np.asarray(state.params["mean"]), expected, rtol=1e-6)

  saved = load_config(workdir)
  assert saved.method.kind == "fitted" and saved.method.name == ChannelMean.name
  restored, step = restore_train_state(workdir, saved, _build_parts(saved))
  assert step == 0 and restored.opt_state == () and restored.ema == {}
  assert restored.target_params is None and restored.round is None
  for a, b in zip(jax.tree.leaves(restored.params), jax.tree.leaves(state.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # sample.py's default copy ('ema') reads the fitted parameters: the run keeps no EMA.
  got = builders.params_for_sampling(restored, saved.sample.params, saved.ema)
  np.testing.assert_array_equal(np.asarray(got["mean"]), np.asarray(state.params["mean"]))
  ckpts = RunCheckpoints(workdir, read_only=True)
  assert ckpts.latest_step() == 0
  ckpts.close()


def test_refitting_into_a_used_workdir_is_refused(fitted):
  config, workdir, _ = fitted
  with pytest.raises(ValueError) as err:
    fit.fit_run(config, workdir)
  assert "not empty" in str(err.value) and "\n" not in str(err.value)


def test_the_training_loop_refuses_a_fitted_method(tmp_path, monkeypatch):
  monkeypatch.setattr(builders, "build_parts", _build_parts)
  with pytest.raises(ValueError, match="fitted, not trained"):
    loop.train(_config(), str(tmp_path / "w"), progress=False)


def test_fit_must_return_the_shapes_it_declares(tmp_path, monkeypatch):
  monkeypatch.setattr(builders, "build_parts", _build_parts)
  monkeypatch.setattr(ChannelMean, "fit", lambda self, t, r, d: {"mean": jnp.zeros((3,)),
                                                                 "count": jnp.int32(0)})
  with pytest.raises(ValueError, match="abstract_fit_params"):
    fit.fit_run(_config(), str(tmp_path / "w"))


def test_a_fit_that_reads_no_data_builds_no_pipeline(tmp_path, monkeypatch):
  monkeypatch.setattr(builders, "build_parts", _build_parts)
  monkeypatch.setattr(ChannelMean, "fit", lambda self, t, r, d: {"mean": jnp.zeros((1,)),
                                                                 "count": jnp.int32(0)})
  config = _config()
  config.data.name = "no_such_data_set"  # building the pipeline would fail
  state = fit.fit_run(config, str(tmp_path / "w"))
  assert int(state.params["count"]) == 0
