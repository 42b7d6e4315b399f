"""Zero-shot editing with a consistency model (Consistency Models, Algorithm 4 / Appendix D).

The consistency function is analytic: make_denoiser(parameterization='consistency')
around a "network" F(x_in) = 2 T + 0.3 tanh(x_in), so f(x, sigma_min) = x holds
and f pulls everything towards the image T. The CLI is checked on its functions
(one-line errors) and end to end on the tiny digits EDM checkpoint of conftest,
its network wrapped with the consistency preconditioning (an EDM run itself is
refused by sample.py --edit, which one subprocess checks).
"""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from cm_jax.cli import editing as editing_cli
from cm_jax.diffusion.grids import karras_sigmas
from cm_jax.diffusion.noise import per_image_keys, per_image_normal
from cm_jax.diffusion.preconditioning import consistency_scalings, make_denoiser
from cm_jax.methods import cm_editing as ed
from cm_jax.methods import cm_editing_ops as ops
from cm_jax.methods.base import network_fn

H = W = 8
RNG = np.random.default_rng(0)
TARGET = RNG.uniform(-0.8, 0.8, (1, H, W, 3)).astype(np.float32)
IMAGES = RNG.uniform(-1.0, 1.0, (2, H, W, 3)).astype(np.float32)
SIGMAS = ed.sigmas_from_indices([0, 10, 20, 30, 39], 40)   # 4 levels, sigma_min dropped
KEYS = per_image_keys(jax.random.key(0), jnp.arange(2))
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _net(x_in, c_noise, labels=None, cond=None):
  c = x_in.shape[-1]
  return 2.0 * jnp.asarray(TARGET[..., :c]) + 0.3 * jnp.tanh(x_in)


CFN = make_denoiser(_net, parameterization="consistency")


def _f_np(x, s):
  """numpy f(x, s) of CFN, float64."""
  c_skip, c_out, c_in = (float(v) for v in consistency_scalings(s))
  return c_skip * x + c_out * (2.0 * TARGET[..., :x.shape[-1]] + 0.3 * np.tanh(c_in * x))


# ------------------------------------------------------------------ operators

def test_luma_matrix_is_orthogonal_with_luma_first_column():
  q = ops.luma_orthogonal_matrix()
  np.testing.assert_allclose(q @ q.T, np.eye(3), atol=1e-12)
  np.testing.assert_allclose(q.T @ q, np.eye(3), atol=1e-12)
  v = np.array(ops.LUMA_WEIGHTS) / np.linalg.norm(ops.LUMA_WEIGHTS)
  np.testing.assert_allclose(q[:, 0], v, atol=1e-12)
  # replace(y, x) = P y + (I - P) x with P the projection on the luma direction.
  y, x = IMAGES[:1], IMAGES[1:]
  p = np.outer(v, v)
  want = y @ p + x @ (np.eye(3) - p)
  got = ops.colorization_operator().replace(jnp.asarray(y), jnp.asarray(x))
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-5)


@pytest.mark.parametrize("p", [2, 4])
def test_block_mean_matrix_is_orthogonal_and_replaces_block_means(p):
  q = ops.block_mean_orthogonal_matrix(p)
  np.testing.assert_allclose(q @ q.T, np.eye(p * p), atol=1e-12)
  np.testing.assert_allclose(q[:, 0], np.full(p * p, 1.0 / p), atol=1e-12)
  y, x = IMAGES[:1], IMAGES[1:]

  def bmean(a):
    m = a.reshape(1, H // p, p, W // p, p, 3).mean(axis=(2, 4), keepdims=True)
    return np.broadcast_to(m, (1, H // p, p, W // p, p, 3)).reshape(1, H, W, 3)

  got = ops.superres_operator(p).replace(jnp.asarray(y), jnp.asarray(x))
  np.testing.assert_allclose(np.asarray(got), x - bmean(x) + bmean(y), atol=1e-5)
  np.testing.assert_allclose(np.asarray(ops.block_mean(jnp.asarray(y), p)), bmean(y), atol=1e-6)


def test_patches_roundtrip_and_center_box():
  x = jnp.asarray(IMAGES)
  np.testing.assert_array_equal(np.asarray(ops.from_patches(ops.to_patches(x, 4), 4)), IMAGES)
  m = ops.center_box_mask(32, 32)
  assert m[8:24, 8:24].sum() == 0 and m.sum() == 32 * 32 - 16 * 16


def test_slerp_endpoints_and_norm():
  k1, k2 = jax.random.split(jax.random.key(3))
  z1 = jax.random.normal(k1, (H, W, 3))
  z2 = jax.random.normal(k2, (H, W, 3))
  np.testing.assert_array_equal(np.asarray(ops.slerp(z1, z2, 0.0)), np.asarray(z1))
  np.testing.assert_array_equal(np.asarray(ops.slerp(z1, z2, 1.0)), np.asarray(z2))
  # Equal norms: slerp stays on the sphere; the midpoint bisects the angle.
  z2s = z2 * (jnp.linalg.norm(z1) / jnp.linalg.norm(z2))
  mid = ops.slerp(z1, z2s, 0.5)
  np.testing.assert_allclose(float(jnp.linalg.norm(mid)), float(jnp.linalg.norm(z1)), rtol=1e-5)
  # Unequal norms: the formula, in numpy.
  a, b = np.asarray(z1, np.float64).ravel(), np.asarray(z2, np.float64).ravel()
  psi = np.arccos(a @ b / np.linalg.norm(a) / np.linalg.norm(b))
  want = (np.sin(0.3 * psi) * a + np.sin(0.7 * psi) * b) / np.sin(psi)
  np.testing.assert_allclose(np.asarray(ops.slerp(z1, z2, 0.7)).ravel(), want, atol=1e-5)
  # Parallel latents: linear interpolation, no NaN.
  np.testing.assert_allclose(np.asarray(ops.slerp(z1, 2 * z1, 0.5)), 1.5 * np.asarray(z1),
                             rtol=1e-5)


def test_sigmas_from_indices_match_the_karras_grid():
  grid = np.asarray(karras_sigmas(40))
  np.testing.assert_allclose(ed.sigmas_from_indices([0, 22, 39], 40), grid[[0, 22]], rtol=1e-6)
  np.testing.assert_allclose(ed.sigmas_from_indices([0, 22], 40), grid[[0, 22]], rtol=1e-6)
  np.testing.assert_allclose(ed.sigmas_from_indices([39], 40), grid[[39]], rtol=1e-6)
  for bad in ([3, 1], [0, 40], [-1], []):
    with pytest.raises(ValueError):
      ed.sigmas_from_indices(bad, 40)


# ---------------------------------------------------------------------- tasks

def test_algorithm4_by_hand_two_levels():
  """Inpainting, t_1 > t_2: x = y + t_1 z_0, f, replace; + sqrt(t_2^2 - eps^2) z_1, f, replace."""
  mask = ops.center_box_mask(H, W)[None, :, :, None]
  t1, t2 = float(SIGMAS[1]), float(SIGMAS[2])
  out, ref = ed.inpaint(CFN, IMAGES, mask[0, :, :, 0], KEYS, jnp.asarray([t1, t2]))
  z0 = np.asarray(per_image_normal(KEYS, (H, W, 3), step=0), np.float64)
  z1 = np.asarray(per_image_normal(KEYS, (H, W, 3), step=1), np.float64)
  y = IMAGES * mask
  x = np.clip(_f_np(y + t1 * z0, t1), -1, 1)
  x = y * mask + x * (1 - mask)
  x = x + np.sqrt(t2**2 - 0.002**2) * z1
  x = np.clip(_f_np(x, t2), -1, 1)
  want = y * mask + x * (1 - mask)
  np.testing.assert_allclose(np.asarray(ref), y, atol=1e-7)
  np.testing.assert_allclose(np.asarray(out), want, atol=1e-4)


def test_inpaint_keeps_known_pixels_exactly_and_fills_the_rest():
  mask = ops.center_box_mask(H, W)
  out, _ = ed.inpaint(CFN, IMAGES, mask, KEYS, SIGMAS)
  out = np.asarray(out)
  known = np.broadcast_to(mask[None, :, :, None] > 0, out.shape)
  np.testing.assert_array_equal(out[known], IMAGES[known])
  unknown = out[~known]
  assert np.all(np.abs(unknown - IMAGES[~known]) > 1e-3)
  assert np.abs(unknown).max() <= 1.0 and np.std(unknown) > 0.1  # generated, not zeros
  with pytest.raises(ValueError, match="mask shape"):
    ed.inpaint(CFN, IMAGES, np.ones((4, 4)), KEYS, SIGMAS)


def test_colorize_keeps_luma_and_adds_colour():
  grey = np.repeat(IMAGES[..., :1], 3, axis=-1)
  out, ref = ed.colorize(CFN, grey, KEYS, SIGMAS)
  np.testing.assert_allclose(np.asarray(ops.luma(out)), np.asarray(ops.luma(jnp.asarray(grey))),
                             atol=2e-5)
  np.testing.assert_allclose(np.asarray(ops.luma(ref)), np.asarray(ops.luma(jnp.asarray(grey))),
                             atol=2e-5)  # the reference keeps only the luma coefficient
  assert float(jnp.std(out, axis=-1).mean()) > 0.05  # channels now differ: colour
  with pytest.raises(ValueError, match="RGB"):
    ed.colorize(CFN, IMAGES[..., :1], KEYS, SIGMAS)


def test_superres_keeps_block_means():
  out, ref = ed.superres(CFN, IMAGES, KEYS, SIGMAS, 2)
  np.testing.assert_allclose(np.asarray(ops.block_mean(out, 2)),
                             np.asarray(ops.block_mean(jnp.asarray(IMAGES), 2)), atol=2e-5)
  np.testing.assert_allclose(np.asarray(ref), np.asarray(ops.block_mean(jnp.asarray(IMAGES), 2)),
                             atol=2e-6)
  assert float(jnp.abs(out - ref).mean()) > 0.05  # detail was generated inside the blocks
  with pytest.raises(ValueError, match="patch"):
    ed.superres(CFN, IMAGES, KEYS, SIGMAS, 3)


def test_stroke_guided_by_hand():
  t1, t2 = float(SIGMAS[2]), float(SIGMAS[3])
  out, ref = ed.stroke_guided(CFN, IMAGES, KEYS, jnp.asarray([t1, t2]))
  z0 = np.asarray(per_image_normal(KEYS, (H, W, 3), step=0), np.float64)
  z1 = np.asarray(per_image_normal(KEYS, (H, W, 3), step=1), np.float64)
  x = np.clip(_f_np(IMAGES + t1 * z0, t1), -1, 1)
  x = np.clip(_f_np(x + np.sqrt(t2**2 - 0.002**2) * z1, t2), -1, 1)
  np.testing.assert_allclose(np.asarray(out), x, atol=1e-4)
  np.testing.assert_array_equal(np.asarray(ref), IMAGES)


def test_interpolate_endpoints_are_one_step_samples_of_z1_z2():
  k1, k2 = jax.random.split(jax.random.key(5))
  z1 = jax.random.normal(k1, (H, W, 3))
  z2 = jax.random.normal(k2, (H, W, 3))
  keys = per_image_keys(jax.random.key(0), jnp.zeros(3, jnp.int32))
  out, zs = ed.interpolate(CFN, z1, z2, jnp.asarray([0.0, 0.5, 1.0]), keys, jnp.asarray([80.0]))
  np.testing.assert_array_equal(np.asarray(zs[0]), np.asarray(z1))
  np.testing.assert_array_equal(np.asarray(zs[2]), np.asarray(z2))
  for i, z in ((0, z1), (2, z2)):
    want = np.clip(_f_np(80.0 * np.asarray(z, np.float64)[None], 80.0), -1, 1)[0]
    np.testing.assert_allclose(np.asarray(out[i]), want, atol=1e-5)
  # multistep works too and stays in range
  out2, _ = ed.interpolate(CFN, z1, z2, jnp.asarray([0.0, 0.5, 1.0]), keys, SIGMAS[:2])
  assert out2.shape == (3, H, W, 3) and float(jnp.abs(out2).max()) <= 1.0


def test_denoise_returns_f_of_the_noisy_image():
  sigma = 0.3
  out, noisy = ed.denoise(CFN, IMAGES, KEYS, sigma)
  z = np.asarray(per_image_normal(KEYS, (H, W, 3), step=0), np.float64)
  np.testing.assert_allclose(np.asarray(noisy), IMAGES + sigma * z, atol=1e-5)
  np.testing.assert_allclose(np.asarray(out), np.clip(_f_np(IMAGES + sigma * z, sigma), -1, 1),
                             atol=1e-5)


def test_deterministic_per_image_and_jittable():
  mask = ops.center_box_mask(H, W)
  run = jax.jit(lambda x, k, s: ed.inpaint(CFN, x, mask, k, s)[0])
  a = np.asarray(run(IMAGES, KEYS, SIGMAS))
  np.testing.assert_array_equal(a, np.asarray(run(IMAGES, KEYS, SIGMAS)))
  eager, _ = ed.inpaint(CFN, IMAGES, mask, KEYS, SIGMAS)
  np.testing.assert_allclose(a, np.asarray(eager), atol=1e-5)
  other = np.asarray(run(IMAGES, per_image_keys(jax.random.key(1), jnp.arange(2)), SIGMAS))
  assert np.abs(other - a).max() > 1e-3
  # image 1 edited alone with its own key is the same as in the batch
  alone, _ = ed.inpaint(CFN, IMAGES[1:], mask, KEYS[1:], SIGMAS)
  np.testing.assert_allclose(np.asarray(alone)[0], a[1], atol=1e-5)


def test_grey_model_inpaint_and_superres():
  grey = IMAGES[..., :1]
  out, _ = ed.inpaint(CFN, grey, ops.center_box_mask(H, W), KEYS, SIGMAS[:2])
  assert out.shape == grey.shape
  out, _ = ed.superres(CFN, grey, KEYS, SIGMAS[:2], 4)
  np.testing.assert_allclose(np.asarray(ops.block_mean(out, 4)),
                             np.asarray(ops.block_mean(jnp.asarray(grey), 4)), atol=2e-5)


# ------------------------------------------------------------------------ CLI

def _png(path, array):
  a = np.asarray(array, np.uint8)
  Image.fromarray(a[..., 0] if a.ndim == 3 and a.shape[2] == 1 else a).save(path)
  return str(path)


def _one_line(excinfo):
  msg = str(excinfo.value)
  assert msg and "\n" not in msg
  return msg


def test_cli_input_errors_are_one_line(tmp_path):
  rgb = _png(tmp_path / "rgb.png", RNG.integers(0, 255, (H, W, 3)))
  grey = _png(tmp_path / "grey.png", RNG.integers(0, 255, (H, W, 1)))
  big = _png(tmp_path / "big.png", RNG.integers(0, 255, (16, 16, 3)))
  with pytest.raises(editing_cli.EditError) as e:
    editing_cli.load_images(big, (H, W, 3), task="inpaint")
  assert "16x16" in _one_line(e) and "8x8" in _one_line(e)
  with pytest.raises(editing_cli.EditError) as e:
    editing_cli.load_images(rgb, (H, W, 1), task="inpaint")
  assert "RGB" in _one_line(e)
  with pytest.raises(editing_cli.EditError) as e:
    editing_cli.load_images(grey, (H, W, 3), task="superres", patch=2)
  assert "grey" in _one_line(e)
  assert editing_cli.load_images(grey, (H, W, 3), task="colorize").shape == (1, H, W, 3)
  low = _png(tmp_path / "low.png", RNG.integers(0, 255, (H // 2, W // 2, 3)))
  up = editing_cli.load_images(low, (H, W, 3), task="superres", patch=2)
  assert up.shape == (1, H, W, 3)
  with pytest.raises(editing_cli.EditError) as e:
    editing_cli.load_images(str(tmp_path / "missing.png"), (H, W, 3), task="inpaint")
  _one_line(e)
  with pytest.raises(editing_cli.EditError) as e:
    editing_cli.load_mask(_png(tmp_path / "m.png", np.full((4, 8, 1), 255)), H, W)
  assert "4x8" in _one_line(e)
  m = np.full((H, W, 1), 255)
  m[2:5, 2:5] = 0
  mask = editing_cli.load_mask(_png(tmp_path / "m2.png", m), H, W)
  assert mask.shape == (H, W) and mask.sum() == H * W - 9
  for text in ("3,1", "0,40", "a,b"):
    with pytest.raises(editing_cli.EditError) as e:
      editing_cli.parse_ts(text, 40, [0])
    _one_line(e)


@pytest.fixture(scope="module")
def tiny_cm(tiny_edm_run):
  """The tiny EDM run's network with the consistency preconditioning (a stand-in for a
  trained CT/CD run; the network is the same, only the scalings differ)."""
  from cm_jax.train import builders
  config, workdir, state = tiny_edm_run
  parts = builders.build_parts(config)
  params = builders.params_for_sampling(state, "ema", config.ema)
  cm_config = config.copy_and_resolve_references()
  cm_config.method.name = "stand_in_cm"
  fn = make_denoiser(
      network_fn(parts.net, params), parameterization="consistency",
      sigma_data=config.precond.sigma_data,
      sigma_min=config.precond.sigma_min, c_noise=config.precond.c_noise)
  return config, cm_config, workdir, parts, params, fn


def test_cli_plan_errors(tiny_cm, tmp_path):
  config, cm_config, _, parts, _, _ = tiny_cm
  shape = parts.image_shape  # (8, 8, 1) digits
  img = _png(tmp_path / "d.png", RNG.integers(0, 255, (H, W, 1)))
  with pytest.raises(editing_cli.EditError) as e:
    editing_cli.plan(editing_cli.EditRequest(task="inpaint", image=img), config, shape)
  assert "consistency model" in _one_line(e)
  with pytest.raises(editing_cli.EditError) as e:
    editing_cli.plan(editing_cli.EditRequest(task="colorize", image=img), cm_config, shape)
  assert "RGB" in _one_line(e)
  with pytest.raises(editing_cli.EditError) as e:
    editing_cli.plan(editing_cli.EditRequest(task="superres", image=img, patch=3), cm_config,
                     shape)
  assert "--patch 3" in _one_line(e)
  with pytest.raises(editing_cli.EditError) as e:
    editing_cli.plan(editing_cli.EditRequest(task="inpaint"), cm_config, shape)
  assert "--image" in _one_line(e)
  with pytest.raises(editing_cli.EditError) as e:
    editing_cli.plan(editing_cli.EditRequest(task="denoise", image=img, sigma=500.0), cm_config,
                     shape)
  assert "--sigma" in _one_line(e)


def test_cli_end_to_end_on_tiny_checkpoint(tiny_cm, tmp_path):
  _, cm_config, _, parts, params, fn = tiny_cm
  shape = parts.image_shape
  digit = np.full((H, W, 1), 64, np.uint8)
  digit[1:7, 3:5] = 192
  img = _png(tmp_path / "digit.png", digit)
  mask = np.full((H, W, 1), 255, np.uint8)
  mask[:, 4:] = 0
  mask_png = _png(tmp_path / "mask.png", mask)
  requests = {
      "inpaint": dict(image=img, mask=mask_png, num=3),
      "superres": dict(image=img, patch=2),
      "stroke": dict(image=img, sigma=2.0),
      "denoise": dict(image=img, sigma=0.5),
      "interpolate": dict(num=4),
  }
  for task, kw in requests.items():
    ts = None if task == "denoise" else "0,1,2,3"
    req = editing_cli.EditRequest(task=task, ts=ts, grid_points=4, batch_size=2, **kw)
    job = editing_cli.plan(req, cm_config, shape)
    out = str(tmp_path / f"{task}.npz")
    result = editing_cli.run_and_save(job, cm_config, parts, params, out, consistency_fn=fn)
    with np.load(out) as f:
      arr = f["arr_0"]
      assert arr.dtype == np.uint8 and arr.shape == (job.num, H, W, 1)
      assert f["arr_1"].shape == (job.num,)
    assert os.path.exists(str(tmp_path / f"{task}.png"))
    if task == "inpaint":
      assert arr.shape[0] == 3
      np.testing.assert_array_equal(arr[:, :, :4], np.broadcast_to(digit[None, :, :4],
                                                                   (3, H, 4, 1)))
    if task == "superres":
      # Block means are kept (up to uint8 rounding) wherever the uint8 output is not clipped.
      blocks = arr.astype(np.float64).reshape(4, 2, 4, 2).transpose(0, 2, 1, 3).reshape(16, 4)
      want = digit.astype(np.float64).reshape(4, 2, 4, 2).mean(axis=(1, 3)).reshape(16)
      free = np.all((blocks > 0) & (blocks < 255), axis=1)
      assert free.any()
      np.testing.assert_allclose(blocks.mean(axis=1)[free], want[free], atol=0.5)
    assert result["results"].shape[0] == job.num


def test_sample_py_refuses_to_edit_an_edm_run(tiny_edm_run, tmp_path):
  _, workdir, _ = tiny_edm_run
  img = _png(tmp_path / "d.png", np.zeros((H, W, 1)))
  proc = subprocess.run(
      [sys.executable, os.path.join(REPO, "sample.py"), f"--workdir={workdir}",
       "--edit=inpaint", f"--image={img}", f"--out={tmp_path / 'x.npz'}"],
      capture_output=True, text=True, cwd=REPO, timeout=300)
  assert proc.returncode != 0
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("sample.py: --edit needs a consistency model"), proc.stderr[-2000:]


def test_cli_plan_timesteps(tiny_cm, tmp_path):
  _, cm_config, _, parts, _, _ = tiny_cm
  shape = parts.image_shape
  img = _png(tmp_path / "d.png", RNG.integers(0, 255, (H, W, 1)))
  grid = np.asarray(karras_sigmas(40))
  plan = lambda **kw: editing_cli.plan(editing_cli.EditRequest(**kw), cm_config, shape)
  # the reference's editing: every index of the 40-level grid; sigma_min costs no step
  np.testing.assert_allclose(plan(task="inpaint", image=img).sigmas, grid[:39], rtol=1e-6)
  np.testing.assert_allclose(plan(task="inpaint", image=img, steps=3).sigmas,
                             grid[[0, 13, 26]], rtol=1e-6)
  np.testing.assert_allclose(plan(task="superres", image=img, ts="0,22,39").sigmas,
                             grid[[0, 22]], rtol=1e-6)
  np.testing.assert_allclose(plan(task="interpolate").sigmas, [80.0], rtol=1e-6)
  s = plan(task="stroke", image=img, sigma=2.0).sigmas
  assert s[0] == 2.0 and np.all(np.diff(s) < 0) and s[1] < 2.0
  assert plan(task="denoise", image=img).sigmas.shape == (1,)
  with pytest.raises(editing_cli.EditError) as e:
    plan(task="inpaint", image=img, steps=2, ts="0,1")
  _one_line(e)
