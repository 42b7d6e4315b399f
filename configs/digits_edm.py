"""EDM teacher on the embedded 8x8 digits (scikit-learn; no download).

  python train.py --config configs/digits_edm.py --workdir runs/digits_edm
  python sample.py --workdir runs/digits_edm --num 64 --out runs/digits_edm/samples.npz

About 10 minutes on a 2-core CPU to samples that read as digits (Heun, 18
steps, NFE 35). `:tiny` is the seconds-long variant the tests use.
"""
from configs.base import base_config, check_arg


def get_config(arg: str = ""):
  variant = check_arg(arg)
  c = base_config()
  c.data.update(name="digits", image_size=8, channels=1, random_flip=False, num_classes=10)
  c.model.update(model_channels=32, channel_mult=(1, 2), num_res_blocks=2,
                 attention_resolutions=(4,), num_head_channels=32, dropout=0.1,
                 use_scale_shift_norm=True, resblock_updown=True, num_groups=8, cond_dim=0,
                 dtype="float32", remat=False)
  c.optim.update(lr=2e-3, warmup_steps=200)
  # Half-life in images, ramped up as in EDM so the average forgets the init.
  c.ema.update(halflife_kimg=25.0, rampup_ratio=0.05)
  c.training.update(batch_size=128, num_steps=2000, log_every=50, save_every=500,
                    sample_every=500)
  c.sample.update(num_steps=18, grid_size=100)
  if variant == "tiny":
    c.model.update(model_channels=16, num_res_blocks=1, num_head_channels=8, num_groups=8,
                   dropout=0.0)
    c.training.update(batch_size=16, num_steps=4, log_every=2, save_every=2, sample_every=0)
    c.sample.update(num_steps=4, grid_size=16, batch_size=16)
  return c
