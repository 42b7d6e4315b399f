"""What checkpointing costs a training run: the loop's step rate with and without saves,
and the save-time checksum pass against the save itself, on whatever devices JAX sees.

  python benchmarks/checkpoint_cost.py                 # digits loop + CIFAR-10-sized state
  python benchmarks/checkpoint_cost.py --steps 40 --state_config digits_edm

1. Loop: configs/digits_edm.py (batch --batch) trained --steps steps twice in fresh
   workdirs, saving every --save_every steps and only at the end; img/s is the mean of
   metrics.jsonl's per-window images_per_sec, the first window (compilation) left out.
   Saves are asynchronous: the step rate with saves should match the one without.
2. State: the train state of configs/<--state_config>.py (default CIFAR-10 EDM, 56M parameters, with
   its EMA and Adam moments), initialised on the device; timed: the checksum pass
   (cm_jax.utils.checksums.tree_stats, what every save adds) and a synchronous Orbax save
   of the same state, median of --repeats after a warm-up.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

# pylint: disable=wrong-import-position
import jax  # noqa: E402
import numpy as np  # noqa: E402

from cm_jax.train import builders, loop  # noqa: E402
from cm_jax.train.checkpoint import RunCheckpoints  # noqa: E402
from cm_jax.utils import checksums  # noqa: E402
from configs import digits_edm  # noqa: E402
# pylint: enable=wrong-import-position


def loop_rate(steps: int, batch: int, save_every: int, log_every: int) -> float:
  """Mean img/s over the logged windows after the first, in a fresh workdir."""
  config = digits_edm.get_config()
  config.training.update(batch_size=batch, save_every=save_every, log_every=log_every,
                         sample_every=0, keep_checkpoints=3)
  with tempfile.TemporaryDirectory() as workdir:
    loop.train(config, workdir, num_steps=steps, progress=False)
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
      rows = [json.loads(line) for line in f]
  return float(np.mean([r["images_per_sec"] for r in rows[1:]]))


def timed(fn, repeats: int) -> float:
  fn()
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return float(np.median(times))


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--steps", type=int, default=60)
  p.add_argument("--batch", type=int, default=128)
  p.add_argument("--save_every", type=int, default=10)
  p.add_argument("--state_config", default="cifar10_edm", help="a module of configs/")
  p.add_argument("--repeats", type=int, default=3)
  args = p.parse_args(argv)
  from absl import logging  # pylint: disable=g-import-not-at-top
  logging.set_verbosity(logging.ERROR)

  log_every = max(1, args.save_every)
  without = loop_rate(args.steps, args.batch, args.steps, log_every)
  with_saves = loop_rate(args.steps, args.batch, args.save_every, log_every)

  config = importlib.import_module(f"configs.{args.state_config}").get_config()
  parts = builders.build_parts(config)
  state = builders.new_train_state(parts, config, jax.random.key(0), None)
  jax.block_until_ready(state)
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
  n_bytes = sum(int(x.size) * x.dtype.itemsize for x in jax.tree.leaves(state))
  sums_s = timed(lambda: checksums.tree_stats(state), args.repeats)
  with tempfile.TemporaryDirectory() as workdir:
    ckpts = RunCheckpoints(workdir, max_to_keep=1, async_save=False)
    counter = iter(range(1, 1000))
    save_s = timed(lambda: ckpts.save(next(counter), state, {}, config, wait=True),
                   args.repeats)
    ckpts.close()

  print(f"| what | measured |\n|---|---|\n"
        f"| digits loop, batch {args.batch}, {args.steps} steps, no save until the end | "
        f"{without:.0f} img/s |\n"
        f"| the same, saving every {args.save_every} steps (async) | {with_saves:.0f} img/s "
        f"({with_saves / without:.2f}x) |\n"
        f"| {args.state_config} state ({n_params / 1e6:.1f}M params, {n_bytes / 2**20:.0f} "
        f"MiB with EMA and Adam): checksum pass | {sums_s * 1e3:.0f} ms |\n"
        f"| the same state: synchronous Orbax save, checksums included | {save_s * 1e3:.0f} ms "
        f"(checksums {sums_s / save_s:.2f} of it) |\n"
        f"backend {jax.default_backend()}, {jax.device_count()} device(s)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
