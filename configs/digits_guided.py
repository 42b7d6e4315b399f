"""Guided-diffusion distillation, stage 1 (Meng et al. 2023, Sec. 4.1), on the digits: one
student x(z_t, w, c) that matches the digits VP teacher guided with any w in [0, 4].

  python train.py --config configs/digits_vp.py --workdir runs/digits_vp      # the teacher
  python train.py --config configs/digits_guided.py --workdir runs/digits_guided
  python sample.py --workdir runs/digits_guided --guidance 1.0 --steps 64 --out g.npz

The teacher's network (digits_vp.py: v-prediction, cosine logSNR, null class) plus the
w-embedding (model.cond_dim = 64 sin/cos features of 1000 w into the UNet's zero-initialised
cond_emb), started from the teacher's weights; w ~ U[0, 4] (Meng Sec. 5, pixel space),
loss max(SNR, 1) x-MSE, Adam with grad clip 1 and the teacher's EMA. 1,000 steps at batch
128 (about 11 minutes on 2 CPU cores); one network evaluation per sampling step instead of
the teacher's two. The stage-2 rounds are configs/digits_pd.py. `:tiny` distils the tiny
teacher in runs/digits_vp_tiny (python train.py --config configs/digits_vp.py:tiny
--workdir runs/digits_vp_tiny).

Meng et al. (ImageNet 64, their Table / Fig. 4 as Heek et al. 2024 quote it): the guided
teacher is distilled to 1 / 2 / 4 / 8 steps with FID 18.5 / 5.81 / 2.24 / 2.31 after stage 2.
"""
from cm_jax.methods.guided_distillation import method_config
from configs import digits_vp
from configs.base import check_arg


def get_config(arg: str = ""):
  variant = check_arg(arg)
  c = digits_vp.get_config(variant)  # the teacher's network, schedule and data
  c.model.update(cond_dim=64)
  c.method = method_config("guided", prediction="v", teacher_workdir="runs/digits_vp",
                           w_min=0.0, w_max=4.0)
  c.optim.update(lr=5e-4, warmup_steps=100, grad_clip=1.0)
  c.training.update(num_steps=1000, save_every=500, sample_every=500)
  c.sample.update(num_steps=64, guidance=1.0)
  if variant == "tiny":
    c.method.teacher_workdir = "runs/digits_vp_tiny"
    c.optim.update(warmup_steps=0)
    c.training.update(num_steps=2, save_every=2, sample_every=0)
    c.sample.update(num_steps=4)
  return c
