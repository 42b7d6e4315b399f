"""Multistep consistency benchmark on the digits (Heek, Hoogeboom & Salimans 2024): the VP
teacher with DDIM and aDDIM against multistep CD and CT at S segments, one table, on a CPU.

  python benchmarks/digits_multistep.py                  # train what is missing, then score
  python benchmarks/digits_multistep.py --variant tiny   # seconds-long smoke run

Trains (or reuses, when a run already reached its step count; an interrupted one resumes)
the README's runs in <runs>: digits_vp (the teacher), digits_mcm_cd<S> for each --cd_steps S
and digits_mcm_ct<S> for each --ct_steps S (configs/digits_mcm_cd.py / digits_mcm_ct.py with
--config.method.student_steps=S, all started from the teacher's weights). Then draws --num
images per row with fixed per-image seeds (cm_jax.sampling.generate, classes drawn
uniformly) and scores each with the digits metric (FD-digits against all 1,797 real digits;
class accuracy of the class-conditional samples):

  teacher   DDIM and aDDIM (the paper's baseline sampler, x_var = 0.1 / (2 + SNR)) at each
            --teacher_steps, unguided, N network evaluations each
  MCM CD    Algorithm 2 with S steps (S network evaluations)
  MCM CT    the same for the CT runs
  ablations with --ablation_steps S: CD with a DDIM teacher step (the paper's Table 4) and
            with fixed teacher steps N = 64 (Table 2), in digits_mcm_cd<S>_ddim / _fixed

and checks the issue's claims: multistep CD improves monotonically with S, and S = 8 comes
within 1.3x of the teacher's 256-step DDIM FD-digits. Written as <out>.json and <out>.md.
FD-digits depends on the sample count (like FID): compare rows at one --num.
"""
from __future__ import annotations

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for path in (ROOT, os.path.dirname(os.path.abspath(__file__))):
  if path not in sys.path:
    sys.path.insert(0, path)

# pylint: disable=wrong-import-position
from cm_jax.eval import digits_metric  # noqa: E402
from cm_jax.train import parallel  # noqa: E402
from configs import digits_mcm_cd, digits_mcm_ct, digits_vp  # noqa: E402
from digits_quality import (restore_params, sample_and_score, train_or_reuse,  # noqa: E402
                            write_report)
# pylint: enable=wrong-import-position


def _ints(text: str) -> list[int]:
  return [int(v) for v in text.split(",") if v.strip()]


def runs_to_score(args) -> list[tuple[str, object, str, list[tuple[str, int]]]]:
  """(label, config, workdir, [(sampler, steps), ...]) for the teacher and every student."""
  suffix = "_tiny" if args.variant == "tiny" else ""
  teacher_dir = os.path.join(args.runs, f"digits_vp{suffix}")
  teacher = digits_vp.get_config(args.variant)
  out = [("VP teacher", teacher, teacher_dir,
          [(s, n) for s in ("ddim", "addim") for n in _ints(args.teacher_steps)])]
  for kind, module, steps in (("CD", digits_mcm_cd, args.cd_steps),
                              ("CT", digits_mcm_ct, args.ct_steps)):
    for s in _ints(steps):
      config = module.get_config(args.variant)
      config.method.update(student_steps=s, teacher_workdir=teacher_dir)
      workdir = os.path.join(args.runs, f"digits_mcm_{kind.lower()}{s}{suffix}")
      out.append((f"MCM {kind}, S = {s}", config, workdir, [("multistep", s)]))
  # The paper's ablations of CD (Table 4: a DDIM teacher step; Table 2: fixed N_teacher = 64).
  for s in _ints(args.ablation_steps):
    for tag, fields in (("DDIM teacher step", {"teacher_solver": "ddim"}),
                        ("fixed N_teacher = 64", {"teacher_anneal_steps": 0})):
      config = digits_mcm_cd.get_config(args.variant)
      config.method.update(student_steps=s, teacher_workdir=teacher_dir, **fields)
      name = "ddim" if "teacher_solver" in fields else "fixed"
      workdir = os.path.join(args.runs, f"digits_mcm_cd{s}_{name}{suffix}")
      out.append((f"MCM CD, S = {s}, {tag}", config, workdir, [("multistep", s)]))
  return out


def markdown_table(rows: list[dict]) -> str:
  lines = ["| model | sampler | steps | NFE | FD-digits | coverage | accuracy | sample s | "
           "train s |", "|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    acc = "-" if r["accuracy"] is None else f"{r['accuracy']:.3f}"
    train = "reused" if r["train_s"] is None else f"{r['train_s']:.0f}"
    lines.append(f"| {r['model']} | {r['sampler']} | {r['num_steps']} | {r['nfe']} | "
                 f"{r['fd_digits']:.2f} | {r['coverage']:.2f} | {acc} | {r['sample_s']:.1f} | "
                 f"{train} |")
  return "\n".join(lines)


def checks(rows: list[dict]) -> list[str]:
  """The issue's two claims, each a PASS / FAIL line (or why it could not be checked)."""
  out = []
  cd = sorted((r["num_steps"], r["fd_digits"]) for r in rows
              if r["model"].startswith("MCM CD") and r["model"].count(",") == 1)
  if len(cd) >= 2:
    monotone = all(b[1] < a[1] for a, b in zip(cd, cd[1:]))
    out.append(f"{'PASS' if monotone else 'FAIL'}: multistep CD FD-digits falls with S: "
               + " > ".join(f"{fd:.2f} (S={s})" for s, fd in cd))
  ref = [r["fd_digits"] for r in rows if r["model"] == "VP teacher" and r["sampler"] == "ddim"
         and r["num_steps"] == 256]
  eight = [fd for s, fd in cd if s == 8]
  if ref and eight:
    ratio = eight[0] / ref[0]
    out.append(f"{'PASS' if ratio <= 1.3 else 'FAIL'}: multistep CD S = 8 FD-digits "
               f"{eight[0]:.2f} is {ratio:.2f}x the teacher's 256-step DDIM {ref[0]:.2f} "
               f"(goal <= 1.3x)")
  return out


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--runs", default=os.path.join(ROOT, "runs"), help="run directories root")
  p.add_argument("--teacher_steps", default="8,16,64,256", help="teacher DDIM / aDDIM steps")
  p.add_argument("--cd_steps", default="1,2,4,8", help="multistep CD segments S")
  p.add_argument("--ct_steps", default="2,4", help="multistep CT segments S")
  p.add_argument("--ablation_steps", default="", help="S of the CD ablations (a DDIM "
                 "teacher step; fixed teacher steps), e.g. 4; none by default")
  p.add_argument("--num", type=int, default=1000, help="samples per row")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--variant", default="", choices=["", "tiny"], help="config variant")
  p.add_argument("--out", default=None, help="output prefix (default <runs>/digits_multistep)")
  args = p.parse_args(argv)
  from absl import logging  # pylint: disable=g-import-not-at-top
  logging.set_verbosity(logging.ERROR)  # Orbax logs every file it reads and writes
  out = args.out or os.path.join(args.runs, "digits_multistep" +
                                 ("_tiny" if args.variant == "tiny" else ""))

  metric = digits_metric.DigitsMetric()  # trains the digits classifier once, then cached
  rows = []
  for label, config, workdir, settings in runs_to_score(args):
    print(f"== {label}: {workdir}", flush=True)
    train_s, train_step, trained = train_or_reuse(config, workdir)
    parts, params, ckpt_step = restore_params(config, workdir)
    mesh = parallel.make_mesh(config.get("mesh"))
    for sampler, num_steps in settings:
      options = {} if sampler == config.sample.sampler else {"sampler": sampler}
      scores, sample_s = sample_and_score(metric, parts, params, config, mesh, num=args.num,
                                          seed=args.seed, num_steps=num_steps, **options)
      row = {"model": label, "sampler": sampler, "num_steps": num_steps, "nfe": num_steps,
             "fd_digits": scores["fd_digits"], "coverage": scores["coverage"],
             "accuracy": scores.get("accuracy"), "num_samples": scores["num_samples"],
             "sample_s": sample_s, "train_s": train_s if trained else None,
             "train_steps": train_step, "checkpoint_step": ckpt_step, "workdir": workdir}
      rows.append(row)
      print(f"   {label} {sampler} {num_steps} steps: FD-digits {row['fd_digits']:.2f}, "
            f"coverage {row['coverage']:.2f}, accuracy {row['accuracy']}  [{sample_s:.1f}s]",
            flush=True)

  table = markdown_table(rows)
  verdicts = checks(rows)
  print()
  print(table)
  print()
  print("\n".join(verdicts))
  write_report(out, {"rows": rows, "checks": verdicts}, metric,
               {"num_samples": args.num, "seed": args.seed, "variant": args.variant},
               f"Multistep consistency on the digits ({args.num} samples each, seed "
               f"{args.seed}; FD-digits vs all 1,797 digits)\n\n{table}\n\n"
               + "\n".join(verdicts) + "\n")
  return 0


if __name__ == "__main__":
  sys.exit(main())
