"""openai/consistency_models (and guided-diffusion) UNetModel state dicts <-> ADMUNet.

The attention checks run small torch references of the two qkv orders, written here from
the reference code's documented reshapes: consistency_models' QKVAttention (chunk into q, k,
v, then heads) and guided-diffusion's QKVAttentionLegacy (heads, then q, k, v)."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import _interop_util as U
from cm_jax.interop import export_openai, name_maps, openai_import
from cm_jax.nets.adm import ADMUNet, AttentionBlock


@pytest.fixture(scope="module")
def tiny():
  cfg = U.model_cfg()
  net = U.net_for(cfg, num_classes=10)
  return cfg, net, U.random_params(net, num_classes=10, seed=3)


@pytest.mark.parametrize("layout,conv1d", [("three_heads", False), ("heads_three", True)])
def test_export_then_import_is_bit_exact(tiny, tmp_path, layout, conv1d):
  cfg, _, params = tiny
  path = export_openai.save(str(tmp_path / "cd_tiny.pt"), params, cfg, layout, conv1d)
  state = openai_import.load_torch_state_dict(path)
  back = name_maps.unflatten(openai_import.adm_params_from_openai(state, cfg, layout))
  U.assert_trees_equal(back, params)
  assert openai_import.num_classes_in(state) == 10


def test_openai_key_names_and_layouts(tiny, tmp_path):
  cfg, _, params = tiny
  path = export_openai.save(str(tmp_path / "m.pt"), params, cfg)
  sd = torch.load(path, map_location="cpu", weights_only=True)
  # UNetModel's names: Sequential/ModuleList indices as their own key components.
  assert sd["input_blocks.0.0.weight"].shape == (16, 3, 3, 3)
  assert sd["input_blocks.1.0.in_layers.2.weight"].shape == (16, 16, 3, 3)
  assert sd["input_blocks.1.0.emb_layers.1.weight"].shape == (32, 64)  # scale-shift: 2 x 16
  assert sd["input_blocks.3.0.skip_connection.weight"].shape == (32, 16, 1, 1)
  assert sd["input_blocks.3.1.qkv.weight"].shape == (96, 32, 1, 1)  # dims=2 attention convs
  assert sd["middle_block.1.proj_out.weight"].shape == (32, 32, 1, 1)
  assert sd["output_blocks.1.2.in_layers.0.weight"].shape == (32,)  # the upsampling ResBlock
  assert sd["label_emb.weight"].shape == (10, 64)
  assert sd["time_embed.2.weight"].shape == (64, 64)
  assert sd["out.2.weight"].shape == (3, 16, 3, 3)
  np.testing.assert_array_equal(sd["time_embed.0.weight"].numpy(),
                                np.asarray(params["time_embed_0"]["kernel"]).T)
  np.testing.assert_array_equal(sd["input_blocks.0.0.weight"].numpy(),
                                np.asarray(params["input_blocks_0_0"]["kernel"]).transpose(3, 2, 0, 1))
  for key in ("out.0.weight", "input_blocks.1.0.in_layers.0.weight"):
    assert key in sd  # GroupNorm weight <- scale


def _torch_attention(x, sd, prefix, heads, layout):
  """AttentionBlock._forward of the reference: norm, qkv conv, attention, proj_out, residual."""
  b, c, h, w = x.shape
  g = lambda n: sd[f"{prefix}.{n}"]
  hn = F.group_norm(x, 8, g("norm.weight"), g("norm.bias"), eps=1e-5)
  wq = g("qkv.weight")
  qkv = (F.conv1d(hn.reshape(b, c, -1), wq, g("qkv.bias")) if wq.ndim == 3 else
         F.conv2d(hn, wq, g("qkv.bias")).reshape(b, 3 * c, -1))
  ch = c // heads
  if layout == "three_heads":  # QKVAttention: chunk(3), then heads
    q, k, v = (t.reshape(b * heads, ch, -1) for t in qkv.chunk(3, dim=1))
  else:  # QKVAttentionLegacy: heads, then split q, k, v
    q, k, v = qkv.reshape(b * heads, 3 * ch, -1).split(ch, dim=1)
  scale = 1 / np.sqrt(np.sqrt(ch))
  wts = torch.softmax(torch.einsum("bct,bcs->bts", q * scale, k * scale), dim=-1)
  a = torch.einsum("bts,bcs->bct", wts, v).reshape(b, c, h, w)
  wp = g("proj_out.weight")
  out = (F.conv1d(a.reshape(b, c, -1), wp, g("proj_out.bias")).reshape(b, c, h, w)
         if wp.ndim == 3 else F.conv2d(a, wp, g("proj_out.bias")))
  return x + out


@pytest.mark.parametrize("layout,conv1d", [("three_heads", False), ("heads_three", True)])
def test_qkv_layouts_match_reference_attention(tiny, tmp_path, layout, conv1d):
  cfg, _, params = tiny
  path = export_openai.save(str(tmp_path / "m.pt"), params, cfg, layout, conv1d)
  sd = torch.load(path, map_location="cpu", weights_only=True)
  imported = name_maps.unflatten(openai_import.adm_params_from_openai(
      openai_import.load_torch_state_dict(path), cfg, layout))
  heads = 32 // 8
  x = np.random.RandomState(0).randn(2, 32, 4, 4).astype(np.float32)
  with torch.no_grad():
    ref = _torch_attention(torch.from_numpy(x), sd, "middle_block.1", heads, layout).numpy()
  out = AttentionBlock(num_heads=heads, num_groups=8).apply(
      {"params": imported["middle_block_1"]}, jnp.asarray(x.transpose(0, 2, 3, 1)))
  np.testing.assert_allclose(np.asarray(out).transpose(0, 3, 1, 2), ref, atol=1e-5, rtol=0)
  # The wrong layout gives a different function (the check above has teeth).
  other = "heads_three" if layout == "three_heads" else "three_heads"
  with torch.no_grad():
    wrong = _torch_attention(torch.from_numpy(x), sd, "middle_block.1", heads, other).numpy()
  assert np.abs(wrong - ref).max() > 1e-3


def test_imagenet64_key_set_has_the_reference_parameter_count():
  """The full ImageNet 64 net: every ADMUNet path has a UNetModel key and back."""
  net = ADMUNet(image_size=64, in_channels=3, out_channels=3, model_channels=192,
                channel_mult=(1, 2, 3, 4), num_res_blocks=3, attention_resolutions=(32, 16, 8),
                num_head_channels=64, num_classes=1000)
  shapes = jax.eval_shape(lambda: net.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)),
                                           jnp.zeros((1,)), jnp.zeros((1,), jnp.int32)))["params"]
  flat = {tuple(k.key for k in p): s for p, s in jax.tree_util.tree_flatten_with_path(shapes)[0]}
  keys = {name_maps.path_to_openai_key(p): p for p in flat}
  assert len(keys) == len(flat)
  assert sum(int(np.prod(s.shape)) for s in flat.values()) == 295_899_267
  for key, path in keys.items():
    ndim = len(flat[path].shape)
    assert name_maps.openai_key_to_path(key, ndim) == path
  # A few names of the released checkpoints' state dicts.
  for key in ("input_blocks.4.0.in_layers.2.weight",
              "input_blocks.5.1.qkv.weight", "middle_block.1.qkv.bias",
              "output_blocks.3.2.out_layers.3.weight", "output_blocks.15.0.skip_connection.bias",
              "label_emb.weight", "out.2.bias"):
    assert key in keys, key


def test_malicious_pt_is_refused_by_weights_only_load(tmp_path):
  target = tmp_path / "owned"

  class Evil:
    def __reduce__(self):
      return (os.system, (f"touch {target}",))

  path = tmp_path / "evil.pt"
  torch.save({"input_blocks.0.0.weight": torch.zeros(1), "x": Evil()}, path)
  with pytest.raises(Exception, match="(?i)weights.only|unsupported|global"):
    openai_import.load_torch_state_dict(str(path))
  assert not target.exists()


def test_mismatched_checkpoint_names_every_problem(tiny):
  cfg, _, params = tiny
  flat = name_maps.flatten(params)
  broken = dict(flat)
  broken.pop(("out_2", "bias"))
  broken[("bogus", "kernel")] = np.zeros(1, np.float32)
  broken[("out_0", "scale")] = np.zeros(5, np.float32)
  with pytest.raises(ValueError) as err:
    name_maps.check_against(broken, flat, "ckpt")
  msg = str(err.value)
  assert "out_2/bias" in msg and "bogus/kernel" in msg and "out_0/scale" in msg
