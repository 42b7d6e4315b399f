"""Nested parameter dicts <-> flat {'a/b/kernel': leaf} dicts, the layout of our .npz weight files."""
from __future__ import annotations


def flatten_paths(tree) -> dict:
  """{'block/conv/kernel': leaf} for every leaf of a nested mapping; leaves are returned as is."""
  flat = {}

  def walk(node, prefix):
    for key, value in node.items():
      name = f"{prefix}/{key}" if prefix else str(key)
      if hasattr(value, "items"):
        walk(value, name)
      else:
        flat[name] = value

  walk(tree, "")
  return flat


def unflatten_paths(flat: dict) -> dict:
  """The inverse of flatten_paths: split names on '/' back into nested dicts."""
  tree: dict = {}
  for name, value in flat.items():
    node = tree
    *parents, leaf = name.split("/")
    for parent in parents:
      node = node.setdefault(parent, {})
    node[leaf] = value
  return tree
