"""FID, Inception Score, precision/recall and KID of a run or a sample file, as one JSON.

  # a trained run: sample 50k images (per-image seeds), then score them
  python evaluate.py --workdir runs/cifar10_cd --steps 1 --num 50000 \\
      --ref tfds:cifar10:train --detector inception --inception_weights inception_fid.npz \\
      --out runs/cifar10_cd/eval_1step.json
  # a sample file (arr_0 uint8 NHWC, arr_1 labels), against EDM-format statistics
  python evaluate.py --samples samples.npz --ref cifar10-32x32.npz \\
      --inception_weights inception_fid.npz
  # the digits, on a CPU, with the project's digits classifier as the detector
  python evaluate.py --workdir runs/digits_edm --num 1797 --ref data --detector digits

--ref: a .npz of images (`arr_0`; OpenAI/ADM reference batches) or statistics (`mu`,
`sigma`; EDM's format: Frechet distance only), `tfds:NAME:SPLIT[:SIZE]`, `digits`, or
`data` (the run's own data set). --inception_weights: the converted pytorch-fid weights
(python -m cm_jax.eval.inception_convert pt_inception-2015-12-05-6726825d.pth out.npz);
nothing is downloaded. The JSON holds every metric and the protocol: sampler, steps, NFE,
image counts, seeds, reference, and the detector's identity (weight hashes).
"""
import json
import os
import sys
import time

import jax
from absl import app, flags, logging

from cm_jax.cli import sample_request
from cm_jax.eval import evaluator
from cm_jax.eval import features as features_lib

# What to score.
_WORKDIR = flags.DEFINE_string("workdir", None, "run directory to sample from (train.py's)")
_SAMPLES = flags.DEFINE_string("samples", None, "or: .npz of samples (arr_0 uint8 NHWC)")
_NUM = flags.DEFINE_integer("num", 50_000, "images to generate (--workdir) / to use (--samples)")
_STEPS = flags.DEFINE_integer("steps", None, "sampler steps (default: the config's)")
_SAMPLER = flags.DEFINE_string("sampler", None, "sampler name (default: the config's)")
_SEED = flags.DEFINE_integer("seed", 0, "base seed; image i uses fold_in(seed, i)")
_BATCH = flags.DEFINE_integer("batch_size", None, "sampling batch (default: the config's)")
_PARAMS = flags.DEFINE_string("params", None, "ema | online | an EMA's name (default: config)")
_CLASS = flags.DEFINE_integer("class_label", None, "generate only this class")
_STEP = flags.DEFINE_integer("checkpoint_step", None, "checkpoint step (default: latest; a "
                             "progressive-distillation run: the round whose student takes --steps)")
_GUIDANCE = flags.DEFINE_float("guidance", None, "guidance strength w, as sample.py's "
                               "(default: config.sample.guidance)")
_TS = flags.DEFINE_list("ts", None, "consistency models: grid indices of CM Algorithm 1, e.g. "
                        "0,22,39 (on config.sample.grid_points levels); sets --steps")
_GRID_POINTS = flags.DEFINE_integer("grid_points", None, "Karras grid size for --ts "
                                    "(default: the config's)")
_SAVE_SAMPLES = flags.DEFINE_string("save_samples", None, "also write the generated .npz here")
# Against what.
_REF = flags.DEFINE_string("ref", None, "reference: .npz (images or mu/sigma), "
                           "tfds:NAME:SPLIT[:SIZE], digits, or data")
_NUM_REF = flags.DEFINE_integer("num_ref", 50_000, "reference images to use (at most)")
_REF_SEED = flags.DEFINE_integer("ref_seed", 0, "seed of the reference subset")
_TFDS_DIR = flags.DEFINE_string("tfds_data_dir", "", "TFDS data directory for tfds: refs")
_SAVE_REF = flags.DEFINE_string("save_ref_stats", None, "write the reference mu/sigma here")
# Measured by.
_DETECTOR = flags.DEFINE_enum("detector", "inception", ["inception", "digits"], "feature net")
_WEIGHTS = flags.DEFINE_string("inception_weights", None, "converted FID Inception weights")
_PREPROCESS = flags.DEFINE_enum("inception_preprocess", "tf1", ["tf1", "pytorch_fid"],
                                "tf1: the TF graph / torch-fidelity / EDM; pytorch_fid")
_NONSTANDARD = flags.DEFINE_bool("inception_allow_nonstandard", False,
                                 "accept weights not converted from the standard file")
_DET_BATCH = flags.DEFINE_integer("detector_batch_size", None, "images per detector batch")
_METRICS = flags.DEFINE_list("metrics", list(evaluator.ALL_METRICS), "fd,is,pr,kid")
_PR_MAX = flags.DEFINE_integer("pr_max", 10_000, "precision/recall: items per set (subset)")
_KID_SUBSETS = flags.DEFINE_integer("kid_subsets", 100, "KID: number of subsets")
_KID_SIZE = flags.DEFINE_integer("kid_subset_size", 1000, "KID: subset size")
_METRIC_SEED = flags.DEFINE_integer("metric_seed", 0, "seed of PR/KID subsets")
_OUT = flags.DEFINE_string("out", None, "JSON path (default: <workdir>/eval/<...>.json or "
                           "beside --samples)")


def _fail(msg: str):
  sys.exit(f"evaluate.py: {msg}")


def _samples_from_run(mesh_holder: dict):
  # pylint: disable=g-import-not-at-top
  from cm_jax import runs, sampling
  from cm_jax.train import builders, parallel
  # pylint: enable=g-import-not-at-top
  try:
    config = runs.load_config(_WORKDIR.value, _STEP.value)
  except FileNotFoundError as e:
    _fail(str(e))
  parts = builders.build_parts(config)
  num_classes = config.data.num_classes
  try:
    sample_request.check_class_label(_CLASS.value, num_classes)
    plan = sample_request.plan_sampling(
        config, parts.method, steps=_STEPS.value, ts=_TS.value,
        grid_points=_GRID_POINTS.value, sampler=_SAMPLER.value, guidance=_GUIDANCE.value)
    run = sample_request.read_weights(config, _WORKDIR.value, _PARAMS.value, plan.num_steps,
                                      _STEP.value)
  except sample_request.RequestError as e:
    _fail(str(e))
  params, step, options, num_steps = run.params, run.step, plan.options, plan.num_steps
  sampler, guidance = plan.sampler, plan.guidance
  which = _PARAMS.value or config.sample.params  # as asked (run.which: the EMA it chose)
  if plan.warning:
    print(f"evaluate.py: warning: {plan.warning}", file=sys.stderr)
  mesh = parallel.make_mesh(config.get("mesh"))
  mesh_holder["mesh"] = mesh
  t0 = time.perf_counter()
  try:
    images, labels = sampling.generate(
        parts.method, params, num=_NUM.value, seed=_SEED.value,
        batch_size=_BATCH.value or config.sample.batch_size, num_steps=num_steps,
        image_shape=parts.image_shape, num_classes=num_classes, class_label=_CLASS.value,
        mesh=mesh, progress=True, **options)
  except sampling.NonFiniteSamplesError as e:
    _fail(f"step {step}, weights {run.which!r}: {e}")
  except ValueError as e:  # e.g. a sampler or step count the method refuses, in one line
    _fail(str(e))
  wall = time.perf_counter() - t0
  protocol = {
      "source": "workdir", "workdir": os.path.abspath(_WORKDIR.value), "checkpoint_step": step,
      "method": config.method.name, "sampler": sampler, "num_steps": num_steps,
      "nfe": evaluator.nfe(parts.method, sampler, num_steps, guidance=guidance),
      "guidance": float(guidance or 0.0), "params": which,
      "sampler_options": {k: v for k, v in options.items() if k != "sampler"},
      "seed": _SEED.value, "num": int(len(images)), "class_label": _CLASS.value,
      "conditional": num_classes > 0, "sampling_wall_time_s": wall,
  }
  return images, labels, protocol, config


def main(argv):
  del argv
  logging.set_verbosity(logging.ERROR)  # Orbax logs every file it writes
  try:  # every flag is checked before a run, a sample file or a detector is read
    sample_request.check_counts(num=_NUM.value, steps=_STEPS.value, batch_size=_BATCH.value,
                                num_ref=_NUM_REF.value, detector_batch_size=_DET_BATCH.value,
                                pr_max=_PR_MAX.value, kid_subsets=_KID_SUBSETS.value,
                                kid_subset_size=_KID_SIZE.value, grid_points=_GRID_POINTS.value)
    metrics = sample_request.check_metrics(_METRICS.value, evaluator.ALL_METRICS)
  except sample_request.RequestError as e:
    _fail(str(e))
  if bool(_WORKDIR.value) == bool(_SAMPLES.value):
    _fail("give exactly one of --workdir (sample from a run) or --samples (an .npz)")
  if not _REF.value:
    _fail("--ref is required (a .npz, tfds:NAME:SPLIT, digits or data)")
  if _DETECTOR.value == "inception" and not _WEIGHTS.value:
    _fail("--detector inception needs --inception_weights PATH (convert pytorch-fid's "
          "pt_inception-2015-12-05-6726825d.pth with python -m cm_jax.eval.inception_convert)")

  mesh_holder, config = {}, None
  if _WORKDIR.value:
    images, labels, sample_protocol, config = _samples_from_run(mesh_holder)
  else:
    try:
      images, labels = evaluator.load_samples_npz(_SAMPLES.value)
    except (OSError, ValueError) as e:
      _fail(str(e))
    images = images[:_NUM.value]
    labels = None if labels is None else labels[:_NUM.value]
    sample_protocol = {"source": "npz", "path": os.path.abspath(_SAMPLES.value),
                       "num": int(len(images))}
  mesh = mesh_holder.get("mesh")
  if mesh is None:
    from cm_jax.train import parallel  # pylint: disable=g-import-not-at-top
    mesh = parallel.make_mesh()
  if _SAVE_SAMPLES.value:
    from cm_jax.utils.images import save_samples_npz  # pylint: disable=g-import-not-at-top
    save_samples_npz(_SAVE_SAMPLES.value, images, labels)

  try:
    if _DETECTOR.value == "inception":
      detector = features_lib.build_detector(
          "inception", weights_path=_WEIGHTS.value, preprocess=_PREPROCESS.value,
          allow_nonstandard=_NONSTANDARD.value)
    else:
      detector = features_lib.build_detector("digits")
    if _DET_BATCH.value:
      detector.batch_size = _DET_BATCH.value
    t0 = time.perf_counter()
    ref = evaluator.resolve_reference(
        _REF.value, detector, num=_NUM_REF.value, seed=_REF_SEED.value,
        run_data_cfg=config.data if config is not None else None,
        image_size=int(images.shape[1]), tfds_data_dir=_TFDS_DIR.value, mesh=mesh,
        progress=True)
    ref_time = time.perf_counter() - t0
  except (OSError, ValueError, KeyError) as e:
    _fail(str(e))
  if _SAVE_REF.value:
    evaluator.save_reference_stats(_SAVE_REF.value, ref, detector)

  # A conditional run's labels are what the samples were asked to be.
  cond_labels = labels if sample_protocol.get("conditional", labels is not None) else None
  result = evaluator.evaluate_images(
      images, cond_labels, detector, ref, mesh=mesh, progress=True,
      metrics=metrics, pr_max=_PR_MAX.value,
      kid_subsets=_KID_SUBSETS.value, kid_subset_size=_KID_SIZE.value,
      seed=_METRIC_SEED.value)
  result["wall_time_s"]["reference"] = ref_time
  result["protocol"] = {"samples": sample_protocol, "reference": ref.info,
                        "detector": detector.fingerprint, **result["protocol"]}
  result["versions"] = evaluator.versions()

  out = _OUT.value
  if not out:
    if _WORKDIR.value:
      tag = f"{sample_protocol['sampler']}_{sample_protocol['num_steps']}steps_{len(images)}"
      out = os.path.join(_WORKDIR.value, "eval", f"{_DETECTOR.value}_{tag}.json")
    else:
      out = os.path.splitext(_SAMPLES.value)[0] + f"_{_DETECTOR.value}_eval.json"
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  with open(out, "w") as f:
    json.dump(result, f, indent=2, sort_keys=True, default=str)
  shown = {k: (round(v, 4) if isinstance(v, float) else v)
           for k, v in result["metrics"].items() if k != "class_histogram"}
  nfe = sample_protocol.get("nfe")
  print(f"{len(images)} images{f' (NFE {nfe})' if nfe else ''} vs {_REF.value}: {shown}")
  print(f"wrote {out}")


if __name__ == "__main__":
  jax.config.parse_flags_with_absl()
  app.run(main)
