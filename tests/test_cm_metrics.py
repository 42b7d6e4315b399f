"""Distances of the consistency losses and the LPIPS-VGG network (random weights only)."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cm_jax.methods import cm_metrics
from cm_jax.nets import lpips, lpips_convert


def test_pseudo_huber_by_hand():
  x = jnp.zeros((2, 4, 4, 3))
  y = x.at[0].set(0.1).at[1].set(-0.2)
  d = 48
  c = 0.00054 * math.sqrt(d)
  assert cm_metrics.pseudo_huber_c((4, 4, 3)) == pytest.approx(c)
  assert cm_metrics.pseudo_huber_c((32, 32, 3)) == pytest.approx(0.0299, abs=1e-4)  # iCT: ~0.03
  want = [math.sqrt(d * 0.01 + c * c) - c, math.sqrt(d * 0.04 + c * c) - c]
  np.testing.assert_allclose(cm_metrics.pseudo_huber(x, y), want, rtol=1e-6)
  np.testing.assert_allclose(cm_metrics.distance(x, y, "pseudo_huber", huber_c=0.5),
                             [math.sqrt(0.48 + 0.25) - 0.5, math.sqrt(1.92 + 0.25) - 0.5],
                             rtol=1e-6)
  np.testing.assert_allclose(cm_metrics.distance(x, y, "l2"), [0.01, 0.04], rtol=1e-6)
  np.testing.assert_allclose(cm_metrics.distance(x, y, "l1"), [0.1, 0.2], rtol=1e-6)
  np.testing.assert_allclose(cm_metrics.distance(x, x, "pseudo_huber"), [0.0, 0.0], atol=1e-9)
  with pytest.raises(ValueError, match="lpips"):
    cm_metrics.distance(x, y, "lpips")
  with pytest.raises(ValueError, match="unknown metric"):
    cm_metrics.distance(x, y, "l3")


@pytest.fixture(scope="module")
def lpips_params():
  return lpips.random_params(jax.random.key(0))


def test_lpips_shapes_identity_determinism(lpips_params):
  net = lpips.LPIPS(resize_to=16)  # the 224 upsampling of training, scaled down for speed
  fn = jax.jit(lambda a, b: net.apply({"params": lpips_params}, a, b))
  x = jax.random.uniform(jax.random.key(1), (3, 8, 8, 3), minval=-1, maxval=1)
  y = jax.random.uniform(jax.random.key(2), (3, 8, 8, 3), minval=-1, maxval=1)
  d = fn(x, y)
  assert d.shape == (3,) and np.all(np.asarray(d) > 0)
  np.testing.assert_array_equal(np.asarray(fn(x, y)), np.asarray(d))   # deterministic
  np.testing.assert_allclose(np.asarray(fn(y, x)), np.asarray(d), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(fn(x, x)), 0.0, atol=1e-7)      # identity gives 0
  # Grey images are repeated to RGB.
  g = x[..., :1]
  np.testing.assert_allclose(np.asarray(fn(g, g)), 0.0, atol=1e-7)
  assert fn(g, y[..., :1]).shape == (3,)


def test_lpips_weights_file_errors(tmp_path, lpips_params):
  with pytest.raises(FileNotFoundError, match="lpips_convert"):
    lpips.load_params(str(tmp_path / "missing.npz"))
  with pytest.raises(FileNotFoundError, match="lpips_convert"):
    lpips.load_params("")
  bad = dict(lpips.flatten_params(lpips_params))
  bad.pop("lin3/kernel")
  np.savez(tmp_path / "bad.npz", **bad)
  with pytest.raises(ValueError, match="lin3/kernel"):
    lpips.load_params(str(tmp_path / "bad.npz"))
  lpips.save_params(str(tmp_path / "ok.npz"), lpips_params)
  back = lpips.load_params(str(tmp_path / "ok.npz"))
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(lpips_params)):
    np.testing.assert_array_equal(a, b)


def _torch_lpips(vgg_state, lins, x, y, torch):
  """LPIPS as PerceptualSimilarity computes it, in NCHW torch, from the torch-layout weights."""
  F = torch.nn.functional
  shift = torch.tensor(lpips.SHIFT).view(1, 3, 1, 1)
  scale = torch.tensor(lpips.SCALE).view(1, 3, 1, 1)

  def feats(z):
    h = (z - shift) / scale
    out, k = [], 0
    for b, block in enumerate(lpips.VGG16_BLOCKS):
      if b:
        h = F.max_pool2d(h, 2, 2)
      for _ in block:
        idx = lpips_convert.TORCHVISION_CONV_INDICES[k]
        h = F.relu(F.conv2d(h, vgg_state[f"features.{idx}.weight"],
                            vgg_state[f"features.{idx}.bias"], padding=1))
        k += 1
      out.append(h / (h.pow(2).sum(1, keepdim=True).sqrt() + 1e-10))
    return out

  total = 0
  for f1, f2, w in zip(feats(x), feats(y), lins):
    total = total + F.conv2d((f1 - f2) ** 2, w).mean(dim=(2, 3))
  return total.view(-1)


def test_convert_matches_torch_lpips(tmp_path):
  torch = pytest.importorskip("torch")
  gen = torch.Generator().manual_seed(0)
  vgg_state, cin = {}, 3
  names = [n for block in lpips.VGG16_BLOCKS for n in block]
  for (_, ch), idx in zip(names, lpips_convert.TORCHVISION_CONV_INDICES):
    vgg_state[f"features.{idx}.weight"] = torch.randn(ch, cin, 3, 3, generator=gen) * 0.1
    vgg_state[f"features.{idx}.bias"] = torch.randn(ch, generator=gen) * 0.1
    cin = ch
  lins = [torch.rand(1, ch, 1, 1, generator=gen) for ch in lpips.TAP_CHANNELS]
  lin_state = {f"lin{i}.model.1.weight": w for i, w in enumerate(lins)}
  torch.save(vgg_state, tmp_path / "vgg16.pth")
  torch.save(lin_state, tmp_path / "vgg.pth")
  out = str(tmp_path / "lpips.npz")
  assert lpips_convert.main(["--vgg16", str(tmp_path / "vgg16.pth"), "--lin",
                             str(tmp_path / "vgg.pth"), "--out", out]) == 0
  params = lpips.load_params(out)
  rng = np.random.default_rng(0)
  x = rng.uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
  y = rng.uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
  got = lpips.LPIPS(resize_to=None).apply({"params": params}, x, y)
  to_t = lambda a: torch.from_numpy(a.transpose(0, 3, 1, 2).copy())
  with torch.no_grad():
    want = _torch_lpips(vgg_state, lins, to_t(x), to_t(y), torch).numpy()
  np.testing.assert_allclose(np.asarray(got), want, rtol=2e-4)
