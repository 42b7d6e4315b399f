"""Tests of the Flax port of diffusers' UNet2DConditionModel (cm_jax.nets.sd_unet):
fp32 parity with the PyTorch reference on identical random weights (SD1-style, SD2-style,
LCM's timestep_cond, a cross-attention mask, latents whose side is not a multiple of 2),
the exact state-dict round trip, SD 1.5's parameter count, one-line config errors, bf16."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from cm_jax.utils.torch_names import params_from_state_dict, state_dict_from_params  # noqa: E402
from cm_jax.nets.sd_unet import UNet2DCondition, sd15_unet_config  # noqa: E402

# Tiny nets diffusers accepts, each with a cross-attention block, a plain block and the
# cross-attention mid block; 4 GroupNorm groups so 8 channels divide.
BASE = dict(block_out_channels=(8, 16), norm_num_groups=4, layers_per_block=1,
            cross_attention_dim=8, attention_head_dim=2, sample_size=16,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
CONFIGS = {
    # SD 1.x: 1x1-conv proj_in/proj_out, one head count for every block.
    "sd1": BASE,
    # SD 2.x: Linear proj_in/proj_out, per-block head counts (the up blocks take them
    # reversed) and two transformer blocks in the first level.
    "sd2": dict(BASE, use_linear_projection=True, attention_head_dim=(2, 4),
                transformer_layers_per_block=(2, 1)),
    # LCM: the guidance embedding w -> cond_proj, added to the time projection.
    "lcm": dict(BASE, time_cond_proj_dim=8),
}
B, L = 2, 7


def torch_unet(name: str):
  """The diffusers net with every parameter perturbed by noise (the default init has zeros,
  e.g. biases, that would hide a wrong layout) and its state dict as numpy."""
  torch.manual_seed(0)
  model = diffusers.UNet2DConditionModel(**CONFIGS[name]).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.1 * torch.randn_like(p))
  return model, {k: v.numpy() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def nets():
  """name -> (torch model, numpy state dict, Flax net from the torch config, Flax params,
  jitted apply)."""
  out = {}
  for name in CONFIGS:
    model, sd = torch_unet(name)
    # The full diffusers config (bookkeeping and default-valued keys included).
    net = UNet2DCondition.from_config(dict(model.config))
    x, t, ctx = np.zeros((1, 16, 16, 4)), np.zeros((1,)), np.zeros((1, L, 8))
    abstract = jax.eval_shape(lambda: net.init(jax.random.key(0), x, t, context=ctx))["params"]
    out[name] = model, sd, net, params_from_state_dict(sd, abstract, what=name), apply_fn(net)
  return out


def apply_fn(net):
  """One jitted apply per net, shared by the tests: each input structure compiles once."""
  return jax.jit(lambda p, x, t, c, ctx, m: net.apply({"params": p}, x, t, cond=c, context=ctx,
                                                      context_mask=m))


def inputs(seed: int, hw=(16, 16)):
  rng = np.random.RandomState(seed)
  x = rng.randn(B, *hw, 4).astype(np.float32)
  ctx = rng.randn(B, L, 8).astype(np.float32)
  return x, ctx


def reference(model, x, t, ctx, cond=None, mask=None):
  with torch.no_grad():
    out = model(torch.from_numpy(x).permute(0, 3, 1, 2), torch.as_tensor(t),
                torch.from_numpy(ctx),
                timestep_cond=None if cond is None else torch.from_numpy(cond),
                encoder_attention_mask=None if mask is None else torch.from_numpy(mask)).sample
  return out.permute(0, 2, 3, 1).numpy()


def flax_out(apply, params, x, t, ctx, cond=None, mask=None):
  return np.asarray(apply(params, x, t, cond, ctx, mask))


# (config, extra inputs): timesteps as the SD pipelines pass them, LCM's timestep_cond with
# and without it (there with a scalar timestep, broadcast to the batch), a padding mask on
# the text tokens, 15x13 latents (the odd skip sizes make diffusers upsample to the skip's
# size, not by 2).
CASES = {
    "sd1": ("sd1", {}),
    "sd2": ("sd2", {}),
    "lcm_cond": ("lcm", {"cond": True}),
    "lcm_no_cond": ("lcm", {"t": np.float32(500.0)}),
    "sd1_mask": ("sd1", {"mask": True}),
    "sd2_odd_size": ("sd2", {"hw": (15, 13)}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_parity_with_diffusers(nets, case):
  name, opts = CASES[case]
  model, _, _, params, apply = nets[name]
  x, ctx = inputs(1, opts.get("hw", (16, 16)))
  t = opts.get("t", np.array([10.0, 500.0], np.float32))
  cond = np.random.RandomState(2).randn(B, 8).astype(np.float32) if opts.get("cond") else None
  mask = None
  if opts.get("mask"):
    mask = np.ones((B, L), np.float32)
    mask[1, 4:] = 0  # the second prompt is 4 tokens long
  ref = reference(model, x, t, ctx, cond, mask)
  out = flax_out(apply, params, x, t, ctx, cond, mask)
  assert out.shape == ref.shape == x.shape
  assert np.abs(ref).max() > 0.1  # a live output, not zeros
  np.testing.assert_allclose(out, ref, atol=1e-4, rtol=0)


def test_cond_and_mask_change_the_output(nets):
  """The parity cases above would also pass if cond or the mask were dropped on both sides
  alike; check that they matter (input structures as in the parity cases: no new compile)."""
  x, ctx = inputs(3)
  t = np.full((B,), 500.0, np.float32)
  _, _, _, params, apply = nets["lcm"]
  cond = np.random.RandomState(4).randn(B, 8).astype(np.float32)
  with_cond = flax_out(apply, params, x, t, ctx, cond)
  assert np.abs(with_cond - flax_out(apply, params, x, np.float32(500.0), ctx)).max() > 1e-3
  _, _, _, params, apply = nets["sd1"]
  mask = np.ones((B, L), np.float32)
  mask[:, 3:] = 0
  diff = flax_out(apply, params, x, t, ctx, mask=mask) - flax_out(apply, params, x, t, ctx)
  assert np.abs(diff).max() > 1e-3


@pytest.mark.parametrize("name", list(CONFIGS))
def test_state_dict_round_trip(nets, name):
  _, sd, _, params, _ = nets[name]
  back = state_dict_from_params(params)
  assert sorted(back) == sorted(sd)
  for key, value in sd.items():
    assert back[key].dtype == value.dtype and back[key].shape == value.shape, key
    assert np.array_equal(back[key], value), key


def test_flax_tree_names(nets):
  """Spot-check the module tree against the torch attribute names."""
  p = nets["lcm"][3]
  assert p["time_embedding"]["cond_proj"]["kernel"].shape == (8, 8)  # (cond dim, t-proj width)
  assert "bias" not in p["time_embedding"]["cond_proj"]
  block = p["down_blocks_0"]["attentions_0"]["transformer_blocks_0"]
  assert set(block) == {"norm1", "attn1", "norm2", "attn2", "norm3", "ff"}
  assert set(block["attn2"]) == {"to_q", "to_k", "to_v", "to_out_0"}
  assert set(block["attn2"]["to_q"]) == {"kernel"}  # no bias on q/k/v
  assert block["ff"]["net_0"]["proj"]["kernel"].shape == (8, 64)  # GEGLU: 2 x 4 x dim
  assert set(p["up_blocks_0"]["upsamplers_0"]) == {"conv"}
  assert set(p["down_blocks_0"]["downsamplers_0"]) == {"conv"}


def test_sd15_parameter_count():
  net = UNet2DCondition.from_config(sd15_unet_config())
  assert net.cond_dim == 0
  shapes = jax.eval_shape(lambda: net.init(
      jax.random.key(0), jnp.zeros((1, 8, 8, 4)), jnp.zeros((1,)),
      context=jnp.zeros((1, 77, 768))))
  assert sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(shapes)) == 859_520_964


def one_line_error(fn, *words):
  with pytest.raises(ValueError) as info:
    fn()
  msg = str(info.value)
  assert "\n" not in msg, msg
  for word in words:
    assert word in msg, msg


def test_config_errors():
  cfg = dict(BASE)
  one_line_error(lambda: UNet2DCondition.from_config(
      dict(cfg, down_block_types=["SimpleCrossAttnDownBlock2D", "DownBlock2D"])),
      "down_block_types", "SimpleCrossAttnDownBlock2D")
  one_line_error(lambda: UNet2DCondition(**dict(cfg, up_block_types=("UpBlock2D", "KUpBlock2D"))),
                 "up_block_types", "KUpBlock2D")
  one_line_error(lambda: UNet2DCondition.from_config(dict(cfg, mid_block_type="UNetMidBlock2D")),
                 "mid_block_type", "UNetMidBlock2D")
  one_line_error(lambda: UNet2DCondition.from_config(dict(cfg, class_embed_type="timestep")),
                 "class_embed_type", "timestep")
  one_line_error(lambda: UNet2DCondition.from_config(dict(cfg, addition_embed_type="text_time")),
                 "addition_embed_type", "text_time")
  # A key with no field here, set away from its default, and a key diffusers does not know.
  one_line_error(lambda: UNet2DCondition.from_config(
      dict(cfg, resnet_time_scale_shift="scale_shift")), "resnet_time_scale_shift", "scale_shift")
  one_line_error(lambda: UNet2DCondition.from_config(dict(cfg, num_class_embeds=10)),
                 "num_class_embeds", "10")
  one_line_error(lambda: UNet2DCondition.from_config(dict(cfg, foo_bar=1)), "foo_bar")
  one_line_error(lambda: UNet2DCondition(**cfg, num_classes=10), "num_classes")
  # Bookkeeping keys and default-valued extras are accepted.
  net = UNet2DCondition.from_config(dict(
      cfg, _class_name="UNet2DConditionModel", _diffusers_version="0.6.0",
      _name_or_path="x", resnet_time_scale_shift="default", mid_block_only_cross_attention=None))
  assert net.block_out_channels == (8, 16)


def test_build_network_keywords_and_call_errors(nets):
  """The keywords cm_jax.nets.build_network passes to every network are accepted; labels,
  a missing context or an unexpected cond are one-line errors."""
  net = UNet2DCondition(**BASE, image_size=16, in_channels=4, out_channels=4, num_classes=None,
                        dtype=jnp.float32, remat=False)
  assert net.cond_dim == 0 and nets["lcm"][2].cond_dim == 8
  x, ctx = inputs(5)
  t = jnp.zeros((B,))
  key = jax.random.key(0)
  one_line_error(lambda: jax.eval_shape(lambda: net.init(key, x, t, jnp.zeros((B,), jnp.int32),
                                                         context=ctx)), "labels")
  one_line_error(lambda: jax.eval_shape(lambda: net.init(key, x, t)), "context")
  one_line_error(lambda: jax.eval_shape(lambda: net.init(key, x, t, cond=jnp.zeros((B, 8)),
                                                         context=ctx)), "time_cond_proj_dim")
  one_line_error(lambda: jax.eval_shape(lambda: net.init(key, x, t, context=ctx[..., :4])),
                 "cross_attention_dim")


def test_bf16_close_to_fp32(nets):
  _, _, net, params, apply = nets["sd1"]
  x, ctx = inputs(6)
  t = np.array([10.0, 500.0], np.float32)
  ref = flax_out(apply, params, x, t, ctx)
  net16 = net.clone(dtype=jnp.bfloat16)
  out = flax_out(apply_fn(net16), params, x, t, ctx)
  assert out.dtype == np.float32
  assert np.abs(out - ref).max() < 0.05 * np.abs(ref).max()
  # Parameters stay float32 under a bf16 compute dtype.
  shapes = jax.eval_shape(lambda: net16.init(jax.random.key(0), x, t, context=ctx))
  assert {leaf.dtype for leaf in jax.tree.leaves(shapes)} == {jnp.dtype(jnp.float32)}


def test_remat_traces_under_grad(nets):
  """remat=True keeps the parameter tree and differentiates (traced only: compiling the
  backward pass costs a minute on 2 CPU cores; the forward math is the same modules)."""
  _, _, net, params, _ = nets["sd2"]
  x, ctx = inputs(7)
  t = np.array([10.0, 500.0], np.float32)
  remat = net.clone(remat=True)
  loss = lambda p: jnp.mean(remat.apply({"params": p}, x, t, context=ctx) ** 2)
  value, grads = jax.eval_shape(jax.value_and_grad(loss), params)
  assert value.shape == () and value.dtype == jnp.float32
  assert jax.tree.map(lambda g: (g.shape, g.dtype), grads) == \
      jax.tree.map(lambda p: (p.shape, p.dtype), params)
  jaxpr = str(jax.make_jaxpr(jax.grad(loss))(params))
  assert "remat" in jaxpr or "checkpoint" in jaxpr
