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

Each config runs in its own subprocess, so peak memory is per config. The
table is printed and written as JSON (--json). Defaults adapt to CPU: the 32x32
and 64x64 configs use batch 2, 2 timed steps and a 2-step sampler there
(--batch / --steps / --sample_steps override).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIGS = ("configs/digits_edm.py:tiny", "configs/digits_edm.py",
                   "configs/cifar10_edm.py", "configs/imagenet64_edm.py")
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


def bench_one(spec: str, overrides: list[str], batch: int | None, steps: int | None,
              sample_steps: int | None, sample_batch: int | None, do_sample: bool) -> dict:
  import jax
  import jax.numpy as jnp
  import numpy as np
  from cm_jax import sampling
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
  par = parallel.build_parallel(config)
  ways = par.batch_divisor()
  parallel.check_batch_size(batch, ways, accum)

  teacher = None
  if hasattr(parts.method, "load_teacher"):  # distillation: a random teacher of the right shape
    teacher = par.place_teacher(builders.init_params(parts, config, jax.random.key(1)))
  state = par.init_state(lambda r, t: builders.new_train_state(parts, config, r, t),
                         jax.random.key(0), teacher)
  n_params = count_params(state.params)
  rs = np.random.RandomState(0)
  h, c = config.data.image_size, config.data.channels
  local = {"image": rs.uniform(-1, 1, (batch, h, h, c)).astype(np.float32),
           "label": rs.randint(0, max(config.data.num_classes, 1), (batch,)).astype(np.int32),
           parallel.PREEMPT_KEY: np.zeros((batch,), np.int32)}
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

  result = dict(
      config=spec, overrides=list(overrides), backend=jax.default_backend(),
      device=str(jax.devices()[0].device_kind), devices=jax.device_count(),
      mesh=dict(par.mesh.shape), params=n_params, batch=batch, grad_accum_steps=accum,
      dtype=config.model.get("dtype", "float32"), remat=bool(config.model.get("remat", False)),
      train_steps_timed=steps, train_step_s=step_time, train_img_s=batch / step_time,
      train_compile_s=train_compile, train_flops_per_step=flops,
      train_tflop_s=flops / step_time / 1e12)

  if do_sample:
    sb = sample_batch or batch
    sb = max(ways, sb - sb % ways)
    fn = sampling.make_sample_fn(parts.method, parts.image_shape, config.data.num_classes,
                                 sample_steps, mesh=par.mesh)
    params = jax.device_put(state.params, parallel.replicated(par.mesh))
    indices = jnp.arange(sb, dtype=jnp.int32)
    t0 = time.perf_counter()
    sample_compiled = fn.lower(params, indices, 0).compile()
    sample_compile = time.perf_counter() - t0
    jax.block_until_ready(sample_compiled(params, indices, 0))  # warm-up
    t0 = time.perf_counter()
    jax.block_until_ready(sample_compiled(params, indices, 1))
    sample_time = time.perf_counter() - t0
    from cm_jax.diffusion.samplers import sampler_nfe
    try:
      nfe = sampler_nfe(config.sample.sampler, sample_steps)
    except Exception:  # pylint: disable=broad-except  # non-EDM samplers count differently
      nfe = sample_steps
    result.update(sampler=config.sample.sampler, sample_steps=sample_steps, sample_nfe=nfe,
                  sample_batch=sb, sample_img_s=sb / sample_time,
                  sample_compile_s=sample_compile)

  peak, source = peak_memory_bytes()
  result.update(peak_memory_bytes=peak, peak_memory_source=source)
  return result


def format_table(rows: list[dict]) -> str:
  head = ("config", "params", "batch", "train img/s", "step ms", "compile s", "TFLOP/s",
          "sample img/s", "NFE", "s-compile s", "peak mem")
  lines = [head]
  for r in rows:
    if "error" in r:
      lines.append((r["config"], "-", str(r.get("batch", "-")), "error: " + r["error"][:60]) +
                   ("",) * (len(head) - 4))
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
  return "\n".join(out)


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
  parser.add_argument("--json", default="throughput.json", help="where to write the results")
  parser.add_argument("--timeout", type=float, default=1800, help="seconds per config")
  parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
  args, overrides = parser.parse_known_args(argv)
  bad = [o for o in overrides if not o.startswith("--config.")]
  if bad:
    parser.error(f"unknown arguments {bad} (config overrides look like --config.a.b=value)")
  configs = [c for item in args.configs for c in item.split(",") if c]

  if args.one:  # child: one config, JSON on the last stdout line
    result = bench_one(configs[0], overrides, args.batch, args.steps, args.sample_steps,
                       args.sample_batch, not args.no_sample)
    print(json.dumps(result))
    return

  rows = []
  for spec in configs:
    cmd = [sys.executable, os.path.abspath(__file__), "--one", "--configs", spec, *overrides]
    for flag in ("batch", "steps", "sample_steps", "sample_batch"):
      if getattr(args, flag) is not None:
        cmd += [f"--{flag}", str(getattr(args, flag))]
    if args.no_sample:
      cmd.append("--no_sample")
    print(f"benchmarking {spec} ...", file=sys.stderr, flush=True)
    try:
      proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=args.timeout)
      if proc.returncode != 0:
        rows.append(dict(config=spec, batch=args.batch, error=proc.stderr.strip().splitlines()[-1]
                         if proc.stderr.strip() else f"exit {proc.returncode}"))
      else:
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    except subprocess.TimeoutExpired:
      rows.append(dict(config=spec, batch=args.batch, error=f"timeout after {args.timeout:.0f} s"))
  print(format_table(rows))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(rows, f, indent=2)
    print(f"wrote {args.json}", file=sys.stderr)
  if any("error" in r for r in rows):
    sys.exit(1)


if __name__ == "__main__":
  main()
