"""Fitting instead of training: a method with `fit(...)` and no loss (e.g. OLSS).

train.py calls `fit_run` for such a method. The fitted parameter pytree is
saved as an ordinary run: one checkpoint at step 0 in `<workdir>/checkpoints`
holding `fitted_train_state(params)` (no optimizer state, no EMA) and the
config, so `cm_jax.train.restore.restore_train_state`, sample.py and
evaluate.py read it like a trained run (builders.abstract_train_state takes the
shapes from the method's `abstract_fit_params()`).

The saved config is marked for readers of runs: `config.method.kind =
"fitted"`, and its EMA fields are emptied (`ema.rates = ()`,
`ema.halflife_kimg = 0`) because the run has none, so `--params ema` (the
default) reads the fitted parameters. The checkpoint's data item is
`{"fitted": True}`: there is no data position to resume.

A fit is not resumable: a workdir that already holds anything is refused.
"""
from __future__ import annotations

import jax
import numpy as np
from etils import epath
from jax.experimental import multihost_utils

from cm_jax import data as data_lib
from cm_jax import runs
from cm_jax.train import builders
from cm_jax.train.checkpoint import RunCheckpoints
from cm_jax.train.state import fitted_train_state

FITTED_KIND = runs.FITTED_KIND


def is_fitted(method) -> bool:
  return hasattr(method, "fit")


class LazyIterator:
  """The training data pipeline, built on the first `next()`: many fits never read data
  (OLSS samples the teacher), and building a TFDS pipeline needs the data set present."""

  def __init__(self, build):
    self._build = build
    self._it = None

  def _get(self):
    if self._it is None:
      self._it = self._build()
    return self._it

  def __iter__(self):
    return self

  def __next__(self):
    return next(self._get())

  def __getattr__(self, name):  # info, get_state, set_state
    if name.startswith("_"):
      raise AttributeError(name)
    return getattr(self._get(), name)


def fitted_config(config, method_fields=None):
  """The config saved with a fitted run (see the module docstring), with the method's
  `fitted_method_fields()` (e.g. the teacher's step and identity) in config.method."""
  saved = config.copy_and_resolve_references()
  with saved.unlocked():
    saved.method.update(method_fields or {})
    saved.method.kind = FITTED_KIND
    saved.ema.rates = ()
    saved.ema.halflife_kimg = 0.0
  return saved


def _check_empty(workdir: str) -> None:
  path = epath.Path(workdir)
  if path.exists() and any(True for _ in path.iterdir()):
    raise ValueError(f"{workdir} is not empty; a fit writes a new run and cannot resume or "
                     f"overwrite one: choose an empty --workdir")


def _replicated(tree):
  # Every process fits the same pytree (same config and seed); a globally replicated
  # array of it is what Orbax saves from several processes as from one.
  sharding = runs.replicated_sharding()

  def put(x):
    x = np.asarray(jax.device_get(x))
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

  return jax.tree.map(put, tree)


def fit_run(config, workdir: str, *, teacher_params=None, data_iterator=None):
  """Fits the config's method and saves the result as a run in `workdir`; returns its state.

  The method's `fit(teacher_params, rng, data_iterator)` gets load_teacher()'s
  networks (or `teacher_params` when given), the key `key(config.seed)` and
  this process's training batches (`data_iterator`, by default the config's
  pipeline, built only if the fit reads it). With several processes every
  process runs the fit and must return the same pytree (each reads its own
  shard of the data, so combine statistics across processes first).
  """
  parts = builders.build_parts(config)
  method = parts.method
  if not is_fitted(method):
    raise ValueError(f"method {config.method.name!r} has no fit(); train it with "
                     f"cm_jax.train.loop.train")
  _check_empty(workdir)
  if jax.process_count() > 1:  # before any process creates the workdir it checked
    multihost_utils.sync_global_devices("cm_jax.fit: workdir checked")
  if teacher_params is None and hasattr(method, "load_teacher"):
    teacher_params = method.load_teacher()
  data_it = data_iterator
  if data_it is None:
    def build():
      it = data_lib.build_train_iterator(
          config.data, global_batch_size=config.training.batch_size, seed=config.seed,
          process_index=jax.process_index(), process_count=jax.process_count())
      builders.check_data_matches(config, it.info)
      return it
    data_it = LazyIterator(build)
  params = method.fit(teacher_params, jax.random.key(config.seed), data_it)

  expected = jax.tree.map(lambda x: (tuple(x.shape), np.dtype(x.dtype)),
                          method.abstract_fit_params())
  got = jax.tree.map(lambda x: (tuple(np.shape(x)), np.dtype(x.dtype)), params)
  if jax.tree.structure(expected) != jax.tree.structure(got) or expected != got:
    raise ValueError(f"method {config.method.name!r}: fit() returned shapes {got} but "
                     f"abstract_fit_params() says {expected}; sample.py could not read the run")

  state = _replicated(fitted_train_state(params))
  epath.Path(workdir).mkdir(parents=True, exist_ok=True)
  ckpts = RunCheckpoints(workdir, async_save=False)
  try:
    fields = getattr(method, "fitted_method_fields", None)
    ckpts.save(0, state, {"fitted": True},
               fitted_config(config, fields() if fields is not None else None), wait=True)
  finally:
    ckpts.close()
  return state
