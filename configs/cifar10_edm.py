"""EDM teacher on unconditional CIFAR-10 with the NCSN++ network.

  python train.py --config configs/cifar10_edm.py --workdir runs/cifar10_edm \
      --config.data.data_dir=~/tensorflow_datasets
  python sample.py --workdir runs/cifar10_edm --num 50000 --steps 18 --out cifar10_edm.npz

Unconditional, as the consistency-models CIFAR-10 benchmarks are (Song et al.
2023); --config.data.num_classes=10 gives the class-conditional model.
Network: NCSN++ (Song et al. 2021) as EDM and consistency_models_cifar10 use it:
128 channels, mult 2-2-2, 4 res blocks, attention at 16, FIR resampling,
Fourier noise embedding, skip rescaling: 56,395,651 parameters.
Training hyper-parameters: EDM paper (Karras et al. 2022) Table 7, CIFAR-10
column: batch 512, Adam lr 1e-3 (beta 0.9/0.999, eps 1e-8), lr ramp-up over 10
Mimg, EMA half-life 0.5 Mimg, dropout 13%, 200 Mimg of training. EDM's
geometric augmentation (p = 0.12) is not implemented; horizontal flips are on.
Sampling: Heun, 18 steps (NFE 35); EDM Table 2 reports FID 1.98 for this network
(unconditional VE, NCSN++; 1.97 is the VP / DDPM++ figure).
"""
from configs.base import base_config, check_arg


def get_config(arg: str = ""):
  variant = check_arg(arg)
  c = base_config()
  c.data.update(name="tfds", tfds_name="cifar10", image_size=32, channels=3, random_flip=True,
                num_classes=0, num_threads=16)
  c.model.update(name="ncsnpp", model_channels=128, channel_mult=(2, 2, 2), num_res_blocks=4,
                 attention_resolutions=(16,), dropout=0.13, embedding_type="fourier",
                 resample="fir", skip_rescale=True, progressive_input="residual",
                 progressive="none", resblock_type="biggan", cond_dim=0, dtype="float32",
                 remat=False)
  batch = 512
  c.optim.update(name="adam", lr=1e-3, b1=0.9, b2=0.999, eps=1e-8,
                 warmup_steps=10_000_000 // batch)
  c.ema.update(halflife_kimg=500.0, rampup_ratio=0.05)
  c.training.update(batch_size=batch, num_steps=200_000_000 // batch, log_every=100,
                    save_every=5_000, sample_every=10_000)
  c.sample.update(sampler="heun", num_steps=18, batch_size=500)
  if variant == "tiny":
    c.data.update(image_size=8)
    c.model.update(model_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                   attention_resolutions=(4,), dropout=0.0)
    c.optim.update(warmup_steps=0)
    c.training.update(batch_size=8, num_steps=2, log_every=1, save_every=2, sample_every=0)
    c.sample.update(num_steps=4, batch_size=8, grid_size=8)
  return c
