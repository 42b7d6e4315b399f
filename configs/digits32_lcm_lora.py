"""LCM-LoRA (Luo et al. 2023b, "LCM-LoRA: A Universal Stable-Diffusion Acceleration Module")
of the digits32 latent teacher: LoRA adapters distilled with LCD, the teacher frozen.

  python train.py --config configs/digits32_lcm_lora.py --workdir runs/digits32_lcm_lora \
      --config.data.name=latent_cache --config.data.path=runs/digits32_latents
  python -m cm_jax.interop export --workdir runs/digits32_lcm_lora --format lora \
      --out hf/digits32_lcm_lora        # pytorch_lora_weights.safetensors

As diffusers' `train_lcm_distill_lora_sd_wds.py`: the student is the teacher's UNet plus
LoRA adapters on its attention projections, feed-forward and convolution layers
(`cm_jax.nets.lora.LCM_LORA_TARGETS`); only the adapters are trained, checkpointed and held
in the optimizer state; no w-embedding (w is drawn from [w_min, w_max] for the teacher's
guidance and baked into the adapters) and no separate target network (the target is the
online student under stop-gradient). Rank 64, alpha 64 on SD; rank 16 here for a 3M-parameter
UNet. The digits guidance range matches `digits32_lcd.py` (w = 2 at its centre: sampled with
--guidance 0, since a LoRA student has the guidance built in). `:tiny` is the test variant.
"""
from configs import digits32_lcd
from configs.base import check_arg


def get_config(arg: str = ""):
  variant = check_arg(arg)
  c = digits32_lcd.get_config(arg)
  from cm_jax.nets import lora  # pylint: disable=g-import-not-at-top
  c.model.time_cond_proj_dim = None
  c.method.update(w_embedding=False, w_min=2.0, w_max=2.0, lora_rank=16, lora_alpha=16,
                  lora_targets=tuple(lora.LCM_LORA_TARGETS))
  c.optim.update(lr=1e-4)
  c.sample.update(guidance=0.0)
  if variant == "tiny":
    c.method.update(lora_rank=2, lora_alpha=2)
  return c
