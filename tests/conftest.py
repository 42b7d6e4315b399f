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


@pytest.fixture(scope="session")
def tiny_sd_folder(tmp_path_factory):
  """A tiny random-weight Stable Diffusion pipeline folder (tests/sd_tiny.py), built once."""
  import sd_tiny  # pylint: disable=g-import-not-at-top
  return sd_tiny.make_tiny_sd_folder(tmp_path_factory.mktemp("sd") / "tiny")


@pytest.fixture(scope="session")
def tiny_latent_runs(tmp_path_factory):
  """The tiny digits32 autoencoder and the tiny latent diffusion teacher trained on it:
  (vae_workdir, ldm_config, ldm_workdir)."""
  from configs import digits32_ldm, digits32_vae  # pylint: disable=g-import-not-at-top
  vae_dir = str(tmp_path_factory.mktemp("tiny_vae_run"))
  loop.train(digits32_vae.get_config("tiny"), vae_dir, progress=False)
  config = digits32_ldm.get_config("tiny")
  config.method.vae_workdir = vae_dir
  config.training.sample_every = 4  # the loop's PNG grid decodes through the frozen parts
  ldm_dir = str(tmp_path_factory.mktemp("tiny_ldm_run"))
  loop.train(config, ldm_dir, progress=False)
  return vae_dir, config, ldm_dir
