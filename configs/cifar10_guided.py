"""Guided-diffusion distillation, stage 1 (Meng et al. 2023, Sec. 4.1), class-conditional
CIFAR-10: one student x(z_t, w, c) for every w in [0, 4].

  # the teacher: the CIFAR-10 VP model made class-conditional, with label dropout
  python train.py --config configs/cifar10_vp.py --workdir runs/c10_vp_cond \
      --config.data.num_classes=10 --config.model.null_class=True \
      --config.method.label_dropout=0.1 --config.data.data_dir=~/tensorflow_datasets
  python train.py --config configs/cifar10_guided.py --workdir runs/c10_guided \
      --config.data.data_dir=~/tensorflow_datasets

The teacher's network (cifar10_vp.py, x prediction) plus a 256-wide w-embedding, dropout 0,
Adam lr 1e-4, grad clip 1, EMA 0.9999, w ~ U[0, 4] (the stage-1 settings of Meng et al.'s
configs; the run length is ours). Stage 2: configs/cifar10_pd.py.
"""
from cm_jax.methods.guided_distillation import method_config
from configs import cifar10_vp
from configs.base import check_arg


def get_config(arg: str = ""):
  variant = check_arg(arg)
  c = cifar10_vp.get_config(variant)
  c.data.update(num_classes=10)
  c.model.update(null_class=True, cond_dim=256, dropout=0.0)
  c.method = method_config("guided", prediction="x", teacher_workdir="runs/c10_vp_cond",
                           w_min=0.0, w_max=4.0)
  c.optim.update(name="adam", lr=1e-4, warmup_steps=0, weight_decay=0.0, grad_clip=1.0)
  c.training.update(num_steps=100_000)
  c.sample.update(num_steps=256, guidance=0.3)
  if variant == "tiny":
    c.method.teacher_workdir = "runs/c10_vp_cond_tiny"
    c.training.update(num_steps=2)
    c.sample.update(num_steps=4)
  return c
