"""Multi-head attention core shared by the networks.

On GPU `jax.nn.dot_product_attention` picks the fused cuDNN (flash) kernel when the
shapes and dtypes allow it (half precision, a head width it takes), else XLA's plain
softmax(QK^T)V; TPU uses that XLA path too. On CPU the networks use `_heads_first`:
XLA's CPU backend runs the (batch, tokens, heads, width) contractions of the library's
XLA path several times slower than the same products with heads ahead of tokens
(measured by benchmarks/sd_vs_diffusers.py: one 256-token self-attention of SD's
UNet shape 26.6 ms -> 3.5 ms on one core; the small UNet 0.95x -> 1.2x diffusers'
throughput), so there q, k, v are laid out (batch * heads, tokens, width) first. Its
gradient is written by hand (`_attend_bwd`): autodiff let XLA contract the (L, Lk)
weights over their rows for dv and dk, several times slower on CPU than the same products
with the small operand transposed first (a 256-token self-attention's gradient with SD's
small-UNet shape: 14.7 -> 9.1 ms, the transformer block's 38 -> 24 ms, 2 threads), and it
recomputes the weights instead of keeping them from the forward (memory).
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
  Logits, exponentials and sums in float32, like the library's XLA path; its gradient is
  `_attend`'s hand-written one."""
  b, length, heads, d = q.shape
  lk = k.shape[1]
  dtype = q.dtype
  to_bh = lambda a: a.transpose(0, 2, 1, 3).reshape(b * heads, a.shape[1], d)
  q, k, v = to_bh(q), to_bh(k), to_bh(v)
  keep = None
  if key_mask is not None:  # (B * heads, 1, Lk)
    keep = jnp.repeat(jnp.asarray(key_mask, bool), heads, axis=0)[:, None, :]

  if b * heads * length * lk > _SLICE_LOGITS:
    one = lambda a: _attend(*(None if x is None else x[None] for x in a))[0]
    out = jax.lax.map(one, (q, k, v, keep))
  else:
    out = _attend(q, k, v, keep)
  return out.astype(dtype).reshape(b, heads, length, d).transpose(0, 2, 1, 3)


def _weights(q, k, keep):
  """Unnormalised softmax weights p = exp(s - max s) of s = q k^T / sqrt(d), and their row
  sums, float32."""
  logits = jnp.einsum("nqd,nkd->nqk", q, k, preferred_element_type=jnp.float32)
  logits = logits * (q.shape[-1] ** -0.5)
  if keep is not None:
    # A finite fill, not -inf: a row with every key masked becomes uniform, not NaN.
    logits = jnp.where(keep, logits, jnp.finfo(jnp.float32).min)
  p = jnp.exp(logits - logits.max(axis=-1, keepdims=True))
  return p, p.sum(axis=-1)


def _t_times(x, y):
  """x^T y over the batch, x (n, a, b), y (n, a, c) -> (n, b, c), as (y^T x)^T with the
  small operand y transposed and materialised first. XLA's CPU backend folds a transpose
  into the dot and then contracts the large x over its rows, 4-6x slower than this for
  attention's (L, Lk) weights; the barriers keep the transposes where they are."""
  yt = jax.lax.optimization_barrier(jnp.swapaxes(y, 1, 2))
  out = jnp.einsum("nca,nab->ncb", yt, x, preferred_element_type=jnp.float32)
  return jnp.swapaxes(jax.lax.optimization_barrier(out), 1, 2)


@jax.custom_vjp
def _attend(q, k, v, keep):
  """softmax(q k^T / sqrt(d)) v over (n, L, d) / (n, Lk, d), float32 out."""
  p, total = _weights(q, k, keep)
  out = jnp.einsum("nqk,nkd->nqd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
  return out / total[..., None]


def _attend_fwd(q, k, v, keep):
  out = _attend(q, k, v, keep)
  return out, (q, k, v, keep, out)


def _attend_bwd(res, g):
  """The softmax-attention gradient (as flash attention's backward: with P the normalised
  weights and D = rowsum(g * out), dv = P^T g, ds = P (g v^T - D), dq = ds k / sqrt(d),
  dk = ds^T q / sqrt(d)); the weights are recomputed rather than kept from the forward."""
  q, k, v, keep, out = res
  scale = q.shape[-1] ** -0.5
  g = g.astype(jnp.float32)
  p, total = _weights(q, k, keep)
  weights = p / total[..., None]
  dv = _t_times(weights, g)
  dweights = jnp.einsum("nqd,nkd->nqk", g, v.astype(jnp.float32))
  ds = weights * (dweights - jnp.sum(g * out, axis=-1, keepdims=True)) * scale
  dq = jnp.einsum("nqk,nkd->nqd", ds, k.astype(jnp.float32))
  dk = _t_times(ds, q.astype(jnp.float32))
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None


_attend.defvjp(_attend_fwd, _attend_bwd)
