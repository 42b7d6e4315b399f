"""Digits quality benchmark: the EDM teacher and every few-step model, one table, on a CPU.

  python benchmarks/digits_quality.py                  # train what is missing, then score
  python benchmarks/digits_quality.py --variant tiny   # seconds-long smoke run
  python benchmarks/digits_quality.py --methods edm,cd --steps 1,2

For each of configs/digits_{edm,vp,cd,ct,ict}.py that exists (others are skipped, saying so),
trains it in <runs>/digits_<method> with cm_jax.train.loop.train, or reuses the run there
when it already reached its step count (an interrupted run resumes). CD distils the EDM
teacher of the same run directory. Then samples --num images per setting with per-image
seeds (cm_jax.sampling.generate): the teacher with its Heun sampler at --teacher_steps
(18 steps = NFE 35), the VP teacher with DDIM at --vp_steps, unguided and with each
--vp_guidance w (NFE doubles when guided), each consistency model at --steps (1, 2, 4
network evaluations).
Scores them with the digits metric (cm_jax.eval.digits_metric: FD-digits against all
1,797 real digits, class coverage, label accuracy of the class-conditional samples) and
prints one table, also written as <out>.json and <out>.md.

FD-digits depends on the sample count (like FID): compare rows at the same --num.
Wall times include compilation; the machine and device count are in the JSON.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

# pylint: disable=wrong-import-position
import jax  # noqa: E402

from cm_jax import runs, sampling  # noqa: E402
from cm_jax.eval import digits_metric, evaluator  # noqa: E402
from cm_jax.train import builders, loop, parallel  # noqa: E402
from cm_jax.train.checkpoint import RunCheckpoints  # noqa: E402
# pylint: enable=wrong-import-position

METHODS = ("edm", "vp", "cd", "ct", "ict")


def load_config(method: str, variant: str):
  """configs/digits_<method>.py's get_config(variant), or None when the file is absent."""
  if not os.path.exists(os.path.join(ROOT, "configs", f"digits_{method}.py")):
    return None
  return importlib.import_module(f"configs.digits_{method}").get_config(variant)


def latest_step(workdir: str):
  if not os.path.isdir(os.path.join(workdir, "checkpoints")):
    return None
  ckpts = RunCheckpoints(workdir, read_only=True, async_save=False)
  step = ckpts.latest_step()
  ckpts.close()
  return step


def train_or_reuse(config, workdir: str, train_steps=None) -> tuple[float, int, bool]:
  """(train seconds spent now, final step, whether it trained now)."""
  total = int(train_steps or config.training.num_steps)
  latest = latest_step(workdir)
  if latest is not None and latest >= total:
    return 0.0, latest, False
  t0 = time.perf_counter()
  loop.train(config, workdir, num_steps=total, progress=True)
  seconds = time.perf_counter() - t0
  reached = latest_step(workdir)
  if reached is None or reached < total:
    # loop.train returns early on SIGTERM / SIGINT after saving: never score a half run.
    raise SystemExit(f"training in {workdir} stopped at step {reached} of {total} "
                     f"(interrupted?); run the benchmark again to resume it")
  return seconds, total, True


def restore_params(config, workdir: str):
  parts = builders.build_parts(config)
  run = runs.load_run(workdir, config.sample.params)  # only the sampling copy is read
  return parts, run.params, run.step


def sample_and_score(metric, parts, params, config, mesh, *, num: int, seed: int,
                     num_steps: int, **options) -> tuple[dict, float]:
  """(digits-metric scores, seconds spent sampling) of `num` images with per-image seeds."""
  t0 = time.perf_counter()
  images, labels = sampling.generate(
      parts.method, params, num=num, seed=seed, batch_size=config.sample.batch_size,
      num_steps=num_steps, image_shape=parts.image_shape,
      num_classes=config.data.num_classes, mesh=mesh, **options)
  seconds = time.perf_counter() - t0
  return metric(images, labels), seconds


def markdown_table(rows: list[dict]) -> str:
  conditional = any(r.get("accuracy") is not None for r in rows)
  head = ["method", "steps", "NFE", "FD-digits", "coverage", "class entropy"]
  head += ["accuracy"] if conditional else []
  head += ["sample s", "train s"]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for r in rows:
    cells = [r["method"], str(r["num_steps"]), str(r["nfe"]), f"{r['fd_digits']:.2f}",
             f"{r['coverage']:.2f}", f"{r['class_entropy']:.3f}"]
    if conditional:
      cells.append("-" if r.get("accuracy") is None else f"{r['accuracy']:.3f}")
    train_s = r["train_s"]
    cells += [f"{r['sample_s']:.1f}",
              "reused" if train_s is None else f"{train_s:.0f}"]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--runs", default=os.path.join(ROOT, "runs"), help="run directories root")
  p.add_argument("--methods", default=",".join(METHODS), help="subset of edm,cd,ct,ict")
  p.add_argument("--steps", default="1,2,4", help="consistency-model sampling steps (= NFE)")
  p.add_argument("--teacher_steps", type=int, default=18, help="EDM Heun steps (NFE 2N-1)")
  p.add_argument("--vp_steps", default="50,100,256", help="VP teacher DDIM steps")
  p.add_argument("--vp_guidance", default="0,1", help="VP teacher guidance strengths w")
  p.add_argument("--num", type=int, default=1797, help="samples per setting")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--variant", default="", choices=["", "tiny"], help="config variant")
  p.add_argument("--train_steps", type=int, default=None,
                 help="override every config's training.num_steps (e.g. a quick look)")
  p.add_argument("--out", default=None, help="output prefix (default <runs>/digits_quality)")
  args = p.parse_args(argv)
  from absl import logging  # pylint: disable=g-import-not-at-top
  logging.set_verbosity(logging.ERROR)  # Orbax logs every file it reads and writes

  methods = [m.strip() for m in args.methods.split(",") if m.strip()]
  unknown = set(methods) - set(METHODS)
  if unknown:
    p.error(f"unknown methods {sorted(unknown)}; choose from {METHODS}")
  steps = [int(s) for s in args.steps.split(",")]
  suffix = "_tiny" if args.variant == "tiny" else ""
  teacher_dir = os.path.join(args.runs, f"digits_edm{suffix}")
  out = args.out or os.path.join(args.runs, f"digits_quality{suffix}")

  metric = digits_metric.DigitsMetric()  # trains the digits classifier once, then cached
  rows, skipped = [], []
  for method in methods:
    config = load_config(method, args.variant)
    if config is None:
      print(f"skipped digits_{method}: configs/digits_{method}.py does not exist yet")
      skipped.append(method)
      continue
    workdir = os.path.join(args.runs, f"digits_{method}{suffix}")
    if "teacher_workdir" in config.method:
      if not os.path.isdir(os.path.join(teacher_dir, "checkpoints")):
        print(f"skipped digits_{method}: it distils the EDM teacher, which is not trained in "
              f"{teacher_dir} (include edm in --methods)")
        skipped.append(method)
        continue
      config.method.teacher_workdir = teacher_dir
    print(f"== digits_{method}: {workdir}")
    train_s, train_step, trained = train_or_reuse(config, workdir, args.train_steps)
    parts, params, ckpt_step = restore_params(config, workdir)
    mesh = parallel.make_mesh(config.get("mesh"))
    settings = [(n, 0.0) for n in ([args.teacher_steps] if method == "edm" else steps)]
    if method == "vp":
      settings = [(int(n), float(w)) for w in args.vp_guidance.split(",")
                  for n in args.vp_steps.split(",")]
    for num_steps, guidance in settings:
      scores, sample_s = sample_and_score(
          metric, parts, params, config, mesh, num=args.num, seed=args.seed,
          num_steps=num_steps, **({"guidance": guidance} if guidance else {}))
      nfe = evaluator.nfe(parts.method, config.sample.sampler, num_steps)
      row = {"method": method + (f" (w={guidance:g})" if guidance else ""),
             "num_steps": num_steps, "sampler": config.sample.sampler, "guidance": guidance,
             "nfe": nfe * (2 if guidance else 1),
             "fd_digits": scores["fd_digits"], "coverage": scores["coverage"],
             "class_entropy": scores["class_entropy"], "confident": scores["confident"],
             "accuracy": scores.get("accuracy"), "num_samples": scores["num_samples"],
             "sample_s": sample_s, "train_s": train_s if trained else None,
             "train_steps": train_step, "checkpoint_step": ckpt_step, "workdir": workdir}
      rows.append(row)
      print(f"   {method} {num_steps} steps (NFE {row['nfe']}): FD-digits "
            f"{row['fd_digits']:.2f}, coverage {row['coverage']:.2f}"
            + (f", accuracy {row['accuracy']:.3f}" if row["accuracy"] is not None else "")
            + f"  [{sample_s:.1f}s]")

  table = markdown_table(rows) if rows else "(no rows)"
  print()
  print(table)
  write_report(out, {"rows": rows, "skipped": skipped}, metric,
               {"num_samples": args.num, "seed": args.seed, "variant": args.variant},
               f"Digits quality ({args.num} samples each, seed {args.seed}; FD-digits vs all "
               f"1,797 digits; digits classifier recipe "
               f"{metric.classifier.fingerprint()['recipe_sha256'][:12]})\n\n{table}\n")
  return 0


def write_report(out: str, fields: dict, metric, protocol: dict, markdown: str) -> None:
  """<out>.json (fields + protocol, the digits metric's identity, machine, versions) and
  <out>.md (`markdown`)."""
  result = dict(fields)
  result.update(
      protocol={**protocol, "reference": "all 1,797 sklearn digits", **metric.protocol()},
      machine={"platform": platform.platform(), "backend": jax.default_backend(),
               "devices": jax.device_count()},
      versions=evaluator.versions())
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  with open(out + ".json", "w") as f:
    json.dump(result, f, indent=2, default=str)
  with open(out + ".md", "w") as f:
    f.write(markdown)
  print(f"\nwrote {out}.json and {out}.md")


if __name__ == "__main__":
  sys.exit(main())
