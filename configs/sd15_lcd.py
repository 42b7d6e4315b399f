"""Latent consistency distillation (LCM Algorithm 1, Luo et al. 2023, "Latent Consistency
Models") of Stable Diffusion 1.5 into a 1-8 step text-to-image model with a guidance
embedding, and the config of any released LCM folder (`from_folder`).

  python train.py --config configs/sd15_lcd.py --workdir runs/sd15_lcd \
      --config.method.pretrained=/path/to/stable-diffusion-v1-5 \
      --config.data.name=webdataset --config.data.path=/data/laion_aesthetics_6plus \
      --config.data.tokenizer=/path/to/stable-diffusion-v1-5/tokenizer
  python sample.py --workdir runs/sd15_lcd --prompt "a red cat" --steps 4 --guidance 7.5 \
      --num 4 --out cats.npz
  python -m cm_jax.interop export --workdir runs/sd15_lcd --format diffusers --out hf/lcm
      # a LatentConsistencyModelPipeline folder
  python sample.py --pretrained /path/to/LCM_Dreamshaper_v7 --prompt "a red cat" --steps 4

The paper's recipe (Sec. 5, LAION-Aesthetics-6+ at 512 px): the teacher is Stable
Diffusion (the UNet of method.pretrained, a diffusers folder; or method.teacher_workdir, an
ldm run), the student the same UNet plus a 256-wide `time_cond_proj_dim` layer fed w; the
skipping-step DDIM solver over 50 of the 1000 timesteps (k = 20), the pseudo-Huber loss
(c = 0.001), an EMA target at 0.95. Its FID at w = 8 over 1 / 2 / 4 / 8 steps: LCM
35.36 / 13.31 / 11.10 / 11.84, DDIM 183.29 / 81.05 / 22.38 / 13.83. What the paper does not
pin down is taken from diffusers' `train_lcm_distill_sd_wds.py`: AdamW lr 1e-4 (wd 1e-2,
500 warmup steps, gradient norm 1), batch 16 at 512 px, w ~ U[5, 15] (the script's range;
the paper's is [2, 14]). The training budget (num_steps) is ours. Sampling: the LCM
sampler (LCMScheduler), 4 steps at the paper's evaluation guidance w = 8.

`:tiny` is the test variant: SD 1.5's layout at toy widths (tests/sd_tiny.py's folder, an
8-wide guidance embedding) on 16 px digits with captions; the tests point
method.pretrained (the teacher) and data.tokenizer at the tiny random folder.
"""
import ml_collections

from configs import digits32_lcd, sd15_ldm
from configs.base import check_arg

W_RANGE = (5.0, 15.0)         # train_lcm_distill_sd_wds.py's w_min / w_max
PAPER_W_RANGE = (2.0, 14.0)   # LCM Sec. 5.1; what the released LCMs were trained on
PIPELINE_GUIDANCE = 7.5       # LatentConsistencyModelPipeline's guidance_scale 8.5 = 1 + w


def lcd_recipe(c, **method_overrides) -> None:
  """Turns an sd15_ldm-style config (the teacher's shapes and frozen parts) into its LCD
  student, in place: the method fields (`digits32_lcd.lcm_method_fields`), the reference
  script's optimizer and batch, the LCM sampler."""
  fields = dict(teacher_workdir="", w_min=W_RANGE[0], w_max=W_RANGE[1])
  fields.update(method_overrides)
  c.method = digits32_lcd.lcm_method_fields(c.method, **fields)
  c.optim.update(name="adamw", lr=1e-4, weight_decay=1e-2, warmup_steps=500, grad_clip=1.0)
  # The student is read online (the reference script saves the online UNet); the 0.95 EMA
  # target lives in the train state.
  c.ema.update(halflife_kimg=0.0, rates=())
  c.training.update(batch_size=16, num_steps=10_000, log_every=50, save_every=1000,
                    sample_every=1000)
  c.sample.update(sampler="lcm", num_steps=4, guidance=8.0, params="online")


def tiny_fields(c) -> None:
  """The `:tiny` run, in place: 2 steps of batch 2 on 16 px digits with captions (the tiny
  folder's VAE takes 16x16x3 images; its word-level tokenizer knows the digit captions)."""
  c.data.update(name="digits_captions", image_size=16, channels=3, num_classes=10)
  c.optim.update(warmup_steps=0)
  c.training.update(batch_size=2, num_steps=2, log_every=1, save_every=2, sample_every=0)
  c.sample.update(num_steps=2, grid_size=2, batch_size=2)


def get_config(arg: str = ""):
  variant = check_arg(arg)
  c = sd15_ldm.get_config(arg)  # SD 1.5's UNet, VAE, CLIP and schedule (or the toy ones)
  c.model.time_cond_proj_dim = 8 if variant == "tiny" else 256
  lcd_recipe(c)
  if variant == "tiny":
    tiny_fields(c)
  return c


def is_lcm_folder(folder: str) -> bool:
  """Whether a diffusers folder's scheduler is an LCMScheduler (a released LCM, e.g. the
  `SimianLuo/LCM_Dreamshaper_v7` layout); a folder without one is a one-line error."""
  scheduler = sd15_ldm.read_folder_config(folder, "scheduler", "scheduler_config.json")
  return scheduler.get("_class_name") == "LCMScheduler"


def from_folder(folder: str):
  """The config of an LCM diffusers folder (LCMScheduler; its UNet has a guidance embedding,
  `time_cond_proj_dim`), read from its configs only: method 'lcd' with the folder as
  method.pretrained, the scheduler's original_inference_steps and timestep_scaling, and
  the LCM sampler at 4 steps and the pipeline's default guidance."""
  scheduler = sd15_ldm.read_folder_config(folder, "scheduler", "scheduler_config.json")
  if scheduler.get("_class_name") != "LCMScheduler":
    raise ValueError(f"{folder!r} is not an LCM folder: its scheduler is "
                     f"{scheduler.get('_class_name')!r}, not LCMScheduler")
  unet = sd15_ldm.read_folder_config(folder, "unet")
  c = sd15_ldm.from_folder(folder)
  c.data.tokenizer = f"{folder}/tokenizer"  # for fine-tuning on captions (lcf)
  embedding = bool(unet.get("time_cond_proj_dim"))
  # The folder does not record the range of w it was trained on: the paper's, which the
  # released LCMs used, so only guidance outside it draws sample.py's warning.
  lcd_recipe(c, pretrained=folder, w_embedding=embedding,
             w_min=PAPER_W_RANGE[0], w_max=PAPER_W_RANGE[1],
             num_ddim_timesteps=int(scheduler.get("original_inference_steps", 50)),
             timestep_scaling=float(scheduler.get("timestep_scaling", 10.0)))
  # Without an embedding (e.g. an LCM-LoRA fused into SD) guidance costs two evaluations
  # and LCM-LoRA's guide recommends none: guidance_scale 1.
  c.sample.update(guidance=PIPELINE_GUIDANCE if embedding else 0.0)
  return c
