"""Stable Diffusion on a CPU: cm_jax's Flax path against diffusers' PyTorch pipeline, side by side.

  python benchmarks/sd_vs_diffusers.py                       # tiny + small, every core
  python benchmarks/sd_vs_diffusers.py --configs small --batch 4 --repeats 7 --threads 2 \
      --json sd_vs_diffusers.json

For each configuration a random-weight diffusers `StableDiffusionPipeline` folder is written
offline into a temporary directory (tests/sd_tiny.py's recipe: torch init plus small noise,
so no layer is zero; SD 1.5's DDIMScheduler settings):

  tiny    tests/sd_tiny.py's folder itself: UNet (8, 16) channels, 8x8x4 latents, CLIP width 16
  small   UNet (64, 128, 128) channels, 2 cross-attention levels, 8 heads, 16x16x4 latents,
          CLIP width 64 (4 layers), cross_attention_dim 64
  medium  (not run by default) UNet (128, 256, 256), 2 resnets per level, 32x32x4 latents,
          CLIP width 128 (4 layers)

That one folder is read by diffusers (torch, float32) and by cm_jax (`sd_folder.load_sd_folder`
and `configs/sd15_ldm.from_folder`: safetensors, Flax float32), so both run identical weights
on identical inputs (the same noise, NCHW for torch and NHWC for JAX; the same prompt).
Timed, each after a warm-up call, --repeats times with time.perf_counter, the two frameworks
interleaved (cm_jax, diffusers, cm_jax, ...) so that other load on the machine falls on both:

  unet      one UNet forward at batch B: a jitted `UNet2DCondition.apply` against
            `UNet2DConditionModel(...)` under torch.no_grad()
  ddim20    text-to-image latents: 20 DDIM steps with classifier-free guidance w (the cond and
            uncond halves in one batch of 2B per step, text encoding included): a jitted
            `LatentDiffusion.sample_latents` against `StableDiffusionPipeline(prompt,
            num_images_per_prompt=B, guidance_scale=1 + w, latents=..., output_type="latent")`

img/s is B / the median call time (the best is in the JSON); ratio = cm_jax / diffusers
img/s; `max diff` is the largest |cm_jax - diffusers| over the outputs (a speed comparison of
different computations would mean nothing); `compile s` is cm_jax's trace + XLA compile of
that function, paid once per shape and not in img/s (diffusers' first, warm-up call is
reported beside it).

Threads: torch.set_num_threads(N) and, for XLA, the process's CPU affinity restricted to N
CPUs (XLA's CPU thread pool is sized from the schedulable CPUs; jax 0.10's XLA has no
intra_op_parallelism_threads flag: `--intra_op_parallelism_threads` is a fatal unknown flag
and the bare form is ignored), plus --xla_cpu_multi_thread_eigen=true. N defaults to every
CPU this process may run on. All of it is set before jax or torch is imported, and the
output states N and the load average. On a machine whose cores other processes also use,
run --threads 1 as well: with N threads on N busy cores each of torch's OpenMP parallel
regions waits for its descheduled threads, and the PyTorch side slows down by one to two
orders of magnitude (XLA's thread pool degrades far less), which measures the sharing, not
the frameworks.

  python benchmarks/sd_vs_diffusers.py --threads 1

cm_jax's attention on CPU is `cm_jax.nets.attention._heads_first` (heads ahead of tokens,
normalised after the PV product, sliced when large): with jax.nn.dot_product_attention's
XLA path, which lays the products out (batch, tokens, heads, width), the small UNet ran at
0.95x diffusers' throughput (one thread), with this path at 1.2x (measured when it was
introduced). --budget_s caps the time spent repeating one measurement (two calls at least).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for _path in (ROOT, os.path.join(ROOT, "tests")):  # tests/ for sd_tiny's folder recipe
  if _path not in sys.path:
    sys.path.insert(0, _path)

PROMPT = "a red cat"
CONFIGS = ("tiny", "small", "medium")
DEFAULT_CONFIGS = ("tiny", "small")
DEFAULT_BATCH = {"tiny": 8, "small": 4, "medium": 2}


def _clip_text(hidden: int, layers: int, heads: int) -> dict:
  return dict(hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
              num_attention_heads=heads, max_position_embeddings=77, projection_dim=hidden)


def folder_spec(name: str) -> dict:
  """UNet / VAE / CLIP text configs of a benchmark configuration (tiny: sd_tiny's)."""
  import sd_tiny  # pylint: disable=g-import-not-at-top
  if name == "small":
    unet = dict(sample_size=16, in_channels=4, out_channels=4, block_out_channels=(64, 128, 128),
                layers_per_block=1, norm_num_groups=32, attention_head_dim=8,
                cross_attention_dim=64,
                down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))
    return dict(unet=unet, vae=dict(sd_tiny.vae_kwargs(), sample_size=32),
                text=_clip_text(64, 4, 4))
  if name == "medium":
    unet = dict(sample_size=32, in_channels=4, out_channels=4, block_out_channels=(128, 256, 256),
                layers_per_block=2, norm_num_groups=32, attention_head_dim=8,
                cross_attention_dim=128,
                down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))
    return dict(unet=unet, vae=dict(sd_tiny.vae_kwargs(), sample_size=64),
                text=_clip_text(128, 4, 4))
  raise ValueError(f"unknown configuration {name!r}; choose from {CONFIGS}")


def make_folder(name: str, path: str, *, time_cond_proj_dim=None, scheduler="ddim") -> str:
  """Writes configuration `name`'s random-weight pipeline folder at `path`, as
  tests/sd_tiny.make_tiny_sd_folder does (which writes `tiny` itself), with its options: a
  `time_cond_proj_dim`-wide guidance input on the UNet, a 'ddim' or 'lcm' scheduler (an LCM
  folder: benchmarks/lcm_vs_diffusers.py)."""
  import shutil  # pylint: disable=g-import-not-at-top
  import sd_tiny  # pylint: disable=g-import-not-at-top
  if name == "tiny":
    return sd_tiny.make_tiny_sd_folder(path, time_cond_proj_dim=time_cond_proj_dim,
                                       scheduler=scheduler)
  import torch  # pylint: disable=g-import-not-at-top
  from diffusers import (AutoencoderKL, DDIMScheduler,  # pylint: disable=g-import-not-at-top
                         LCMScheduler, StableDiffusionPipeline, UNet2DConditionModel)
  from transformers import CLIPTextConfig, CLIPTextModel  # pylint: disable=g-import-not-at-top
  from cm_jax.data import text_tokenizer  # pylint: disable=g-import-not-at-top
  spec = folder_spec(name)
  tok_dir = path + ".tokenizer-src"
  text_tokenizer.write_word_level_tokenizer(sd_tiny.WORDS, tok_dir)
  tokenizer = text_tokenizer.load_tokenizer(tok_dir)
  torch.manual_seed(0)
  unet = UNet2DConditionModel(**spec["unet"], time_cond_proj_dim=time_cond_proj_dim)
  vae = AutoencoderKL(**spec["vae"])
  text_encoder = CLIPTextModel(CLIPTextConfig(
      vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
      **spec["text"]))
  with torch.no_grad():
    for model in (unet, vae, text_encoder):
      for p in model.parameters():
        p.add_(sd_tiny.NOISE * torch.randn_like(p))
  pipe = StableDiffusionPipeline(
      vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
      scheduler={"ddim": DDIMScheduler, "lcm": LCMScheduler}[scheduler](
          **sd_tiny.scheduler_kwargs()), safety_checker=None,
      feature_extractor=None, requires_safety_checker=False)
  pipe.save_pretrained(path, safe_serialization=True)
  # As sd_tiny: the CLIP vocab.json + merges.txt that cm_jax's tokenizer reader takes.
  shutil.rmtree(os.path.join(path, "tokenizer"))
  shutil.move(tok_dir, os.path.join(path, "tokenizer"))
  return path


# ----------------------------------------------------------------------------- timing


def interleaved(fns: dict, repeats: int, budget_s: float) -> dict:
  """{name: [seconds per call]}, the callables run in turn each round (each must return only
  once its work is done): `repeats` rounds, fewer (two at least) once `budget_s` is spent."""
  times = {k: [] for k in fns}
  start = time.perf_counter()
  for i in range(repeats):
    if i >= 2 and time.perf_counter() - start > budget_s:
      break
    for k, fn in fns.items():
      t0 = time.perf_counter()
      fn()
      times[k].append(time.perf_counter() - t0)
  return times


def timed_first(fn) -> tuple[float, object]:
  t0 = time.perf_counter()
  out = fn()
  return time.perf_counter() - t0, out


def bench_config(name: str, workdir: str, batch: int, repeats: int, steps: int, w: float,
                 budget_s: float, skip_sampling: bool = False) -> list[dict]:
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  from diffusers import StableDiffusionPipeline  # pylint: disable=g-import-not-at-top
  from cm_jax.nets import sd_folder  # pylint: disable=g-import-not-at-top
  from cm_jax.train import builders  # pylint: disable=g-import-not-at-top
  from configs import sd15_ldm  # pylint: disable=g-import-not-at-top

  path = make_folder(name, os.path.join(workdir, name))
  pipe = StableDiffusionPipeline.from_pretrained(path, safety_checker=None,
                                                 requires_safety_checker=False)
  pipe.set_progress_bar_config(disable=True)
  tunet = pipe.unet.eval()
  n_params = sum(p.numel() for p in tunet.parameters())
  config = sd15_ldm.from_folder(path)
  method = builders.build_parts(config).method
  folder = sd_folder.load_sd_folder(path, components=("unet",))
  unet = folder.unet()
  unet_params = jax.device_put(folder.unet_params)
  ucfg = folder.unet_config
  side, ch = int(ucfg["sample_size"]), int(ucfg.get("in_channels", 4))
  rng = np.random.default_rng(0)
  rows = []
  base = dict(config=name, unet_params=int(n_params), batch=batch,
              latent_shape=[side, side, ch])

  # (1) the UNet forward alone: latents, timestep 500 for every image, random text states.
  x = rng.standard_normal((batch, side, side, ch)).astype(np.float32)
  ctx = rng.standard_normal((batch, 77, int(ucfg["cross_attention_dim"]))).astype(np.float32)
  t = np.full((batch,), 500, np.int64)
  fwd = jax.jit(lambda p, x, t, c: unet.apply({"params": p}, x, t, context=c))
  jx, jt, jc = jnp.asarray(x), jnp.asarray(t, jnp.float32), jnp.asarray(ctx)
  compile_s, compiled = timed_first(lambda: fwd.lower(unet_params, jx, jt, jc).compile())
  tx = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
  tt, tc = torch.from_numpy(t), torch.from_numpy(ctx)

  def torch_fwd():
    with torch.no_grad():
      return tunet(tx, tt, encoder_hidden_states=tc).sample

  ours = np.asarray(jax.block_until_ready(compiled(unet_params, jx, jt, jc)))
  first_s, theirs = timed_first(torch_fwd)
  diff = float(np.max(np.abs(ours - theirs.numpy().transpose(0, 2, 3, 1))))
  times = interleaved({"cm_jax": lambda: jax.block_until_ready(compiled(unet_params, jx, jt, jc)),
                       "diffusers": torch_fwd}, repeats, budget_s)
  rows.append(dict(base, what="unet", times=times, max_diff=diff, compile_s=compile_s,
                   diffusers_first_s=first_s))
  if skip_sampling:
    return rows

  # (2) 20-step DDIM text-to-image latents with classifier-free guidance.
  noise = rng.standard_normal((batch, side, side, ch)).astype(np.float32)
  ids = method.parts.tokenize([PROMPT])
  params = jax.device_put(method.sampling_params(folder.unet_params))
  # The prompt ids are a constant of the program (sample_latents reads them on the host).
  sample = jax.jit(lambda p, z: method.sample_latents(p, z, None, None, steps, sampler="ddim",
                                                      guidance=w, prompt_ids=ids))
  jz = jnp.asarray(noise)
  compile_s, compiled_s = timed_first(lambda: sample.lower(params, jz).compile())
  tz = torch.from_numpy(noise.transpose(0, 3, 1, 2).copy())

  def torch_sample():
    return pipe(PROMPT, num_images_per_prompt=batch, num_inference_steps=steps,
                guidance_scale=1.0 + w, latents=tz, output_type="latent").images

  ours = np.asarray(jax.block_until_ready(compiled_s(params, jz)))
  first_s, theirs = timed_first(torch_sample)
  diff = float(np.max(np.abs(ours - theirs.numpy().transpose(0, 2, 3, 1))))
  times = interleaved({"cm_jax": lambda: jax.block_until_ready(compiled_s(params, jz)),
                       "diffusers": torch_sample}, repeats, budget_s)
  rows.append(dict(base, what=f"ddim{steps} w={w:g}", times=times, max_diff=diff,
                   latent_scale=float(np.max(np.abs(theirs.numpy()))), compile_s=compile_s,
                   diffusers_first_s=first_s))
  return rows


def summarize(row: dict) -> dict:
  for side in ("cm_jax", "diffusers"):
    ts = row["times"][side]
    row[f"{side}_median_s"] = statistics.median(ts)
    row[f"{side}_best_s"] = min(ts)
    row[f"{side}_img_s"] = row["batch"] / statistics.median(ts)
  row["calls"] = len(row["times"]["cm_jax"])
  row["ratio"] = row["cm_jax_img_s"] / row["diffusers_img_s"]
  row["ratio_best"] = row["diffusers_best_s"] / row["cm_jax_best_s"]
  return row


def format_table(rows: list[dict]) -> str:
  lines = ["| config | measured | UNet params | batch | calls | cm_jax img/s | diffusers img/s | "
           "ratio (cm_jax / diffusers) | ratio of bests | max diff | cm_jax compile s | "
           "diffusers first call s |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    diff = f"{r['max_diff']:.1e}"
    if "latent_scale" in r:  # random weights under guidance: latents far from unit scale
      diff += f" (max abs latent {r['latent_scale']:.3g})"
    lines.append(f"| {r['config']} | {r['what']} | {r['unet_params'] / 1e6:.3f}M | {r['batch']} | "
                 f"{r['calls']} | "
                 f"{r['cm_jax_img_s']:.2f} | {r['diffusers_img_s']:.2f} | {r['ratio']:.2f} | "
                 f"{r['ratio_best']:.2f} | {diff} | {r['compile_s']:.1f} | "
                 f"{r['diffusers_first_s']:.2f} |")
  return "\n".join(lines)


def set_threads(n: int) -> dict:
  """Pins both frameworks to n threads (before jax / torch are imported); returns what was
  set, for the output."""
  cpus = sorted(os.sched_getaffinity(0))
  if n < len(cpus):
    os.sched_setaffinity(0, cpus[:n])  # XLA sizes its CPU thread pool from this
  flags = os.environ.get("XLA_FLAGS", "")
  if "xla_cpu_multi_thread_eigen" not in flags:
    os.environ["XLA_FLAGS"] = (flags + " --xla_cpu_multi_thread_eigen=true").strip()
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  import torch  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(n)
  return dict(threads=n, cpus=sorted(os.sched_getaffinity(0)), torch_threads=torch.get_num_threads(),
              xla_flags=os.environ["XLA_FLAGS"])


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--configs", nargs="+", default=list(DEFAULT_CONFIGS), choices=CONFIGS)
  parser.add_argument("--batch", type=int, default=None,
                      help="images per call (default: " +
                           ", ".join(f"{k} {v}" for k, v in DEFAULT_BATCH.items()) + ")")
  parser.add_argument("--repeats", type=int, default=5, help="timed calls per side")
  parser.add_argument("--budget_s", type=float, default=60.0,
                      help="stop repeating a measurement (after two calls) past this many seconds")
  parser.add_argument("--steps", type=int, default=20, help="DDIM steps")
  parser.add_argument("--guidance", type=float, default=3.0,
                      help="cm_jax's w (diffusers guidance_scale = 1 + w)")
  parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                      help="threads for torch and XLA (default: every CPU this process may use)")
  parser.add_argument("--unet_only", action="store_true", help="skip the DDIM sampling rows")
  parser.add_argument("--json", default=None, metavar="OUT", help="also write the rows as JSON")
  args = parser.parse_args(argv)

  setting = set_threads(args.threads)
  import diffusers  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  from diffusers.utils import logging as dlog  # pylint: disable=g-import-not-at-top
  dlog.set_verbosity_error()
  load_before = os.getloadavg()
  t_start = time.perf_counter()
  rows = []
  with tempfile.TemporaryDirectory(prefix="sd_vs_diffusers.") as workdir:
    for name in args.configs:
      print(f"benchmarking {name} ...", file=sys.stderr, flush=True)
      batch = args.batch or DEFAULT_BATCH[name]
      rows += [summarize(r)
               for r in bench_config(name, workdir, batch, args.repeats, args.steps,
                                     args.guidance, args.budget_s, args.unet_only)]
  meta = dict(setting, jax=jax.__version__, torch=torch.__version__,
              diffusers=diffusers.__version__, backend=jax.default_backend(),
              load_average_before=load_before, load_average_after=os.getloadavg(),
              wall_s=time.perf_counter() - t_start, prompt=PROMPT, guidance_w=args.guidance,
              steps=args.steps)
  print(f"threads: {setting['threads']} (torch.set_num_threads; XLA on CPUs {setting['cpus']}), "
        f"float32, jax {meta['jax']} / torch {meta['torch']} / diffusers {meta['diffusers']}; "
        f"median of `calls` interleaved calls; load average "
        f"{load_before[0]:.2f} before, {meta['load_average_after'][0]:.2f} after; "
        f"wall {meta['wall_s']:.0f} s")
  print(format_table(rows))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(dict(meta=meta, rows=rows), f, indent=2)
    print(f"wrote {args.json}", file=sys.stderr)


if __name__ == "__main__":
  main()
