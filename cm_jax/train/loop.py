"""The training loop shared by every method: data -> step -> logs, grids, checkpoints.

Resumes from the newest checkpoint in the workdir, with the data iterator at
the same position, so N steps + restart + N steps equals 2N steps in one go.
"""
from __future__ import annotations

import dataclasses
import os
import signal
import tempfile
import threading
import time
from typing import Any, Optional

import jax
import numpy as np
from etils import epath
from jax.experimental import multihost_utils
from tqdm.auto import tqdm

from cm_jax import data as data_lib
from cm_jax import sampling
from cm_jax.methods import teachers
from cm_jax.train import builders, parallel, resume_check, rounds
from cm_jax.train.checkpoint import (RunCheckpoints, data_state_for_process, is_remote,
                                     load_config, process_data_states)
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


class _StopSignals:
  """SIGTERM / SIGINT -> a flag the loop reads after each step (preemption-safe stop).

  The first signal asks the run to finish its current step, save a checkpoint
  synchronously and return; a second SIGINT interrupts at once
  (KeyboardInterrupt). Installed only from the main thread, and the previous
  handlers are put back when the loop ends.
  """

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self, enabled: bool = True):
    self.requested = None  # the signal's name once one arrived
    self._previous = {}
    if enabled and threading.current_thread() is threading.main_thread():
      for sig in self.SIGNALS:
        self._previous[sig] = signal.signal(sig, self._handle)

  def _handle(self, signum, frame):
    del frame
    if self.requested is not None and signum == signal.SIGINT:
      raise KeyboardInterrupt
    self.requested = self.requested or signal.Signals(signum).name

  def restore(self) -> None:
    for sig, handler in self._previous.items():
      if handler is not None:  # None: installed outside Python (e.g. JAX's notifier)
        signal.signal(sig, handler)
    self._previous = {}


@dataclasses.dataclass
class TrainResult:
  """How a call of `run` ended."""
  state: Any                 # the final train state in host form
  step: int                  # the last step trained (and checkpointed)
  total: int                 # the step the run was asked to reach
  stopped_by: Optional[str]  # the signal that ended it early; None when it reached `total`


def train(config, workdir: str, **kwargs):
  """`run` for the final state alone (the tests' and benchmarks' form)."""
  return run(config, workdir, **kwargs).state


def run(config, workdir: str, *, num_steps: Optional[int] = None,
        progress: bool = True, teacher_params=None, data_iterator=None) -> TrainResult:
  """Trains `config` in `workdir` up to `num_steps` (default config.training.num_steps).

  A method that distils a teacher provides `load_teacher() -> params`; the
  teacher's parameters then ride along every step (sharded like the params
  under FSDP, replicated otherwise), never trained.

  A method with `rounds()` (progressive distillation) trains round after round
  (cm_jax.train.rounds): the default total is all its rounds, and each new
  round starts from the method's `start_round` hook with a fresh optimizer
  state and EMA copies.

  SIGTERM or SIGINT (config.training.handle_signals) ends the run early and
  cleanly: the current step finishes, a checkpoint is written synchronously
  and the function returns (a restart continues exactly, data position
  included). With several processes every process stops at the same step: the
  stop request travels with the next batch, so they agree one step later.

  `data_iterator` replaces this process's data pipeline (anything with
  next / get_state / set_state / info); the tests use it to feed one process
  the shards of several.

  Returns a TrainResult: the final state in host form (no device axis, whatever
  config.parallel), the step reached and, when a signal ended the run early, which.
  """
  # Listening from the start: a signal during set-up or compilation stops the run
  # after its first step (JAX's own SIGTERM notifier would otherwise swallow it).
  signals = _StopSignals(enabled=bool(config.training.get("handle_signals", True)))
  # Locked as train.py's config flag locks it, so a field the trainer adds without
  # unlocking fails in every test, not only on the command line.
  config = config.copy_and_resolve_references()
  config.lock()
  try:
    return _train(config, workdir, num_steps, progress, teacher_params, data_iterator, signals)
  finally:
    signals.restore()


def _train(config, workdir, num_steps, progress, teacher_params, data_iterator, signals):
  tcfg = config.training
  if tcfg.keep_checkpoints is not None and int(tcfg.keep_checkpoints) < 1:
    # Orbax would delete every checkpoint, the one this run resumes from included.
    raise ValueError(f"training.keep_checkpoints must be >= 1, got {tcfg.keep_checkpoints}: "
                     f"fewer would delete every checkpoint of the run")
  for field in ("save_every", "log_every"):  # checked before anything is built or compiled
    if int(tcfg.get(field, 1)) < 1:
      raise ValueError(f"training.{field} must be >= 1, got {tcfg.get(field)}")
  if num_steps is not None and int(num_steps) < 1:
    raise ValueError(f"--steps must be >= 1 (the total number of training steps), got "
                     f"{num_steps}")
  accum = int(tcfg.get("grad_accum_steps", 1) or 1)
  parts = builders.build_parts(config)
  if hasattr(parts.method, "fit"):
    raise ValueError(f"method {config.method.name!r} is fitted, not trained: train.py fits it "
                     f"(cm_jax.train.fit.fit_run)")
  plan = rounds.round_plan(parts.method)
  total = _total_steps(config, num_steps, plan)
  epath.Path(workdir).mkdir(parents=True, exist_ok=True)
  par = parallel.build_parallel(config)
  parallel.check_batch_size(tcfg.batch_size, par.batch_divisor(), accum)
  pindex, pcount = jax.process_index(), jax.process_count()

  data_it = data_iterator
  if data_it is None:
    data_it = data_lib.build_train_iterator(
        config.data, global_batch_size=tcfg.batch_size, seed=config.seed,
        process_index=pindex, process_count=pcount)
  builders.check_data_matches(config, data_it.info)
  # A method with rounds keeps the checkpoint that ends each round (its finished student).
  ckpts = RunCheckpoints(workdir, max_to_keep=tcfg.keep_checkpoints,
                         keep_period=plan[1] if plan is not None else None)
  # The config the run was started with, when resuming: checked before the teacher is read
  # or anything is built.
  resumed_config = load_config(workdir) if ckpts.latest_step() is not None else None
  if resumed_config is not None:
    try:
      resume_check.check_same_run(resumed_config, config, workdir)
    except ValueError:
      ckpts.close()
      raise
  if teacher_params is None and hasattr(parts.method, "load_teacher"):
    teacher_params = parts.method.load_teacher()  # refuses to start without its teacher
  saved_config = _with_teacher_identity(config, getattr(parts.method, "teacher_identity", None),
                                        resumed_config)
  teacher_params = par.place_teacher(teacher_params)
  rng = jax.random.key(config.seed)
  init_rng = jax.random.fold_in(rng, 0x5EED)
  state = par.init_state(lambda r, t: builders.new_train_state(parts, config, r, t),
                         init_rng, teacher_params)
  if getattr(parts.method, "teacher_seeds_only", False):
    # The loaded teacher only chose the starting weights (multistep CT), or every step
    # reads the round's teacher from the state (progressive distillation): this copy need
    # not ride along (memory).
    teacher_params = None
  elif teacher_params is not None and hasattr(parts.method, "step_frozen"):
    # Part of what load_teacher() read only seeded the weights (LCF's starting LCM).
    teacher_params = parts.method.step_frozen(teacher_params)
  start = 0
  if ckpts.latest_step() is not None:
    host_state, data_state, start = ckpts.restore(par.host_abstract(state))
    state = par.from_host(host_state)
    resumed_position = data_state_for_process(data_state, pindex, pcount)
    if resumed_position is not None:  # None: imported weights, no data position yet
      data_it.set_state(resumed_position)
    print(f"resumed from step {start} in {ckpts.directory}")
  last_saved = start if start > 0 else None
  current_round = rounds.host_round(par.to_host(state)) if plan is not None else None
  if start >= total:
    ckpts.close()
    return TrainResult(par.to_host(state), start, total, None)

  step_fn = par.compile(
      make_train_step(parts.method, parts.optimizer, config.ema, tcfg.batch_size,
                      grad_accum_steps=accum, axis_name=par.axis_name),
      state, teacher_params)
  log = MetricsLog(workdir, enabled=pindex == 0, resume_step=start)
  grid_fn = None
  pending, window, t_window = None, [], time.perf_counter()
  done, stopped_by = start, None
  bar = tqdm(total=total, initial=start, desc="train", unit="step",
             disable=not progress or pindex != 0, dynamic_ncols=True)

  def save(done):
    data_states = parallel.gather_process_states(data_it.get_state())
    ckpts.save(done, par.to_host(state), process_data_states(data_states), saved_config)

  try:
    for step in range(start, total):
      while plan is not None and current_round < rounds.round_of_step(step, plan):
        if pending is not None:  # the finished round's last step must have been good
          _check_finite(pending, step - 1, last_saved)
        current_round += 1
        state = par.from_host(rounds.next_round(parts.method, parts.optimizer,
                                                par.to_host(state), current_round))
        if pindex == 0:
          bar.write(f"round {current_round + 1} of {plan[0]} starts at step {step}")
      local = dict(next(data_it))
      rows = len(next(iter(local.values())))
      local[parallel.PREEMPT_KEY] = np.full((rows,), signals.requested is not None, np.int32)
      batch = par.batch(local)
      state, metrics = step_fn(state, batch, rng, teacher_params)
      stop = False
      if pending is not None:  # one step behind, so the host never stalls the device
        _check_finite(pending, step - 1, last_saved)
        # Every process reads the same global flag here, so all stop after this step.
        stop = pcount > 1 and float(pending["preempt"]) > 0
      if pcount == 1:  # alone, stop right after the step that is running
        stop = signals.requested is not None
      pending = metrics
      window.append(metrics)
      done = step + 1
      bar.update(1)
      ckpts.check_saved()  # a failed background save stops the run now, in one line

      if done % tcfg.log_every == 0 or done == total or (stop and window):
        _check_finite(metrics, step, last_saved)
        means = {k: float(np.mean([float(m[k]) for m in jax.device_get(window)]))
                 for k in metrics if k not in ("finite", "preempt")}
        elapsed = time.perf_counter() - t_window
        means["images_per_sec"] = len(window) * tcfg.batch_size / max(elapsed, 1e-9)
        log.write(done, means)
        bar.set_postfix(loss=f"{means['loss']:.4f}", img_s=f"{means['images_per_sec']:.0f}")
        window, t_window = [], time.perf_counter()

      if stop:
        _check_finite(metrics, step, last_saved)
        if last_saved != done:
          save(done)
          last_saved = done
        ckpts.wait()
        stopped_by = signals.requested or "a signal on another process"
        print(f"stopped by {stopped_by} after step {done} of {total}; checkpoint saved in "
              f"{ckpts.directory} (rerun the same command to continue)", flush=True)
        break

      if tcfg.sample_every and (done % tcfg.sample_every == 0 or done == total):
        grid_fn = grid_fn or _grid_writer(parts, config, par.mesh)
        grid_fn(par.sampling_state(state), _join(workdir, "samples", f"step_{done:07d}.png"))

      round_end = plan is not None and done % plan[1] == 0
      if done % tcfg.save_every == 0 or done == total or round_end:
        _check_finite(metrics, step, last_saved)
        save(done)
        last_saved = done
  finally:
    bar.close()
    log.close()
    ckpts.close()
  return TrainResult(par.to_host(state), done, total, stopped_by)


def _with_teacher_identity(config, identity, resumed_config):
  """The config the checkpoints record: with the loaded teacher's identity (its step and a
  hash of its weights), after refusing, in one line, to resume a run against a teacher other
  than the one it was trained with (teachers.check_same_teacher). `resumed_config` is the
  run's saved config when it resumes, else None."""
  if not identity:
    return config
  if resumed_config is not None:
    saved = resumed_config.method.get(teachers.IDENTITY_KEY)
    teachers.check_same_teacher(saved, identity,
                                bool(config.method.get(teachers.OVERRIDE_KEY, False)))
  recorded = config.copy_and_resolve_references()
  with recorded.unlocked():  # a field the config files do not declare
    recorded.method[teachers.IDENTITY_KEY] = identity
  return recorded


def _total_steps(config, num_steps, plan) -> int:
  """config.training.num_steps, or rounds x steps per round for a method with rounds;
  `num_steps` (--steps) overrides either, up to the last round's end."""
  if plan is None:
    return int(num_steps if num_steps is not None else config.training.num_steps)
  planned = rounds.total_steps(plan)
  total = planned if num_steps is None else int(num_steps)
  if total > planned:
    raise ValueError(f"method {config.method.name!r} runs {plan[0]} round(s) of {plan[1]} steps "
                     f"= {planned} steps; {total} steps would go past its last round")
  return total


def _join(workdir: str, *parts: str) -> str:
  return "/".join([str(workdir).rstrip("/"), *parts]) if is_remote(workdir) else os.path.join(
      workdir, *parts)


def _grid_writer(parts, config, mesh):
  """Writes a PNG grid of a fixed set of images (same seeds every time) from the EMA.

  Sampled over the run's mesh (every process takes part when the parameters
  are sharded across processes), gathered, and written by process 0.
  """
  scfg = config.sample
  ways = parallel.batch_divisor(mesh)
  n = int(scfg.grid_size)
  padded = -(-n // ways) * ways  # the sharded batch must split evenly; extra images dropped
  sample_fn = sampling.make_sample_fn(parts.method, parts.image_shape, config.data.num_classes,
                                      scfg.num_steps, mesh=mesh)
  host_indices = np.arange(padded, dtype=np.int32)
  indices = jax.make_array_from_callback(
      (padded,), parallel.batch_sharding(mesh), lambda index: host_indices[index])

  def write(state, path):
    params = builders.params_for_sampling(state, scfg.params, config.ema)
    prepare = getattr(parts.method, "sampling_params", None)
    if prepare is not None:  # e.g. a latent model: its frozen autoencoder and text encoder
      params = prepare(params)
    params = jax.device_put(params, parallel.replicated(mesh))  # FSDP shards -> whole copies
    images, _ = sample_fn(params, indices, config.seed)
    images = np.asarray(multihost_utils.process_allgather(images, tiled=True))[:n]
    if jax.process_index() != 0:
      return
    if not is_remote(path):
      save_grid_png(to_uint8(images), path)
      return
    with tempfile.TemporaryDirectory() as tmp:  # PIL writes files; epath copies to gs://
      local = os.path.join(tmp, "grid.png")
      save_grid_png(to_uint8(images), local)
      target = epath.Path(path)
      target.parent.mkdir(parents=True, exist_ok=True)
      target.write_bytes(epath.Path(local).read_bytes())

  return write
