"""VP diffusion teacher on CIFAR-10 as google-research/diffusion_distillation trains it
(`config/cifar_base.py`): the teacher of progressive distillation (Salimans & Ho 2022).

  python train.py --config configs/cifar10_vp.py --workdir runs/c10_vp \
      --config.data.data_dir=~/tensorflow_datasets

Reference settings kept: continuous-time cosine logSNR on [-20, 20], x prediction
(mean_type 'x'), loss weight snr_trunc, batch 128, Adam with decoupled weight decay 0.001,
lr 2e-4 after 1,000 warm-up steps, grad clip 1, EMA 0.9999, dropout 0.2, random flips,
unconditional; DDIM sampling with x_hat clipped. `--config.method.prediction=v` gives the
v-prediction teacher of later papers. Network: our ADM UNet at the reference widths
(256 channels, mult 1-1-1, 3 res blocks, attention at 16 and 8 with one head, resblock
resampling); the reference's `unet_iddpm` is an ADM-family UNet of the same shape, not
checked weight for weight. The training length is ours (the reference trains until stopped).
"""
from configs.base import base_config, check_arg, vp_fields


def get_config(arg: str = ""):
  variant = check_arg(arg)
  c = base_config()
  c.data.update(name="tfds", tfds_name="cifar10", image_size=32, channels=3, random_flip=True,
                num_classes=0, num_threads=16)
  c.model.update(name="adm", model_channels=256, channel_mult=(1, 1, 1), num_res_blocks=3,
                 attention_resolutions=(16, 8), num_head_channels=-1, num_heads=1,
                 dropout=0.2, use_scale_shift_norm=True, resblock_updown=True,
                 num_groups=32, cond_dim=0, dtype="float32", remat=False)
  vp_fields(c, prediction="x", loss_weight="snr_trunc")
  c.optim.update(name="adamw", lr=2e-4, weight_decay=0.001, warmup_steps=1000, grad_clip=1.0)
  c.ema.update(rates=(0.9999,), halflife_kimg=0.0)
  c.training.update(batch_size=128, num_steps=800_000, log_every=100, save_every=5_000,
                    sample_every=10_000)
  c.sample.update(num_steps=1024, batch_size=256)
  if variant == "tiny":
    c.data.update(image_size=8)
    c.model.update(model_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                   attention_resolutions=(4,), num_heads=1, num_groups=8, dropout=0.0)
    c.optim.update(warmup_steps=0)
    c.training.update(batch_size=8, num_steps=2, log_every=1, save_every=2, sample_every=0)
    c.sample.update(num_steps=4, batch_size=8, grid_size=8)
  return c
