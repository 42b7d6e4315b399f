"""Ternary search for the intermediate level of a consistency model's multistep sampler.

  python -m cm_jax.methods.cm_search --workdir runs/digits_cd
  python -m cm_jax.methods.cm_search --workdir runs/in64_cd --begin 0 --end 39 \
      --grid_points 40 --num 50000 --detector inception --inception_weights inception.npz

As openai/consistency_models scripts/ternary_search.py: sampling visits the grid indices
`begin + (p,) + end` (CM Algorithm 1, cm_sampling.sample_multistep) and p is searched in
(begin[-1], end[0]) for the lowest Frechet distance to the reference set. The metric is
pluggable (`search_intermediate_index` takes any images -> float callable):

  --detector digits     Frechet distance on the project's digits-classifier features
                        (cm_jax.eval; the default for digits runs)
  --detector inception  FID with the Inception weights of --inception_weights
  --detector pixel      FALLBACK: Frechet distance of raw pixels (cm_sampling.
                        pixel_frechet_distance); not FID, only for comparing samplers of
                        one tiny model (used when cm_jax.eval is unavailable)
"""
from __future__ import annotations

import json
import sys
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


def build_metric(detector: str, config, *, ref: str = "data", ref_num: int = 10_000,
                 inception_weights: str = "", seed: int = 0, log=print):
  """images (uint8 NHWC) -> Frechet distance to the reference, and the metric's name."""
  from cm_jax import data as data_lib  # pylint: disable=g-import-not-at-top
  if detector == "auto":
    if config.data.name == "digits":
      detector = "digits"
    elif inception_weights:
      detector = "inception"
    else:
      detector = "pixel"
  if detector in ("digits", "inception"):
    try:
      from cm_jax.eval import evaluator, features  # pylint: disable=g-import-not-at-top
      kwargs = {"weights_path": inception_weights} if detector == "inception" else {}
      det = features.build_detector(detector, **kwargs)
      reference = evaluator.resolve_reference(ref, det, num=ref_num, seed=seed,
                                              run_data_cfg=config.data,
                                              image_size=config.data.image_size)
    except (ImportError, AttributeError) as e:  # cm_jax.eval missing or changed
      if log:
        log(f"cm_jax.eval unavailable ({e}); falling back to the pixel Frechet distance")
      detector = "pixel"
    else:
      def metric(images):
        result = evaluator.evaluate_images(images, None, det, reference, metrics=("fd",))
        return float(next(v for k, v in result["metrics"].items()
                          if k == "fid" or k.startswith("fd_")))
      return metric, ("fid" if detector == "inception" else f"fd_{detector}")
  if detector != "pixel":
    raise ValueError(f"unknown detector {detector!r}; choose auto, digits, inception or pixel")
  images, _ = data_lib.load_reference_images(config.data, ref_num, seed)
  return cm_sampling.pixel_frechet_distance(images), "pixel_frechet_distance (fallback)"


def main(argv=None) -> int:
  import argparse  # pylint: disable=g-import-not-at-top

  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--begin", default="0", help="fixed leading indices, e.g. 0")
  parser.add_argument("--end", default=None, help="fixed trailing indices (default grid_points-1)")
  parser.add_argument("--grid_points", type=int, default=None,
                      help="Karras grid size (default config.sample.grid_points)")
  parser.add_argument("--num", type=int, default=1000, help="samples per evaluation")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--batch_size", type=int, default=None)
  parser.add_argument("--params", default=None, help="ema | online | an EMA name")
  parser.add_argument("--detector", default="auto", help="auto | digits | inception | pixel")
  parser.add_argument("--inception_weights", default="")
  parser.add_argument("--ref", default="data", help="reference set (cm_jax.eval spec)")
  parser.add_argument("--ref_num", type=int, default=10_000)
  parser.add_argument("--out", default=None, help="JSON file for the result")
  args = parser.parse_args(argv)

  from absl import logging  # pylint: disable=g-import-not-at-top
  from cm_jax import sampling  # pylint: disable=g-import-not-at-top
  from cm_jax.train import builders  # pylint: disable=g-import-not-at-top
  from cm_jax.train.checkpoint import load_config  # pylint: disable=g-import-not-at-top
  from cm_jax.train.restore import restore_train_state  # pylint: disable=g-import-not-at-top
  logging.set_verbosity(logging.ERROR)

  try:
    config = load_config(args.workdir)
  except FileNotFoundError as e:
    sys.exit(f"cm_search: {e}")
  if "grid_points" not in config.sample:
    sys.exit("cm_search: the run is not a consistency model (no config.sample.grid_points)")
  grid_points = int(args.grid_points or config.sample.grid_points)
  begin = tuple(int(t) for t in args.begin.split(","))
  end = tuple(int(t) for t in (args.end or str(grid_points - 1)).split(","))
  parts = builders.build_parts(config)
  state, step = restore_train_state(args.workdir, config, parts)
  params = builders.params_for_sampling(state, args.params or config.sample.params, config.ema)
  metric, metric_name = build_metric(args.detector, config, ref=args.ref, ref_num=args.ref_num,
                                     inception_weights=args.inception_weights, seed=args.seed)

  def sample_fn(ts):
    images, _ = sampling.generate(
        parts.method, params, num=args.num, seed=args.seed,
        batch_size=args.batch_size or config.sample.batch_size, num_steps=len(ts) - 1,
        image_shape=parts.image_shape, num_classes=config.data.num_classes,
        ts=tuple(ts), grid_points=grid_points)
    return images

  print(f"step {step}: searching ts = {begin} + (p,) + {end} on {grid_points} levels "
        f"by {metric_name}, {args.num} samples each")
  best, value, history = search_intermediate_index(sample_fn, metric, begin, end)
  ts = begin + (best,) + end
  print(f"best ts {','.join(map(str, ts))}: {metric_name} {value:.6g}")
  if args.out:
    with open(args.out, "w") as f:
      json.dump({"ts": list(ts), "value": value, "metric": metric_name, "step": step,
                 "num": args.num, "history": {str(k): v for k, v in history.items()}}, f,
                indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
