"""Checksums of array trees, so a checkpoint whose bytes changed on disk is caught at restore.

Orbax verifies neither what it writes nor what it reads back: a flipped byte in a data
file restores without an error. Each array gets two sums over its words w_0 .. w_{n-1}
(its bits read as unsigned integers of its own width: uint32 for float32 and int32,
uint16 for bfloat16, uint8 for bool / int8; 8-byte types as two uint32 words each),
computed on its devices in one compiled pass and kept with the checkpoint:

  s1 = sum w_i,   s2 = sum (i + 1) w_i,   both mod 2^32

(Fletcher's idea: s1 catches any changed bit, s2 also a moved word). Integer sums mod 2^32
do not depend on the order of addition, so the same array gives the same sums on any
device layout (an FSDP mesh at save, one device at sample time). The same pass reports
whether a floating array is all finite. Words rather than bytes: a quarter of the
elements for float32 state (measured in benchmarks/checkpoint_cost.py).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


def path_name(path) -> str:
  """'params/conv/kernel' for a key path, whether its keys are attributes (the train
  state) or dict keys (a subtree read back on its own)."""
  parts = []
  for key in path:
    for attr in ("name", "key", "idx"):
      if hasattr(key, attr):
        parts.append(str(getattr(key, attr)))
        break
    else:
      parts.append(str(key))
  return "/".join(parts)


_WORD = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}


def _leaf_stats(x):
  x = jnp.asarray(x)
  size = x.dtype.itemsize
  if x.dtype == jnp.bool_:
    w = x.astype(jnp.uint8)
  else:  # 8-byte types become (..., 2) uint32 words
    w = jax.lax.bitcast_convert_type(x, _WORD[size])
  w = w.reshape(-1).astype(jnp.uint32)
  weights = jax.lax.iota(jnp.uint32, w.shape[0]) + jnp.uint32(1)
  s1 = jnp.sum(w, dtype=jnp.uint32)
  s2 = jnp.sum(w * weights, dtype=jnp.uint32)
  finite = jnp.all(jnp.isfinite(x)) if jnp.issubdtype(x.dtype, jnp.inexact) else True
  return jnp.stack([s1, s2]), jnp.asarray(finite)


@functools.lru_cache(maxsize=None)
def _compiled():
  return jax.jit(lambda leaves: [_leaf_stats(x) for x in leaves])


def tree_stats(tree, prefix: str = "") -> tuple[dict, list]:
  """({path: [s1, s2]} for every array leaf, [paths of non-finite floating leaves]);
  `prefix` is prepended to the paths (a subtree's place in the whole tree)."""
  flat = [(path_name(p), x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]
          if hasattr(x, "dtype") and hasattr(x, "shape")]
  if not flat:
    return {}, []
  stats = jax.device_get(_compiled()([x for _, x in flat]))
  sums, bad = {}, []
  for (name, _), (s, finite) in zip(flat, stats):
    full = f"{prefix}/{name}" if prefix and name else (prefix or name)
    sums[full] = [int(v) for v in np.asarray(s)]
    if not bool(finite):
      bad.append(full)
  return sums, bad


def mismatches(saved: dict, restored: dict) -> list[str]:
  """Paths whose restored sums differ from the saved ones (paths absent from `saved`, such
  as leaves a checkpoint from before checksums lacks, are not compared)."""
  return [p for p, s in restored.items() if p in saved and list(saved[p]) != list(s)]
