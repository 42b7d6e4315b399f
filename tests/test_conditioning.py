"""The Conditioning pytree, label dropout and the classifier-free guidance convention."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cm_jax import conditioning as C


def _label_denoiser(x, sigma, cond=None):
  """x_hat = label value everywhere: conditional 3.0 / 5.0, the null class 10 -> 10.0."""
  labels = C.as_conditioning(cond).labels.astype(jnp.float32)
  return jnp.broadcast_to(labels[:, None, None, None], x.shape) + 0.0 * x


def test_guidance_is_one_plus_w_cond_minus_w_uncond():
  x = jnp.zeros((2, 2, 2, 1))
  cond = C.Conditioning(labels=jnp.array([3, 5]))
  for w in (0.0, 1.0, 2.5):
    got = C.guided_denoiser(_label_denoiser, w, null_class=10)(x, jnp.ones((2,)), cond)
    # by hand: (1 + w) * 3 - w * 10 and (1 + w) * 5 - w * 10
    want = np.array([(1 + w) * 3 - w * 10, (1 + w) * 5 - w * 10])
    np.testing.assert_allclose(np.asarray(got)[:, 0, 0, 0], want, rtol=1e-6)
  # w per example
  got = C.guided_denoiser(_label_denoiser, jnp.array([0.0, 1.0]), 10)(x, 1.0, cond)
  np.testing.assert_allclose(np.asarray(got)[:, 0, 0, 0], [3.0, 2 * 5 - 10], rtol=1e-6)


def test_guidance_without_null_class_is_one_line_error():
  with pytest.raises(ValueError, match="null class"):
    C.guided_denoiser(_label_denoiser, 1.0, None)(
        jnp.zeros((1, 2, 2, 1)), 1.0, C.Conditioning(labels=jnp.array([1])))


def test_label_dropout_rate_and_null_index():
  cond = C.Conditioning(labels=jnp.arange(10000) % 10)
  out = C.drop_labels(cond, jax.random.key(0), 0.2, null_class=10).labels
  dropped = np.asarray(out) == 10
  assert abs(dropped.mean() - 0.2) < 0.02
  kept = ~dropped
  np.testing.assert_array_equal(np.asarray(out)[kept], np.asarray(cond.labels)[kept])
  assert C.drop_labels(cond, jax.random.key(0), 0.0, 10) is cond


def test_unconditional_replaces_labels_and_context():
  cond = C.Conditioning(labels=jnp.array([1, 2]), context=jnp.ones((2, 3, 4)),
                        w=jnp.array([0.5, 1.0]))
  u = C.unconditional(cond, null_class=7, null_context=jnp.zeros((1, 3, 4)))
  np.testing.assert_array_equal(np.asarray(u.labels), [7, 7])
  assert float(jnp.abs(u.context).max()) == 0.0 and u.context.shape == (2, 3, 4)
  assert u.w is cond.w


def test_conditioning_is_a_pytree_that_crosses_jit():
  cond = C.Conditioning(labels=jnp.array([1]), w=jnp.array([2.0]))
  out = jax.jit(lambda c: c.replace(w=c.w * 2))(cond)
  assert float(out.w[0]) == 4.0 and int(out.labels[0]) == 1
  assert len(jax.tree.leaves(C.Conditioning())) == 0


def test_guidance_embedding_matches_the_lcm_formula():
  """LCM's w embedding (diffusers' get_guidance_scale_embedding), re-derived in float64:
  features of 1000 w at frequencies exp(-k ln(10000) / (half - 1)), sines then cosines."""
  w = np.array([0.0, 1.5, 7.0])
  half = 128
  freqs = np.exp(-np.arange(half) * np.log(10000.0) / (half - 1))
  args = 1000.0 * w[:, None] * freqs[None]
  want = np.concatenate([np.sin(args), np.cos(args)], axis=1)
  got = np.asarray(C.guidance_embedding(jnp.asarray(w, jnp.float32), 256))
  assert got.shape == (3, 256)
  np.testing.assert_allclose(got, want, atol=2e-3)  # float32 arguments up to 7000 rad
  np.testing.assert_array_equal(got[0], np.r_[np.zeros(half), np.ones(half)])
