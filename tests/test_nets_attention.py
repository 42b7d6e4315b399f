"""The CPU attention path (heads ahead of tokens, sliced when large) against the library's
XLA attention, with and without a key mask."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cm_jax.nets import attention


@pytest.mark.parametrize("sliced", [False, True])
def test_heads_first_attention_matches_the_library(monkeypatch, sliced):
  if sliced:
    monkeypatch.setattr(attention, "_SLICE_LOGITS", 0)
  kq, kk, kv = jax.random.split(jax.random.key(0), 3)
  q = jax.random.normal(kq, (2, 9, 3, 4))
  k = jax.random.normal(kk, (2, 7, 3, 4))
  v = jax.random.normal(kv, (2, 7, 3, 4))
  keep = jnp.asarray([[1, 1, 0, 1, 0, 1, 1], [1] * 7], bool)
  for mask in (None, keep):
    want = jax.nn.dot_product_attention(
        q, k, v, mask=None if mask is None else mask[:, None, None, :], implementation="xla")
    got = attention._heads_first(q, k, v, mask)  # pylint: disable=protected-access
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-6, rtol=1e-6)
  # Every key masked: uniform weights, as transformers' finite fill gives (not NaN).
  got = attention._heads_first(q, k, v, jnp.zeros((2, 7), bool))  # pylint: disable=protected-access
  np.testing.assert_allclose(np.asarray(got), np.broadcast_to(v.mean(1, keepdims=True),
                                                              got.shape), atol=1e-6)


@pytest.mark.parametrize("sliced", [False, True])
def test_heads_first_gradient_matches_autodiff_of_the_library(monkeypatch, sliced):
  """The CPU path's hand-written backward (recomputed weights, transposes kept out of the
  large contractions) against JAX's autodiff of the library's XLA attention, masked and
  not, in float32."""
  if sliced:
    monkeypatch.setattr(attention, "_SLICE_LOGITS", 0)
  kq, kk, kv, kg = jax.random.split(jax.random.key(1), 4)
  q = jax.random.normal(kq, (2, 9, 3, 4))
  k = jax.random.normal(kk, (2, 7, 3, 4))
  v = jax.random.normal(kv, (2, 7, 3, 4))
  cotangent = jax.random.normal(kg, q.shape)
  keep = jnp.asarray([[1, 1, 0, 1, 0, 1, 1], [1] * 7], bool)
  for mask in (None, keep):
    def library(q, k, v, mask=mask):
      m = None if mask is None else mask[:, None, None, :]
      return jnp.sum(jax.nn.dot_product_attention(q, k, v, mask=m, implementation="xla")
                     * cotangent)
    def ours(q, k, v, mask=mask):
      return jnp.sum(attention._heads_first(q, k, v, mask) * cotangent)  # pylint: disable=protected-access
    want = jax.grad(library, argnums=(0, 1, 2))(q, k, v)
    got = jax.jit(jax.grad(ours, argnums=(0, 1, 2)))(q, k, v)
    for g, w in zip(got, want):
      np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=2e-6, rtol=1e-5)
