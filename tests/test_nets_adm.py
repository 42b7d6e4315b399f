"""Tests of the ADM UNet: the reference parameter count and the conditioning paths on a tiny net."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict

from cm_jax.nets.adm import ADMUNet, timestep_embedding

TINY = dict(image_size=8, in_channels=1, out_channels=1, model_channels=16, channel_mult=(1, 2),
            num_res_blocks=1, attention_resolutions=(4,), num_head_channels=8, num_classes=10,
            num_groups=8)
B = 2


def count(tree):
  return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


def key(seed):
  # The rbg generator: threefry's code takes seconds longer to compile on CPU for the same tests.
  return jax.random.key(seed, impl="rbg")


def randomize(params, seed):
  """Replace every parameter by noise (numpy: nothing to compile). The zero-initialised
  output convs make a fresh net output exactly 0, which would hide every conditioning path."""
  rng = np.random.RandomState(seed)
  return jax.tree.map(lambda p: jnp.asarray(0.3 * rng.randn(*p.shape), p.dtype), params)


@pytest.fixture(scope="module")
def inputs():
  rng = np.random.RandomState(1)
  x = jnp.asarray(rng.randn(B, 8, 8, 1), jnp.float32)
  t = jnp.asarray(rng.randn(B), jnp.float32)
  labels = jnp.array([1, 7])
  cond = jnp.array([[0.5, -1.0, 2.0, 0.0], [1.5, 0.3, -0.2, 1.0]])
  return x, t, labels, cond


@pytest.fixture(scope="module")
def tiny(inputs):
  """A tiny class- and cond-conditional net with dropout, its fresh and randomized params, and one jitted apply."""
  x, t, labels, cond = inputs
  model = ADMUNet(**TINY, cond_dim=4, dropout=0.5)
  params = jax.jit(model.init)(key(0), x, t, labels, cond)["params"]
  apply = jax.jit(lambda p, x, t, y, c, rng, train: model.apply(
      {"params": p}, x, t, y, c, train=train, rngs={"dropout": rng}), static_argnums=6)
  return model, params, randomize(params, 2), apply


def test_imagenet64_parameter_count():
  # openai/consistency_models' ImageNet-64 net (learn_sigma=False -> 3 output channels).
  model = ADMUNet(image_size=64, in_channels=3, out_channels=3, model_channels=192,
                  channel_mult=(1, 2, 3, 4), num_res_blocks=3, attention_resolutions=(32, 16, 8),
                  num_head_channels=64, use_scale_shift_norm=True, resblock_updown=True,
                  num_classes=1000, dropout=0.0)
  shapes = jax.eval_shape(lambda: model.init(
      key(0), jnp.zeros((1, 64, 64, 3)), jnp.zeros((1,)), jnp.zeros((1,), jnp.int32)))
  assert count(shapes) == 295_899_267
  flat = flatten_dict(shapes["params"], sep="/")
  # A few names of the torch-mirroring scheme (see the module docstring).
  assert flat["time_embed_2/kernel"].shape == (768, 768)
  assert flat["label_emb/embedding"].shape == (1000, 768)
  assert flat["input_blocks_5_0/skip_connection/kernel"].shape == (1, 1, 192, 384)
  assert flat["input_blocks_5_1/qkv/kernel"].shape == (1, 1, 384, 3 * 384)
  assert flat["middle_block_1/proj_out/kernel"].shape == (1, 1, 768, 768)
  assert flat["output_blocks_3_2/in_layers_2/kernel"].shape == (3, 3, 768, 768)  # up resblock
  assert flat["out_2/kernel"].shape == (3, 3, 192, 3)


def test_timestep_embedding_is_cos_then_sin():
  emb = timestep_embedding(jnp.array([0.0, 2.0]), 6)
  np.testing.assert_allclose(emb[0], [1, 1, 1, 0, 0, 0], atol=1e-7)
  freqs = 10000.0 ** (-np.arange(3) / 3)
  np.testing.assert_allclose(emb[1], np.concatenate([np.cos(2 * freqs), np.sin(2 * freqs)]), rtol=1e-6)


def test_fresh_net_outputs_zero_with_right_shape(tiny, inputs):
  model, params, _, apply = tiny
  out = apply(params, *inputs, key(0), False)
  assert out.shape == (B, 8, 8, 1) and out.dtype == jnp.float32
  np.testing.assert_array_equal(out, 0.0)  # zero-initialised out conv, as in the reference
  assert not np.any(params["cond_emb"]["kernel"])  # cond path starts switched off


def test_forward_is_deterministic_in_eval(tiny, inputs):
  _, _, rparams, apply = tiny
  a = apply(rparams, *inputs, key(0), False)
  b = apply(rparams, *inputs, key(1), False)  # dropout rng ignored in eval
  assert np.all(np.isfinite(a)) and np.abs(a).max() > 0
  np.testing.assert_array_equal(a, b)


def test_conditioning_changes_output(tiny, inputs):
  _, _, rparams, apply = tiny
  x, t, labels, cond = inputs
  rng = key(0)
  base = apply(rparams, x, t, labels, cond, rng, False)
  for changed in [(x, t + 1.0, labels, cond), (x, t, labels + 1, cond), (x, t, labels, cond + 1.0)]:
    assert np.abs(apply(rparams, *changed, rng, False) - base).max() > 1e-3


def test_dropout_only_in_train(tiny, inputs):
  _, _, rparams, apply = tiny
  ev = apply(rparams, *inputs, key(0), False)
  tr0 = apply(rparams, *inputs, key(0), True)
  tr0b = apply(rparams, *inputs, key(0), True)
  tr1 = apply(rparams, *inputs, key(1), True)
  assert np.abs(tr0 - ev).max() > 1e-3
  assert np.abs(tr0 - tr1).max() > 1e-3
  np.testing.assert_array_equal(tr0, tr0b)


def test_missing_or_unexpected_conditioning_raises(tiny, inputs):
  model, params, _, _ = tiny
  x, t, labels, cond = inputs
  with pytest.raises(ValueError):
    model.apply({"params": params}, x, t, None, cond)
  with pytest.raises(ValueError):
    model.apply({"params": params}, x, t, labels, None)


def test_remat_keeps_names_and_differentiates(inputs):
  """remat=True must not rename parameters, and must trace forward and backward with train=True
  (train is a static argument of the rematerialised block). Traced only, not compiled."""
  x, t, labels, _ = inputs
  plain, remat = ADMUNet(**TINY, dropout=0.1), ADMUNet(**TINY, dropout=0.1, remat=True)
  params = jax.eval_shape(plain.init, key(0), x, t, labels)["params"]
  assert jax.tree.structure(jax.eval_shape(remat.init, key(0), x, t, labels)["params"]) \
      == jax.tree.structure(params)

  def loss(p):
    out = remat.apply({"params": p}, x, t, labels, train=True, rngs={"dropout": key(0)})
    return jnp.mean(out ** 2)

  grads = jax.eval_shape(jax.grad(loss), params)
  assert jax.tree.map(lambda g: g.shape, grads) == jax.tree.map(lambda p: p.shape, params)


def test_plain_resampling_and_bfloat16_shapes(inputs):
  """resblock_updown=False (Downsample/Upsample layers), num_heads, no classes, bf16 compute."""
  x, t, _, _ = inputs
  model = ADMUNet(**{**TINY, "num_classes": None, "num_head_channels": -1, "num_heads": 2},
                  resblock_updown=False, use_scale_shift_norm=False, dtype=jnp.bfloat16)
  variables = jax.eval_shape(model.init, key(0), x, t)
  flat = flatten_dict(variables["params"], sep="/")
  assert flat["input_blocks_2_0/op/kernel"].shape == (3, 3, 16, 16)
  assert flat["output_blocks_1_2/conv/kernel"].shape == (3, 3, 32, 32)
  assert all(v.dtype == jnp.float32 for v in flat.values())  # params stay float32
  out = jax.eval_shape(model.apply, variables, x, t)
  assert out.shape == (B, 8, 8, 1) and out.dtype == jnp.float32
