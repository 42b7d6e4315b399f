"""Class-conditional VP diffusion teacher on ImageNet 64x64 as google-research/
diffusion_distillation trains it (`config/imagenet64_base.py`), with label dropout for
classifier-free guidance: the teacher of guided distillation (Meng et al. 2023).

  python train.py --config configs/imagenet64_vp.py --workdir gs://bucket/runs/in64_vp \
      --config.data.data_dir=gs://bucket/tensorflow_datasets --distributed

Reference settings kept: cosine logSNR on [-20, 20], 'both' output (x and eps channels,
reconciled with weight sigma^2 on x), loss weight snr_trunc, batch 2048, Adam lr 3e-4
after 1,000 warm-up steps, grad clip 1, EMA 0.9999, dropout 0.1, no flips, 1000 classes;
network widths 192, mult 1-2-3-4, 3 res blocks, attention at 32/16/8 with 64 channels per
head, resblock resampling (our ADM UNet). Label dropout 0.1 (Ho & Salimans 2022) is ours:
the reference base model is trained without it; Meng et al. distil a guided teacher.
"""
from configs.base import base_config, check_arg, vp_fields


def get_config(arg: str = ""):
  variant = check_arg(arg)
  c = base_config()
  c.data.update(name="tfds", tfds_name="imagenet_resized/64x64", image_size=64, channels=3,
                random_flip=False, num_classes=1000, num_threads=16)
  c.model.update(name="adm", model_channels=192, channel_mult=(1, 2, 3, 4), num_res_blocks=3,
                 attention_resolutions=(32, 16, 8), num_head_channels=64, dropout=0.1,
                 use_scale_shift_norm=True, resblock_updown=True, num_groups=32, cond_dim=0,
                 dtype="float32", remat=False)
  vp_fields(c, prediction="both", loss_weight="snr_trunc", label_dropout=0.1)
  c.optim.update(name="adam", lr=3e-4, warmup_steps=1000, grad_clip=1.0)
  c.ema.update(rates=(0.9999,), halflife_kimg=0.0)
  c.training.update(batch_size=2048, num_steps=500_000, log_every=100, save_every=2_000,
                    sample_every=10_000)
  c.sample.update(num_steps=1024, batch_size=256)
  if variant == "tiny":
    c.data.update(image_size=8)
    c.model.update(model_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                   attention_resolutions=(4,), num_head_channels=8, num_groups=8, dropout=0.0)
    c.optim.update(warmup_steps=0)
    c.training.update(batch_size=8, num_steps=2, log_every=1, save_every=2, sample_every=0)
    c.sample.update(num_steps=4, batch_size=8, grid_size=8)
  return c
