"""Nested parameter dicts <-> flat {'a/b/kernel': leaf} dicts, the layout of our .npz weight files.

Both are flax.traverse_util's flatten_dict / unflatten_dict with '/' as the separator
(the one nested-dict flattening of the project; interop.name_maps uses tuple paths).
"""
from __future__ import annotations

from flax import traverse_util


def flatten_paths(tree) -> dict:
  """{'block/conv/kernel': leaf} for every leaf of a nested mapping; leaves are returned as is."""
  return traverse_util.flatten_dict(tree, sep="/")


def unflatten_paths(flat: dict) -> dict:
  """The inverse of flatten_paths: split names on '/' back into nested dicts."""
  return traverse_util.unflatten_dict(flat, sep="/")
