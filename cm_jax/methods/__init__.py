"""One module per paper; `build_method` picks one by `config.method.name`."""
from __future__ import annotations

from cm_jax.methods.consistency import (ConsistencyDistillation, ConsistencyTraining,
                                        ImprovedConsistencyTraining)
from cm_jax.methods.edm import EDM

METHODS = {
    "edm": EDM,
    "cd": ConsistencyDistillation,
    "ct": ConsistencyTraining,
    "ict": ImprovedConsistencyTraining,
}


def build_method(net, config):
  name = config.method.name
  if name not in METHODS:
    raise ValueError(f"unknown method {name!r}; choose from {sorted(METHODS)}")
  return METHODS[name](net, config)
