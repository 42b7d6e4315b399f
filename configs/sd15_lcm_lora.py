"""LCM-LoRA (Luo et al. 2023b, "LCM-LoRA: A Universal Stable-Diffusion Acceleration Module")
of Stable Diffusion 1.5: latent consistency distillation that trains only LoRA adapters on
the frozen teacher's UNet, so the result is a small file any SD 1.5 fine-tune can load.

  python train.py --config configs/sd15_lcm_lora.py --workdir runs/sd15_lcm_lora \
      --config.method.pretrained=/path/to/stable-diffusion-v1-5 \
      --config.data.name=webdataset --config.data.path=/data/laion_aesthetics_6plus \
      --config.data.tokenizer=/path/to/stable-diffusion-v1-5/tokenizer
  python -m cm_jax.interop export --workdir runs/sd15_lcm_lora --format lora --out hf/lora
      # pytorch_lora_weights.safetensors: pipe.load_lora_weights("hf/lora")
  python sample.py --pretrained /path/to/stable-diffusion-v1-5 \
      --lora hf/lora/pytorch_lora_weights.safetensors --prompt "a red cat" --steps 4

The recipe is LCD's (configs/sd15_lcd.py) with diffusers' `train_lcm_distill_lora_sd_wds.py`
defaults: rank 64, alpha 64 (scale 1), no dropout, its target modules (every attention
projection, feed-forward, resnet and resampler conv, the resnets' time projections:
`cm_jax.nets.lora.LCM_LORA_TARGETS`), w ~ U[5, 15], AdamW lr 1e-4 (wd 1e-2), batch 16. The
UNet keeps no w input (w only guides the teacher) and there is no separate target network:
the target is the online student under stop-gradient. (The script's default loss is l2;
its documented runs and this config use the pseudo-Huber loss, c = 0.001.) Sampling: the
LCM sampler, 4 steps, no guidance (diffusers' guidance_scale 1, as LCM-LoRA is used).
`:tiny` is the test variant on tests/sd_tiny.py's random folder (rank 4).
"""
from cm_jax.nets.lora import LCM_LORA_TARGETS
from configs import sd15_lcd, sd15_ldm
from configs.base import check_arg

LORA_RANK = 64
LORA_ALPHA = 64


def get_config(arg: str = ""):
  variant = check_arg(arg)
  c = sd15_ldm.get_config(arg)  # the teacher's UNet as it is: no time_cond_proj_dim
  rank = 4 if variant == "tiny" else LORA_RANK
  sd15_lcd.lcd_recipe(c, lora_rank=rank, lora_alpha=rank if variant == "tiny" else LORA_ALPHA,
                      lora_targets=LCM_LORA_TARGETS, w_embedding=False)
  c.sample.update(guidance=0.0)
  if variant == "tiny":
    sd15_lcd.tiny_fields(c)
  return c


def from_folder(folder: str):
  """The config that samples a (non-LCM) diffusers folder whose UNet has an LCM-LoRA merged
  into it (sample.py --pretrained DIR --lora FILE): the folder's shapes and schedule, an LCD
  student without a w input, the LCM sampler on LCMScheduler's defaults (the 50-step grid,
  timestep scaling 10), no guidance."""
  c = sd15_ldm.from_folder(folder)
  sd15_lcd.lcd_recipe(c, pretrained=folder, w_embedding=False)
  c.sample.update(guidance=0.0)
  return c
