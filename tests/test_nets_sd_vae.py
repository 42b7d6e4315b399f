"""Tests of the Flax AutoencoderKL (cm_jax.nets.sd_vae) against diffusers' PyTorch one.

Both networks get the same random weights (a diffusers model whose every parameter is
moved off its init value, loaded into Flax by the mechanical name rule), then encode,
decode and reconstruct the same inputs; plus the state-dict round trip, the legacy
attention names, the posterior helpers, SD 1.5's parameter count and the config checks.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from cm_jax.utils.torch_names import params_from_state_dict, state_dict_from_params
from cm_jax.nets import sd_vae
from cm_jax.nets.sd_vae import AutoencoderKL

# Three levels (two downsamplers), a width change in both encoder and decoder (so the
# conv_shortcut paths run) and a level that keeps its width.
TINY = dict(in_channels=3, out_channels=3, block_out_channels=[8, 16, 16],
            down_block_types=["DownEncoderBlock2D"] * 3, up_block_types=["UpDecoderBlock2D"] * 3,
            layers_per_block=1, latent_channels=4, norm_num_groups=4, sample_size=16)
B, S = 2, 16
LATENT = S // 4
TOL = 1e-4


def nchw(x):
  return np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2))


def nhwc(x):
  return np.ascontiguousarray(np.asarray(x).transpose(0, 2, 3, 1))


def count(tree):
  return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


@pytest.fixture(scope="module")
def torch_vae():
  torch = pytest.importorskip("torch")
  diffusers = pytest.importorskip("diffusers")
  torch.manual_seed(0)
  model = diffusers.AutoencoderKL(**TINY).eval()
  with torch.no_grad():
    # GroupNorm scales start at 1 and biases at 0: noise on everything, so a weight
    # that is loaded into the wrong place (or not at all) changes the output.
    for p in model.parameters():
      p.add_(0.1 * torch.randn_like(p))
  return model


@pytest.fixture(scope="module")
def state(torch_vae):
  return {k: v.detach().cpu().numpy() for k, v in torch_vae.state_dict().items()}


@pytest.fixture(scope="module")
def flax_vae(torch_vae, state):
  """The Flax module from diffusers' own config dict, its params loaded from the torch
  state dict, and jitted encode / decode / forward."""
  model = AutoencoderKL.from_config(dict(torch_vae.config))
  abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, S, S, 3)))["params"]
  params = params_from_state_dict(state, abstract, what="tiny VAE")
  encode = jax.jit(lambda p, x: model.apply({"params": p}, x, method=AutoencoderKL.encode))
  decode = jax.jit(lambda p, z: model.apply({"params": p}, z, method=AutoencoderKL.decode))
  forward = jax.jit(lambda p, x: model.apply({"params": p}, x))
  return model, abstract, params, encode, decode, forward


@pytest.fixture(scope="module")
def data():
  rng = np.random.RandomState(1)
  x = rng.uniform(-1, 1, (B, S, S, 3)).astype(np.float32)
  z = rng.randn(B, LATENT, LATENT, 4).astype(np.float32)
  return x, z


def test_encode_matches_diffusers(torch_vae, flax_vae, data):
  import torch
  _, _, params, encode, _, _ = flax_vae
  x, _ = data
  with torch.no_grad():
    dist = torch_vae.encode(torch.from_numpy(nchw(x))).latent_dist
  mean, logvar = encode(params, x)
  assert mean.shape == logvar.shape == (B, LATENT, LATENT, 4)
  assert mean.dtype == logvar.dtype == jnp.float32
  np.testing.assert_allclose(mean, nhwc(dist.mean), atol=TOL, rtol=0)
  np.testing.assert_allclose(logvar, nhwc(dist.logvar), atol=TOL, rtol=0)


def test_decode_matches_diffusers(torch_vae, flax_vae, data):
  import torch
  _, _, params, _, decode, _ = flax_vae
  _, z = data
  with torch.no_grad():
    want = torch_vae.decode(torch.from_numpy(nchw(z))).sample
  got = decode(params, z)
  assert got.shape == (B, S, S, 3)
  np.testing.assert_allclose(got, nhwc(want), atol=TOL, rtol=0)


def test_reconstruction_matches_diffusers(torch_vae, flax_vae, data):
  import torch
  _, _, params, encode, _, forward = flax_vae
  x, _ = data
  with torch.no_grad():
    want = torch_vae(torch.from_numpy(nchw(x)), sample_posterior=False).sample
  recon, mean, logvar = forward(params, x)
  np.testing.assert_allclose(recon, nhwc(want), atol=TOL, rtol=0)
  mean2, logvar2 = encode(params, x)
  np.testing.assert_array_equal(mean, mean2)
  np.testing.assert_array_equal(logvar, logvar2)


def test_logvar_is_clipped(flax_vae, data):
  # Push the log-variance half of quant_conv's bias far out both ways: encode must clamp
  # to DiagonalGaussianDistribution's [-30, 20] (the mean half is left alone).
  _, _, params, encode, _, _ = flax_vae
  x, _ = data
  flat = traverse_util.flatten_dict(params)
  for shift, bound in ((1e3, 20.0), (-1e3, -30.0)):
    bias = np.asarray(flat[("quant_conv", "bias")]).copy()
    bias[4:] += shift
    moved = traverse_util.unflatten_dict({**flat, ("quant_conv", "bias"): jnp.asarray(bias)})
    mean, logvar = encode(moved, x)
    np.testing.assert_array_equal(logvar, np.full(logvar.shape, bound, np.float32))
    np.testing.assert_array_equal(mean, encode(params, x)[0])


def test_state_dict_round_trip_is_exact(flax_vae, state):
  _, abstract, params, _, _, _ = flax_vae
  back = state_dict_from_params(params)
  assert set(back) == set(state)
  for k, v in state.items():
    assert back[k].shape == v.shape and back[k].dtype == v.dtype, k
    np.testing.assert_array_equal(back[k], v, err_msg=k)
  again = params_from_state_dict(back, abstract)
  jax.tree.map(np.testing.assert_array_equal, again, params)


def test_legacy_attention_keys_load(flax_vae, state, data):
  """An old-format folder: query/key/value/proj_attn, stored as 1x1 conv weights."""
  _, abstract, params, encode, _, _ = flax_vae
  x, _ = data
  new_to_old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
  legacy = {}
  for k, v in state.items():
    for new, old in new_to_old.items():
      marker = f".attentions.0.{new}."
      if marker in k:
        k = k.replace(marker, f".attentions.0.{old}.")
        if k.endswith(".weight"):
          v = v[:, :, None, None]
        break
    legacy[k] = v
  assert "encoder.mid_block.attentions.0.proj_attn.weight" in legacy
  assert legacy["decoder.mid_block.attentions.0.query.weight"].shape == (16, 16, 1, 1)
  with pytest.raises(ValueError, match="query"):
    params_from_state_dict(legacy, abstract)  # not loadable as is

  renamed = sd_vae.rename_legacy_vae_keys(legacy)
  assert set(renamed) == set(state)
  for k, v in state.items():
    np.testing.assert_array_equal(renamed[k], v, err_msg=k)
  loaded = params_from_state_dict(renamed, abstract)
  jax.tree.map(np.testing.assert_array_equal, loaded, params)
  np.testing.assert_array_equal(encode(loaded, x)[0], encode(params, x)[0])
  # Already-current names pass through unchanged (idempotent).
  again = sd_vae.rename_legacy_vae_keys(renamed)
  assert list(again) == list(renamed)


def test_legacy_rename_refuses_a_duplicate():
  w = np.zeros((4, 4), np.float32)
  state = {"encoder.mid_block.attentions.0.query.weight": w,
           "encoder.mid_block.attentions.0.to_q.weight": w}
  with pytest.raises(ValueError, match="to_q.weight"):
    sd_vae.rename_legacy_vae_keys(state)


def test_kl_by_hand_and_against_numpy():
  shape = (3, 2, 2, 4)
  zero = jnp.zeros(shape)
  np.testing.assert_array_equal(sd_vae.kl_to_standard_normal(zero, zero), np.zeros(3))
  # mean 1, var 1: 0.5 * (1 + 1 - 1 - 0) = 0.5 per element, 16 elements per example.
  np.testing.assert_allclose(sd_vae.kl_to_standard_normal(jnp.ones(shape), zero),
                             np.full(3, 8.0), rtol=1e-6)
  # mean 0, logvar log 2: 0.5 * (2 - 1 - log 2) per element.
  np.testing.assert_allclose(
      sd_vae.kl_to_standard_normal(zero, jnp.full(shape, np.log(2.0))),
      np.full(3, 16 * 0.5 * (1 - np.log(2.0))), rtol=1e-6)
  rng = np.random.RandomState(3)
  mean, logvar = rng.randn(*shape), rng.randn(*shape)
  want = 0.5 * (mean ** 2 + np.exp(logvar) - 1 - logvar).reshape(3, -1).sum(1)
  got = sd_vae.kl_to_standard_normal(jnp.asarray(mean, jnp.float32),
                                     jnp.asarray(logvar, jnp.float32))
  assert got.shape == (3,)
  np.testing.assert_allclose(got, want, rtol=1e-5)


def test_kl_matches_diffusers_distribution():
  torch = pytest.importorskip("torch")
  from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
  rng = np.random.RandomState(4)
  moments = rng.randn(2, 8, 3, 3).astype(np.float32)  # NCHW: mean then logvar channels
  want = DiagonalGaussianDistribution(torch.from_numpy(moments)).kl().numpy()
  m = nhwc(moments)
  got = sd_vae.kl_to_standard_normal(jnp.asarray(m[..., :4]), jnp.asarray(m[..., 4:]))
  np.testing.assert_allclose(got, want, rtol=1e-5)


def test_latent_sample():
  rng = jax.random.key(5)
  mean = jnp.asarray(np.linspace(-2, 2, 2 * 3 * 3 * 4).reshape(2, 3, 3, 4), jnp.float32)
  logvar = jnp.asarray(np.linspace(-3, 1, 2 * 3 * 3 * 4).reshape(2, 3, 3, 4), jnp.float32)
  got = sd_vae.latent_sample(mean, logvar, rng)
  eps = np.asarray(jax.random.normal(rng, mean.shape))
  np.testing.assert_allclose(got, np.asarray(mean) + np.exp(0.5 * np.asarray(logvar)) * eps,
                             rtol=1e-6, atol=1e-6)
  # Many draws of one (mean 1.5, std 0.5) element: the sample moments come out right.
  many = sd_vae.latent_sample(jnp.full((20000,), 1.5), jnp.full((20000,), np.log(0.25)), rng)
  assert abs(float(many.mean()) - 1.5) < 0.02 and abs(float(many.std()) - 0.5) < 0.02


def test_sample_posterior_uses_rng(flax_vae, data):
  model, _, params, encode, decode, _ = flax_vae
  x, _ = data
  rng = jax.random.key(6)
  recon, mean, logvar = model.apply({"params": params}, x, rng, sample_posterior=True)
  z = sd_vae.latent_sample(mean, logvar, rng)
  np.testing.assert_allclose(recon, decode(params, z), atol=1e-5, rtol=0)
  with pytest.raises(ValueError, match="rng"):
    model.apply({"params": params}, x, sample_posterior=True)


def test_latent_scaling():
  z = jnp.asarray(np.random.RandomState(7).randn(2, 3), jnp.float32)
  np.testing.assert_allclose(sd_vae.to_latents(z, 0.18215), np.asarray(z) * 0.18215, rtol=1e-6)
  # SD3-style shift: (z - shift) * scale, inverted by latents / scale + shift.
  np.testing.assert_allclose(sd_vae.to_latents(z, 1.5305, 0.0609),
                             (np.asarray(z) - 0.0609) * 1.5305, rtol=1e-6)
  for shift in (None, 0.0609):
    back = sd_vae.from_latents(sd_vae.to_latents(z, 1.5305, shift), 1.5305, shift)
    np.testing.assert_allclose(back, z, atol=1e-6)


def test_bfloat16_and_remat(flax_vae, data):
  """Compute dtype bfloat16: float32 params and outputs, close to float32; remat: same
  gradients as without."""
  model, abstract, params, _, _, forward = flax_vae
  x, _ = data
  bf16 = model.clone(dtype=jnp.bfloat16)
  assert jax.tree.map(lambda a: a.dtype, jax.eval_shape(
      bf16.init, jax.random.key(0), jnp.zeros((1, S, S, 3)))["params"]) == \
      jax.tree.map(lambda a: a.dtype, abstract)
  recon16, mean16, _ = jax.jit(lambda p, x: bf16.apply({"params": p}, x))(params, x)
  recon, mean, _ = forward(params, x)
  assert recon16.dtype == mean16.dtype == jnp.float32
  scale = float(jnp.abs(recon).max())
  assert float(jnp.abs(recon16 - recon).max()) < 0.05 * scale

  def grads(m):
    loss = lambda p: jnp.sum(m.apply({"params": p}, x)[0] ** 2)
    return jax.jit(jax.grad(loss))(params)
  g, g_remat = grads(model), grads(model.clone(remat=True))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), g, g_remat)


def test_sd15_parameter_count():
  model = AutoencoderKL.from_config(sd_vae.sd15_vae_config())
  assert model.scaling_factor == 0.18215 and model.block_out_channels == (128, 256, 512, 512)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 16, 16, 3)))
  assert count(shapes["params"]) == 83_653_863
  recon, mean, logvar = jax.eval_shape(model.apply, shapes, jnp.zeros((1, 64, 64, 3)))
  assert recon.shape == (1, 64, 64, 3) and mean.shape == logvar.shape == (1, 8, 8, 4)


@pytest.mark.parametrize("key, value, needle", [
    ("down_block_types", ["DownEncoderBlock2D", "AttnDownEncoderBlock2D", "DownEncoderBlock2D"],
     "down_block_types='AttnDownEncoderBlock2D'"),
    ("up_block_types", ["UpDecoderBlock2D", "UpDecoderBlock2D", "AttnUpDecoderBlock2D"],
     "up_block_types='AttnUpDecoderBlock2D'"),
    ("act_fn", "gelu", "act_fn='gelu'"),
    ("latents_mean", [0.0] * 4, "latents_mean="),
    ("norm_num_groups", 3, "norm_num_groups=3"),
    ("block_out_channels", [8, 16], "down_block_types="),
    ("resnet_bias", True, "'resnet_bias'"),
    ("_class_name", "AutoencoderTiny", "_class_name='AutoencoderTiny'"),
])
def test_unsupported_config_is_a_one_line_error(key, value, needle):
  config = {**TINY, "_class_name": "AutoencoderKL", "_diffusers_version": "0.42.1",
            "_name_or_path": "somewhere", "shift_factor": None, "force_upcast": True,
            "mid_block_add_attention": True, key: value}
  with pytest.raises(ValueError) as info:
    AutoencoderKL.from_config(config)
  message = str(info.value)
  assert "\n" not in message and needle in message, message


def test_from_config_options():
  model = AutoencoderKL.from_config({**TINY, "shift_factor": 0.0609, "_use_default_values": []},
                                    dtype="bfloat16", remat=True)
  assert model.shift_factor == 0.0609 and model.dtype == jnp.bfloat16 and model.remat
  assert model.down_block_types == ("DownEncoderBlock2D",) * 3
  # Without quant convs (SD3-style) or mid-block attention the tree loses exactly those.
  lean = AutoencoderKL.from_config({**TINY, "use_quant_conv": False, "use_post_quant_conv": False,
                                    "mid_block_add_attention": False})
  names = {"/".join(p) for p in traverse_util.flatten_dict(jax.eval_shape(
      lean.init, jax.random.key(0), jnp.zeros((1, S, S, 3)))["params"])}
  assert not any("quant_conv" in n or "attentions" in n for n in names)
  assert "encoder/mid_block/resnets_1/conv2/kernel" in names
