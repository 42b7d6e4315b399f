"""The VP diffusion teacher (cm_jax.methods.vp_diffusion): loss weights, the DDIM grid,
guidance through sampling, the CLI."""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cm_jax import sampling
from cm_jax.diffusion import parameterization as P
from cm_jax.methods.vp_diffusion import loss_weight
from cm_jax.train import builders

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_loss_weights_by_hand():
  logsnr = jnp.log(jnp.array([4.0, 0.25]))
  np.testing.assert_allclose(loss_weight("constant", logsnr), [1.0, 1.0])
  np.testing.assert_allclose(loss_weight("snr", logsnr), [4.0, 0.25], rtol=1e-6)
  np.testing.assert_allclose(loss_weight("snr_trunc", logsnr), [4.0, 1.0], rtol=1e-6)
  np.testing.assert_allclose(loss_weight("v_mse", logsnr), [5.0, 1.25], rtol=1e-6)
  with pytest.raises(ValueError, match="loss_weight"):
    loss_weight("nope", logsnr)


def test_weights_equal_the_eps_and_v_errors_of_dpm_py():
  """dpm.py weighs eps-MSE / v-MSE; ours weighs the x-MSE: the same numbers."""
  rng = np.random.default_rng(0)
  x, eps, x_hat = (rng.normal(size=(3, 4, 4, 1)).astype(np.float32) for _ in range(3))
  logsnr = np.array([-3.0, 0.5, 4.0], np.float32)
  alpha = np.sqrt(1 / (1 + np.exp(-logsnr)))[:, None, None, None]
  sigma = np.sqrt(1 / (1 + np.exp(logsnr)))[:, None, None, None]
  z = alpha * x + sigma * eps
  x_mse = ((x_hat - x) ** 2).mean(axis=(1, 2, 3))
  eps_hat = (z - alpha * x_hat) / sigma
  v_hat = alpha * eps_hat - sigma * x_hat
  v = alpha * eps - sigma * x
  eps_mse = ((eps_hat - eps) ** 2).mean(axis=(1, 2, 3))
  v_mse = ((v_hat - v) ** 2).mean(axis=(1, 2, 3))
  np.testing.assert_allclose(loss_weight("snr", logsnr) * x_mse, eps_mse, rtol=1e-4)
  np.testing.assert_allclose(loss_weight("v_mse", logsnr) * x_mse, v_mse, rtol=1e-4)
  np.testing.assert_allclose(loss_weight("snr_trunc", logsnr) * x_mse,
                             np.maximum(x_mse, eps_mse), rtol=1e-4)
  # and the v-parameterisation's x from the true v is x
  np.testing.assert_allclose(P.get_parameterization("v").to_x(v, z, alpha, sigma), x,
                             atol=1e-5)


def test_ddim_grid_is_uniform_in_u(tiny_vp_run):
  config, _, _ = tiny_vp_run
  method = builders.build_parts(config).method
  grid = np.asarray(method.sampling_grid(4))
  u = np.array([1.0, 0.75, 0.5, 0.25])
  # logSNR = -2 log tan(a u + b); sigma_ve = exp(-logSNR / 2) = tan(a u + b)
  b = np.arctan(np.exp(-10.0))
  a = np.arctan(np.exp(10.0)) - b
  np.testing.assert_allclose(grid[:-1], np.tan(a * u + b), rtol=1e-5)
  assert grid[-1] == 0.0


def _generate(config, state, **kw):
  parts = builders.build_parts(config)
  params = builders.params_for_sampling(state, "ema", config.ema)
  return sampling.generate(parts.method, params, num=4, seed=0, batch_size=4, num_steps=3,
                           image_shape=parts.image_shape, num_classes=config.data.num_classes,
                           class_label=3, **kw)


def test_guidance_zero_is_the_conditional_model(tiny_vp_run):
  config, _, state = tiny_vp_run
  plain, labels = _generate(config, state)
  zero, _ = _generate(config, state, guidance=0.0)
  np.testing.assert_array_equal(plain, zero)
  np.testing.assert_array_equal(labels, np.full(4, 3))
  guided, _ = _generate(config, state, guidance=2.0)
  assert guided.shape == plain.shape


def test_sample_cli_guidance(tiny_vp_run, tmp_path):
  _, workdir, _ = tiny_vp_run
  out = tmp_path / "threes.npz"
  r = subprocess.run([sys.executable, "sample.py", "--workdir", workdir, "--sampler", "ddim",
                      "--steps", "3", "--guidance", "1.0", "--class_label", "3", "--num", "4",
                      "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr
  data = np.load(out)
  assert data["arr_0"].shape == (4, 8, 8, 1)
  np.testing.assert_array_equal(data["arr_1"], np.full(4, 3))


def test_guidance_on_a_model_without_null_class_is_one_line(tiny_edm_run, tmp_path):
  _, workdir, _ = tiny_edm_run
  r = subprocess.run([sys.executable, "sample.py", "--workdir", workdir, "--guidance", "1.0",
                      "--out", str(tmp_path / "x.npz")], cwd=ROOT, capture_output=True,
                     text=True, timeout=600)
  assert r.returncode != 0
  assert r.stderr.strip().count("\n") == 0 and "null class" in r.stderr


def test_label_dropout_without_null_class_is_refused():
  from configs import digits_vp
  config = digits_vp.get_config("tiny")
  config.model.null_class = False
  with pytest.raises(ValueError, match="null_class"):
    builders.build_parts(config)


def test_edm_label_dropout_needs_and_uses_the_null_class():
  from configs import digits_edm
  config = digits_edm.get_config("tiny")
  config.method.label_dropout = 0.1
  with pytest.raises(ValueError, match="null_class"):
    builders.build_parts(config)
  config.model.null_class = True
  parts = builders.build_parts(config)
  assert parts.method.null_class == 10
  shapes = jax.eval_shape(lambda: builders.init_params(parts, config, jax.random.key(0)))
  assert shapes["label_emb"]["embedding"].shape[0] == 11   # ten digits + the null class
