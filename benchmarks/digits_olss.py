"""OLSS benchmark on the digits (Duan et al. 2023): the fitted few-step scheduler against the
teacher's own few-step samplers at the same number of network evaluations, on a CPU.

  python benchmarks/digits_olss.py                   # train the teachers if missing, fit, score
  python benchmarks/digits_olss.py --variant tiny    # seconds-long smoke run

For each teacher (the EDM teacher of configs/digits_edm.py and the VP v-prediction teacher of
configs/digits_vp.py, trained in <runs> or reused when they reached their step count) this
records --trajectories trajectories of the teacher's own sampler on --teacher_steps levels
once (configs/digits_olss.py: Heun on the Karras grid for EDM, DDIM for VP), then for each
NFE of --nfe fits OLSS (path search) and OLSS-P (uniform path) on them, and draws --num
images with fixed per-image seeds (cm_jax.sampling.generate, classes drawn uniformly) from

  OLSS, OLSS-P        the fitted schedulers (path searched / uniform), NFE = steps
  OLSS z_T            the reference's formulation: searched, every step from z_T
  DDIM                the teacher's grid at NFE steps (the Euler step in VE coordinates)
  DPM-Solver++(2M)    the same grid, NFE steps
  Heun                EDM Algorithm 1, (NFE + 1) // 2 steps, so NFE 2N - 1 (one below an even NFE)
  EDM stochastic      EDM Algorithm 2 with its ImageNet 64 churn (S_churn 40, S_min 0.05,
                      S_max 50, S_noise 1.003), steps as Heun
  (Euler is not a row: in these VE coordinates it is the DDIM step, cm_jax.diffusion.samplers)
  full                the recorded sampler itself (the fit's target)

scored with the digits metric (FD-digits against all 1,797 real digits, class accuracy).
It also reports the fit's wall time (trajectories, then search and least squares per NFE)
and the sampling cost of OLSS against DDIM at one NFE, both compiled and warmed up, on one
batch. Written as <out>.json and <out>.md; FD-digits depends on the sample count, so
compare rows at one --num.
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
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from cm_jax import sampling  # noqa: E402
from cm_jax.eval import digits_metric  # noqa: E402
from cm_jax.methods import olss  # noqa: E402
from cm_jax.train import builders, parallel  # noqa: E402
from configs import digits_edm, digits_olss, digits_vp  # noqa: E402
from digits_quality import train_or_reuse, write_report  # noqa: E402
# pylint: enable=wrong-import-position

# (path, basis, row label): cm_jax's OLSS and OLSS-P, and EasyNLP's formulation (searched
# from the current state, fitted and sampled from z_T; cm_jax.diffusion.olss_solver).
FITS = (("search", "current", "OLSS"), ("uniform", "current", "OLSS-P"),
        ("search", "start", "OLSS z_T"))
BASELINES = ("ddim", "dpmpp_2m", "heun", "edm_stochastic")
SECOND_ORDER = ("heun", "edm_stochastic")  # 2N - 1 evaluations on N levels
# EDM Algorithm 2's settings for ImageNet 64 (Karras et al. 2022, Table 5): the digits
# configs keep S_churn = 0, which would make the stochastic sampler Heun's.
CHURN = {"s_churn": 40.0, "s_min": 0.05, "s_max": 50.0, "s_noise": 1.003}


def baseline_steps(sampler: str, nfe: int) -> int:
  """Steps of `sampler` that spend at most `nfe` evaluations (Heun, EDM stochastic: 2N - 1)."""
  return (nfe + 1) // 2 if sampler in SECOND_ORDER else nfe


def olss_method(cfg, steps: int, path: str, basis: str):
  """The OLSS method object of a run fitted for `steps` (its teacher loaded)."""
  cfg = cfg.copy_and_resolve_references()
  cfg.method.update(steps=steps, path=path, basis=basis)
  method = builders.build_parts(cfg).method
  method.load_teacher()
  return method


def timed_batch(fn, *args, repeats: int = 3) -> float:
  """Seconds per call of a compiled fn, after one warm-up call (median of `repeats`)."""
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return float(np.median(times))


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--runs", default=os.path.join(ROOT, "runs"), help="run directories root")
  p.add_argument("--teachers", default="edm,vp", help="edm and/or vp")
  p.add_argument("--nfe", default="3,4,5,6,8,10", help="network evaluations per image")
  p.add_argument("--trajectories", type=int, default=64, help="B, trajectories fitted on")
  p.add_argument("--teacher_steps", type=int, default=100, help="N, levels of each trajectory")
  p.add_argument("--num", type=int, default=1000, help="samples per setting")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--variant", default="", choices=["", "tiny"], help="config variant")
  p.add_argument("--out", default=None, help="output prefix (default <runs>/digits_olss)")
  args = p.parse_args(argv)
  from absl import logging  # pylint: disable=g-import-not-at-top
  logging.set_verbosity(logging.ERROR)

  nfes = [int(n) for n in args.nfe.split(",")]
  tiny = args.variant == "tiny"
  suffix = "_tiny" if tiny else ""
  out = args.out or os.path.join(args.runs, f"digits_olss_quality{suffix}")
  metric = digits_metric.DigitsMetric()
  rows, timings = [], {}

  for name in args.teachers.split(","):
    teacher_cfg = (digits_edm if name == "edm" else digits_vp).get_config(args.variant)
    teacher_dir = os.path.join(args.runs, f"digits_{name}{suffix}")
    print(f"== teacher digits_{name}: {teacher_dir}")
    train_or_reuse(teacher_cfg, teacher_dir)
    cfg = digits_olss.get_config("_".join(
        part for part in ("vp" if name == "vp" else "", args.variant) if part))
    cfg.method.update(teacher_workdir=teacher_dir, num_trajectories=args.trajectories,
                      trajectory_batch=args.trajectories, teacher_steps=args.teacher_steps,
                      steps=min(nfes))
    parts = builders.build_parts(cfg)
    method = parts.method
    teacher_params = method.load_teacher()
    tm = method._teacher.method  # pylint: disable=protected-access
    full_sampler = method.teacher_sampler()
    mesh = parallel.make_mesh(cfg.get("mesh"))

    t0 = time.perf_counter()
    noise = np.asarray(jax.random.normal(jax.random.key(cfg.seed),
                                         (args.trajectories,) + parts.image_shape))
    states, outputs, grid = olss.record_trajectories(
        tm, teacher_params, noise, method.trajectory_labels(), sampler=full_sampler,
        num_steps=args.teacher_steps, batch_size=args.trajectories)
    record_s = time.perf_counter() - t0
    timings[name] = {"record_s": record_s, "fit_s": {}}
    print(f"   recorded {args.trajectories} x {args.teacher_steps} {full_sampler} steps in "
          f"{record_s:.1f}s")

    def score(label, m, params, steps, nfe, **options):
      t0 = time.perf_counter()
      images, labels = sampling.generate(
          m, params, num=args.num, seed=args.seed, batch_size=cfg.sample.batch_size,
          num_steps=steps, image_shape=parts.image_shape,
          num_classes=cfg.data.num_classes, mesh=mesh, **options)
      s = metric(images, labels)
      row = {"teacher": name, "sampler": label, "num_steps": steps, "nfe": nfe,
             "fd_digits": s["fd_digits"], "accuracy": s.get("accuracy"),
             "num_samples": s["num_samples"], "sample_s": time.perf_counter() - t0}
      rows.append(row)
      print(f"   {label:9s} steps {steps:3d} NFE {nfe:3d}: FD-digits {row['fd_digits']:.2f}, "
            f"accuracy {row['accuracy']:.3f}  [{row['sample_s']:.1f}s]", flush=True)
      return row

    full_nfe = args.teacher_steps * (2 if full_sampler == "heun" else 1) - (
        1 if full_sampler == "heun" else 0)
    score("full", tm, teacher_params, args.teacher_steps, full_nfe, sampler=full_sampler)
    fitted_5 = None
    for nfe in nfes:
      for kind, basis, label in FITS:
        t0 = time.perf_counter()
        fitted = olss.fit_coefficients(states, outputs, grid, nfe, kind, basis=basis)
        fit_s = time.perf_counter() - t0
        timings[name]["fit_s"][f"{label} {nfe}"] = fit_s
        fitted["labels"] = np.zeros((args.trajectories,), np.int32)
        params = {"olss": jax.tree.map(jnp.asarray, fitted), "teacher": teacher_params}
        row = score(label, olss_method(cfg, nfe, kind, basis), params, nfe, nfe)
        row.update(path=fitted["path"].tolist(), fit_s=fit_s,
                   fit_errors=fitted["errors"].tolist())
        if label == "OLSS" and (fitted_5 is None or nfe == 5):
          fitted_5 = (nfe, params)
      for sampler in BASELINES:
        steps = baseline_steps(sampler, nfe)
        if steps >= 1 and not any(r["teacher"] == name and r["sampler"] == sampler and
                                  r["num_steps"] == steps for r in rows):
          score(sampler, tm, teacher_params, steps, 2 * steps - 1 if sampler in SECOND_ORDER
                else steps, sampler=sampler, **(CHURN if sampler == "edm_stochastic" else {}))

    # Sampling cost: OLSS against DDIM at one NFE, one batch, compiled and warm.
    n, params = fitted_5
    method = olss_method(cfg, n, "search", "current")
    keys = sampling.image_keys(args.seed, jnp.arange(cfg.sample.batch_size))
    noise_b, labels_b, skeys = sampling.draw_inputs(keys, parts.image_shape,
                                                    cfg.data.num_classes, None)
    olss_fn = jax.jit(lambda prm: method.sample(prm, noise_b, skeys, labels_b, n))
    ddim_fn = jax.jit(lambda prm: tm.sample(prm, noise_b, skeys, labels_b, n, sampler="ddim"))
    t_olss, t_ddim = timed_batch(olss_fn, params), timed_batch(ddim_fn, teacher_params)
    timings[name]["batch_s"] = {"nfe": n, "batch": cfg.sample.batch_size, "olss": t_olss,
                                "ddim": t_ddim, "ratio": t_olss / t_ddim}
    print(f"   one batch of {cfg.sample.batch_size} at NFE {n}: OLSS {t_olss * 1e3:.1f} ms, "
          f"DDIM {t_ddim * 1e3:.1f} ms ({t_olss / t_ddim:.2f}x)")

  table, claims = report_table(rows, nfes), claims_for(rows, nfes)
  fit_lines = [f"{k} teacher: trajectories {v['record_s']:.1f} s; search + fit "
               f"{min(v['fit_s'].values()):.2f}-{max(v['fit_s'].values()):.2f} s per NFE; "
               f"sampling one batch of {v['batch_s']['batch']} at NFE {v['batch_s']['nfe']}: "
               f"OLSS {v['batch_s']['olss'] * 1e3:.1f} ms vs DDIM {v['batch_s']['ddim'] * 1e3:.1f}"
               f" ms ({v['batch_s']['ratio']:.2f}x)" for k, v in timings.items()]
  print("\n" + table + "\n\n" + "\n".join(claims + fit_lines))
  write_report(out, {"rows": rows, "checks": claims, "timings": timings}, metric,
               {"num_samples": args.num, "seed": args.seed, "variant": args.variant,
                "trajectories": args.trajectories, "teacher_steps": args.teacher_steps,
                "nfe": nfes},
               f"OLSS on the digits ({args.num} samples each, seed {args.seed}; FD-digits vs "
               f"all 1,797 digits / class accuracy)\n\n{table}\n\n"
               + "\n".join(f"- {c}" for c in claims + fit_lines) + "\n")
  return 0


def report_table(rows, nfes) -> str:
  """One line per (teacher, sampler); FD-digits / accuracy per NFE column."""
  head = ["teacher", "sampler"] + [f"NFE {n}" for n in nfes] + ["full"]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for teacher in dict.fromkeys(r["teacher"] for r in rows):
    mine = [r for r in rows if r["teacher"] == teacher]
    full = next(r for r in mine if r["sampler"] == "full")
    for label in tuple(f[2] for f in FITS) + BASELINES:
      cells = []
      for n in nfes:
        r = next((r for r in mine if r["sampler"] == label and
                  (r["nfe"] == n or (label in SECOND_ORDER and r["nfe"] == n - 1))), None)
        cells.append("-" if r is None else
                     f"{r['fd_digits']:.2f} / {r['accuracy']:.3f}"
                     + (f" (NFE {r['nfe']})" if r["nfe"] != n else ""))
      lines.append("| " + " | ".join([teacher, label] + cells + [
          f"{full['fd_digits']:.2f} ({full['nfe']} NFE)"]) + " |")
  return "\n".join(lines)


def claims_for(rows, nfes) -> list[str]:
  """The paper's claim: OLSS beats DDIM and DPM-Solver++(2M) at NFE <= 6, per teacher."""
  out = []
  for teacher in dict.fromkeys(r["teacher"] for r in rows):
    by = {(r["sampler"], r["nfe"]): r["fd_digits"] for r in rows if r["teacher"] == teacher}
    for n in (n for n in nfes if n <= 6):
      mine = by.get(("OLSS", n))
      others = {s: by.get((s, n)) for s in ("ddim", "dpmpp_2m")}
      beaten = [s for s, v in others.items() if v is not None and mine is not None and mine < v]
      out.append(f"{teacher} NFE {n}: OLSS {mine:.2f} vs DDIM {others['ddim']:.2f}, "
                 f"DPM-Solver++(2M) {others['dpmpp_2m']:.2f}: "
                 + ("beats both" if len(beaten) == 2 else
                    f"does NOT beat {', '.join(s for s in others if s not in beaten)}"))
  return out


if __name__ == "__main__":
  sys.exit(main())
