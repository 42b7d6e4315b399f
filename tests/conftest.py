"""Fixtures shared across test modules: the tiny digits EDM and VP runs, trained once."""
import os
import tempfile

import pytest

from configs import digits_edm, digits_vp
from cm_jax.train import loop


def _train_tiny(tmp_path_factory, name, config_module):
  """Trains config_module's :tiny config once in a fresh directory: (config, workdir, state)."""
  workdir = str(tmp_path_factory.mktemp(name))
  config = config_module.get_config("tiny")
  return config, workdir, loop.train(config, workdir, progress=False)


@pytest.fixture(scope="session")
def tiny_edm_run(tmp_path_factory):
  """A 4-step tiny digits EDM run (checkpoints at steps 2 and 4): (config, workdir, state)."""
  return _train_tiny(tmp_path_factory, "tiny_edm_run", digits_edm)


@pytest.fixture(scope="session")
def tiny_vp_run(tmp_path_factory):
  """A 4-step tiny digits VP v-prediction run with label dropout: (config, workdir, state)."""
  return _train_tiny(tmp_path_factory, "tiny_vp_run", digits_vp)


# The digits classifier (cm_jax.eval.digits_classifier) caches its weights in the user's
# cache directory; tests keep theirs in a fixed temp directory instead, so it is trained
# once per machine (deterministic recipe) and nothing is written to ~/.cache.
os.environ.setdefault("CM_JAX_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), "cm_jax_test_cache"))


def _built_once(tmp_path_factory, worker_id, name, build):
  """`build(directory)` run once per test session even under pytest-xdist: session fixtures
  are per worker process, so the workers share one directory under the session's base
  temp dir and take turns with a file lock; the first builds, the others reuse."""
  if worker_id == "master":  # no xdist
    return build(tmp_path_factory.mktemp(name))
  from filelock import FileLock  # pylint: disable=g-import-not-at-top
  root = tmp_path_factory.getbasetemp().parent  # this session's, shared by its workers
  directory, done = root / name, root / f"{name}.done"
  with FileLock(str(root / f"{name}.lock")):
    if not done.exists():
      build(directory)
      done.write_text("built")
  return build.result(directory)


class _Build:
  """A build step whose result can be rebuilt from its directory alone."""

  def __init__(self, make, result):
    self.make, self.result = make, result

  def __call__(self, directory):
    directory.mkdir(parents=True, exist_ok=True)
    self.make(directory)
    return self.result(directory)


@pytest.fixture(scope="session")
def tiny_sd_folder(tmp_path_factory, worker_id):
  """A tiny random-weight Stable Diffusion pipeline folder (tests/sd_tiny.py), built once."""
  import sd_tiny  # pylint: disable=g-import-not-at-top
  build = _Build(lambda d: sd_tiny.make_tiny_sd_folder(d / "tiny"), lambda d: d / "tiny")
  return _built_once(tmp_path_factory, worker_id, "tiny_sd_folder", build)


@pytest.fixture(scope="session")
def tiny_lcm_folder(tmp_path_factory, worker_id):
  """A tiny random-weight LCM folder (tests/sd_tiny.py): the tiny SD layout with an 8-wide
  guidance embedding (time_cond_proj_dim) and an LCMScheduler, built once."""
  import sd_tiny  # pylint: disable=g-import-not-at-top
  build = _Build(lambda d: sd_tiny.make_tiny_sd_folder(d / "tiny", time_cond_proj_dim=8,
                                                       scheduler="lcm", seed=1),
                 lambda d: d / "tiny")
  return _built_once(tmp_path_factory, worker_id, "tiny_lcm_folder", build)


def _tiny_ldm_config(vae_dir):
  from configs import digits32_ldm  # pylint: disable=g-import-not-at-top
  config = digits32_ldm.get_config("tiny")
  config.method.vae_workdir = str(vae_dir)
  config.training.sample_every = 4  # the loop's PNG grid decodes through the frozen parts
  return config


def _train_latent_runs(directory):
  from configs import digits32_vae  # pylint: disable=g-import-not-at-top
  loop.train(digits32_vae.get_config("tiny"), str(directory / "vae"), progress=False)
  loop.train(_tiny_ldm_config(directory / "vae"), str(directory / "ldm"), progress=False)


@pytest.fixture(scope="session")
def tiny_latent_runs(tmp_path_factory, worker_id):
  """The tiny digits32 autoencoder and the tiny latent diffusion teacher trained on it,
  once per session: (vae_workdir, ldm_config, ldm_workdir)."""
  build = _Build(_train_latent_runs, lambda d: (str(d / "vae"), _tiny_ldm_config(d / "vae"),
                                                str(d / "ldm")))
  return _built_once(tmp_path_factory, worker_id, "tiny_latent_runs", build)
