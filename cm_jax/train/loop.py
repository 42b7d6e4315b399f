"""The training loop shared by every method: data -> step -> logs, grids, checkpoints.

Resumes from the newest checkpoint in the workdir, with the data iterator at
the same position, so N steps + restart + N steps equals 2N steps in one go.
"""
from __future__ import annotations

import os
import time
from typing import Optional

import jax
import numpy as np
from tqdm.auto import tqdm

from cm_jax import data as data_lib
from cm_jax import sampling
from cm_jax.train import builders, parallel
from cm_jax.train.checkpoint import RunCheckpoints, abstract_like
from cm_jax.train.metrics_log import MetricsLog
from cm_jax.train.step import make_train_step
from cm_jax.utils.images import save_grid_png, to_uint8


class NonFiniteLossError(FloatingPointError):
  pass


def _check_finite(metrics, step: int, last_saved: Optional[int]) -> None:
  if float(jax.device_get(metrics["finite"])) < 1.0:
    where = (f"the last good checkpoint (step {last_saved}) is untouched"
             if last_saved is not None else "no checkpoint had been saved yet")
    raise NonFiniteLossError(
        f"loss or gradient became NaN/inf at step {step}; training stopped and {where}. "
        f"Lower the learning rate or enable gradient clipping (--config.optim.grad_clip).")


def train(config, workdir: str, *, num_steps: Optional[int] = None,
          progress: bool = True, teacher_params=None):
  """Trains `config` in `workdir` up to `num_steps` (default config.training.num_steps).

  A method that distils a teacher provides `load_teacher() -> params`; the
  teacher's parameters then ride along every step, replicated, never trained.
  """
  tcfg = config.training
  total = int(num_steps if num_steps is not None else tcfg.num_steps)
  os.makedirs(workdir, exist_ok=True)
  parts = builders.build_parts(config)
  mesh = parallel.make_mesh(config.get("mesh"))
  parallel.check_batch_size(tcfg.batch_size, mesh)

  data_it = data_lib.build_train_iterator(
      config.data, global_batch_size=tcfg.batch_size, seed=config.seed,
      process_index=jax.process_index(), process_count=jax.process_count())
  builders.check_data_matches(config, data_it.info)
  ckpts = RunCheckpoints(workdir, max_to_keep=tcfg.keep_checkpoints)
  if teacher_params is None and hasattr(parts.method, "load_teacher"):
    teacher_params = parts.method.load_teacher()  # refuses to start without its teacher
  rng = jax.random.key(config.seed)
  init_rng = jax.random.fold_in(rng, 0x5EED)
  state = jax.jit(lambda r, t: builders.new_train_state(parts, config, r, t),
                  out_shardings=parallel.replicated(mesh))(init_rng, teacher_params)
  start = 0
  if ckpts.latest_step() is not None:
    state, data_state, start = ckpts.restore(abstract_like(state))
    data_it.set_state(data_state)
    print(f"resumed from step {start} in {ckpts.directory}")
  last_saved = start if start > 0 else None
  if start >= total:
    ckpts.close()
    return state

  step_fn = parallel.compile_train_step(
      make_train_step(parts.method, parts.optimizer, config.ema, tcfg.batch_size), mesh)
  log = MetricsLog(workdir, enabled=jax.process_index() == 0)
  grid_fn = None
  pending, window, t_window = None, [], time.perf_counter()
  bar = tqdm(total=total, initial=start, desc="train", unit="step",
             disable=not progress or jax.process_index() != 0, dynamic_ncols=True)
  try:
    for step in range(start, total):
      batch = parallel.global_batch(next(data_it), mesh)
      state, metrics = step_fn(state, batch, rng, teacher_params)
      if pending is not None:  # one step behind, so the host never stalls the device
        _check_finite(pending, step - 1, last_saved)
      pending = metrics
      window.append(metrics)
      done = step + 1
      bar.update(1)

      if done % tcfg.log_every == 0 or done == total:
        _check_finite(metrics, step, last_saved)
        means = {k: float(np.mean([float(m[k]) for m in jax.device_get(window)]))
                 for k in metrics if k != "finite"}
        elapsed = time.perf_counter() - t_window
        means["images_per_sec"] = len(window) * tcfg.batch_size / max(elapsed, 1e-9)
        log.write(done, means)
        bar.set_postfix(loss=f"{means['loss']:.4f}", img_s=f"{means['images_per_sec']:.0f}")
        window, t_window = [], time.perf_counter()

      if tcfg.sample_every and (done % tcfg.sample_every == 0 or done == total):
        grid_fn = grid_fn or _grid_writer(parts, config, mesh)
        grid_fn(state, os.path.join(workdir, "samples", f"step_{done:07d}.png"))

      if done % tcfg.save_every == 0 or done == total:
        _check_finite(metrics, step, last_saved)
        ckpts.save(done, state, data_it.get_state(), config)
        last_saved = done
  finally:
    bar.close()
    log.close()
    ckpts.close()
  return state


def _grid_writer(parts, config, mesh):
  """Writes a PNG grid of a fixed set of images (same seeds every time) from the EMA."""
  scfg = config.sample
  sample_fn = sampling.make_sample_fn(parts.method, parts.image_shape, config.data.num_classes,
                                      scfg.num_steps, mesh=None)
  indices = np.arange(scfg.grid_size, dtype=np.int32)

  def write(state, path):
    params = builders.params_for_sampling(state, scfg.params, config.ema)
    images, _ = sample_fn(params, indices, config.seed)
    save_grid_png(to_uint8(jax.device_get(images)), path)

  return write
