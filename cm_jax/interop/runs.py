"""Imported parameters <-> Orbax run directories (the ones train.py, sample.py and
evaluate.py read)."""
from __future__ import annotations

import os
from typing import Optional, Tuple

import jax
import jax.numpy as jnp

from cm_jax import runs
from cm_jax.interop import name_maps
from cm_jax.train import builders
from cm_jax.train import ema as ema_lib
from cm_jax.train.checkpoint import RunCheckpoints, checkpoint_dir
from cm_jax.train.state import create_train_state


def expected_params(config) -> name_maps.FlatParams:
  """Flat shapes/dtypes of the network the config builds (nothing is allocated)."""
  parts = builders.build_parts(config)
  shapes = jax.eval_shape(lambda: builders.init_params(parts, config, jax.random.key(0)))
  return name_maps.flatten(shapes, to_numpy=False)


def to_network_params(params, config, what: str = "imported parameters"):
  """Checks names and shapes against the config's network; casts to its dtypes (jax arrays)."""
  want = expected_params(config)
  flat = name_maps.flatten(params)
  name_maps.check_against(flat, want, what)
  return name_maps.unflatten({p: jnp.asarray(v, want[p].dtype) for p, v in flat.items()})


def save_imported_run(workdir: str, params, config, step: int = 0,
                      source: Optional[dict] = None) -> str:
  """A run directory at `step` whose online params, every EMA copy and the target (when
  the method keeps one) all hold `params`; the optimizer state starts fresh."""
  if os.path.isdir(checkpoint_dir(workdir)) and os.listdir(checkpoint_dir(workdir)):
    raise FileExistsError(f"{checkpoint_dir(workdir)} already holds checkpoints; import into "
                          f"a new --workdir")
  params = to_network_params(params, config)
  parts = builders.build_parts(config)
  state = create_train_state(params, parts.optimizer, ema_lib.ema_names(config.ema),
                             parts.method.uses_target())
  state = state.replace(step=jnp.asarray(step, jnp.int32))
  # No data iterator has run: the data entry records where the weights came from.
  data_state = {"imported": True, **(source or {})}
  ckpts = RunCheckpoints(workdir, max_to_keep=None, async_save=False)
  try:
    ckpts.save(int(step), state, data_state, config, wait=True)
  finally:
    ckpts.close()
  return checkpoint_dir(workdir)


def load_run_params(workdir: str, which: Optional[str] = None,
                    step: Optional[int] = None) -> Tuple[dict, object, int, str]:
  """(params on the host, config, step, `which`) of a run; `which` as sample.py's --params
  (default: the config's sample.params). Only that copy is read (cm_jax.runs.load_run)."""
  run = runs.load_run(workdir, which, step)
  which = which or run.config.sample.get("params", "ema")
  return jax.device_get(run.params), run.config, run.step, which
