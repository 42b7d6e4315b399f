"""Multi-head attention core shared by the networks.

On GPU `jax.nn.dot_product_attention` picks the fused cuDNN (flash) kernel when the
shapes and dtypes allow it (half precision, a head width it takes), else XLA's plain
softmax(QK^T)V; TPU uses that XLA path too. On CPU the networks use `_heads_first`:
XLA's CPU backend runs the (batch, tokens, heads, width) contractions of the library's
XLA path several times slower than the same products with heads ahead of tokens
(measured by benchmarks/sd_vs_diffusers.py: one 256-token self-attention of SD's
UNet shape 26.6 ms -> 3.5 ms on one core; the small UNet 0.95x -> 1.2x diffusers'
throughput), so there q, k, v are laid out (batch * heads, tokens, width) first.
"""
import jax
import jax.numpy as jnp

# Above this many attention logits (batch * heads * L * Lk) the CPU path takes one
# (batch, head) slice at a time, so SD's 4096-token VAE attention does not hold a
# 64 MB score matrix per image at once.
_SLICE_LOGITS = 1 << 22


def multi_head_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                         key_mask=None) -> jax.Array:
  """softmax(q k^T / sqrt(d)) v for q (B, L, heads, d), k and v (B, Lk, heads, d);
  key_mask (B, Lk), True / 1 = attend (masked keys get no weight)."""
  backend = jax.default_backend()
  if backend == "cpu":
    return _heads_first(q, k, v, key_mask)
  mask = None if key_mask is None else jnp.asarray(key_mask, bool)[:, None, None, :]
  if backend == "gpu" and mask is None and q.dtype in (jnp.float16, jnp.bfloat16):
    try:
      return jax.nn.dot_product_attention(q, k, v, implementation="cudnn")
    except NotImplementedError:
      # Raised while tracing when the flash kernel does not take the head width (a
      # multiple of 8, at most 128 before Hopper, 256 after; SD 1.5's deepest level has
      # 160, its VAE 512): the plain XLA attention takes any width.
      pass
  return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="xla")


def _heads_first(q, k, v, key_mask=None):
  """The same attention with heads ahead of tokens; the softmax's row sums divide the
  (L, d) product instead of the (L, Lk) weights (the same value, fewer divisions).
  Logits, exponentials and sums in float32, like the library's XLA path."""
  b, length, heads, d = q.shape
  lk = k.shape[1]
  dtype = q.dtype
  to_bh = lambda a: a.transpose(0, 2, 1, 3).reshape(b * heads, a.shape[1], d)
  q, k, v = to_bh(q), to_bh(k), to_bh(v)
  keep = None
  if key_mask is not None:  # (B * heads, 1, Lk)
    keep = jnp.repeat(jnp.asarray(key_mask, bool), heads, axis=0)[:, None, :]

  def attend(q, k, v, keep):
    logits = jnp.einsum("nqd,nkd->nqk", q, k, preferred_element_type=jnp.float32)
    logits = logits * (d ** -0.5)
    if keep is not None:
      # A finite fill, not -inf: a row with every key masked becomes uniform, not NaN.
      logits = jnp.where(keep, logits, jnp.finfo(jnp.float32).min)
    p = jnp.exp(logits - jax.lax.stop_gradient(logits.max(axis=-1, keepdims=True)))
    out = jnp.einsum("nqk,nkd->nqd", p.astype(dtype), v, preferred_element_type=jnp.float32)
    return out / p.sum(axis=-1)[..., None]

  if b * heads * length * lk > _SLICE_LOGITS:
    one = lambda a: attend(*(None if x is None else x[None] for x in a))[0]
    out = jax.lax.map(one, (q, k, v, keep))
  else:
    out = attend(q, k, v, keep)
  return out.astype(dtype).reshape(b, heads, length, d).transpose(0, 2, 1, 3)
