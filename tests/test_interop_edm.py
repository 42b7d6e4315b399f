"""NVlabs/edm pickles: restricted unpickling (no stored code runs) and the name maps.

Fixtures are built in EDM's persistence layout (tests/_interop_util.py); no real EDM file is
needed. The DhariwalUNet -> ADMUNet table is checked numerically against a small torch
forward pass written here from the facts of EDM's networks.py (block names in ModuleDict
order, UNetBlock = norm0/conv0(resampling inside)/affine scale-shift/norm1/conv1 + skip,
attention qkv reshaped as (heads, head_dim, 3))."""
import os
import pickle

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import _interop_util as U
from cm_jax.interop import edm_import, name_maps

SONG_CFG = dict(name="ncsnpp", model_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                attention_resolutions=(4,), dropout=0.0, embedding_type="fourier",
                resample="fir", progressive_input="residual", progressive="none",
                resblock_type="biggan", skip_rescale=True, cond_dim=0, dtype="float32",
                remat=False)


def _precond_attrs(label_dim, size=8):
  return dict(img_resolution=size, img_channels=3, label_dim=label_dim, use_fp16=False,
              sigma_min=0.0, sigma_max=float("inf"), sigma_data=0.5,
              _init_kwargs=dict(img_resolution=size, img_channels=3, label_dim=label_dim))


@pytest.fixture
def marker(tmp_path):
  path = tmp_path / "payload_ran"
  return str(path), f"open({str(path)!r}, 'w').write('ran')"


def _write(path, state, precond, arch, payload, label_dim, extra=None):
  with U.fake_persistence():
    net = U.build_edm_network(state, precond, arch, payload, _precond_attrs(label_dim),
                              block_attrs=dict(skip_scale=np.sqrt(0.5), init_weight=np.float32(1)))
    data = {"ema": net, "loss_fn": U.Persistent("EDMLoss", payload, P_mean=-1.2, P_std=1.2),
            "augment_pipe": None, "dataset_kwargs": {"class_name": "ImageFolderDataset"}}
    data.update(extra or {})
    with open(path, "wb") as f:
      pickle.dump(data, f)


@pytest.mark.parametrize("arch", ["ncsnpp", "ddpmpp"])
def test_songunet_pickle_imports_exactly_and_runs_no_stored_code(tmp_path, marker, arch):
  marker_path, payload = marker
  cfg = dict(SONG_CFG)
  if arch == "ddpmpp":
    cfg.update(embedding_type="positional", resample="plain", progressive_input="none")
  cfg = ml_collections.ConfigDict(cfg)
  params = U.random_params(U.net_for(cfg, num_classes=10), num_classes=10, seed=1)
  state = edm_import.song_state_dict(name_maps.flatten(params))
  # What EDM keeps besides the weights: FIR taps of resampling convs, the augmentation input.
  taps = np.array([1, 3, 3, 1] if arch == "ncsnpp" else [1, 1], np.float32)
  state["model.enc.4x4_down.conv0.resample_filter"] = (np.outer(taps, taps) / taps.sum() ** 2)[
      None, None]
  state["model.map_augment.weight"] = np.ones((2 * 16 if arch == "ncsnpp" else 16, 9),
                                              np.float32)
  path = str(tmp_path / "net.pkl")
  _write(path, state, "EDMPrecond", "SongUNet", payload, label_dim=10)

  desc, sd = edm_import.load_edm_network(path)
  assert not os.path.exists(marker_path)
  assert (desc["precond"], desc["arch"], desc["label_dim"], desc["img_resolution"]) == (
      "EDMPrecond", "SongUNet", 10, 8)
  assert ("model.map_noise.freqs" in sd) == (arch == "ncsnpp")
  flat, dropped = edm_import.song_params(sd)
  assert dropped == ["model.map_augment.weight"]
  U.assert_trees_equal(name_maps.unflatten(flat), params)
  edm_import.check_resample_filters(sd, taps)
  with pytest.raises(ValueError, match="FIR taps"):
    edm_import.check_resample_filters(sd, [1, 1] if arch == "ncsnpp" else [1, 3, 3, 1])

  # Control: the same file through plain pickle runs the stored source.
  with U.fake_persistence(), open(path, "rb") as f, pytest.raises(RuntimeError):
    pickle.load(f)
  assert os.path.exists(marker_path)


def _dhariwal_names(size, mc, mult, nb, attn):
  """EDM DhariwalUNet block names in ModuleDict order (encoder, decoder)."""
  enc, dec = [f"{size}x{size}_conv"], []
  for lvl in range(len(mult)):
    r = size >> lvl
    enc += ([f"{r}x{r}_down"] if lvl else []) + [f"{r}x{r}_block{i}" for i in range(nb)]
  for lvl in reversed(range(len(mult))):
    r = size >> lvl
    dec += ([f"{r}x{r}_in0", f"{r}x{r}_in1"] if lvl == len(mult) - 1 else [f"{r}x{r}_up"])
    dec += [f"{r}x{r}_block{i}" for i in range(nb + 1)]
  return enc, dec


def _torch_dhariwal(sd, x, noise_labels, onehot, names, groups, head_channels):
  """Forward pass of an EDM DhariwalUNet state dict (my own code, from EDM's documented math)."""
  g = lambda n: sd["model." + n]
  t = lambda n: torch.from_numpy(np.asarray(g(n)))
  has = lambda n: "model." + n in sd
  conv = lambda h, n: F.conv2d(h, t(n + ".weight"), t(n + ".bias"),
                               padding=g(n + ".weight").shape[-1] // 2)
  lin = lambda h, n: h @ t(n + ".weight").T + (t(n + ".bias") if has(n + ".bias") else 0)
  norm = lambda h, n: F.group_norm(h, min(groups, h.shape[1] // 4), t(n + ".weight"),
                                   t(n + ".bias"), eps=1e-5)
  half = g("map_layer0.weight").shape[1] // 2
  freqs = (1.0 / 10000) ** (torch.arange(half, dtype=torch.float32) / half)
  arg = noise_labels[:, None] * freqs[None]
  emb = torch.cat([arg.cos(), arg.sin()], dim=1)
  emb = F.silu(lin(emb, "map_layer0"))
  emb = lin(emb, "map_layer1")
  if onehot is not None:
    emb = emb + onehot @ t("map_label.weight").T
  emb = F.silu(emb)

  def block(h, n):
    up, down = n.endswith("_up"), n.endswith("_down")
    resample = ((lambda z: F.interpolate(z, scale_factor=2, mode="nearest")) if up else
                (lambda z: F.avg_pool2d(z, 2)) if down else (lambda z: z))
    orig = h
    h = conv(resample(F.silu(norm(h, n + ".norm0"))), n + ".conv0")
    scale, shift = lin(emb, n + ".affine")[:, :, None, None].chunk(2, dim=1)
    h = F.silu(shift + norm(h, n + ".norm1") * (scale + 1))
    h = conv(h, n + ".conv1")
    h = h + (conv(resample(orig), n + ".skip") if has(n + ".skip.weight") else resample(orig))
    if has(n + ".qkv.weight"):
      b, c, hh, ww = h.shape
      heads = c // head_channels
      q, k, v = conv(norm(h, n + ".norm2"), n + ".qkv").reshape(
          b * heads, c // heads, 3, hh * ww).unbind(2)
      w = torch.einsum("ncq,nck->nqk", q, k / np.sqrt(k.shape[1])).softmax(dim=2)
      a = torch.einsum("nqk,nck->ncq", w, v).reshape(b, c, hh, ww)
      h = conv(a, n + ".proj") + h
    return h

  enc, dec = names
  skips = []
  for n in enc:
    x = conv(x, "enc." + n) if n.endswith("_conv") else block(x, "enc." + n)
    skips.append(x)
  for n in dec:
    if x.shape[1] != g(f"dec.{n}.norm0.weight").shape[0]:
      x = torch.cat([x, skips.pop()], dim=1)
    x = block(x, "dec." + n)
  return conv(F.silu(norm(x, "out_norm")), "out_conv")


def test_dhariwal_pickle_imports_exactly_and_matches_edm_forward(tmp_path, marker):
  marker_path, payload = marker
  # 8 groups: EDM's GroupNorm takes min(32, C // 4) groups, the released nets' 32 for their
  # >= 128 channels; these tiny blocks have 32 and 64.
  cfg = U.model_cfg(model_channels=32, channel_mult=(1, 2), num_head_channels=16, num_groups=8,
                    attention_resolutions=(8, 4))
  net = U.net_for(cfg, num_classes=10)
  params = U.random_params(net, num_classes=10, seed=2)
  state = edm_import.dhariwal_state_dict(name_maps.flatten(params), cfg, 8)
  names = _dhariwal_names(8, 32, (1, 2), 1, (8, 4))
  blocks = {k.split(".")[2] for k in state if k.startswith(("model.enc.", "model.dec."))}
  assert blocks == set(names[0]) | set(names[1])
  path = str(tmp_path / "adm.pkl")
  _write(path, state, "EDMPrecond", "DhariwalUNet", payload, label_dim=10)

  desc, sd = edm_import.load_edm_network(path)
  assert not os.path.exists(marker_path)
  assert desc["arch"] == "DhariwalUNet"
  flat, rest = edm_import.dhariwal_params(sd, cfg, 8)
  assert rest == []
  imported = name_maps.unflatten(flat)
  U.assert_trees_equal(imported, params)

  rng = np.random.RandomState(0)
  x = rng.randn(2, 3, 8, 8).astype(np.float32)
  c_noise = np.array([-0.3, 0.7], np.float32)
  labels = np.array([3, 8])
  onehot = np.eye(10, dtype=np.float32)[labels]
  with torch.no_grad():
    ref = _torch_dhariwal(sd, torch.from_numpy(x), torch.from_numpy(c_noise),
                          torch.from_numpy(onehot), names, 8, 16).numpy()
  out = net.apply({"params": imported}, jnp.asarray(x.transpose(0, 2, 3, 1)),
                  jnp.asarray(c_noise), jnp.asarray(labels))
  np.testing.assert_allclose(np.asarray(out).transpose(0, 3, 1, 2), ref, atol=1e-4, rtol=0)
  assert np.abs(ref).max() > 0.1


class _Evil:
  def __init__(self, path):
    self.path = path

  def __reduce__(self):
    return (os.system, (f"touch {self.path}",))


class _EvilStorage:
  """A 'storage' whose nested torch.save blob is itself a malicious pickle."""

  def __init__(self, blob):
    self.blob = blob

  def __reduce__(self):
    from torch.storage import _load_from_bytes  # pylint: disable=g-import-not-at-top
    return (_load_from_bytes, (self.blob,))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("kind", ["top", "nested", "storage_blob", "eval"])
def test_malicious_pickles_are_refused_without_running(tmp_path, kind):
  target = tmp_path / "owned"
  if kind == "top":
    obj = _Evil(target)
  elif kind == "nested":
    obj = {"ema": None, "dataset_kwargs": {"x": [1, _Evil(target)]}}
  elif kind == "eval":
    class _Eval:
      def __reduce__(self):
        return (eval, (f"open({str(target)!r}, 'w')",))
    obj = {"ema": _Eval()}
  else:
    obj = {"ema": _EvilStorage(pickle.dumps(_Evil(target)))}
  path = tmp_path / "evil.pkl"
  with open(path, "wb") as f:
    pickle.dump(obj, f)
  with pytest.raises(Exception) as err:
    edm_import.load_edm_network(str(path))
  assert not target.exists()
  if kind != "storage_blob":
    assert isinstance(err.value, edm_import.UnsafePickleError)
    assert "refusing" in str(err.value)


def test_unknown_persistent_class_and_other_preconds_are_refused(tmp_path, marker):
  marker_path, payload = marker
  state = {"model.map_layer0.weight": np.zeros((4, 2), np.float32)}
  path = str(tmp_path / "odd.pkl")
  _write(path, state, "SomethingElse", "SongUNet", payload, label_dim=0)
  with pytest.raises(edm_import.UnsafePickleError, match="unknown persistent class"):
    edm_import.load_edm_network(path)
  _write(path, state, "VEPrecond", "SongUNet", payload, label_dim=0)
  desc, _ = edm_import.load_edm_network(path)
  with pytest.raises(ValueError, match="VEPrecond"):
    edm_import.check_precond(desc)
  assert not os.path.exists(marker_path)
