"""Guided-distillation benchmark on the digits (Meng et al. 2023): the guided VP teacher
against the distilled student, at several guidance strengths w, one table, on a CPU.

  python benchmarks/digits_guided.py                   # train what is missing, then score
  python benchmarks/digits_guided.py --variant tiny    # seconds-long smoke run

Trains (or reuses, when a run already reached its step count; an interrupted one resumes)
the three runs of the README's commands in <runs>: digits_vp (the teacher, label dropout
0.1), digits_guided (stage 1: one student taking w) and digits_pd (stage 2: rounds down to
one step). Then draws --num images per setting with fixed per-image seeds
(cm_jax.sampling.generate, classes drawn uniformly) and scores each with the digits metric
(FD-digits against all 1,797 real digits; class accuracy of the conditional samples):

  teacher    DDIM --teacher_steps with classifier-free guidance (NFE 2 x steps when w > 0)
  stage 1    the stage-1 student, DDIM at the first round's teacher steps (NFE = steps)
  student    the stage-2 student of each --student_steps (the checkpoint that ends the
             round whose student takes that many steps), DDIM and Meng's stochastic sampler
             (which equals DDIM at one step, so that row is not repeated)

and checks the issue's two claims: guidance raises the teacher's class accuracy, and the
4- and 8-step students come within 1.5x of the teacher's FD-digits at the same w. Written as
<out>.json and <out>.md; FD-digits depends on the sample count, so compare at one --num.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for path in (ROOT, os.path.dirname(os.path.abspath(__file__))):
  if path not in sys.path:
    sys.path.insert(0, path)

# pylint: disable=wrong-import-position
from cm_jax import runs, sampling  # noqa: E402
from cm_jax.eval import digits_metric, evaluator  # noqa: E402
from cm_jax.methods import method_class  # noqa: E402
from cm_jax.train import builders, parallel, rounds  # noqa: E402
from configs import digits_guided, digits_pd, digits_vp  # noqa: E402
from digits_quality import train_or_reuse, write_report  # noqa: E402
# pylint: enable=wrong-import-position


def configs_for(runs_root: str, variant: str):
  """(name, config, workdir) of the teacher, stage 1 and stage 2, chained by workdir."""
  suffix = "_tiny" if variant == "tiny" else ""
  dirs = {n: os.path.join(runs_root, f"digits_{n}{suffix}") for n in ("vp", "guided", "pd")}
  teacher = digits_vp.get_config(variant)
  stage1 = digits_guided.get_config(variant)
  stage1.method.teacher_workdir = dirs["vp"]
  stage2 = digits_pd.get_config(variant)
  stage2.method.teacher_workdir = dirs["guided"]
  return [("vp", teacher, dirs["vp"]), ("guided", stage1, dirs["guided"]),
          ("pd", stage2, dirs["pd"])]


def planned_steps(config) -> int:
  plan = rounds.round_plan(builders.build_parts(config).method)
  return rounds.total_steps(plan) if plan is not None else int(config.training.num_steps)


def pivot_table(rows: list[dict], ws: list[float]) -> str:
  """One line per (model, sampler, steps); FD-digits / accuracy per w."""
  keys = []
  for r in rows:
    k = (r["model"], r["sampler"], r["num_steps"])
    if k not in keys:
      keys.append(k)
  head = ["model", "sampler", "steps", "NFE"] + [f"w={w:g} FD / acc" for w in ws]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for k in keys:
    cells = {r["guidance"]: r for r in rows if (r["model"], r["sampler"], r["num_steps"]) == k}
    nfe = "/".join(sorted({str(c["nfe"]) for c in cells.values()}, key=int))
    vals = [f"{cells[w]['fd_digits']:.2f} / {cells[w]['accuracy']:.3f}" if w in cells else "-"
            for w in ws]
    lines.append("| " + " | ".join([k[0], k[1], str(k[2]), nfe] + vals) + " |")
  return "\n".join(lines)


def checks(rows: list[dict], ws: list[float]) -> list[str]:
  """The issue's claims, each a line saying what was measured."""
  out = []
  teacher = {r["guidance"]: r for r in rows if r["model"] == "teacher"}
  if len(teacher) >= 2:
    accs = [teacher[w]["accuracy"] for w in ws if w in teacher]
    rises = accs[-1] > accs[0]
    out.append(f"teacher class accuracy from w={ws[0]:g} to w={ws[-1]:g}: "
               + " -> ".join(f"{a:.3f}" for a in accs) + (" (rises)" if rises else
                                                             " (does NOT rise)"))
  for r in rows:
    if r["model"] == "student" and r["num_steps"] in (4, 8) and r["guidance"] in teacher:
      ratio = r["fd_digits"] / teacher[r["guidance"]]["fd_digits"]
      out.append(f"student {r['num_steps']} steps {r['sampler']} w={r['guidance']:g}: FD "
                 f"{r['fd_digits']:.2f} = {ratio:.2f}x the teacher's "
                 f"{'(within 1.5x)' if ratio <= 1.5 else '(NOT within 1.5x)'}")
  return out


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--runs", default=os.path.join(ROOT, "runs"), help="run directories root")
  p.add_argument("--w", default="0,0.5,1,2", help="guidance strengths w")
  p.add_argument("--student_steps", default="1,2,4,8", help="stage-2 student step counts")
  p.add_argument("--teacher_steps", type=int, default=256, help="teacher DDIM steps")
  p.add_argument("--num", type=int, default=1000, help="samples per setting")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--variant", default="", choices=["", "tiny"], help="config variant")
  p.add_argument("--out", default=None, help="output prefix (default <runs>/digits_guided)")
  args = p.parse_args(argv)
  from absl import logging  # pylint: disable=g-import-not-at-top
  logging.set_verbosity(logging.ERROR)  # Orbax logs every file it reads and writes

  ws = [float(w) for w in args.w.split(",")]
  student_steps = [int(s) for s in args.student_steps.split(",")]
  suffix = "_tiny" if args.variant == "tiny" else ""
  out = args.out or os.path.join(args.runs, f"digits_guided_quality{suffix}")
  chain = configs_for(args.runs, args.variant)
  trained = {}
  for name, config, workdir in chain:
    print(f"== digits_{name}: {workdir}")
    train_s, _, did = train_or_reuse(config, workdir, planned_steps(config))
    trained[name] = train_s if did else None

  metric = digits_metric.DigitsMetric()
  mesh = parallel.make_mesh(chain[0][1].get("mesh"))  # the three configs share one mesh
  rows = []

  loaded = {}  # (workdir, checkpoint step) -> (parts, run): each read once, not per w

  def score(model, name, config, workdir, num_steps, sampler, w, ckpt_step=None):
    if (workdir, ckpt_step) not in loaded:
      loaded[workdir, ckpt_step] = (builders.build_parts(config),
                                    runs.load_run(workdir, config.sample.params, ckpt_step))
    parts, run = loaded[workdir, ckpt_step]
    options, _ = sampling.guidance_options(parts.method, w)
    t0 = time.perf_counter()
    images, labels = sampling.generate(
        parts.method, run.params, num=args.num, seed=args.seed,
        batch_size=config.sample.batch_size, num_steps=num_steps,
        image_shape=parts.image_shape, num_classes=config.data.num_classes,
        mesh=mesh, sampler=sampler, **options)
    sample_s = time.perf_counter() - t0
    s = metric(images, labels)
    row = {"model": model, "run": name, "sampler": sampler, "num_steps": num_steps,
           "guidance": w, "nfe": evaluator.nfe(parts.method, sampler, num_steps, guidance=w),
           "fd_digits": s["fd_digits"], "accuracy": s.get("accuracy"),
           "coverage": s["coverage"], "num_samples": s["num_samples"],
           "checkpoint_step": run.step, "sample_s": sample_s, "train_s": trained[name]}
    rows.append(row)
    print(f"   {model} {sampler} {num_steps} steps w={w:g} (NFE {row['nfe']}): FD-digits "
          f"{row['fd_digits']:.2f}, accuracy {row['accuracy']:.3f}  [{sample_s:.1f}s]",
          flush=True)

  (_, t_cfg, t_dir), (_, g_cfg, g_dir), (_, p_cfg, p_dir) = chain
  pd_cls = method_class(p_cfg)
  for w in ws:
    score("teacher", "vp", t_cfg, t_dir, args.teacher_steps, "ddim", w)
    score("stage 1", "guided", g_cfg, g_dir, int(p_cfg.method.teacher_steps), "ddim", w)
    for n in student_steps:
      step = pd_cls.checkpoint_step_for(p_cfg, n)
      for sampler in (("ddim",) if n == 1 else ("ddim", "meng_stochastic")):
        score("student", "pd", p_cfg, p_dir, n, sampler, w, step)

  table = pivot_table(rows, ws)
  claims = checks(rows, ws)
  print()
  print(table)
  print()
  print("\n".join(claims))
  write_report(out, {"rows": rows, "checks": claims, "train_s": trained}, metric,
               {"num_samples": args.num, "seed": args.seed, "variant": args.variant,
                "teacher_steps": args.teacher_steps, "w": ws},
               f"Guided distillation on the digits ({args.num} samples each, seed "
               f"{args.seed}; FD-digits vs all 1,797 digits / class accuracy)\n\n{table}\n\n"
               + "\n".join(f"- {c}" for c in claims) + "\n")
  return 0


if __name__ == "__main__":
  sys.exit(main())
