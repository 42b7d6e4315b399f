"""OLSS (Duan et al. 2023): a few-step sampler fitted, not trained, on the digits teacher.

  python train.py --config configs/digits_edm.py --workdir runs/digits_edm     # the teacher
  python train.py --config configs/digits_olss.py --workdir runs/digits_olss5 \
      --config.method.steps=5
  python sample.py --workdir runs/digits_olss5 --steps 5 --out runs/digits_olss5/samples.npz

train.py records 64 trajectories of the teacher's own sampler on 100 levels (Heun on the
Karras grid for the EDM teacher, NFE 199; DDIM for the VP teacher), labels 0..9 cycling,
searches the path and fits the coefficients: seconds on a 2-core CPU, no data read, one
checkpoint at step 0 holding only the coefficients (sample.py reads the teacher from its run
and checks it is the one fitted on). Variants:

  ''          the EDM teacher in runs/digits_edm (digits_edm.py)
  vp          the VP v-prediction teacher in runs/digits_vp (digits_vp.py)
  tiny, vp_tiny   seconds-long test variants on the tiny teachers (runs/digits_*_tiny)

--config.method.path=uniform gives OLSS-P (the same fit on a uniform path, no search);
--config.method.basis=start fits every step from z_T as EasyNLP's olss.py does (the
default, current, steps from the sampler's current state: cm_jax/diffusion/olss_solver.py);
--config.method.guidance=w fits guided trajectories (a teacher with label dropout: vp).
The README's OLSS table (benchmarks/digits_olss.py) has the measured quality.
"""
from cm_jax.methods.olss import method_config
from configs import digits_edm, digits_vp
from configs.base import check_arg

VARIANTS = ("", "tiny", "vp", "vp_tiny")


def get_config(arg: str = ""):
  variant = check_arg(arg, VARIANTS)
  tiny = variant.endswith("tiny")
  vp = variant.startswith("vp")
  teacher = (digits_vp if vp else digits_edm).get_config("tiny" if tiny else "")
  c = teacher  # the teacher's data (checked against the teacher run) and network fields
  name = ("digits_vp" if vp else "digits_edm") + ("_tiny" if tiny else "")
  c.method = method_config(teacher_workdir=f"runs/{name}")
  c.sample.update(sampler="olss", params="ema", guidance=0.0)
  # sample.py's default step count is the fitted one.
  c.sample.num_steps = c.method.get_ref("steps")
  c.ema.update(rates=(), halflife_kimg=0.0)
  if tiny:
    c.method.update(steps=3, teacher_steps=8, num_trajectories=8, trajectory_batch=8)
    c.sample.update(batch_size=16, grid_size=16)
  return c
