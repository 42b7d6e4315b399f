"""EDM teacher on class-conditional ImageNet 64x64 with the ADM network.

  python train.py --config configs/imagenet64_edm.py --workdir gs://bucket/runs/in64_edm \
      --config.data.data_dir=gs://bucket/tensorflow_datasets
  python train.py --config configs/imagenet64_edm.py --dry_run    # params: 295899267

Network: ADM as openai/consistency_models configures it for ImageNet 64 (192
channels, mult 1-2-3-4, 3 res blocks, attention at 32/16/8 with 64 channels per
head, scale-shift norm, resblock up/down, 1000 classes): 295,899,267 params.
Training hyper-parameters: EDM paper (Karras et al. 2022) Table 7, ImageNet-64
column: batch 4096, Adam lr 1e-4 (beta 0.9/0.999, eps 1e-8; also the lr of
openai/consistency_models' EDM ImageNet-64 launch script), lr ramp-up over
10 Mimg, EMA half-life 50 Mimg, dropout 10%, 2500 Mimg of training. EDM's
geometric augmentation is not implemented; flips are off as in EDM's ImageNet run.
Sampling: EDM Algorithm 2 with the paper's ImageNet settings (Table 5):
S_churn 40, S_min 0.05, S_max 50, S_noise 1.003, 256 steps.
"""
from configs.base import base_config, check_arg


def get_config(arg: str = ""):
  variant = check_arg(arg)
  c = base_config()
  c.data.update(name="tfds", tfds_name="imagenet_resized/64x64", image_size=64,
                channels=3, random_flip=False, num_classes=1000,
                num_threads=16)
  c.model.update(name="adm", model_channels=192, channel_mult=(1, 2, 3, 4), num_res_blocks=3,
                 attention_resolutions=(32, 16, 8), num_head_channels=64, dropout=0.1,
                 use_scale_shift_norm=True, resblock_updown=True, num_groups=32, cond_dim=0,
                 dtype="float32", remat=False)
  batch = 4096
  c.optim.update(name="adam", lr=1e-4, b1=0.9, b2=0.999, eps=1e-8,
                 warmup_steps=10_000_000 // batch)
  c.ema.update(halflife_kimg=50_000.0, rampup_ratio=0.05)
  c.training.update(batch_size=batch, num_steps=2_500_000_000 // batch, log_every=100,
                    save_every=2_000, sample_every=10_000)
  c.sample.update(sampler="edm_stochastic", num_steps=256, s_churn=40.0, s_min=0.05,
                  s_max=50.0, s_noise=1.003, batch_size=256)
  if variant == "tiny":
    c.data.update(image_size=8)
    c.model.update(model_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                   attention_resolutions=(4,), num_head_channels=8, num_groups=8, dropout=0.0)
    c.optim.update(warmup_steps=0)
    c.training.update(batch_size=8, num_steps=2, log_every=1, save_every=2, sample_every=0)
    c.sample.update(num_steps=4, batch_size=8, grid_size=8)
  return c
