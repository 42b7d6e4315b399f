"""The Flax FID Inception-v3 against a PyTorch twin of pytorch-fid's FIDInceptionV3.

The torch model below is written here from pytorch-fid's structure (torchvision's
Inception3 names, FIDInceptionA/C/E_1/E_2 pooling patches, 1008 classes), randomly
initialised; its state dict goes through the converter exactly as the real file would.
"""
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cm_jax.eval import features, inception, inception_convert

torch = pytest.importorskip("torch")
nn, F = torch.nn, torch.nn.functional


# ---------------------------------------------------------------------------------------
# PyTorch twin (names and shapes as in torchvision / pytorch-fid).
# ---------------------------------------------------------------------------------------

class BasicConv2d(nn.Module):
  def __init__(self, cin, cout, **kw):
    super().__init__()
    self.conv = nn.Conv2d(cin, cout, bias=False, **kw)
    self.bn = nn.BatchNorm2d(cout, eps=0.001)

  def forward(self, x):
    return F.relu(self.bn(self.conv(x)))


def _avg(x):
  return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class FIDInceptionA(nn.Module):
  def __init__(self, cin, pool_features):
    super().__init__()
    self.branch1x1 = BasicConv2d(cin, 64, kernel_size=1)
    self.branch5x5_1 = BasicConv2d(cin, 48, kernel_size=1)
    self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
    self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
    self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
    self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
    self.branch_pool = BasicConv2d(cin, pool_features, kernel_size=1)

  def forward(self, x):
    return torch.cat([self.branch1x1(x), self.branch5x5_2(self.branch5x5_1(x)),
                      self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                      self.branch_pool(_avg(x))], 1)


class InceptionB(nn.Module):
  def __init__(self, cin):
    super().__init__()
    self.branch3x3 = BasicConv2d(cin, 384, kernel_size=3, stride=2)
    self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
    self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
    self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

  def forward(self, x):
    return torch.cat([self.branch3x3(x),
                      self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                      F.max_pool2d(x, 3, stride=2)], 1)


class FIDInceptionC(nn.Module):
  def __init__(self, cin, c7):
    super().__init__()
    self.branch1x1 = BasicConv2d(cin, 192, kernel_size=1)
    self.branch7x7_1 = BasicConv2d(cin, c7, kernel_size=1)
    self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
    self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
    self.branch7x7dbl_1 = BasicConv2d(cin, c7, kernel_size=1)
    self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
    self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
    self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
    self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
    self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

  def forward(self, x):
    b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
    bd = x
    for i in range(1, 6):
      bd = getattr(self, f"branch7x7dbl_{i}")(bd)
    return torch.cat([self.branch1x1(x), b7, bd, self.branch_pool(_avg(x))], 1)


class InceptionD(nn.Module):
  def __init__(self, cin):
    super().__init__()
    self.branch3x3_1 = BasicConv2d(cin, 192, kernel_size=1)
    self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
    self.branch7x7x3_1 = BasicConv2d(cin, 192, kernel_size=1)
    self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
    self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
    self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

  def forward(self, x):
    b7 = x
    for i in range(1, 5):
      b7 = getattr(self, f"branch7x7x3_{i}")(b7)
    return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7,
                      F.max_pool2d(x, 3, stride=2)], 1)


class FIDInceptionE(nn.Module):
  def __init__(self, cin, pool):
    super().__init__()
    self.pool = pool
    self.branch1x1 = BasicConv2d(cin, 320, kernel_size=1)
    self.branch3x3_1 = BasicConv2d(cin, 384, kernel_size=1)
    self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
    self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
    self.branch3x3dbl_1 = BasicConv2d(cin, 448, kernel_size=1)
    self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
    self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
    self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
    self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

  def forward(self, x):
    b3 = self.branch3x3_1(x)
    b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
    bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
    bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)
    pooled = _avg(x) if self.pool == "avg" else F.max_pool2d(x, 3, stride=1, padding=1)
    return torch.cat([self.branch1x1(x), b3, bd, self.branch_pool(pooled)], 1)


class FIDInceptionV3(nn.Module):
  def __init__(self):
    super().__init__()
    self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
    self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
    self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
    self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
    self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
    self.Mixed_5b = FIDInceptionA(192, 32)
    self.Mixed_5c = FIDInceptionA(256, 64)
    self.Mixed_5d = FIDInceptionA(288, 64)
    self.Mixed_6a = InceptionB(288)
    self.Mixed_6b = FIDInceptionC(768, 128)
    self.Mixed_6c = FIDInceptionC(768, 160)
    self.Mixed_6d = FIDInceptionC(768, 160)
    self.Mixed_6e = FIDInceptionC(768, 192)
    self.Mixed_7a = InceptionD(768)
    self.Mixed_7b = FIDInceptionE(1280, "avg")
    self.Mixed_7c = FIDInceptionE(2048, "max")
    self.fc = nn.Linear(2048, 1008)

  def forward(self, images_uint8_nchw):
    # pytorch-fid's InceptionV3 wrapper: [0, 1] input, resize, 2x - 1.
    x = images_uint8_nchw.float() / 255.0
    x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
    x = 2 * x - 1
    x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
    x = F.max_pool2d(x, 3, stride=2)
    x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
    x = F.max_pool2d(x, 3, stride=2)
    for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
      x = getattr(self, f"Mixed_{name}")(x)
    pool = F.adaptive_avg_pool2d(x, 1).flatten(1)
    return pool, self.fc(pool)


def _randomise(model, seed=0):
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for m in model.modules():
      if isinstance(m, nn.Conv2d):
        fan_in = m.weight[0].numel()
        m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2.0 / fan_in) ** 0.5)
      elif isinstance(m, nn.BatchNorm2d):
        c = m.num_features
        m.weight.copy_(torch.rand(c, generator=g) + 0.5)
        m.bias.copy_(torch.randn(c, generator=g) * 0.1)
        m.running_mean.copy_(torch.randn(c, generator=g) * 0.1)
        m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
      elif isinstance(m, nn.Linear):
        m.weight.copy_(torch.randn(m.weight.shape, generator=g) / 2048 ** 0.5)
        m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
  return model.eval()


@pytest.fixture(scope="module")
def torch_twin(tmp_path_factory):
  """(torch model, path of its .pth state dict, path of the converted .npz)."""
  model = _randomise(FIDInceptionV3())
  d = tmp_path_factory.mktemp("inception")
  pth, npz = str(d / "random_inception.pth"), str(d / "random_inception.npz")
  torch.save(model.state_dict(), pth)
  assert inception_convert.main([pth, npz, "--allow_nonstandard"]) == 0
  return model, pth, npz


# ---------------------------------------------------------------------------------------


def test_forward_shapes_without_compiling():
  out = jax.eval_shape(lambda x: inception.InceptionV3().init_with_output(
      jax.random.key(0), x)[0], jax.ShapeDtypeStruct((3, 32, 32, 3), jnp.uint8))
  assert out["pool"].shape == (3, 2048)
  assert out["logits"].shape == out["logits_unbiased"].shape == (3, 1008)
  grey = jax.eval_shape(lambda x: inception.InceptionV3().init_with_output(
      jax.random.key(0), x)[0], jax.ShapeDtypeStruct((1, 8, 8, 1), jnp.uint8))
  assert grey["pool"].shape == (1, 2048)


def test_converted_state_dict_has_every_parameter(torch_twin):
  model, _, npz = torch_twin
  with np.load(npz) as f:
    names = {k for k in f.files if not k.startswith("__")}
    assert str(f[inception.SOURCE_KEY]) == inception_convert.file_sha256(torch_twin[1])
  assert names == set(inception.flatten_params(inception.abstract_params()))
  n_torch = sum(v.numel() for k, v in model.state_dict().items()
                if not k.endswith("num_batches_tracked"))
  assert sum(int(np.prod(v.shape)) for v in inception.flatten_params(
      inception.abstract_params()).values()) == n_torch


def test_flax_matches_torch_twin_and_is_deterministic(torch_twin):
  model, _, npz = torch_twin
  weights = inception.load_weights(npz, expected_source_sha256=None)
  images = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3)).astype(np.uint8)
  with torch.no_grad():
    t_pool, t_logits = model(torch.from_numpy(images).permute(0, 3, 1, 2))
  fn = jax.jit(lambda p, x: inception.InceptionV3("pytorch_fid").apply({"params": p}, x))
  start = time.perf_counter()
  out = jax.block_until_ready(fn(weights.params, images))
  first = time.perf_counter() - start
  again = fn(weights.params, images)
  print(f"Inception 299x299 batch 2 on {jax.default_backend()}: compile + run {first:.1f}s")
  t_pool, t_logits = t_pool.numpy(), t_logits.numpy()
  scale = np.abs(t_pool).max()
  np.testing.assert_allclose(np.asarray(out["pool"]), t_pool, atol=2e-4 * scale, rtol=2e-3)
  np.testing.assert_allclose(np.asarray(out["logits"]), t_logits,
                             atol=2e-4 * np.abs(t_logits).max(), rtol=2e-3)
  bias = model.fc.bias.detach().numpy()
  np.testing.assert_allclose(np.asarray(out["logits_unbiased"]), t_logits - bias,
                             atol=2e-4 * np.abs(t_logits).max(), rtol=2e-3)
  for k in out:
    np.testing.assert_array_equal(np.asarray(out[k]), np.asarray(again[k]))


def test_pytorch_fid_resize_matches_torch_interpolate():
  x = np.random.default_rng(1).uniform(0, 255, (2, 13, 32, 3)).astype(np.float32)
  ours = np.asarray(inception.resize_bilinear(jnp.asarray(x), 299, "pytorch_fid"))
  ref = F.interpolate(torch.from_numpy(x).permute(0, 3, 1, 2), size=(299, 299),
                      mode="bilinear", align_corners=False).permute(0, 2, 3, 1).numpy()
  np.testing.assert_allclose(ours, ref, atol=1e-3)


def test_tf1_resize_matches_edm_torchscript_grid_sample():
  """StyleGAN3/EDM's inception-2015-12-05.pkl emulates TF1 resize_bilinear with an affine
  grid shifted by 1/in - 1/out and grid_sample(border); the same here, in torch."""
  x = np.random.default_rng(2).uniform(0, 255, (2, 32, 20, 3)).astype(np.float32)
  ours = np.asarray(inception.resize_bilinear(jnp.asarray(x), 299, "tf1"))
  t = torch.from_numpy(x).permute(0, 3, 1, 2)
  n, c, h, w = t.shape
  theta = torch.eye(2, 3).unsqueeze(0).repeat(n, 1, 1)
  theta[:, 0, 2] += 1.0 / w - 1.0 / 299
  theta[:, 1, 2] += 1.0 / h - 1.0 / 299
  grid = F.affine_grid(theta, [n, c, 299, 299], align_corners=False)
  ref = F.grid_sample(t, grid, mode="bilinear", padding_mode="border", align_corners=False)
  np.testing.assert_allclose(ours, ref.permute(0, 2, 3, 1).numpy(), atol=1e-3)
  # And TF1's definition directly: output pixel j samples input position j * in / out.
  m = inception.resize_matrix(8, 20, "tf1")
  src = np.arange(20) * 8 / 20
  np.testing.assert_allclose(m @ np.arange(8.0), np.minimum(src, 7), atol=1e-6)


def test_preprocessing_ranges():
  x = jnp.asarray(np.array([0, 128, 255], np.uint8).reshape(1, 1, 3, 1))
  tf1 = inception.preprocess_images(x, "tf1", size=3)
  pt = inception.preprocess_images(x, "pytorch_fid", size=3)
  np.testing.assert_allclose(np.asarray(tf1)[0, 0, :, 0], [-1.0, 0.0, 127 / 128])
  np.testing.assert_allclose(np.asarray(pt)[0, 0, :, 0], [-1.0, 128 / 127.5 - 1, 1.0], atol=1e-6)
  assert tf1.shape == (1, 3, 3, 3)  # grey tiled to RGB


def test_converter_refuses_nonstandard_files_unless_told(torch_twin, tmp_path):
  _, pth, npz = torch_twin
  assert inception_convert.main([pth, str(tmp_path / "x.npz")]) == 1
  with pytest.raises(ValueError, match="not the standard"):
    inception.load_weights(npz)  # default: only the standard pytorch-fid source
  with pytest.raises(ValueError, match="not the standard"):
    features.build_detector("inception", weights_path=npz)
  det = features.build_detector("inception", weights_path=npz, allow_nonstandard=True)
  assert det.fingerprint["standard_pytorch_fid_weights"] is False
  assert det.fingerprint["source_sha256"] == inception_convert.file_sha256(pth)
  with pytest.raises(FileNotFoundError, match="inception_convert"):
    inception.load_weights(str(tmp_path / "missing.npz"))


def test_standard_hash_constant_is_well_formed():
  assert inception.PYTORCH_FID_WEIGHTS_SHA256.startswith("6726825d")  # the file name's prefix
  assert len(inception.PYTORCH_FID_WEIGHTS_SHA256) == 64
