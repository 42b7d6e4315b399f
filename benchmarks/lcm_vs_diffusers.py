"""Latent consistency models on a CPU: cm_jax's LCD train step and 4-step LCM sampling
against the same computations written with diffusers' PyTorch components.

  python benchmarks/lcm_vs_diffusers.py                        # tiny + small, every core
  python benchmarks/lcm_vs_diffusers.py --configs tiny,small --threads 1 --reps 7 \
      --batch 4 --out lcm_vs_diffusers          # also lcm_vs_diffusers.json / .md

The folders are benchmarks/sd_vs_diffusers.py's random-weight recipes (`make_folder`; tiny =
tests/sd_tiny.py's folder, small = UNet (64, 128, 128) at 16x16x4 latents), and so are the
thread setting (`set_threads`: torch.set_num_threads(N), XLA's pool through the CPU
affinity), the interleaved timing (`interleaved`: cm_jax, diffusers, cm_jax, ...) and the
compile / first-call accounting. Per configuration:

  lcd step  One latent consistency distillation step (LCM Algorithm 1) at batch B, the
            teacher a DDIM folder without a w input, the student its UNet plus a 256-wide
            `time_cond_proj_dim` layer.
            cm_jax: `cm_jax.train.step.make_train_step` of method 'lcd' (the config of
            tests/sd_tiny.lcd_config with the reference script's w ~ U[5, 15] and optimizer),
            jitted with the state donated as the training loop does, teacher_params =
            `method.load_teacher()`, batch {'latent': z, 'input_ids': ids}: text encoding, the
            draws of t_{n+k}, w and eps, the student forward + backward, the teacher's
            guided prediction (cond and empty prompt in one batch of 2B), the DDIM solver
            step, the EMA target's forward, pseudo-Huber loss, clip 1.0, AdamW (lr 1e-4, wd
            1e-2), the target's 0.95 EMA.
            diffusers: the step of diffusers' examples/consistency_distillation/
            train_lcm_distill_sd_wds.py on the same latents and prompts, float32 without
            autocast (its CPU autocast would run the teacher in bfloat16): CLIPTextModel
            under no_grad, DDPMScheduler.add_noise at t_{n+k}, the student
            UNet2DConditionModel with the guidance embedding, the teacher's conditional and
            empty-prompt forwards (two calls) under no_grad, the DDIM solver step, the target
            UNet under no_grad, pseudo-Huber (c = 0.001), backward, clip_grad_norm_(1.0),
            torch.optim.AdamW, the in-place EMA of the target; the empty-prompt states are
            encoded once, before the loop, as the script does.
            Both start from the same student (cm_jax's initial parameters converted with
            `torch_names.state_dict_from_params`); the parity call feeds diffusers cm_jax's
            own step-0 draws (t, w, eps from the step's key, as method.loss splits it), and
            `max diff` is the |loss| difference, with the largest |student| or |target|
            weight difference after that step and ||update difference|| / ||update|| (the
            JSON adds the gradient norms).
  lcm4      Text-to-image latents with 4 LCM steps, guidance w fed to the w embedding, B
            images of one prompt, text encoding included, on an LCM folder (the same recipe
            with time_cond_proj_dim = 256 and an LCMScheduler).
            cm_jax: `LatentConsistencyDistillation.sample_latents` jitted (method from
            configs/sd15_lcd.from_folder).
            diffusers: `LatentConsistencyModelPipeline(prompt, num_images_per_prompt=B,
            num_inference_steps=4, guidance_scale=1 + w, latents=..., output_type='latent')`.
            The same initial noise; for the parity call the scheduler's re-noising draws
            (`scheduling_lcm.randn_tensor`) hand out cm_jax's (step i of image j =
            normal(fold_in(keys[j], i))); the timed calls run the pipeline unpatched.

ratio = diffusers ms / cm_jax ms (median of the interleaved calls; > 1: cm_jax is faster).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
  sys.path.insert(0, HERE)
import sd_vs_diffusers as sdb  # pylint: disable=g-import-not-at-top,wrong-import-position

PROMPTS = ("a red cat", "a blue digit", "seven", "a handwritten digit three")
PROMPT = PROMPTS[0]
PROJ = 256                      # the reference script's unet_time_cond_proj_dim
W_RANGE = (5.0, 15.0)           # its w_min / w_max
HUBER_C, EMA_DECAY, LR, WD, CLIP = 0.001, 0.95, 1e-4, 1e-2, 1.0


# ----------------------------------------------------------------------------- LCD step


def lcd_config(folder: str):
  """tests/sd_tiny.lcd_config with the reference script's w range and optimizer (no warmup:
  the first, compared step then moves the weights)."""
  import sd_tiny  # pylint: disable=g-import-not-at-top
  c = sd_tiny.lcd_config(folder, time_cond_proj_dim=PROJ, w_min=W_RANGE[0], w_max=W_RANGE[1],
                         loss_type="huber", huber_c=HUBER_C, ema_decay=EMA_DECAY)
  c.optim.update(name="adamw", lr=LR, b1=0.9, b2=0.999, eps=1e-8, weight_decay=WD,
                 warmup_steps=0, grad_clip=CLIP, anneal="none")
  return c


class TorchLCD:
  """One step of train_lcm_distill_sd_wds.py (float32, no autocast), its modules built
  from the folder and the student's state dict."""

  def __init__(self, folder: str, student_state: dict, batch: int):
    import copy  # pylint: disable=g-import-not-at-top
    import numpy as np  # pylint: disable=g-import-not-at-top
    import torch  # pylint: disable=g-import-not-at-top
    from diffusers import DDPMScheduler, UNet2DConditionModel  # pylint: disable=g-import-not-at-top
    from transformers import CLIPTextModel  # pylint: disable=g-import-not-at-top
    self.torch = torch
    self.sched = DDPMScheduler.from_pretrained(folder, subfolder="scheduler")
    self.prediction = self.sched.config.prediction_type
    ac = self.sched.alphas_cumprod
    self.alphas, self.sigmas = torch.sqrt(ac), torch.sqrt(1 - ac)
    k = self.sched.config.num_train_timesteps // 50
    self.k = k
    self.grid = torch.from_numpy((np.arange(1, 51) * k).round().astype(np.int64) - 1)
    self.prev = torch.cat([ac[:1], ac[self.grid[:-1]]])  # the solver's alpha_cumprod_prev
    self.teacher = UNet2DConditionModel.from_pretrained(folder, subfolder="unet").eval()
    self.teacher.requires_grad_(False)
    self.text = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder").eval()
    self.text.requires_grad_(False)
    self.unet = UNet2DConditionModel.from_config(self.teacher.config, time_cond_proj_dim=PROJ)
    self.unet.load_state_dict({n: torch.from_numpy(np.array(v))
                               for n, v in student_state.items()}, strict=True)
    self.unet.train()
    self.target = copy.deepcopy(self.unet)
    self.target.requires_grad_(False)
    self.opt = torch.optim.AdamW(self.unet.parameters(), lr=LR, betas=(0.9, 0.999),
                                 weight_decay=WD, eps=1e-8)
    self.batch = batch

  def encode(self, ids):
    with self.torch.no_grad():
      return self.text(self.torch.as_tensor(ids, dtype=self.torch.int64))[0]

  def set_uncond(self, empty_ids):
    import numpy as np  # pylint: disable=g-import-not-at-top
    self.uncond = self.encode(np.repeat(np.asarray(empty_ids), self.batch, axis=0))

  def _x0(self, out, t, z):
    a = self.alphas[t].reshape(-1, 1, 1, 1)
    s = self.sigmas[t].reshape(-1, 1, 1, 1)
    if self.prediction == "epsilon":
      return (z - s * out) / a
    return a * z - s * out

  def _eps(self, out, t, z):
    a = self.alphas[t].reshape(-1, 1, 1, 1)
    s = self.sigmas[t].reshape(-1, 1, 1, 1)
    if self.prediction == "epsilon":
      return out
    return a * out + s * z

  @staticmethod
  def _boundary(t):
    u = (10.0 * t).float().reshape(-1, 1, 1, 1)
    return 0.25 / (u ** 2 + 0.25), u / (u ** 2 + 0.25) ** 0.5

  def _w_embedding(self, w):
    torch = self.torch
    half = PROJ // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32)
                      * -(torch.log(torch.tensor(10000.0)) / (half - 1)))
    args = (1000.0 * w)[:, None] * freqs[None, :]
    return torch.cat([torch.sin(args), torch.cos(args)], dim=1)

  def step(self, z, ids, draws=None):
    """One training step on latents z (NCHW) and prompt ids; `draws` = (grid index, w, eps)
    replaces the script's own torch draws. Returns (loss, grad norm before clipping)."""
    torch = self.torch
    prompt = self.encode(ids)
    b = z.shape[0]
    if draws is None:
      index = torch.randint(0, 50, (b,))
      w = (W_RANGE[1] - W_RANGE[0]) * torch.rand((b,)) + W_RANGE[0]
      eps = torch.randn_like(z)
    else:
      index, w, eps = draws
    start = self.grid[index]
    end = torch.clamp(start - self.k, min=0)
    c_skip_start, c_out_start = self._boundary(start)
    c_skip, c_out = self._boundary(end)
    noisy = self.sched.add_noise(z, eps, start)
    w_emb = self._w_embedding(w)
    w = w.reshape(b, 1, 1, 1)
    out = self.unet(noisy, start, timestep_cond=w_emb, encoder_hidden_states=prompt).sample
    pred = c_skip_start * noisy + c_out_start * self._x0(out, start, noisy)
    with torch.no_grad():
      cond = self.teacher(noisy, start, encoder_hidden_states=prompt).sample
      uncond = self.teacher(noisy, start, encoder_hidden_states=self.uncond).sample
      x0_c, x0_u = self._x0(cond, start, noisy), self._x0(uncond, start, noisy)
      e_c, e_u = self._eps(cond, start, noisy), self._eps(uncond, start, noisy)
      x0 = x0_c + w * (x0_c - x0_u)
      e = e_c + w * (e_c - e_u)
      p = self.prev[index].reshape(-1, 1, 1, 1)
      x_prev = p.sqrt() * x0 + (1 - p).sqrt() * e
      out_t = self.target(x_prev, end, timestep_cond=w_emb, encoder_hidden_states=prompt).sample
      target = c_skip * x_prev + c_out * self._x0(out_t, end, x_prev)
    loss = torch.mean(torch.sqrt((pred - target) ** 2 + HUBER_C ** 2) - HUBER_C)
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(self.unet.parameters(), CLIP)
    self.opt.step()
    self.opt.zero_grad(set_to_none=True)
    with torch.no_grad():
      for tp, sp in zip(self.target.parameters(), self.unet.parameters()):
        tp.mul_(EMA_DECAY).add_(sp, alpha=1 - EMA_DECAY)
    return loss.item(), norm.item()


def _param_diffs(params, module, before: dict) -> tuple[float, float]:
  """(largest |cm_jax - torch| parameter difference, ||update difference|| / ||torch's
  update||): AdamW's first step moves each weight by about lr sign(g), so a weight whose
  gradient is ~0 may move either way in the two; the relative update difference says how
  the step as a whole agrees."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from cm_jax.utils import torch_names  # pylint: disable=g-import-not-at-top
  ours = torch_names.state_dict_from_params(params)
  theirs = {k: v.detach().numpy() for k, v in module.state_dict().items()}
  worst = max(float(np.max(np.abs(v - theirs[k]))) for k, v in ours.items())
  num = sum(float(np.sum(np.square(v - theirs[k]))) for k, v in ours.items())
  den = sum(float(np.sum(np.square(theirs[k] - before[k]))) for k in ours)
  return worst, (num / den) ** 0.5 if den else float("nan")


def bench_lcd(name: str, workdir: str, batch: int, reps: int, budget_s: float) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  from cm_jax.train import builders  # pylint: disable=g-import-not-at-top
  from cm_jax.train.step import make_train_step  # pylint: disable=g-import-not-at-top
  from cm_jax.utils import torch_names  # pylint: disable=g-import-not-at-top

  folder = sdb.make_folder(name, os.path.join(workdir, name + "_teacher"))
  config = lcd_config(folder)
  parts = builders.build_parts(config)
  method = parts.method
  frozen = jax.device_put(method.load_teacher())
  rng = jax.random.key(0)
  state = builders.new_train_state(parts, config, jax.random.key(1), teacher_params=frozen)
  # The student starts as the teacher and may share its buffers: copies, so donating the
  # state leaves the teacher alone.
  state = jax.tree.map(jnp.array, state)
  before = torch_names.state_dict_from_params(jax.device_get(state.params))
  theirs = TorchLCD(folder, before, batch)
  theirs.set_uncond(method.empty_prompt_ids)
  n_params = sum(p.numel() for p in theirs.unet.parameters())

  side, ch = parts.image_shape[0], parts.image_shape[-1]
  npr = np.random.default_rng(0)
  z = npr.standard_normal((batch, side, side, ch)).astype(np.float32)
  ids = np.asarray(method.parts.tokenize([PROMPTS[i % len(PROMPTS)] for i in range(batch)]))
  jbatch = {"latent": jnp.asarray(z), "input_ids": jnp.asarray(ids, jnp.int32)}
  tz = torch.from_numpy(z.transpose(0, 3, 1, 2).copy())

  step = jax.jit(make_train_step(method, parts.optimizer, config.ema, batch),
                 donate_argnums=(0,))
  compile_s, compiled = sdb.timed_first(
      lambda: step.lower(state, jbatch, rng, frozen).compile())

  # Step 0's draws, split from its key as LatentConsistencyDistillation.loss splits them.
  _, k_draw, k_eps, _ = jax.random.split(jax.random.fold_in(rng, 0), 4)
  t_start, _, w = method.draw(k_draw, batch)
  eps = jax.random.normal(k_eps, z.shape, jnp.float32)
  index = torch.from_numpy((np.asarray(t_start, np.int64) + 1) // theirs.k - 1)
  draws = (index, torch.from_numpy(np.array(w)),
           torch.from_numpy(np.asarray(eps).transpose(0, 3, 1, 2).copy()))

  holder = {}
  holder["state"], metrics = compiled(state, jbatch, rng, frozen)  # `state` is donated
  metrics = jax.device_get(metrics)
  first_s, (loss, norm) = sdb.timed_first(lambda: theirs.step(tz, ids, draws))
  new = jax.device_get(holder["state"])
  parity = dict(loss_cm_jax=float(metrics["loss"]), loss_diffusers=loss,
                loss_diff=abs(float(metrics["loss"]) - loss),
                grad_norm_cm_jax=float(metrics["grad_norm"]), grad_norm_diffusers=norm,
                grad_norm_diff=abs(float(metrics["grad_norm"]) - norm),
                student_diff=0.0, student_update_rel_diff=0.0, target_diff=0.0)
  parity["student_diff"], parity["student_update_rel_diff"] = _param_diffs(
      new.params, theirs.unet, before)
  parity["target_diff"], _ = _param_diffs(new.target_params, theirs.target, before)

  def ours_step():
    holder["state"], m = compiled(holder["state"], jbatch, rng, frozen)
    jax.block_until_ready(m)

  times = sdb.interleaved({"cm_jax": ours_step, "diffusers": lambda: theirs.step(tz, ids)},
                          reps, budget_s)
  return dict(config=name, what="lcd step", batch=batch, unet_params=int(n_params),
              latent_shape=[side, side, ch], times=times, max_diff=parity["loss_diff"],
              diff_of="loss", parity=parity, compile_s=compile_s, diffusers_first_s=first_s)


# ----------------------------------------------------------------------------- LCM sampling


def bench_lcm(name: str, workdir: str, batch: int, reps: int, budget_s: float, steps: int,
              w: float) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  from diffusers import LatentConsistencyModelPipeline  # pylint: disable=g-import-not-at-top
  from diffusers.schedulers import scheduling_lcm  # pylint: disable=g-import-not-at-top
  from cm_jax.nets import sd_folder  # pylint: disable=g-import-not-at-top
  from cm_jax.train import builders  # pylint: disable=g-import-not-at-top
  from configs import sd15_lcd  # pylint: disable=g-import-not-at-top

  folder = sdb.make_folder(name, os.path.join(workdir, name + "_lcm"), time_cond_proj_dim=PROJ,
                           scheduler="lcm")
  pipe = LatentConsistencyModelPipeline.from_pretrained(folder, safety_checker=None,
                                                        requires_safety_checker=False)
  pipe.set_progress_bar_config(disable=True)
  n_params = sum(p.numel() for p in pipe.unet.parameters())
  method = builders.build_parts(sd15_lcd.from_folder(folder)).method
  unet_params = sd_folder.load_sd_folder(folder, components=("unet",)).unet_params
  params = jax.device_put(method.sampling_params(unet_params))
  ucfg = pipe.unet.config
  side, ch = int(ucfg.sample_size), int(ucfg.in_channels)

  noise = np.random.default_rng(1).standard_normal((batch, side, side, ch)).astype(np.float32)
  keys = jax.random.split(jax.random.key(2), batch)
  ids = method.parts.tokenize([PROMPT])
  sample = jax.jit(lambda p, z, k: method.sample_latents(p, z, k, None, steps, sampler="lcm",
                                                         guidance=w, prompt_ids=ids))
  jz = jnp.asarray(noise)
  compile_s, compiled = sdb.timed_first(lambda: sample.lower(params, jz, keys).compile())
  tz = torch.from_numpy(noise.transpose(0, 3, 1, 2).copy())

  def torch_sample():
    return pipe(PROMPT, num_images_per_prompt=batch, num_inference_steps=steps,
                guidance_scale=1.0 + w, latents=tz.clone(), output_type="latent").images

  # The re-noising draws of step i (every step but the last), as cm_jax draws them.
  renoise = np.asarray(jax.vmap(lambda k: jax.vmap(
      lambda i: jax.random.normal(jax.random.fold_in(k, i), noise.shape[1:]))(
          jnp.arange(steps)))(keys)).transpose(1, 0, 4, 2, 3)  # (steps, B, C, H, W)
  drawn = []

  def cm_jax_noise(shape, *args, **kwargs):
    del args, kwargs
    out = torch.from_numpy(renoise[len(drawn)].copy())
    if tuple(out.shape) != tuple(shape):
      raise ValueError(f"re-noising draw of shape {tuple(shape)}, expected {tuple(out.shape)}")
    drawn.append(out)
    return out

  ours = np.asarray(jax.block_until_ready(compiled(params, jz, keys)))
  stock = scheduling_lcm.randn_tensor
  scheduling_lcm.randn_tensor = cm_jax_noise
  try:
    first_s, out = sdb.timed_first(torch_sample)
  finally:
    scheduling_lcm.randn_tensor = stock
  theirs = out.numpy().transpose(0, 2, 3, 1)
  diff = float(np.max(np.abs(ours - theirs)))
  times = sdb.interleaved({"cm_jax": lambda: jax.block_until_ready(compiled(params, jz, keys)),
                           "diffusers": torch_sample}, reps, budget_s)
  return dict(config=name, what=f"lcm{steps} w={w:g}", batch=batch, unet_params=int(n_params),
              latent_shape=[side, side, ch], times=times, max_diff=diff, diff_of="latents",
              renoise_draws=len(drawn), latent_scale=float(np.max(np.abs(theirs))),
              compile_s=compile_s, diffusers_first_s=first_s)


# ----------------------------------------------------------------------------- output


def summarize(row: dict, threads: int) -> dict:
  for side in ("cm_jax", "diffusers"):
    ts = row["times"][side]
    row[f"{side}_ms"] = 1e3 * statistics.median(ts)
    row[f"{side}_best_ms"] = 1e3 * min(ts)
  row.update(threads=threads, calls=len(row["times"]["cm_jax"]),
             ratio=row["diffusers_ms"] / row["cm_jax_ms"],
             ratio_best=row["diffusers_best_ms"] / row["cm_jax_best_ms"])
  return row


def format_table(rows: list[dict]) -> str:
  lines = ["| config | threads | what | batch | calls | cm_jax ms | diffusers ms | "
           "ratio (diffusers / cm_jax ms) | max diff | cm_jax compile s |",
           "|---|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    diff = f"{r['max_diff']:.1e} ({r['diff_of']}"
    if "parity" in r:
      diff += (f"; params {max(r['parity']['student_diff'], r['parity']['target_diff']):.1e}, "
               f"update rel {r['parity']['student_update_rel_diff']:.1e}")
    if "latent_scale" in r:
      diff += f"; max abs latent {r['latent_scale']:.3g}"
    diff += ")"
    lines.append(f"| {r['config']} | {r['threads']} | {r['what']} | {r['batch']} | "
                 f"{r['calls']} | {r['cm_jax_ms']:.1f} | {r['diffusers_ms']:.1f} | "
                 f"{r['ratio']:.2f} | {diff} | {r['compile_s']:.1f} |")
  return "\n".join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--configs", default="tiny,small",
                      help=f"comma-separated, from {', '.join(sdb.CONFIGS)}")
  parser.add_argument("--batch", type=int, default=4, help="latents per step / images per call")
  parser.add_argument("--reps", type=int, default=5, help="timed calls per side")
  parser.add_argument("--budget_s", type=float, default=60.0,
                      help="stop repeating a measurement (after two calls) past this many seconds")
  parser.add_argument("--steps", type=int, default=4, help="LCM sampling steps")
  parser.add_argument("--guidance", type=float, default=7.5,
                      help="cm_jax's w (the pipeline's guidance_scale = 1 + w)")
  parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                      help="threads for torch and XLA (default: every CPU this process may use)")
  parser.add_argument("--only", choices=("lcd", "lcm"), default=None,
                      help="run one of the two measurements")
  parser.add_argument("--out", default=None, metavar="PREFIX",
                      help="also write PREFIX.json (rows, settings) and PREFIX.md (the table)")
  args = parser.parse_args(argv)
  names = [n for n in args.configs.split(",") if n]
  bad = [n for n in names if n not in sdb.CONFIGS]
  if bad or not names:
    raise ValueError(f"--configs: unknown {bad}; choose from {sdb.CONFIGS}")

  setting = sdb.set_threads(args.threads)
  import diffusers  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  from diffusers.utils import logging as dlog  # pylint: disable=g-import-not-at-top
  dlog.set_verbosity_error()
  load_before = os.getloadavg()
  t_start = time.perf_counter()
  rows = []
  with tempfile.TemporaryDirectory(prefix="lcm_vs_diffusers.") as workdir:
    for name in names:
      if args.only in (None, "lcd"):
        print(f"{name}: lcd step ...", file=sys.stderr, flush=True)
        rows.append(summarize(bench_lcd(name, workdir, args.batch, args.reps, args.budget_s),
                              args.threads))
      if args.only in (None, "lcm"):
        print(f"{name}: lcm sampling ...", file=sys.stderr, flush=True)
        rows.append(summarize(bench_lcm(name, workdir, args.batch, args.reps, args.budget_s,
                                        args.steps, args.guidance), args.threads))
  meta = dict(setting, jax=jax.__version__, torch=torch.__version__,
              diffusers=diffusers.__version__, backend=jax.default_backend(),
              load_average_before=load_before, load_average_after=os.getloadavg(),
              wall_s=time.perf_counter() - t_start, guidance_w=args.guidance, steps=args.steps)
  header = (f"threads: {setting['threads']} (torch.set_num_threads; XLA on CPUs "
            f"{setting['cpus']}), float32, jax {meta['jax']} / torch {meta['torch']} / "
            f"diffusers {meta['diffusers']}; median of `calls` interleaved calls; load average "
            f"{load_before[0]:.2f} before, {meta['load_average_after'][0]:.2f} after; "
            f"wall {meta['wall_s']:.0f} s")
  table = format_table(rows)
  print(header)
  print(table)
  if args.out:
    with open(args.out + ".json", "w") as f:
      json.dump(dict(meta=meta, rows=rows), f, indent=2)
    with open(args.out + ".md", "w") as f:
      f.write(header + "\n\n" + table + "\n")
    print(f"wrote {args.out}.json, {args.out}.md", file=sys.stderr)


if __name__ == "__main__":
  main()
