"""Latent consistency models on digits32: LCD, LCM-LoRA and LCF against their teacher.

  python benchmarks/digits32_lcm.py                         # train what is missing, score
  python benchmarks/digits32_lcm.py --steps 1,2,4,8 --guidance 2 --num 1000

Needs the digits32 latent teacher (`python benchmarks/digits32_latent.py` trains it, with
its autoencoder and latent cache, under --runs). Trains (or reuses, or resumes)
configs/digits32_lcd.py, digits32_lcm_lora.py and then digits32_lcf.py (started from the
LCD run) on the latent cache, then samples --num images per row, each prompted with its
class's caption, decodes them and scores them with the digits metric of
`benchmarks/digits32_latent.py` (FD-digits after 32 -> 8 px block means, class coverage,
and the classifier's accuracy against the prompt's digit). Rows: the teacher with DDIM at
50 steps and guidance w (two evaluations per step) and with DDIM at each --steps count (the
paper's baseline), then each student at every --steps count with the LCM sampler (LCD /
LCF take w through their embedding; LCM-LoRA was distilled at w and samples without
guidance). Prints one table, also written as <out>.json and <out>.md.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for path in (ROOT, os.path.join(ROOT, "benchmarks")):
  if path not in sys.path:
    sys.path.insert(0, path)

# pylint: disable=wrong-import-position
from digits32_latent import markdown_table, real_digits  # noqa: E402
from digits_quality import sample_and_score, train_or_reuse, write_report  # noqa: E402
from cm_jax import runs  # noqa: E402
from cm_jax.eval import digits_metric  # noqa: E402
from cm_jax.train import builders  # noqa: E402
from configs import digits32_lcd, digits32_lcf, digits32_lcm_lora, digits32_ldm  # noqa: E402
# pylint: enable=wrong-import-position


def student_configs(runs_root: str, variant: str):
  """(name, config, workdir) of the three students, in training order (LCF needs LCD)."""
  cache = os.path.join(runs_root, "digits32_latents")
  out = []
  for name, module in (("LCD", digits32_lcd), ("LCM-LoRA", digits32_lcm_lora),
                       ("LCF", digits32_lcf)):
    c = module.get_config(variant)
    c.method.update(vae_workdir=os.path.join(runs_root, "digits32_vae"),
                    teacher_workdir=("" if name == "LCF"
                                     else os.path.join(runs_root, "digits32_ldm")))
    if name == "LCF":
      c.method.init_workdir = os.path.join(runs_root, "digits32_lcd")
    c.data.update(name="latent_cache", path=cache)
    workdir = os.path.join(runs_root, {"LCD": "digits32_lcd", "LCM-LoRA": "digits32_lcm_lora",
                                       "LCF": "digits32_lcf"}[name])
    out.append((name, c, workdir))
  return out


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--runs", default=os.path.join(ROOT, "runs"), help="run directories root")
  p.add_argument("--guidance", type=float, default=2.0, help="guidance strength w")
  p.add_argument("--steps", default="1,2,4,8", help="LCM step counts")
  p.add_argument("--teacher_steps", type=int, default=50, help="the teacher's DDIM steps")
  p.add_argument("--num", type=int, default=1000, help="samples per row")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--variant", default="", choices=["", "tiny"], help="config variant")
  p.add_argument("--out", default=os.path.join(ROOT, "runs", "digits32_lcm"))
  args = p.parse_args(argv)

  ldm_dir = os.path.join(args.runs, "digits32_ldm")
  teacher = digits32_ldm.get_config(args.variant)
  teacher.method.vae_workdir = os.path.join(args.runs, "digits32_vae")
  if not os.path.isdir(os.path.join(ldm_dir, "checkpoints")):
    raise SystemExit(f"no latent teacher in {ldm_dir}: run benchmarks/digits32_latent.py")
  students = student_configs(args.runs, args.variant)
  train_s = {}
  for name, config, workdir in students:
    train_s[name] = train_or_reuse(config, workdir)[0]

  images, labels = real_digits(int(teacher.data.image_size))
  metric = digits_metric.DigitsMetric(reference=images)
  w = float(args.guidance)
  rows = []

  def score(label, config, workdir, sampler, steps, nfe, options):
    parts = builders.build_parts(config)
    params = runs.load_run(workdir, config.sample.params).params
    scores, seconds = sample_and_score(metric, parts, params, config, None, num=args.num,
                                       seed=args.seed, num_steps=steps, **options)
    rows.append(dict(model=label, sampler=sampler, steps=steps, w=w, nfe=nfe,
                     sample_s=seconds, **scores))
    print(markdown_table(rows[-1:]).splitlines()[-1], flush=True)

  t = args.teacher_steps
  step_counts = [int(s) for s in args.steps.split(",")]
  # The teacher at its own step count, then with DDIM at the students' (the paper's baseline).
  for steps in [t] + [s for s in step_counts if s != t]:
    score("digits32 latent teacher", teacher, ldm_dir, "ddim", steps,
          steps * (2 if w else 1), {"guidance": w} if w else {})
  for name, config, workdir in students:
    embedded = bool(config.method.w_embedding)
    for steps in step_counts:
      score(name, config, workdir, "lcm", steps, steps,
            {"guidance": w} if (embedded and w) else {})
  table = markdown_table(rows)
  print(table)
  write_report(args.out, {"rows": rows, "train_s": train_s}, metric,
               {"reference_images": "all 1,797 digits upscaled to 32 px, back to 8 px by "
                                    "4x4 means", "num": args.num, "seed": args.seed,
                "guidance": w, "teacher_steps": t}, table + "\n")
  return 0


if __name__ == "__main__":
  sys.exit(main())
