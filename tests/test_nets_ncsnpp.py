"""Tests for cm_jax.nets.ncsnpp (NCSN++ / DDPM++ UNet).

A tiny configuration keeps every test fast on CPU; each fixture is module-scoped so the tiny
network is initialised once.  The full CIFAR-10 configuration is only traced (jax.eval_shape),
never allocated.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cm_jax.nets.ncsnpp import NCSNppUNet, downsample_fir, upsample_fir, _fir_2d

TINY = dict(image_size=8, in_channels=1, out_channels=1, model_channels=16, channel_mult=(1, 2),
            num_res_blocks=1, attention_resolutions=(4,), dropout=0.1)
B = 2


def _n_params(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))


def _randomise(params, seed=0):
  """Perturb every leaf: the near-zero initial output layers would otherwise hide how the
  inputs reach the output."""
  leaves, treedef = jax.tree_util.tree_flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
  leaves = [l + 0.3 * jax.random.normal(k, l.shape) / np.sqrt(max(1, np.prod(l.shape[:-1])))
            for l, k in zip(leaves, keys)]
  return jax.tree_util.tree_unflatten(treedef, leaves)


@pytest.fixture(scope="module")
def inputs():
  kx, kt = jax.random.split(jax.random.PRNGKey(42))
  x = jax.random.normal(kx, (B, 8, 8, 1))
  noise_cond = jax.random.normal(kt, (B,))
  labels = jnp.array([3, 7])
  return x, noise_cond, labels


@pytest.fixture(scope="module")
def cond_model(inputs):
  """Class- and vector-conditional tiny net, randomised params and a jitted apply."""
  x, t, y = inputs
  net = NCSNppUNet(num_classes=10, cond_dim=4, **TINY)
  params = net.init({"params": jax.random.PRNGKey(0)}, x, t, y, jnp.zeros((B, 4)))["params"]
  params = _randomise(params)

  # Eager calls: on CPU, after the first call has compiled each primitive once, an eager call
  # of this tiny net takes ~0.1 s, while every jax.jit would compile the whole graph again.
  def apply(params, x, t, labels, cond, rng):
    return net.apply({"params": params}, x, t, labels, cond, train=True, rngs={"dropout": rng})

  def apply_eval(params, x, t, labels, cond):
    return net.apply({"params": params}, x, t, labels, cond)

  return net, params, apply, apply_eval


def test_output_shape_and_dtype(cond_model, inputs):
  _, params, _, apply_eval = cond_model
  x, t, y = inputs
  out = apply_eval(params, x, t, y, jnp.zeros((B, 4)))
  assert out.shape == (B, 8, 8, 1)
  assert out.dtype == jnp.float32
  assert bool(jnp.all(jnp.isfinite(out)))


def test_parameter_names(cond_model):
  """The EDM SongUNet naming the module docstring promises (for checkpoint mapping)."""
  _, params, _, _ = cond_model
  assert set(params) == {
      "map_noise", "map_label", "map_cond", "map_layer0", "map_layer1",
      "enc_8x8_conv", "enc_8x8_block0", "enc_4x4_down", "enc_4x4_aux_residual",
      "enc_4x4_block0", "dec_4x4_in0", "dec_4x4_in1", "dec_4x4_block0", "dec_4x4_block1",
      "dec_8x8_up", "dec_8x8_block0", "dec_8x8_block1", "dec_8x8_aux_norm", "dec_8x8_aux_conv"}
  assert set(params["dec_4x4_block1"]) == {"norm0", "conv0", "affine", "norm1", "conv1", "skip",
                                           "norm2", "qkv", "proj"}
  assert set(params["enc_8x8_block0"]) == {"norm0", "conv0", "affine", "norm1", "conv1"}
  assert params["map_noise"]["freqs"].shape == (16,)  # model_channels Fourier frequencies
  assert params["map_label"]["kernel"].shape == (10, 32)  # to the noise width 2 * 16
  assert set(params["map_cond"]) == {"kernel"}  # no bias, like EDM's map_augment
  assert params["dec_4x4_block1"]["qkv"]["kernel"].shape == (1, 1, 32, 96)


def test_deterministic_forward(cond_model, inputs):
  net, params, _, apply_eval = cond_model
  x, t, y = inputs
  c = jnp.zeros((B, 4))
  a = apply_eval(params, x, t, y, c)
  b = apply_eval(params, x, t, y, c)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # The jitted call agrees with the eager one.
  ref = jax.jit(lambda p: net.apply({"params": p}, x, t, y, c))(params)
  np.testing.assert_allclose(np.asarray(a), np.asarray(ref), rtol=1e-5, atol=1e-5)


def test_noise_cond_changes_output(cond_model, inputs):
  _, params, _, apply_eval = cond_model
  x, t, y = inputs
  c = jnp.zeros((B, 4))
  diff = apply_eval(params, x, t, y, c) - apply_eval(params, x, t + 0.5, y, c)
  assert float(jnp.abs(diff).max()) > 1e-3


def test_labels_change_output(cond_model, inputs):
  _, params, _, apply_eval = cond_model
  x, t, y = inputs
  c = jnp.zeros((B, 4))
  out = apply_eval(params, x, t, y, c)
  other = apply_eval(params, x, t, (y + 1) % 10, c)
  assert float(jnp.abs(out - other).max()) > 1e-3
  # Integer labels and one-hot rows are the same input.
  onehot = apply_eval(params, x, t, jax.nn.one_hot(y, 10), c)
  np.testing.assert_allclose(np.asarray(out), np.asarray(onehot), rtol=1e-5, atol=1e-5)


def test_cond_vector_path(cond_model, inputs):
  _, params, _, apply_eval = cond_model
  x, t, y = inputs
  zeros = apply_eval(params, x, t, y, jnp.zeros((B, 4)))
  ones = apply_eval(params, x, t, y, jnp.ones((B, 4)))
  assert float(jnp.abs(zeros - ones).max()) > 1e-3
  # cond=None is the zero vector (map_cond has no bias).
  net = cond_model[0]
  none = net.apply({"params": params}, x, t, y, None)
  np.testing.assert_allclose(np.asarray(none), np.asarray(zeros), rtol=1e-5, atol=1e-5)


def test_cond_without_cond_dim_raises(inputs):
  x, t, _ = inputs
  net = NCSNppUNet(**TINY)
  with pytest.raises(ValueError, match="cond_dim"):
    jax.eval_shape(lambda: net.init({"params": jax.random.PRNGKey(0)}, x, t, None, jnp.ones((B, 3))))


def test_dropout_train_vs_eval(cond_model, inputs):
  _, params, apply, apply_eval = cond_model
  x, t, y = inputs
  c = jnp.zeros((B, 4))
  ev = apply_eval(params, x, t, y, c)
  tr1 = apply(params, x, t, y, c, jax.random.PRNGKey(1))
  tr1b = apply(params, x, t, y, c, jax.random.PRNGKey(1))
  tr2 = apply(params, x, t, y, c, jax.random.PRNGKey(2))
  assert float(jnp.abs(tr1 - ev).max()) > 1e-4
  assert float(jnp.abs(tr1 - tr2).max()) > 1e-4
  np.testing.assert_array_equal(np.asarray(tr1), np.asarray(tr1b))  # same rng, same mask


def test_fourier_freqs_get_no_gradient(cond_model, inputs):
  net, params, _, _ = cond_model
  x, t, y = inputs
  g = jax.grad(lambda p: jnp.sum(net.apply({"params": p}, x, t, y) ** 2))(params)
  assert float(jnp.abs(g["map_noise"]["freqs"]).max()) == 0.0
  assert float(jnp.abs(g["map_layer0"]["kernel"]).max()) > 0.0


@pytest.mark.parametrize("embedding_type", ["fourier", "positional"])
def test_embeddings_build_and_run(embedding_type, inputs):
  x, t, _ = inputs
  net = NCSNppUNet(embedding_type=embedding_type, **TINY)
  params = _randomise(net.init({"params": jax.random.PRNGKey(0)}, x, t)["params"])
  out = net.apply({"params": params}, x, t)
  assert out.shape == x.shape and bool(jnp.all(jnp.isfinite(out)))
  assert ("map_noise" in params) == (embedding_type == "fourier")
  # Fourier: 2 * model_channels features into map_layer0; positional: model_channels.
  width = 32 if embedding_type == "fourier" else 16
  assert params["map_layer0"]["kernel"].shape == (width, 64)


@pytest.mark.parametrize("variant", [
    dict(resblock_type="ddpm"),
    dict(resample="plain", progressive_input="none"),
    dict(progressive_input="input_skip", progressive="output_skip"),
    dict(dtype=jnp.bfloat16),
])
def test_variants_trace(variant, inputs):
  """Other score_sde options build and give the right shape (traced only, not compiled)."""
  x, t, _ = inputs
  net = NCSNppUNet(**TINY, **variant)
  def run():
    params = net.init({"params": jax.random.PRNGKey(0)}, x, t)["params"]
    return net.apply({"params": params}, x, t)
  out = jax.eval_shape(run)
  assert out.shape == x.shape and out.dtype == jnp.float32


def test_remat_same_params_and_output(inputs):
  x, t, _ = inputs
  kw = dict(TINY, num_classes=None)
  plain, remat = NCSNppUNet(**kw), NCSNppUNet(remat=True, **kw)
  params = _randomise(plain.init({"params": jax.random.PRNGKey(0)}, x, t)["params"])
  shapes = jax.eval_shape(lambda: remat.init({"params": jax.random.PRNGKey(0)}, x, t))["params"]
  assert jax.tree_util.tree_structure(shapes) == jax.tree_util.tree_structure(params)
  loss = lambda net: lambda p: jnp.sum(net.apply({"params": p}, x, t, train=True,
                                                 rngs={"dropout": jax.random.PRNGKey(3)}) ** 2)
  g1 = jax.grad(loss(plain))(params)
  g2 = jax.grad(loss(remat))(params)
  for a, b in zip(jax.tree_util.tree_leaves(g1), jax.tree_util.tree_leaves(g2)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


def test_fir_resampling():
  x = jax.random.normal(jax.random.PRNGKey(0), (1, 4, 4, 2))
  box = _fir_2d((1, 1))
  # [1, 1] is nearest-neighbour upsampling and 2x2 average pooling.
  np.testing.assert_allclose(np.asarray(upsample_fir(x, box, pad=0)),
                             np.asarray(jnp.repeat(jnp.repeat(x, 2, 1), 2, 2)), atol=1e-6)
  pooled = x.reshape(1, 2, 2, 2, 2, 2).mean(axis=(2, 4))
  np.testing.assert_allclose(np.asarray(downsample_fir(x, box, pad=0)), np.asarray(pooled),
                             atol=1e-6)
  # [1, 3, 3, 1] keeps a constant image constant away from the zero-padded border.
  fir = _fir_2d((1, 3, 3, 1))
  ones = jnp.ones((1, 8, 8, 1))
  np.testing.assert_allclose(np.asarray(upsample_fir(ones, fir, pad=1))[:, 2:-2, 2:-2], 1.0,
                             atol=1e-6)
  np.testing.assert_allclose(np.asarray(downsample_fir(ones, fir, pad=1))[:, 1:-1, 1:-1], 1.0,
                             atol=1e-6)


def _full_count(**kw):
  net = NCSNppUNet(image_size=32, **kw)
  shapes = jax.eval_shape(lambda: net.init({"params": jax.random.PRNGKey(0)},
                                           jnp.zeros((1, 32, 32, 3)), jnp.zeros((1,))))
  return _n_params(shapes["params"]), shapes["params"]


# Reference counts, obtained independently (locally, with code that is not part of this repo):
# * EDM's SongUNet (NVlabs/edm training/networks.py) built in PyTorch with the CIFAR-10
#   settings of EDM's train.py (img_resolution 32, model_channels 128, channel_mult [2,2,2]):
#   NCSN++ (fourier, channel_mult_noise 2, encoder 'residual', filter [1,3,3,1]) counts
#   56,395,523 parameters unconditional and 56,398,339 with label_dim 10; DDPM++ (positional,
#   encoder 'standard', filter [1,1]) 55,732,739 and 55,734,147.  EDM keeps the 128 Fourier
#   frequencies in a buffer, not a parameter.
# * The JAX NCSNpp of openai/consistency_models_cifar10 (configs/cifar10_ve_cd.py), counted with
#   jax.eval_shape: 56,395,651 = 56,395,523 + the 128 frequencies, which it keeps (like this
#   module) in a stop-gradient parameter.
# Randomised weights of both reference nets, loaded into NCSNppUNet by the name mapping in the
# module docstring, gave the same outputs to ~1e-6 (EDM: all four encoder/decoder variants and
# the full conditional config; consistency_models_cifar10: its CD config).
@pytest.mark.parametrize("num_classes, expected", [(None, 56_395_651), (10, 56_398_467)])
def test_param_count_cifar10_ncsnpp(num_classes, expected):
  n, params = _full_count(num_classes=num_classes)
  assert n == expected
  # Trainable parameters (everything but the frozen Fourier frequencies) = EDM's count.
  assert n - params["map_noise"]["freqs"].size == expected - 128


@pytest.mark.parametrize("num_classes, expected", [(None, 55_732_739), (10, 55_734_147)])
def test_param_count_cifar10_ddpmpp(num_classes, expected):
  n, _ = _full_count(num_classes=num_classes, embedding_type="positional", resample="plain",
                     progressive_input="none")
  assert n == expected
