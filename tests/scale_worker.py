"""Subprocess side of tests/test_scale_*.py (multi-device and multi-process runs).

Simulated CPU devices must be requested before JAX is imported, so every
multi-device check runs here, in a fresh interpreter started by the tests:

  python tests/scale_worker.py layouts OUT.npz
      one train step of the same global batch under several layouts on 8 devices
  python tests/scale_worker.py multihost OUT.npz WORKDIR STEPS PROCESS_ID PORT
      one of two processes (4 devices each) training a few steps with checkpoints
  python tests/scale_worker.py concat OUT.npz WORKDIR STEPS
      one process, 8 devices, fed the two processes' data shards side by side
"""
from __future__ import annotations

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# Compile-time knobs: the checks compare layouts with each other under the same
# flags, and XLA's backend optimisation dominates compile time on 2 CPU cores.
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def micro_config(fsdp_min_size: int = 64):
  """The tiny digits EDM config with a still smaller UNet (one level, no attention)."""
  from configs import digits_edm
  c = digits_edm.get_config("tiny")
  c.model.update(model_channels=8, channel_mult=(1,), attention_resolutions=(),
                 num_res_blocks=1, num_head_channels=8, num_groups=4, resblock_updown=False)
  c.mesh.fsdp_min_size = fsdp_min_size  # small, so the micro net's kernels do get sharded
  # No warm-up (its first step has lr 0), and an Adam epsilon that keeps the first
  # update lr * g / (|g| + eps) a smooth function of the gradient: float-level
  # differences in g stay float-level in the parameters.
  c.optim.update(warmup_steps=0, lr=1e-3, eps=1e-4)
  return c


def per_example_method(parts, config):
  """EDM's loss with randomness keyed by example, not by batch (see test_scale_parallel).

  Example i's sigma and noise come from fold_in(key(step), batch['index'][i]),
  ignoring the step's rng, so the loss and its gradient do not depend on how
  the batch is cut into devices or microbatches: any two layouts of the same
  global batch must give the same update up to float summation order.
  """
  import jax
  import jax.numpy as jnp
  from cm_jax.diffusion.edm_loss import edm_loss_weight
  from cm_jax.methods.edm import EDM

  class PerExampleEDM(EDM):

    def loss(self, params, batch, rng, ctx):
      del rng
      x0 = batch["image"].astype(jnp.float32)
      base = jax.random.fold_in(jax.random.key(1234), ctx.step)
      keys = jax.vmap(lambda i: jax.random.fold_in(base, i))(batch["index"])
      z = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, 0), ()))(keys)
      sigma = jnp.exp(self.cfg.p_mean + self.cfg.p_std * z)
      noise = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, 1), x0.shape[1:]))(keys)
      d = self.denoiser(params)(x0 + sigma[:, None, None, None] * noise, sigma, batch["label"])
      per = edm_loss_weight(sigma, self.precond.sigma_data) * jnp.mean(
          jnp.square(d - x0), axis=(1, 2, 3))
      loss = jnp.mean(per)
      return loss, {"loss": loss}

  return PerExampleEDM(parts.net, config)


def fixed_batch(config, size: int):
  import numpy as np
  rs = np.random.RandomState(0)
  h, c = config.data.image_size, config.data.channels
  return {"image": rs.uniform(-1, 1, (size, h, h, c)).astype(np.float32),
          "label": rs.randint(0, 10, (size,)).astype(np.int32),
          "index": np.arange(size, dtype=np.int32),
          "_preempt": np.zeros((size,), np.int32)}


_INIT = {}


def _initial_state(parts, config):
  """The starting state, computed once per network config (on one device) and shared."""
  import jax
  key = config.model.to_json()
  if key not in _INIT:
    from cm_jax.train import builders
    _INIT[key] = jax.jit(lambda r: builders.new_train_state(parts, config, r))(
        jax.random.key(7))
  return _INIT[key]


def one_step(config, method_fn, batch, accum: int = 1):
  """Params after one step from the fixed init, under config.parallel / config.mesh."""
  import jax
  import numpy as np
  from cm_jax.train import builders, parallel
  from cm_jax.train.step import make_train_step
  parts = builders.build_parts(config)
  method = method_fn(parts, config) if method_fn else parts.method
  par = parallel.build_parallel(config)
  parallel.check_batch_size(len(batch["image"]), par.batch_divisor(), accum)
  # A copy: the compiled step donates (deletes) the state it is given.
  state = par.from_host(jax.tree.map(lambda x: x.copy(), _initial_state(parts, config)))
  step = make_train_step(method, parts.optimizer, config.ema, len(batch["image"]),
                         grad_accum_steps=accum, axis_name=par.axis_name)
  fn = par.compile(step, state, None)
  state, metrics = fn(state, par.batch(batch), jax.random.key(3), None)
  host = par.to_host(state)
  leaves = jax.tree_util.tree_leaves_with_path({"params": host.params, "opt": host.opt_state})
  out = {jax.tree_util.keystr(p): np.asarray(x) for p, x in leaves}
  out["__loss"] = np.asarray(metrics["loss"])
  out["__dtypes"] = np.asarray(sorted({str(x.dtype) for x in jax.tree.leaves(
      (host.params, host.opt_state, host.ema))}))
  shardings = {str(x.sharding.spec) for x in jax.tree.leaves(state.params)
               if hasattr(x.sharding, "spec")}
  return out, shardings


def layouts(out_path):
  import jax
  import numpy as np
  assert jax.device_count() == 8, jax.devices()
  base = micro_config()
  batch = fixed_batch(base, 16)
  results, specs = {}, {}

  def run(name, accum=1, method=per_example_method, **over):
    c = micro_config()
    for key, value in over.items():
      section, _, field = key.partition("__")
      if field:
        c[section][field] = value
      else:
        c[section] = value
    results[name], specs[name] = one_step(c, method, batch, accum)

  # The per-example method under every layout.
  run("single", mesh__data=1)
  run("jit_8x1")
  run("jit_4x2", mesh__fsdp=2)
  run("pmap", parallel="pmap")
  # Gradient accumulation: k microbatches against the one big batch.
  run("single_accum4", accum=4, mesh__data=1)
  run("jit_4x2_accum2", accum=2, mesh__fsdp=2)
  # The real EDM loss (its noise drawn for the whole batch from one key) under jit.
  run("edm_single", method=None, mesh__data=1)
  run("edm_4x2", method=None, mesh__fsdp=2)
  # Remat changes memory, not the maths.
  run("single_remat", mesh__data=1, model__remat=True)
  # bf16 compute, fp32 master weights.
  run("single_bf16", mesh__data=1, model__dtype="bfloat16")

  flat = {f"{name}/{k}": v for name, r in results.items() for k, v in r.items()}
  flat["pmap_loop/checked"] = np.asarray(pmap_loop(os.path.dirname(os.path.abspath(out_path))))
  flat.update({f"spec/{name}": np.asarray(sorted(s)) for name, s in specs.items()})
  np.savez(out_path, **flat)


def pmap_loop(tmp):
  """The loop under pmap: checkpoints hold the unreplicated state, resume is exact, grids draw.

  Returns the names of the checks that passed (an assertion fails the worker).
  """
  import jax
  import numpy as np
  from cm_jax.train import builders, loop
  from cm_jax.train.checkpoint import RunCheckpoints
  c = micro_config()
  c.parallel = "pmap"
  c.training.update(batch_size=16, save_every=2, sample_every=2, log_every=1)
  straight = loop.train(c, os.path.join(tmp, "pmap_a"), num_steps=4, progress=False)
  resumed_dir = os.path.join(tmp, "pmap_b")
  loop.train(c, resumed_dir, num_steps=2, progress=False)
  resumed = loop.train(c, resumed_dir, num_steps=4, progress=False)
  for a, b in zip(jax.tree.leaves(straight), jax.tree.leaves(resumed)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # What sample.py does: restore into the plain (unreplicated) abstract state.
  parts = builders.build_parts(c)
  abstract = builders.abstract_train_state(parts, c)
  restored, _, step = RunCheckpoints(resumed_dir, read_only=True).restore(abstract)
  assert step == 4
  for a, b, s in zip(jax.tree.leaves(restored), jax.tree.leaves(resumed),
                     jax.tree.leaves(abstract)):
    assert a.shape == s.shape, (a.shape, s.shape)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert os.path.exists(os.path.join(resumed_dir, "samples", "step_0000004.png"))
  assert int(straight.step) == 4
  return ["resume_exact", "checkpoint_unreplicated", "grid_written"]


class ConcatShards:
  """One process reading what `count` processes would read, side by side.

  next() concatenates the per-process batches in process order, which is the
  row order `jax.make_array_from_process_local_data` gives the global batch
  when process p owns the p-th block of devices.
  """

  def __init__(self, config, count):
    from cm_jax import data as data_lib
    self.its = [data_lib.build_train_iterator(
        config.data, global_batch_size=config.training.batch_size, seed=config.seed,
        process_index=i, process_count=count) for i in range(count)]
    self.info = self.its[0].info

  def __iter__(self):
    return self

  def __next__(self):
    import numpy as np
    parts = [next(it) for it in self.its]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

  def get_state(self):
    return {"shards": [it.get_state() for it in self.its]}

  def set_state(self, state):
    for it, s in zip(self.its, state["shards"]):
      it.set_state(s)


def multihost_config():
  c = micro_config()
  c.mesh.fsdp = 2
  # Grids too: sampling over a mesh whose parameters are split across processes.
  c.training.update(batch_size=16, save_every=2, log_every=1, keep_checkpoints=5,
                    sample_every=2)
  return c


def save_params(state, out_path):
  import jax
  import numpy as np
  leaves = jax.tree_util.tree_leaves_with_path((state.params, state.ema, state.opt_state))
  np.savez(out_path, **{jax.tree_util.keystr(p): np.asarray(jax.device_get(x))
                        for p, x in leaves}, __step=np.asarray(int(state.step)))


def multihost(out_path, workdir, steps, process_id, port):
  import jax
  from cm_jax.train import distributed
  distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2,
                         process_id=int(process_id), timeout_s=120)
  assert jax.process_count() == 2 and jax.device_count() == 8, jax.devices()
  from cm_jax.train import loop
  state = loop.train(multihost_config(), workdir, num_steps=int(steps), progress=False)
  # Gather the FSDP-sharded leaves to every process before reading them.
  from jax.experimental import multihost_utils
  host = multihost_utils.process_allgather(
      (state.params, state.ema, state.opt_state), tiled=True)
  if int(process_id) == 0:
    save_params(type(state)(step=state.step, params=host[0], ema=host[1], opt_state=host[2]),
                out_path)
  jax.distributed.shutdown()


def concat(out_path, workdir, steps):
  from cm_jax.train import loop
  config = multihost_config()
  state = loop.train(config, workdir, num_steps=int(steps), progress=False,
                     data_iterator=ConcatShards(config, 2))
  save_params(state, out_path)


if __name__ == "__main__":
  mode, args = sys.argv[1], sys.argv[2:]
  devices = 4 if mode == "multihost" else 8
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" {FAST_COMPILE} "
                             f"--xla_force_host_platform_device_count={devices}")
  {"layouts": layouts, "multihost": multihost, "concat": concat}[mode](*args)
