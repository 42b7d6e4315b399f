"""Test-session set-up shared by every test.

- Puts the repository root on sys.path (rootdir conftest), so tests import
  `configs` the way train.py does.
- Turns on JAX's persistent compilation cache in a temp directory: the suite
  compiles the same tiny train/sample steps in several tests and in the CLI
  subprocesses, and XLA compile time dominates on 2 CPU cores.
"""
import os
import tempfile

_CACHE = os.path.join(tempfile.gettempdir(), "cm_jax_test_xla_cache")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _CACHE)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
