"""Multi-head self-attention core shared by the UNets.

`jax.nn.dot_product_attention` picks the fused cuDNN (flash) kernel on GPU when
the shapes and dtypes allow it and falls back to the plain XLA softmax(QK^T)V
elsewhere (CPU, TPU), so the networks call it through this one function.
"""
import jax
import jax.numpy as jnp


def multi_head_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
  """softmax(q k^T / sqrt(d)) v for q, k, v of shape (batch, length, heads, head_dim)."""
  implementation = None
  if jax.default_backend() == "gpu" and q.dtype in (jnp.float16, jnp.bfloat16):
    implementation = "cudnn"  # the flash kernel only takes half precision
  return jax.nn.dot_product_attention(q, k, v, implementation=implementation)
