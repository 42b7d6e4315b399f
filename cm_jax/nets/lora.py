"""LoRA adapters on Flax parameter trees (Hu et al. 2021, "LoRA: Low-Rank Adaptation of
Large Language Models", Sec. 4.1), laid out so they map one to one onto PEFT's LoRA layers
and the files diffusers reads (cm_jax.nets.lora_files), as LCM-LoRA needs (Luo et al.
2023b, "LCM-LoRA: A Universal Stable-Diffusion Acceleration Module").

The trainer's parameters are only the adapters; the base network stays frozen and is merged
with them when applied. For each adapted layer, with the Flax kernel layouts

  Dense kernel (in, out):         A (in, r),          B (r, out)
  Conv kernel  (kh, kw, in, out): A (kh, kw, in, r),  B (r, out)

the effective kernel is  W + scale * (A . B)  (the contraction over r), scale = alpha / r.
That is PEFT's LoRA forward with no dropout: its Linear LoRA is lora_B(lora_A(x)) with
lora_A: in -> r, lora_B: r -> out, and its Conv2d LoRA is a kh x kw conv in -> r (the base
conv's stride and padding) followed by a 1x1 conv r -> out, both linear, so they compose to
the one conv with the merged kernel. A starts as PEFT's default (kaiming-uniform with
a = sqrt(5) on the torch layout, i.e. U(-1/sqrt(fan_in), 1/sqrt(fan_in)) with fan_in =
in * kh * kw) and B at zero, so training starts from the base network.

A lora tree is a nested dict that mirrors the base tree down to each adapted module, whose
leaves are {"lora_A": A, "lora_B": B}, e.g.
  lora["down_blocks_0"]["attentions_0"]["transformer_blocks_0"]["attn1"]["to_q"]["lora_A"]
Modules are picked by their torch names (cm_jax.utils.torch_names: the Flax module tree of
the SD UNet carries diffusers' attribute names) with PEFT's rule for a list of
`target_modules`: a module is adapted when its dotted name equals a target or ends with
"." + target.
"""
from __future__ import annotations

import numbers
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import traverse_util

from cm_jax.utils.torch_names import torch_key

# The default target_modules of diffusers' LCM-LoRA trainer
# (examples/consistency_distillation/train_lcm_distill_lora_sd_wds.py): every linear and
# conv layer of the attention blocks and resnets, and the resamplers' convs, but not
# conv_in, conv_out or the time-embedding MLP. The same script's defaults: lora_rank 64,
# lora_alpha 64 (scale 1), lora_dropout 0, guidance w in [5, 15], learning rate 1e-4.
LCM_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out",
                    "ff.net.0.proj", "ff.net.2", "conv1", "conv2", "conv_shortcut",
                    "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj")
# The attention projections alone: a smaller adapter, for the attention-only option.
ATTENTION_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


def _matches(name: str, targets: Sequence[str]) -> bool:
  return any(name == t or name.endswith("." + t) for t in targets)


def lora_paths(base_params, targets: Sequence[str] = LCM_LORA_TARGETS) -> list[tuple[str, ...]]:
  """Flax module paths (leaf excluded) of every Dense / Conv kernel of `base_params` (arrays
  or ShapeDtypeStructs) whose torch name matches one of `targets`, in tree order."""
  targets = (targets,) if isinstance(targets, str) else tuple(targets)
  paths = [path[:-1] for path, leaf in traverse_util.flatten_dict(base_params).items()
           if path[-1] == "kernel" and len(leaf.shape) in (2, 4)
           and _matches(torch_key(path[:-1]), targets)]
  if not paths:
    raise ValueError(f"lora_paths: no Dense or Conv layer of the network is named like any of "
                     f"the LoRA targets {list(targets)}")
  return paths


def init_lora(rng, base_params, rank: int, targets: Sequence[str] = LCM_LORA_TARGETS) -> dict:
  """A fresh float32 lora tree of rank `rank` on the modules `lora_paths` picks: A as PEFT
  draws it, B zero (so merging it gives the base network back). Traceable (eval_shape)."""
  if isinstance(rank, bool) or not isinstance(rank, numbers.Integral) or rank < 1:
    raise ValueError(f"init_lora: rank must be a positive integer, not {rank!r}")
  flat = traverse_util.flatten_dict(base_params)
  paths = lora_paths(base_params, targets)
  out = {}
  rank = int(rank)
  for key, path in zip(jax.random.split(rng, len(paths)), paths):
    shape = tuple(flat[path + ("kernel",)].shape)
    fan_in = 1
    for d in shape[:-1]:  # kh * kw * in: torch's fan_in of lora_A's weight (r, in, kh, kw)
      fan_in *= d
    bound = 1.0 / fan_in ** 0.5  # kaiming-uniform's gain * sqrt(3 / fan_in) at a = sqrt(5)
    out[path + ("lora_A",)] = jax.random.uniform(key, shape[:-1] + (rank,), jnp.float32,
                                                 -bound, bound)
    out[path + ("lora_B",)] = jnp.zeros((rank, shape[-1]), jnp.float32)
  return traverse_util.unflatten_dict(out)


def lora_modules(lora) -> dict[tuple[str, ...], tuple]:
  """{module path: (A, B)} of a lora tree; a one-line error for a malformed one."""
  flat = traverse_util.flatten_dict(lora)
  modules: dict[tuple[str, ...], dict] = {}
  for path, value in flat.items():
    if path[-1] not in ("lora_A", "lora_B"):
      raise ValueError(f"lora tree: unexpected leaf {'/'.join(path)} (only lora_A and lora_B)")
    modules.setdefault(path[:-1], {})[path[-1]] = value
  out = {}
  for path, pair in modules.items():
    if len(pair) != 2:
      raise ValueError(f"lora tree: module {'/'.join(path)} lacks lora_A or lora_B")
    a, b = pair["lora_A"], pair["lora_B"]
    if a.shape[-1] != b.shape[0] or len(b.shape) != 2:
      raise ValueError(f"lora tree: module {'/'.join(path)} has lora_A {tuple(a.shape)} and "
                       f"lora_B {tuple(b.shape)}, which do not chain over one rank")
    out[path] = (a, b)
  return out


def lora_delta(a, b):
  """A . B, the kernel-shaped update: (..., in, r) x (r, out) -> (..., in, out)."""
  # Full float32 precision: on GPUs XLA may otherwise run float32 dots in TF32, and the
  # update is small next to W, so its rounding would show as a drift from PEFT's merge.
  return jnp.tensordot(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32), axes=1,
                       precision=jax.lax.Precision.HIGHEST)


def merge_lora(base_params, lora, scale=1.0):
  """`base_params` with W + scale * A.B on every module of `lora`, computed in float32 and
  cast back to each kernel's dtype. Jit-friendly (scale may be traced)."""
  flat = dict(traverse_util.flatten_dict(base_params))
  for path, (a, b) in lora_modules(lora).items():
    kernel = flat.get(path + ("kernel",))
    if kernel is None:
      raise ValueError(f"merge_lora: the base network has no kernel at {'/'.join(path)}; the "
                       f"LoRA is for another architecture")
    want = tuple(kernel.shape[:-1]) + (a.shape[-1],)
    if tuple(a.shape) != want or b.shape[1] != kernel.shape[-1]:
      raise ValueError(f"merge_lora: lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} do not fit "
                       f"the kernel {tuple(kernel.shape)} at {'/'.join(path)}; the LoRA is for "
                       f"another architecture")
    merged = jnp.asarray(kernel, jnp.float32) + scale * lora_delta(a, b)
    flat[path + ("kernel",)] = merged.astype(kernel.dtype)
  return traverse_util.unflatten_dict(flat)
