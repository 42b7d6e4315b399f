"""The FID Inception-v3 in Flax: the TF "2015-12-05" graph every published FID is measured with.

This is the network of the original TF FID/IS code (`classify_image_graph_def.pb` from
inception-2015-12-05.tgz), as ported to PyTorch by pytorch-fid (`FIDInceptionA/C/E_1/E_2`)
and reused by torch-fidelity, clean-fid, StyleGAN2-ADA/3 and EDM. It differs from
torchvision's Inception-v3 in its weights (1008 classes) and in three places:
  - the average pools inside Mixed_5b..5d, 6b..6e and 7b do not count padding;
  - Mixed_7c's pool branch is a 3x3 *max* pool (an oddity of the TF graph);
  - batch norm eps is 1e-3.

Outputs, for uint8-range NHWC images of any size (1-channel images are tiled to RGB):
  pool     (B, 2048)  the 'pool_3' features of FID, KID and precision/recall;
  logits   (B, 1008)  fc(pool) with its bias;
  logits_unbiased (B, 1008)  pool @ W without the bias: what the original Inception Score
           code (Salimans et al. 2016), StyleGAN's IS and torch-fidelity feed the softmax.

Preprocessing (`preprocess=`), which both resize to 299x299 inside the network:
  'tf1'          TF1's `resize_bilinear(align_corners=False)` (source pixel = dst * in/out,
                 no half-pixel offset), then (x - 128) / 128. The TF graph itself, torch-
                 fidelity, and the TorchScript `inception-2015-12-05.pkl` of StyleGAN3/EDM
                 (which emulates this resize with affine_grid + grid_sample). Default.
  'pytorch_fid'  torch's `F.interpolate(bilinear, align_corners=False)` (half-pixel
                 centres), then x / 127.5 - 1: pytorch-fid. Its FIDs differ slightly.

Weights: the user supplies them; nothing is downloaded. The standard file is pytorch-fid's
`pt_inception-2015-12-05-6726825d.pth` (github.com/mseitzer/pytorch-fid, release
`fid_weights`; 95,628,359 bytes; SHA-256 `PYTORCH_FID_WEIGHTS_SHA256` below), the same
file torch-fidelity distributes as `weights-inception-2015-12-05-6726825d.pth`. Convert it
once:  python -m cm_jax.eval.inception_convert pt_inception-2015-12-05-6726825d.pth
inception_fid.npz. StyleGAN3/EDM's `inception-2015-12-05.pkl` holds the same network as
TorchScript; reading it needs unpickling (code execution), so the converter does not.
"""
from __future__ import annotations

import hashlib
import os
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

# Names kept for callers of this module's weight-file layout.
from cm_jax.utils.trees import flatten_paths as flatten_params
from cm_jax.utils.trees import unflatten_paths as unflatten_params

# SHA-256 of pytorch-fid's pt_inception-2015-12-05-6726825d.pth (95,628,359 bytes), the
# source file the converter accepts by default; the file name carries its first 8 hex digits
# (torch.hub's check_hash convention). The value is the one several independent projects
# pin for this file (e.g. genforce's metrics/inception.py, torch-fidelity users); it was
# not recomputed here, as the file cannot be downloaded where cm_jax is developed.
PYTORCH_FID_WEIGHTS_SHA256 = "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2"
PYTORCH_FID_WEIGHTS_BYTES = 95_628_359
PYTORCH_FID_WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"

FEATURE_DIM = 2048
NUM_LOGITS = 1008
INPUT_SIZE = 299
PREPROCESS = ("tf1", "pytorch_fid")
_HIGHEST = jax.lax.Precision.HIGHEST  # FID must not run on TF32 / bf16 matmuls.


# ----------------------------------------------------------------------------
# Resize as a pair of (out, in) interpolation matrices: exact, static, cheap.
# ----------------------------------------------------------------------------


def resize_matrix(in_size: int, out_size: int, mode: str) -> np.ndarray:
  """(out_size, in_size) bilinear weights along one axis.

  'tf1': src = dst * in/out (TF1 resize_bilinear, align_corners=False, no half pixel).
  'pytorch_fid': src = (dst + 0.5) * in/out - 0.5, clamped at 0 (torch, align_corners=False).
  Both clamp the right neighbour at the last pixel (grid_sample's 'border').
  """
  if mode not in PREPROCESS:
    raise ValueError(f"unknown resize mode {mode!r}; choose from {PREPROCESS}")
  dst = np.arange(out_size, dtype=np.float64)
  scale = in_size / out_size
  if mode == "tf1":
    src = dst * scale
  else:
    src = np.maximum((dst + 0.5) * scale - 0.5, 0.0)
  i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
  i1 = np.minimum(i0 + 1, in_size - 1)
  w1 = src - i0
  m = np.zeros((out_size, in_size), np.float64)
  np.add.at(m, (np.arange(out_size), i0), 1.0 - w1)
  np.add.at(m, (np.arange(out_size), i1), w1)
  return m.astype(np.float32)


def resize_bilinear(x: jax.Array, size: int, mode: str) -> jax.Array:
  """NHWC float -> (N, size, size, C) with the chosen bilinear convention."""
  _, h, w, _ = x.shape
  if h == size and w == size:
    return x
  mh = jnp.asarray(resize_matrix(h, size, mode))
  mw = jnp.asarray(resize_matrix(w, size, mode))
  x = jnp.einsum("oh,nhwc->nowc", mh, x, precision=_HIGHEST)
  return jnp.einsum("pw,nowc->nopc", mw, x, precision=_HIGHEST)


def preprocess_images(images: jax.Array, mode: str = "tf1", size: int = INPUT_SIZE) -> jax.Array:
  """uint8-range NHWC (1 or 3 channels) -> float32 (N, size, size, 3) in [-1, 1]."""
  x = jnp.asarray(images).astype(jnp.float32)
  if x.shape[-1] == 1:
    x = jnp.tile(x, (1, 1, 1, 3))
  if x.shape[-1] != 3:
    raise ValueError(f"Inception wants 1- or 3-channel images, got shape {images.shape}")
  x = resize_bilinear(x, size, mode)
  if mode == "tf1":
    return (x - 128.0) / 128.0
  return x / 127.5 - 1.0


# ----------------------------------------------------------------------------
# The network. Module and parameter names follow torchvision / pytorch-fid, so a
# state-dict key 'Mixed_6b.branch7x7_2.conv.weight' is params['Mixed_6b']['branch7x7_2']
# ['conv']['kernel'] (transposed to HWIO).
# ----------------------------------------------------------------------------


class FrozenBatchNorm(nn.Module):
  """Inference batch norm with its statistics as ordinary params (nothing to update)."""
  eps: float = 1e-3

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (c,))
    bias = self.param("bias", nn.initializers.zeros, (c,))
    mean = self.param("mean", nn.initializers.zeros, (c,))
    var = self.param("var", nn.initializers.ones, (c,))
    inv = scale * jax.lax.rsqrt(var + self.eps)
    return (x - mean) * inv + bias


def _pad(padding):
  ph, pw = padding if isinstance(padding, tuple) else (padding, padding)
  return ((ph, ph), (pw, pw))


class BasicConv(nn.Module):
  """Conv (no bias) -> BN(eps 1e-3) -> ReLU: torchvision's BasicConv2d."""
  features: int
  kernel: tuple
  strides: int = 1
  padding: object = 0

  @nn.compact
  def __call__(self, x):
    kernel = self.kernel if isinstance(self.kernel, tuple) else (self.kernel, self.kernel)
    x = nn.Conv(self.features, kernel, strides=(self.strides, self.strides),
                padding=_pad(self.padding), use_bias=False, precision=_HIGHEST, name="conv")(x)
    return nn.relu(FrozenBatchNorm(name="bn")(x))


def _avg_pool_same(x):
  # TF's average pool ignores the zero padding (pytorch-fid: count_include_pad=False).
  return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool(x, strides=2, padding="VALID"):
  return nn.max_pool(x, (3, 3), strides=(strides, strides), padding=padding)


class InceptionA(nn.Module):
  pool_features: int

  @nn.compact
  def __call__(self, x):
    b1 = BasicConv(64, 1, name="branch1x1")(x)
    b5 = BasicConv(48, 1, name="branch5x5_1")(x)
    b5 = BasicConv(64, 5, padding=2, name="branch5x5_2")(b5)
    b3 = BasicConv(64, 1, name="branch3x3dbl_1")(x)
    b3 = BasicConv(96, 3, padding=1, name="branch3x3dbl_2")(b3)
    b3 = BasicConv(96, 3, padding=1, name="branch3x3dbl_3")(b3)
    bp = BasicConv(self.pool_features, 1, name="branch_pool")(_avg_pool_same(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):

  @nn.compact
  def __call__(self, x):
    b3 = BasicConv(384, 3, strides=2, name="branch3x3")(x)
    bd = BasicConv(64, 1, name="branch3x3dbl_1")(x)
    bd = BasicConv(96, 3, padding=1, name="branch3x3dbl_2")(bd)
    bd = BasicConv(96, 3, strides=2, name="branch3x3dbl_3")(bd)
    return jnp.concatenate([b3, bd, _max_pool(x)], axis=-1)


class InceptionC(nn.Module):
  channels_7x7: int

  @nn.compact
  def __call__(self, x):
    c7 = self.channels_7x7
    b1 = BasicConv(192, 1, name="branch1x1")(x)
    b7 = BasicConv(c7, 1, name="branch7x7_1")(x)
    b7 = BasicConv(c7, (1, 7), padding=(0, 3), name="branch7x7_2")(b7)
    b7 = BasicConv(192, (7, 1), padding=(3, 0), name="branch7x7_3")(b7)
    bd = BasicConv(c7, 1, name="branch7x7dbl_1")(x)
    bd = BasicConv(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_2")(bd)
    bd = BasicConv(c7, (1, 7), padding=(0, 3), name="branch7x7dbl_3")(bd)
    bd = BasicConv(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_4")(bd)
    bd = BasicConv(192, (1, 7), padding=(0, 3), name="branch7x7dbl_5")(bd)
    bp = BasicConv(192, 1, name="branch_pool")(_avg_pool_same(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):

  @nn.compact
  def __call__(self, x):
    b3 = BasicConv(192, 1, name="branch3x3_1")(x)
    b3 = BasicConv(320, 3, strides=2, name="branch3x3_2")(b3)
    b7 = BasicConv(192, 1, name="branch7x7x3_1")(x)
    b7 = BasicConv(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
    b7 = BasicConv(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
    b7 = BasicConv(192, 3, strides=2, name="branch7x7x3_4")(b7)
    return jnp.concatenate([b3, b7, _max_pool(x)], axis=-1)


class InceptionE(nn.Module):
  """pool='avg' is pytorch-fid's FIDInceptionE_1 (Mixed_7b), 'max' its E_2 (Mixed_7c)."""
  pool: str = "avg"

  @nn.compact
  def __call__(self, x):
    b1 = BasicConv(320, 1, name="branch1x1")(x)
    b3 = BasicConv(384, 1, name="branch3x3_1")(x)
    b3 = jnp.concatenate([BasicConv(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(b3),
                          BasicConv(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(b3)], -1)
    bd = BasicConv(448, 1, name="branch3x3dbl_1")(x)
    bd = BasicConv(384, 3, padding=1, name="branch3x3dbl_2")(bd)
    bd = jnp.concatenate([BasicConv(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(bd),
                          BasicConv(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(bd)], -1)
    if self.pool == "avg":
      pooled = _avg_pool_same(x)
    else:
      pooled = _max_pool(x, strides=1, padding=((1, 1), (1, 1)))
    bp = BasicConv(192, 1, name="branch_pool")(pooled)
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class InceptionV3(nn.Module):
  """uint8-range NHWC images -> {'pool': (B, 2048), 'logits', 'logits_unbiased': (B, 1008)}."""
  preprocess: str = "tf1"
  input_size: int = INPUT_SIZE

  @nn.compact
  def __call__(self, images):
    x = preprocess_images(images, self.preprocess, self.input_size)
    x = BasicConv(32, 3, strides=2, name="Conv2d_1a_3x3")(x)
    x = BasicConv(32, 3, name="Conv2d_2a_3x3")(x)
    x = BasicConv(64, 3, padding=1, name="Conv2d_2b_3x3")(x)
    x = _max_pool(x)
    x = BasicConv(80, 1, name="Conv2d_3b_1x1")(x)
    x = BasicConv(192, 3, name="Conv2d_4a_3x3")(x)
    x = _max_pool(x)
    x = InceptionA(32, name="Mixed_5b")(x)
    x = InceptionA(64, name="Mixed_5c")(x)
    x = InceptionA(64, name="Mixed_5d")(x)
    x = InceptionB(name="Mixed_6a")(x)
    x = InceptionC(128, name="Mixed_6b")(x)
    x = InceptionC(160, name="Mixed_6c")(x)
    x = InceptionC(160, name="Mixed_6d")(x)
    x = InceptionC(192, name="Mixed_6e")(x)
    x = InceptionD(name="Mixed_7a")(x)
    x = InceptionE("avg", name="Mixed_7b")(x)
    x = InceptionE("max", name="Mixed_7c")(x)
    pool = jnp.mean(x, axis=(1, 2))
    fc = nn.Dense(NUM_LOGITS, precision=_HIGHEST, name="fc")
    logits = fc(pool)
    kernel = fc.variables["params"]["kernel"]
    unbiased = jnp.dot(pool, kernel, precision=_HIGHEST)
    return {"pool": pool, "logits": logits, "logits_unbiased": unbiased}


# ----------------------------------------------------------------------------
# Parameters on disk: a flat .npz of 'Module/sub/param' arrays plus provenance.
# ----------------------------------------------------------------------------

SOURCE_KEY = "__source_sha256__"
FORMAT_KEY = "__format__"
FORMAT = "cm_jax.inception_fid.v1"


def abstract_params(preprocess: str = "tf1"):
  """The parameter tree's shapes (no allocation, no compile)."""
  model = InceptionV3(preprocess)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0),
                                             jnp.zeros((1, 75, 75, 3), jnp.uint8)))
  return shapes["params"]


def params_digest(flat: dict[str, np.ndarray]) -> str:
  """SHA-256 over (name, dtype, shape, bytes) of every array, in name order: the identity
  of the converted weights whatever zip timestamps the .npz carries."""
  h = hashlib.sha256()
  for name in sorted(flat):
    a = np.ascontiguousarray(flat[name])
    h.update(f"{name}|{a.dtype.str}|{a.shape}\n".encode())
    h.update(a.tobytes())
  return h.hexdigest()


def check_params(flat: dict[str, np.ndarray]) -> None:
  """Every parameter present with the right shape, nothing extra: else a clear error."""
  want = {k: tuple(v.shape) for k, v in flatten_params(abstract_params()).items()}
  got = {k: tuple(np.shape(v)) for k, v in flat.items()}
  missing = sorted(set(want) - set(got))
  extra = sorted(set(got) - set(want))
  wrong = sorted(k for k in set(want) & set(got) if want[k] != got[k])
  if missing or extra or wrong:
    raise ValueError(
        "these are not FID Inception-v3 weights: "
        f"{len(missing)} missing (e.g. {missing[:3]}), {len(extra)} unexpected "
        f"(e.g. {extra[:3]}), {len(wrong)} with the wrong shape "
        f"(e.g. {[(k, got[k], want[k]) for k in wrong[:3]]})")


def save_params(path: str, flat: dict[str, np.ndarray], source_sha256: str) -> str:
  """Writes the converted weights; returns their digest."""
  check_params(flat)
  arrays = {k: np.asarray(v, np.float32) for k, v in flat.items()}
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  np.savez(path, **arrays, **{SOURCE_KEY: np.asarray(source_sha256),
                              FORMAT_KEY: np.asarray(FORMAT)})
  return params_digest(arrays)


class InceptionWeights:
  """Loaded FID Inception params and where they came from."""

  def __init__(self, params, source_sha256: str, digest: str, path: str):
    self.params = params
    self.source_sha256 = source_sha256
    self.digest = digest
    self.path = path

  @property
  def is_standard(self) -> bool:
    return self.source_sha256 == PYTORCH_FID_WEIGHTS_SHA256

  def fingerprint(self) -> dict:
    return {"source_sha256": self.source_sha256, "params_sha256": self.digest,
            "standard_pytorch_fid_weights": self.is_standard, "path": self.path}


def load_weights(path: str, *, expected_source_sha256: Optional[str] = PYTORCH_FID_WEIGHTS_SHA256
                 ) -> InceptionWeights:
  """Reads converted weights (.npz from inception_convert) or converts a pytorch-fid .pth in
  memory. Refuses weights whose source file is not `expected_source_sha256` (None: accept
  any, e.g. randomly initialised test weights)."""
  if not os.path.exists(path):
    raise FileNotFoundError(
        f"Inception weights {path!r} not found. Download pytorch-fid's "
        f"{PYTORCH_FID_WEIGHTS_NAME} yourself and convert it with "
        f"`python -m cm_jax.eval.inception_convert {PYTORCH_FID_WEIGHTS_NAME} inception_fid.npz`")
  if path.endswith((".pth", ".pt")):
    from cm_jax.eval import inception_convert  # pylint: disable=g-import-not-at-top
    source_sha = inception_convert.file_sha256(path)
    flat = inception_convert.convert_state_dict(inception_convert.load_torch_state_dict(path))
  else:
    with np.load(path, allow_pickle=False) as f:
      if FORMAT_KEY not in f.files:
        raise ValueError(f"{path!r} was not written by cm_jax.eval.inception_convert")
      source_sha = str(f[SOURCE_KEY])
      flat = {k: f[k] for k in f.files if not k.startswith("__")}
  if expected_source_sha256 is not None and source_sha != expected_source_sha256:
    raise ValueError(
        f"{path!r} comes from a file with SHA-256 {source_sha}, not the standard "
        f"{PYTORCH_FID_WEIGHTS_NAME} ({expected_source_sha256}); its FIDs would not be "
        f"comparable with published ones. Pass expected_source_sha256=None "
        f"(evaluate.py --inception_allow_nonstandard) to use it anyway.")
  check_params(flat)
  flat = {k: np.asarray(v, np.float32) for k, v in flat.items()}
  return InceptionWeights(unflatten_params(flat), source_sha, params_digest(flat), path)


def random_params(seed: int = 0) -> dict:
  """Random params with sensible scales (He-normal kernels, random BN statistics), drawn
  with numpy from the abstract shapes: for tests, where features mean nothing. (Flax's
  own `init` of this net takes ~40 s to compile on CPU.)"""
  rng = np.random.default_rng(seed)
  flat = {}
  for name, leaf in sorted(flatten_params(abstract_params()).items()):
    shape, kind = leaf.shape, name.rsplit("/", 1)[-1]
    if kind == "kernel":
      fan_in = int(np.prod(shape[:-1]))
      gain = 1.0 if name.startswith("fc/") else 2.0
      value = rng.normal(0.0, np.sqrt(gain / fan_in), shape)
    elif kind in ("scale", "var"):
      value = rng.uniform(0.5, 1.5, shape)
    else:  # bias, mean
      value = rng.normal(0.0, 0.1, shape)
    flat[name] = value.astype(np.float32)
  return unflatten_params(flat)
