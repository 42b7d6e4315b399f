"""Ternary search for the intermediate level of a consistency model's multistep sampler.

  python -m cm_jax.cli.cm_search --workdir runs/digits_cd
  python -m cm_jax.cli.cm_search --workdir runs/in64_cd --begin 0 --end 39 \
      --grid_points 40 --num 50000 --detector inception --inception_weights inception.npz

As openai/consistency_models scripts/ternary_search.py: sampling visits the grid indices
`begin + (p,) + end` (CM Algorithm 1) and p is searched in (begin[-1], end[0]) for the
lowest Frechet distance to the reference set (cm_jax.methods.cm_search, the search
itself). The metric:

  --detector digits     Frechet distance on the project's digits-classifier features
                        (cm_jax.eval; the default for digits runs)
  --detector inception  FID with the Inception weights of --inception_weights
  --detector pixel      FALLBACK: Frechet distance of raw pixels (cm_jax.eval.fid.
                        pixel_frechet_distance); not FID, only for comparing samplers of
                        one tiny model
"""
from __future__ import annotations

import json
import sys

from cm_jax import data as data_lib
from cm_jax import runs, sampling
from cm_jax.eval import evaluator, features
from cm_jax.eval.fid import pixel_frechet_distance
from cm_jax.methods.cm_search import search_intermediate_index
from cm_jax.train import builders


def build_metric(detector: str, config, *, ref: str = "data", ref_num: int = 10_000,
                 inception_weights: str = "", seed: int = 0, log=print):
  """images (uint8 NHWC) -> Frechet distance to the reference, and the metric's name."""
  if detector == "auto":
    if config.data.name == "digits":
      detector = "digits"
    elif inception_weights:
      detector = "inception"
    else:
      detector = "pixel"
  if detector in ("digits", "inception"):
    try:
      kwargs = {"weights_path": inception_weights} if detector == "inception" else {}
      det = features.build_detector(detector, **kwargs)
      reference = evaluator.resolve_reference(ref, det, num=ref_num, seed=seed,
                                              run_data_cfg=config.data,
                                              image_size=config.data.image_size)
    except (ImportError, AttributeError, OSError) as e:  # a detector's weights missing
      if log:
        log(f"detector {detector!r} unavailable ({e}); falling back to the pixel Frechet "
            f"distance")
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
  return pixel_frechet_distance(images), "pixel_frechet_distance (fallback)"


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
  logging.set_verbosity(logging.ERROR)

  try:
    config = runs.load_config(args.workdir)
  except FileNotFoundError as e:
    sys.exit(f"cm_search: {e}")
  if "grid_points" not in config.sample:
    sys.exit("cm_search: the run is not a consistency model (no config.sample.grid_points)")
  grid_points = int(args.grid_points or config.sample.grid_points)
  begin = tuple(int(t) for t in args.begin.split(","))
  end = tuple(int(t) for t in (args.end or str(grid_points - 1)).split(","))
  parts = builders.build_parts(config)
  run = runs.load_run(args.workdir, args.params or config.sample.params)
  params, step = run.params, run.step
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
