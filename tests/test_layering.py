"""The layer map of the cm_jax package: nothing imports from a layer above its own.

Every module of cm_jax is parsed with `ast` (nothing is imported or run); each
`import cm_jax.X...` / `from cm_jax.X import ...` / `from cm_jax import X` / relative
import, at module level or lazily inside a function, is resolved to its top-level part
of the package (`cm_jax/X/` or `cm_jax/X.py`) and checked against LAYERS. README.md's
"Layout" block states the same map.
"""
import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "cm_jax")

# Top to bottom. A part may import from its own layer and any layer below, never above.
LAYERS = (
    ("cli", "interop"),                      # command-line programs; run import / export
    ("train",),                              # the one trainer, checkpoints, fitting
    ("eval", "sampling"),                    # metrics; batched per-image-seeded generation
    ("methods",),                            # one module per paper
    ("runs",),                               # reading a run: config + one parameter copy
    ("diffusion", "nets", "data", "conditioning"),  # math on arrays, networks, inputs
    ("utils",),                              # images, files, trees, shardings
)
LAYER_OF = {part: depth for depth, parts in enumerate(LAYERS) for part in parts}


def _part_of(module: str):
  """'cm_jax.train.loop' -> 'train'; 'cm_jax' (the package itself) -> None."""
  bits = module.split(".")
  return bits[1] if len(bits) > 1 and bits[0] == "cm_jax" else None


def _module_name(path: str) -> str:
  rel = os.path.relpath(path, ROOT)[:-3].split(os.sep)
  if rel[-1] == "__init__":
    rel = rel[:-1]
  return ".".join(rel)


def _imported_modules(path: str):
  """(line, module) for every cm_jax import in the file, lazy ones included."""
  name = _module_name(path)
  is_pkg = path.endswith("__init__.py")
  package = name if is_pkg else name.rpartition(".")[0]
  with open(path, encoding="utf-8") as f:
    tree = ast.parse(f.read(), path)
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      for alias in node.names:
        yield node.lineno, alias.name
    elif isinstance(node, ast.ImportFrom):
      if node.level:
        base = package.split(".")
        base = base[:len(base) - (node.level - 1)]
        module = ".".join(base + ([node.module] if node.module else []))
      else:
        module = node.module or ""
      if module == "cm_jax":  # from cm_jax import data, runs, ...
        for alias in node.names:
          yield node.lineno, f"cm_jax.{alias.name}"
      else:
        yield node.lineno, module


def _modules():
  for dirpath, dirnames, filenames in os.walk(PACKAGE):
    dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
    for fn in sorted(filenames):
      if fn.endswith(".py"):
        yield os.path.join(dirpath, fn)


def test_every_part_of_the_package_is_in_the_layer_map():
  parts = set()
  for path in _modules():
    part = _part_of(_module_name(path))
    if part is not None:
      parts.add(part)
  missing = sorted(parts - set(LAYER_OF))
  assert not missing, (f"cm_jax parts not in tests/test_layering.py LAYERS (add them where "
                       f"they belong, and to README.md's Layout): {missing}")


def test_nothing_imports_from_a_layer_above_it():
  violations = []
  for path in _modules():
    me = _part_of(_module_name(path))
    if me is None or me not in LAYER_OF:
      continue
    for line, module in _imported_modules(path):
      other = _part_of(module)
      if other is None or other == me or other not in LAYER_OF:
        continue
      if LAYER_OF[other] < LAYER_OF[me]:
        violations.append(f"{os.path.relpath(path, ROOT)}:{line} ({me}) imports {module} "
                          f"({other}, a layer above)")
  assert not violations, "imports against the layer map:\n" + "\n".join(violations)


@pytest.mark.parametrize("source,part", [
    ("import cm_jax.train.parallel", "train"),
    ("from cm_jax.train import builders", "train"),
    ("from cm_jax import sampling as s", "sampling"),
    ("def f():\n  from cm_jax.methods.cm_search import x", "methods"),
])
def test_the_scanner_sees_every_form_of_import(tmp_path, source, part):
  path = tmp_path / "probe.py"
  path.write_text(source)
  found = {_part_of(m) for _, m in _imported_modules(str(path))}
  assert part in found
