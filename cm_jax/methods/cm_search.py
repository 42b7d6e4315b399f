"""Ternary search for the intermediate level of a consistency model's multistep sampler.

As openai/consistency_models scripts/ternary_search.py: sampling visits the grid indices
`begin + (p,) + end` (CM Algorithm 1, cm_sampling.sample_multistep) and p is searched in
(begin[-1], end[0]) for the lowest value of a metric (lower is better). The metric is
pluggable: `search_intermediate_index` takes any images -> float callable. The command
line (sampling a run, the digits / Inception / pixel Frechet distances) is
`python -m cm_jax.cli.cm_search`.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import numpy as np

from cm_jax.methods import cm_sampling


def search_intermediate_index(sample_fn: Callable[[tuple[int, ...]], np.ndarray],
                              metric: Callable[[np.ndarray], float], begin: Sequence[int],
                              end: Sequence[int], log: Optional[Callable[[str], None]] = print):
  """Best p for ts = begin + (p,) + end by ternary search over begin[-1] < p < end[0].

  `sample_fn(ts) -> uint8 images`, `metric(images) -> float` (lower is better).
  Returns (p, value, {p: value}).
  """
  begin, end = tuple(int(b) for b in begin), tuple(int(e) for e in end)
  lo, hi = begin[-1] + 1, end[0] - 1
  if hi < lo:
    raise ValueError(f"no index strictly between {begin[-1]} and {end[0]}")
  return cm_sampling.ternary_search(lambda p: metric(sample_fn(begin + (p,) + end)), lo, hi,
                                    log=log)
