"""Train-step and sampling throughput of cm_jax configs, on whatever devices JAX sees.

  python benchmarks/throughput.py                                   # the four default configs
  python benchmarks/throughput.py --configs configs/cifar10_edm.py --batch 512 --steps 20
  python benchmarks/throughput.py --configs configs/imagenet64_edm.py --batch 256 \
      --config.mesh.fsdp=4 --config.model.dtype=bfloat16 --config.model.remat=True

For each config: the train step (the loop's own compiled step: jit over the
mesh of config.mesh, FSDP, grad accumulation, bf16 and remat as configured)
and the sampler (config.sample.sampler, sharded over the mesh's batch axes)
are compiled and timed on synthetic random batches (no data set is read).
Reported per config:

  train img/s     global batch x timed steps / wall time (after one warm-up step)
  sample img/s    images / wall time of one sampling call, with its NFE
  compile s       XLA compile time of the train step and of the sampler
  peak mem        peak device memory (memory_stats()['peak_bytes_in_use']) where the
                  backend reports it, else the process's peak RSS (CPU)
  TFLOP/s         XLA's cost analysis of the compiled train step (flops of one step, per
                  device program, times the devices) / measured step time

With --save, each config also saves its train state as train.py does (an asynchronous
Orbax checkpoint with per-array checksums) and reports how long save() holds the loop up,
when the write is committed, and the step time of the steps run while it writes: the loop
must not wait for the disk (a second table).

Each config runs in its own subprocess, so peak memory is per config. The
table is printed and written as JSON (--json). Defaults adapt to CPU: the 32x32
and 64x64 configs use batch 2, 2 timed steps and a 2-step sampler there
(--batch / --steps / --sample_steps override). A config written `spec@N`
(configs/digits_edm.py@20) times N train steps instead of --steps.

Latent configs: configs/digits32_vae.py (the KL autoencoder: its train step, the eval-mode
reconstruction as the forward, decoded prior samples as the sampler) and configs/digits32_ldm.py
(the text-conditioned latent UNet: the step encodes the images with the frozen autoencoder and
the captions with the frozen text encoder; the batch gets token ids of the digit captions; the
sampler is DDIM in latent space plus the decoder). The latent model reads the trained
autoencoder at method.vae_workdir (runs/digits32_vae): without that run it is skipped with a
one-line note (a `skipped` row, not an error).

  python benchmarks/throughput.py --configs configs/digits32_vae.py configs/digits32_ldm.py

Distillation configs (CD, guided and progressive distillation) time the step with a
freshly initialised teacher of the student's network: random weights, for speed only (no
teacher run is read).

What a distillation step costs against the plain diffusion step, in the same run:

  python benchmarks/throughput.py --no_sample --baseline configs/digits_vp.py@20 \
      --configs configs/digits_vp.py@20 configs/digits_guided.py@20 configs/digits_pd.py@20

prints, besides the table, each step's time as a ratio to the baseline's and the bound
(baseline step + teacher forwards x one eval-mode forward at the train batch) / baseline
step: a distillation step should cost no more than its teacher's evaluations plus one
student forward/backward.

Before/after comparison against another checkout of the repo (e.g. the last commit):

  git worktree add /tmp/cm_jax_ref HEAD
  python benchmarks/throughput.py --compare /tmp/cm_jax_ref --repeats 2 --steps 200 \
      --configs configs/digits_edm.py:tiny configs/digits_edm.py@20 configs/digits_cd.py:tiny
  git worktree remove --force /tmp/cm_jax_ref

--compare REF_TREE runs every config's `--one` measurement in REF_TREE (that tree's own
benchmarks/throughput.py, cwd=REF_TREE, PYTHONPATH=REF_TREE so the child imports REF_TREE's
cm_jax and configs, not this checkout's editable install; checked before timing) and in
this tree, interleaved ref, new, ref, new, ... for --repeats rounds so that machine noise
falls on both. The table gives per config the train step ms, sample img/s and compile s of
ref and new with the new/ref ratio, each the best of the rounds (least disturbed by other
load), and `noise`, the largest spread between rounds of one tree's step time; a ratio
inside that spread is within noise. When REF_TREE's own harness fails on a config (HEAD's
harness cannot build CD), the ref side of that config runs this file's harness against
REF_TREE's code and configs (CM_JAX_BENCH_ROOT=REF_TREE) and the note says so. Every
round's raw result is in the JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

# The checkout whose configs are read; CM_JAX_BENCH_ROOT runs this harness on another one
# (--compare's fallback for a reference tree whose own harness fails).
ROOT = os.environ.get("CM_JAX_BENCH_ROOT") or os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))
THIS_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RANDOM_TEACHER = "random init (timing only)"
DEFAULT_CONFIGS = ("configs/digits_edm.py:tiny", "configs/digits_edm.py",
                   "configs/cifar10_edm.py", "configs/imagenet64_edm.py",
                   "configs/digits32_vae.py", "configs/digits32_ldm.py")
CPU_BIG_BATCH = 2          # 32x32 and larger on a CPU
CPU_STEPS, ACCEL_STEPS = 2, 10
CPU_BIG_SAMPLE_STEPS = 2   # Heun with 2 grid points: NFE 3


def load_config(spec: str, overrides: list[str]):
  """configs/x.py[:variant] + --config.a.b=value overrides, as train.py reads them."""
  import importlib.util
  path, _, variant = spec.partition(":")
  path = os.path.join(ROOT, path) if not os.path.isabs(path) else path
  module_spec = importlib.util.spec_from_file_location("bench_config", path)
  module = importlib.util.module_from_spec(module_spec)
  sys.path.insert(0, ROOT)
  module_spec.loader.exec_module(module)
  config = module.get_config(variant)
  for item in overrides:
    key, _, value = item.removeprefix("--config.").partition("=")
    node = config
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    old = node[leaf]
    if isinstance(old, bool):
      value = value.lower() in ("1", "true", "yes")
    elif isinstance(old, (int, float)) and not isinstance(old, bool):
      value = type(old)(float(value)) if isinstance(old, int) else float(value)
    elif isinstance(old, tuple):
      value = tuple(type(old[0])(v) for v in value.strip("()").split(",") if v) if old else ()
    node[leaf] = value
  return config


def peak_memory_bytes() -> tuple[int, str]:
  import resource
  import jax
  peaks = []
  for d in jax.local_devices():
    try:
      stats = d.memory_stats() or {}
    except Exception:  # pylint: disable=broad-except
      stats = {}
    if "peak_bytes_in_use" in stats:
      peaks.append(int(stats["peak_bytes_in_use"]))
  if peaks:
    return max(peaks), "device"
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "rss"


def flops_of(compiled) -> float:
  try:
    cost = compiled.cost_analysis()
  except Exception:  # pylint: disable=broad-except
    return float("nan")
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  return float((cost or {}).get("flops", float("nan")))


def random_teacher(parts, config, rng):
  """What load_teacher() gives the loss, with the teacher network freshly initialised.

  CD (a method with _load_teacher_params) gets {'teacher': random weights of the student's
  network} plus its other frozen extras (LPIPS); guided distillation and multistep CD get a VP
  teacher of the student's network (without the w input); progressive distillation and
  multistep CT need none (the round's teacher is the state's copy of the student; CT reads
  its diffusion run only for the starting weights); other methods with load_teacher
  (CT/iCT: LPIPS only, None for l2) get load_teacher() itself. Returns (aux, description).
  """
  from cm_jax.methods.teachers import teacher_method
  from cm_jax.nets import example_inputs
  from cm_jax.train import builders
  method = parts.method
  if not hasattr(method, "load_teacher"):
    return None, None
  if getattr(method, "teacher_seeds_only", False):
    return None, RANDOM_TEACHER
  if method.name in ("guided", "mcm_cd"):  # a VP teacher of the student's network
    tcfg = config.copy_and_resolve_references()
    tcfg.model.cond_dim = 0
    tcfg.method.update(name="vp", label_dropout=0.1)
    method._teacher = teacher_method(tcfg)  # pylint: disable=protected-access
    params = method._teacher.net.init({"params": rng}, *example_inputs(tcfg), train=False)  # pylint: disable=protected-access
    return {"teacher": params["params"]}, RANDOM_TEACHER
  if not hasattr(method, "_load_teacher_params"):
    return method.load_teacher(), None
  method._load_teacher_params = lambda: builders.init_params(parts, config, rng)  # pylint: disable=protected-access
  return method.load_teacher(), RANDOM_TEACHER


def latent_run_missing(method) -> str | None:
  """Why a latent method cannot be timed here (the trained autoencoder it reads from
  method.vae_workdir is not there, or does not match), else None: its frozen autoencoder
  and text encoder are read now, before anything is compiled."""
  from cm_jax.methods.latent_parts import LatentParts
  parts = getattr(method, "parts", None)
  if not isinstance(parts, LatentParts):
    return None
  try:
    parts.params  # pylint: disable=pointless-statement
  except (FileNotFoundError, ValueError) as e:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]
  return None


def text_batch(method, labels):
  """Token ids (B, 77) for a text-conditioned method's synthetic batch: the class captions
  of the labels where the method has them (digits), else the empty prompt; None for a
  method without text."""
  import numpy as np
  if not hasattr(method, "empty_prompt_ids"):
    return None
  by_class = getattr(method, "class_prompt_ids", None)
  if by_class is not None:
    return np.asarray(by_class, np.int32)[labels]
  empty = np.asarray(method.empty_prompt_ids, np.int32)
  return np.broadcast_to(empty, (len(labels), empty.shape[-1])).copy()


def teacher_forwards(method, config) -> int:
  """Eval-mode network forwards at the train batch that one step spends besides the
  student's forward/backward: CD one (Euler) or two (Heun) teacher evaluations (doubled
  when the teacher is guided) plus the target network's; guided distillation stage 1 the
  teacher on twice the batch (conditional and unconditional halves); progressive
  distillation two teacher DDIM steps; multistep CD one teacher evaluation (doubled when
  guided) plus the student's stop-gradient x_ref, multistep CT x_ref alone; 0 for a plain
  diffusion step."""
  name = getattr(method, "name", "")
  guided = float(config.method.get("teacher_guidance", 0.0) or 0.0) > 0
  if name == "cd":
    return (2 if config.method.solver == "heun" else 1) * (2 if guided else 1) + 1
  if name == "mcm_cd":
    return (2 if guided else 1) + 1
  return {"guided": 2, "pd": 2, "mcm_ct": 1}.get(name, 0)


def time_saving(par, state, compiled, gbatch, rng, teacher, config, steps: int) -> dict:
  """What an asynchronous checkpoint save costs the loop, as train.py saves: the time
  `RunCheckpoints.save` blocks the loop (device-to-host copy and checksums), the step time
  of `steps` steps run while it writes, and for scale the same save done synchronously
  (returning only once the checkpoint is committed)."""
  import tempfile
  import jax
  from cm_jax.train.checkpoint import RunCheckpoints
  with tempfile.TemporaryDirectory() as tmp:
    ckpts = RunCheckpoints(tmp)
    data = {"process_count": 1, "processes": [{}]}
    ckpts.save(0, par.to_host(state), data, config, wait=True)  # first save: Orbax set-up
    t0 = time.perf_counter()
    ckpts.save(1, par.to_host(state), data, config)
    blocked = time.perf_counter() - t0
    for _ in range(steps):  # the loop goes on while the write is in flight
      state, metrics = compiled(state, gbatch, rng, teacher)
    jax.block_until_ready((state, metrics))
    during = (time.perf_counter() - t0 - blocked) / steps
    ckpts.wait()
    t0 = time.perf_counter()
    ckpts.save(2, par.to_host(state), data, config, wait=True)
    synchronous = time.perf_counter() - t0
    ckpts.close()
  return dict(save_blocks_s=blocked, save_sync_s=synchronous, train_step_saving_s=during)


def bench_one(spec: str, overrides: list[str], batch: int | None, steps: int | None,
              sample_steps: int | None, sample_batch: int | None, do_sample: bool,
              do_save: bool = False) -> dict:
  import jax
  import jax.numpy as jnp
  import numpy as np
  from cm_jax import sampling
  from cm_jax.nets import init_inputs as nets_init_inputs
  from cm_jax.train import builders, parallel
  from cm_jax.train.state import count_params
  from cm_jax.train.step import make_train_step

  config = load_config(spec, overrides)
  cpu = jax.default_backend() == "cpu"
  big = config.data.image_size >= 32
  if batch is None:
    batch = CPU_BIG_BATCH if (cpu and big) else config.training.batch_size
  if steps is None:
    steps = CPU_STEPS if cpu else ACCEL_STEPS
  if sample_steps is None:
    sample_steps = CPU_BIG_SAMPLE_STEPS if (cpu and big) else config.sample.num_steps
  config.training.batch_size = batch
  accum = int(config.training.get("grad_accum_steps", 1) or 1)
  config.parallel = "jit"  # the benchmark reads XLA's cost analysis of the jit program
  parts = builders.build_parts(config)
  missing = latent_run_missing(parts.method)
  if missing:
    return dict(config=spec, batch=batch, skipped=missing)
  par = parallel.build_parallel(config)
  ways = par.batch_divisor()
  parallel.check_batch_size(batch, ways, accum)

  teacher, teacher_kind = random_teacher(parts, config, jax.random.key(1))
  teacher = par.place_teacher(teacher)
  state = par.init_state(lambda r, t: builders.new_train_state(parts, config, r, t),
                         jax.random.key(0), teacher)
  n_params = count_params(state.params)
  rs = np.random.RandomState(0)
  h, c = config.data.image_size, config.data.channels
  local = {"image": rs.uniform(-1, 1, (batch, h, h, c)).astype(np.float32),
           "label": rs.randint(0, max(config.data.num_classes, 1), (batch,)).astype(np.int32),
           parallel.PREEMPT_KEY: np.zeros((batch,), np.int32)}
  ids = text_batch(parts.method, local["label"])
  if ids is not None:
    local["input_ids"] = ids
  gbatch = par.batch(local)
  rng = jax.random.key(0)
  step = par.compile(make_train_step(parts.method, parts.optimizer, config.ema, batch,
                                     grad_accum_steps=accum), state, teacher)
  t0 = time.perf_counter()
  compiled = step.lower(state, gbatch, rng, teacher).compile()
  train_compile = time.perf_counter() - t0
  flops = flops_of(compiled) * jax.device_count()

  state, metrics = compiled(state, gbatch, rng, teacher)  # warm-up
  jax.block_until_ready(metrics)
  t0 = time.perf_counter()
  for _ in range(steps):
    state, metrics = compiled(state, gbatch, rng, teacher)
  jax.block_until_ready((state, metrics))
  step_time = (time.perf_counter() - t0) / steps

  # One eval-mode forward of the network at the train batch: the unit in which a
  # distillation step's teacher evaluations are counted (--baseline's bound).
  # init_inputs: also the text context of the latent UNet, the image alone of the autoencoder.
  fwd_inputs, fwd_kwargs = nets_init_inputs(config, parts.image_shape, batch)
  fwd = jax.jit(lambda p, *a: parts.net.apply({"params": p}, *a, **fwd_kwargs))
  params_rep = jax.device_put(state.params, parallel.replicated(par.mesh))
  jax.block_until_ready(fwd(params_rep, *fwd_inputs))
  t0 = time.perf_counter()
  for _ in range(steps):
    out = fwd(params_rep, *fwd_inputs)
  jax.block_until_ready(out)
  forward_time = (time.perf_counter() - t0) / steps

  result = dict(
      config=spec, overrides=list(overrides), backend=jax.default_backend(),
      device=str(jax.devices()[0].device_kind), devices=jax.device_count(),
      mesh=dict(par.mesh.shape), params=n_params, batch=batch, grad_accum_steps=accum,
      dtype=config.model.get("dtype", "float32"), remat=bool(config.model.get("remat", False)),
      train_steps_timed=steps, train_step_s=step_time, train_img_s=batch / step_time,
      forward_s=forward_time, teacher_forwards=teacher_forwards(parts.method, config),
      train_compile_s=train_compile, train_flops_per_step=flops,
      train_tflop_s=flops / step_time / 1e12)
  import cm_jax
  result.update(cm_jax_file=cm_jax.__file__, harness=os.path.abspath(__file__))
  if teacher_kind:
    result.update(teacher=teacher_kind)
  if do_save:
    result.update(time_saving(par, state, compiled, gbatch, rng, teacher, config, steps))

  if do_sample:
    sb = sample_batch or batch
    sb = max(ways, sb - sb % ways)
    fn = sampling.make_sample_fn(parts.method, parts.image_shape, config.data.num_classes,
                                 sample_steps, mesh=par.mesh)
    params = state.params
    prepare = getattr(parts.method, "sampling_params", None)
    if prepare is not None:  # a latent method samples with its frozen networks beside the UNet
      params = prepare(params)
    params = jax.device_put(params, parallel.replicated(par.mesh))
    indices = jnp.arange(sb, dtype=jnp.int32)
    t0 = time.perf_counter()
    sample_compiled = fn.lower(params, indices, 0).compile()
    sample_compile = time.perf_counter() - t0
    jax.block_until_ready(sample_compiled(params, indices, 0))  # warm-up
    t0 = time.perf_counter()
    jax.block_until_ready(sample_compiled(params, indices, 1))
    sample_time = time.perf_counter() - t0
    from cm_jax.diffusion.samplers import sampler_nfe
    sampler = config.sample.sampler
    try:
      nfe = sampler_nfe(sampler, sample_steps)
    except Exception:  # pylint: disable=broad-except  # non-EDM samplers count differently
      nfe = sample_steps
    if parts.method.name == "autoencoder_kl":  # its "sample" is one decode of prior latents
      sampler, nfe = "decode", 1
    result.update(sampler=sampler, sample_steps=sample_steps, sample_nfe=nfe,
                  sample_batch=sb, sample_img_s=sb / sample_time,
                  sample_compile_s=sample_compile)

  peak, source = peak_memory_bytes()
  result.update(peak_memory_bytes=peak, peak_memory_source=source)
  return result


def format_table(rows: list[dict]) -> str:
  head = ("config", "params", "batch", "train img/s", "step ms", "compile s", "TFLOP/s",
          "sample img/s", "NFE", "s-compile s", "peak mem")
  lines = [head]
  skipped = []
  for r in rows:
    if "error" in r:
      lines.append((r["config"], "-", str(r.get("batch", "-")), "error: " + r["error"][:60]) +
                   ("",) * (len(head) - 4))
      continue
    if "skipped" in r:  # the reason goes under the table: it is a sentence
      lines.append((r["config"].replace("configs/", ""), "-", str(r.get("batch", "-")),
                    "skipped") + ("",) * (len(head) - 4))
      skipped.append(f"{r['config']} skipped: {r['skipped']}")
      continue
    mem = f"{r['peak_memory_bytes'] / 2**30:.2f} GiB ({r['peak_memory_source']})"
    lines.append((
        r["config"].replace("configs/", ""), f"{r['params'] / 1e6:.2f}M", str(r["batch"]),
        f"{r['train_img_s']:.1f}", f"{r['train_step_s'] * 1e3:.0f}",
        f"{r['train_compile_s']:.1f}", f"{r['train_tflop_s']:.3f}",
        f"{r.get('sample_img_s', float('nan')):.2f}", str(r.get("sample_nfe", "-")),
        f"{r.get('sample_compile_s', float('nan')):.1f}", mem))
  widths = [max(len(str(row[i])) for row in lines) for i in range(len(head))]
  out = [" | ".join(str(v).ljust(w) for v, w in zip(row, widths)) for row in lines]
  out.insert(1, "-+-".join("-" * w for w in widths))
  return "\n".join(out + skipped)


def format_saving(rows: list[dict]) -> str:
  """--save: how long a checkpoint save holds the loop up, against the plain step time."""
  lines = ["| config | step ms | async save blocks the loop, ms | step ms while it writes | "
           "ratio | the save done synchronously, ms |", "|---|---|---|---|---|---|"]
  for r in rows:
    if "error" in r or "save_blocks_s" not in r:
      continue
    lines.append(f"| {r['config'].replace('configs/', '')} | {r['train_step_s'] * 1e3:.1f} | "
                 f"{r['save_blocks_s'] * 1e3:.0f} | {r['train_step_saving_s'] * 1e3:.1f} | "
                 f"{r['train_step_saving_s'] / r['train_step_s']:.2f} | "
                 f"{r['save_sync_s'] * 1e3:.0f} |")
  return "\n".join(lines)


def format_cost_ratios(rows: list[dict], baseline: str) -> str:
  """Each distillation step against the plain diffusion step of the same run: measured
  ratio and the bound (baseline step + teacher forwards x this config's forward time) /
  baseline step, i.e. 'teacher evaluations + one student forward/backward'."""
  baseline = split_spec(baseline, None)[0]
  base = next((r for r in rows if r["config"] == baseline and "train_step_s" in r), None)
  if base is None:
    return f"(no successful row for --baseline {baseline})"
  lines = ["| config | step ms | forward ms | frozen forwards | ratio to baseline | bound | "
           "within |", "|---|---|---|---|---|---|---|"]
  for r in rows:
    if "train_step_s" not in r:  # an error or a skipped config
      continue
    ratio = r["train_step_s"] / base["train_step_s"]
    bound = (base["train_step_s"] + r["teacher_forwards"] * r["forward_s"]) / base["train_step_s"]
    lines.append(f"| {r['config'].replace('configs/', '')} | {r['train_step_s'] * 1e3:.1f} | "
                 f"{r['forward_s'] * 1e3:.1f} | {r['teacher_forwards']} | {ratio:.2f} | "
                 f"{bound:.2f} | {'yes' if ratio <= bound else 'no'} |")
  return "\n".join(lines)


def split_spec(spec: str, steps: int | None) -> tuple[str, int | None]:
  """'configs/x.py[:variant][@N]' -> (config spec, timed steps: N, else --steps)."""
  base, at, n = spec.rpartition("@")
  return (base, int(n)) if at and n.isdigit() else (spec, steps)


def error_line(stderr: str, returncode: int) -> str:
  """The exception line of a child's traceback (JAX appends a note after it)."""
  lines = [l.strip() for l in stderr.strip().splitlines() if l.strip()]
  for line in reversed(lines):
    head = line.split(":", 1)[0]
    if head.isidentifier() and (head.endswith("Error") or head.endswith("Exception")):
      return line
  return lines[-1] if lines else f"exit {returncode}"


def child_env(tree: str | None, bench_root: str | None = None) -> dict | None:
  """The child's environment: PYTHONPATH=tree first (its cm_jax and configs, ahead of any
  editable install), CM_JAX_BENCH_ROOT for this harness on another tree's configs."""
  if tree is None:
    return None
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join([tree] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH")
                                               else []))
  env.pop("CM_JAX_BENCH_ROOT", None)
  if bench_root:
    env["CM_JAX_BENCH_ROOT"] = bench_root
  return env


def check_imports(tree: str) -> str:
  """Where a child run in `tree` imports cm_jax from; raises unless it is that tree's."""
  proc = subprocess.run([sys.executable, "-c", "import cm_jax; print(cm_jax.__file__)"],
                        cwd=tree, env=child_env(tree), capture_output=True, text=True,
                        check=True)
  where = proc.stdout.strip().splitlines()[-1]
  if not os.path.realpath(where).startswith(os.path.realpath(tree) + os.sep):
    raise SystemExit(f"a child in {tree} imports cm_jax from {where}, not from that tree")
  return where


def run_one(spec: str, args, overrides: list[str], tree: str | None = None,
            script: str | None = None, bench_root: str | None = None) -> dict:
  """One `--one` child: `script` (default this file) in `tree` (default this checkout)."""
  config, steps = split_spec(spec, args.steps)
  script = script or os.path.abspath(__file__)
  cmd = [sys.executable, script, "--one", "--configs", config, *overrides]
  for flag, value in (("batch", args.batch), ("steps", steps),
                      ("sample_steps", args.sample_steps), ("sample_batch", args.sample_batch)):
    if value is not None:
      cmd += [f"--{flag}", str(value)]
  if args.no_sample:
    cmd.append("--no_sample")
  if getattr(args, "save", False):
    cmd.append("--save")
  try:
    proc = subprocess.run(cmd, cwd=tree or ROOT, env=child_env(tree, bench_root),
                          capture_output=True, text=True, timeout=args.timeout)
    if proc.returncode != 0:
      return dict(config=config, batch=args.batch, error=error_line(proc.stderr,
                                                                     proc.returncode))
    return json.loads(proc.stdout.strip().splitlines()[-1])
  except subprocess.TimeoutExpired:
    return dict(config=config, batch=args.batch, error=f"timeout after {args.timeout:.0f} s")


def _best(runs: list[dict], key: str, lower_is_better: bool) -> float:
  vals = [r[key] for r in runs if "error" not in r and key in r]
  if not vals:
    return float("nan")
  return min(vals) if lower_is_better else max(vals)


def compare_summary(spec: str, ref_runs: list[dict], new_runs: list[dict], note: str) -> dict:
  """Best-of-rounds ref / new numbers and new/ref ratios of one config."""
  out = dict(config=spec, note=note)
  for name, key, low in (("step_ms", "train_step_s", True), ("sample_img_s", "sample_img_s", False),
                         ("compile_s", "train_compile_s", True),
                         ("sample_compile_s", "sample_compile_s", True)):
    scale = 1e3 if name == "step_ms" else 1.0
    ref, new = _best(ref_runs, key, low) * scale, _best(new_runs, key, low) * scale
    out[name] = dict(ref=ref, new=new, ratio=new / ref if ref == ref and ref else float("nan"))
  spreads = []
  for runs in (ref_runs, new_runs):
    steps = [r["train_step_s"] for r in runs if "train_step_s" in r]
    if len(steps) > 1:
      spreads.append(max(steps) / min(steps) - 1)
  out["noise"] = max(spreads) if spreads else float("nan")
  out["errors"] = [f"{side}: {r['error']}" for side, runs in (("ref", ref_runs), ("new", new_runs))
                   for r in runs if "error" in r]
  return out


def format_compare(summaries: list[dict]) -> str:
  head = ("config", "step ms ref", "new", "new/ref", "sample img/s ref", "new", "new/ref",
          "compile s ref", "new", "noise", "note")
  lines = [head]
  f = lambda v, p: "-" if v != v else f"{v:.{p}f}"  # nan -> '-'
  for s in summaries:
    st, sa, co = s["step_ms"], s["sample_img_s"], s["compile_s"]
    note = "; ".join([s["note"]] * bool(s["note"]) + s["errors"][:1])
    lines.append((s["config"].replace("configs/", ""), f(st["ref"], 1), f(st["new"], 1),
                  f(st["ratio"], 3), f(sa["ref"], 1), f(sa["new"], 1), f(sa["ratio"], 3),
                  f(co["ref"], 1), f(co["new"], 1),
                  "-" if s["noise"] != s["noise"] else f"{100 * s['noise']:.0f}%", note))
  widths = [max(len(str(row[i])) for row in lines) for i in range(len(head))]
  out = [" | ".join(str(v).ljust(w) for v, w in zip(row, widths)).rstrip() for row in lines]
  out.insert(1, "-+-".join("-" * w for w in widths))
  return "\n".join(out)


def compare(configs: list[str], args, overrides: list[str]) -> list[dict]:
  """Interleaved ref/new `--one` runs of every config; prints and returns the summaries."""
  ref_tree = os.path.abspath(args.compare)
  ref_script = os.path.join(ref_tree, "benchmarks", "throughput.py")
  if not os.path.isfile(ref_script):
    raise SystemExit(f"--compare {ref_tree}: no benchmarks/throughput.py there")
  where = {"ref": check_imports(ref_tree), "new": check_imports(THIS_ROOT)}
  print(f"ref imports {where['ref']}; new imports {where['new']}", file=sys.stderr)
  summaries, records = [], []
  for spec in configs:
    ref_runs, new_runs, ref_fallback, ref_own_error = [], [], False, None
    for rnd in range(args.repeats):
      for side in ("ref", "new"):
        print(f"[round {rnd + 1}/{args.repeats}] {side}: {spec} ...", file=sys.stderr, flush=True)
        if side == "new":
          row = run_one(spec, args, overrides, tree=THIS_ROOT)
          new_runs.append(row)
        else:
          row = None
          if not ref_fallback:
            row = run_one(spec, args, overrides, tree=ref_tree, script=ref_script)
            if "error" in row:  # its own harness cannot run this config: ours on its code
              ref_fallback, ref_own_error = True, row["error"]
          if ref_fallback:
            row = run_one(spec, args, overrides, tree=ref_tree, bench_root=ref_tree)
          ref_runs.append(row)
        if "error" in row or "skipped" in row:
          print(f"  {'error' if 'error' in row else 'skipped'}: "
                f"{row.get('error', row.get('skipped'))}", file=sys.stderr)
        else:
          print(f"  step {row['train_step_s'] * 1e3:.1f} ms, sample "
                f"{row.get('sample_img_s', float('nan')):.1f} img/s, compile "
                f"{row['train_compile_s']:.1f} s", file=sys.stderr, flush=True)
    notes = []
    if ref_fallback:
      notes.append("ref timed with this harness on ref's code (ref's own: "
                   f"{ref_own_error[:60]})")
    if any(r.get("teacher") for r in ref_runs + new_runs):
      notes.append(f"teacher: {RANDOM_TEACHER}")
    summary = compare_summary(spec, ref_runs, new_runs, "; ".join(notes))
    summaries.append(summary)
    records.append(dict(summary, ref_runs=ref_runs, new_runs=new_runs,
                        ref_harness="new" if ref_fallback else "own",
                        ref_own_error=ref_own_error))
  print(f"ref = {ref_tree}, new = {THIS_ROOT}; best of {args.repeats} interleaved rounds; "
        "noise = largest spread of one tree's step time between rounds")
  print(format_compare(summaries))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(dict(ref_tree=ref_tree, new_tree=THIS_ROOT, repeats=args.repeats,
                     steps=args.steps, imports=where, configs=records), f, indent=2)
    print(f"wrote {args.json}", file=sys.stderr)
  return records


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--configs", nargs="+", default=list(DEFAULT_CONFIGS),
                      help="configs/x.py[:variant], several allowed (comma-separated too)")
  parser.add_argument("--batch", type=int, default=None, help="global train batch "
                      f"(default: the config's; {CPU_BIG_BATCH} on CPU for 32x32 and larger)")
  parser.add_argument("--steps", type=int, default=None,
                      help=f"timed train steps (default {ACCEL_STEPS}; {CPU_STEPS} on CPU)")
  parser.add_argument("--sample_steps", type=int, default=None,
                      help="sampler grid points (default: the config's; "
                           f"{CPU_BIG_SAMPLE_STEPS} on CPU for 32x32 and larger)")
  parser.add_argument("--sample_batch", type=int, default=None,
                      help="images per sampling call (default: the train batch)")
  parser.add_argument("--no_sample", action="store_true", help="time the train step only")
  parser.add_argument("--save", action="store_true", help="also time an asynchronous "
                      "checkpoint save of the train state, and the steps run while it writes")
  parser.add_argument("--json", default="throughput.json", help="where to write the results")
  parser.add_argument("--timeout", type=float, default=1800, help="seconds per config")
  parser.add_argument("--compare", metavar="REF_TREE", default=None,
                      help="another checkout of the repo (e.g. a git worktree of HEAD): time "
                           "every config there and here, interleaved, and print new/ref")
  parser.add_argument("--repeats", type=int, default=2,
                      help="--compare: interleaved ref/new rounds per config (default 2)")
  parser.add_argument("--baseline", default=None, metavar="SPEC",
                      help="one of --configs (a plain diffusion config): print every config's "
                           "step time as a ratio to it, beside the bound (its step + the "
                           "config's teacher forwards) / its step")
  parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
  args, overrides = parser.parse_known_args(argv)
  bad = [o for o in overrides if not o.startswith("--config.")]
  if bad:
    parser.error(f"unknown arguments {bad} (config overrides look like --config.a.b=value)")
  configs = [c for item in args.configs for c in item.split(",") if c]

  if args.one:  # child: one config, JSON on the last stdout line
    spec, steps = split_spec(configs[0], args.steps)
    result = bench_one(spec, overrides, args.batch, steps, args.sample_steps,
                       args.sample_batch, not args.no_sample, args.save)
    print(json.dumps(result))
    return

  if args.compare:
    records = compare(configs, args, overrides)
    if any(r["errors"] for r in records):
      sys.exit(1)
    return

  rows = []
  for spec in configs:
    print(f"benchmarking {spec} ...", file=sys.stderr, flush=True)
    rows.append(run_one(spec, args, overrides))
  print(format_table(rows))
  if args.save:
    print()
    print(format_saving(rows))
  if args.baseline:
    print()
    print(format_cost_ratios(rows, args.baseline))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(rows, f, indent=2)
    print(f"wrote {args.json}", file=sys.stderr)
  if any("error" in r for r in rows):
    sys.exit(1)


if __name__ == "__main__":
  main()
