"""VP v-prediction teacher on the embedded 8x8 digits, with label dropout for classifier-free
guidance (Salimans & Ho 2022 cosine schedule; Ho & Salimans 2022 guidance).

  python train.py --config configs/digits_vp.py --workdir runs/digits_vp
  python sample.py --workdir runs/digits_vp --sampler ddim --steps 50 --guidance 1.0 \
      --class_label 3 --out threes.npz

configs/digits_edm.py's ADM network, optimizer, EMA and training length (2,000 steps at
batch 128), plus grad clip 1 as diffusion_distillation trains; 10% of the labels are
replaced by the null class (Ho & Salimans 2022 use p_uncond 0.1-0.2). DDIM 50 steps by
default. `:tiny` is the seconds-long test variant.
"""
from configs import digits_edm
from configs.base import vp_fields


def get_config(arg: str = ""):
  c = digits_edm.get_config(arg)  # checks the variant name too
  vp_fields(c, prediction="v", loss_weight="snr_trunc", label_dropout=0.1)
  c.optim.update(grad_clip=1.0)
  c.sample.update(num_steps=4 if arg == "tiny" else 50)
  return c
