"""Fixtures shared across test modules: the tiny digits EDM run, trained once."""
import os
import tempfile

import pytest

from configs import digits_edm, digits_vp
from cm_jax.train import loop


@pytest.fixture(scope="session")
def tiny_edm_run(tmp_path_factory):
  """A 4-step tiny digits EDM run (checkpoints at steps 2 and 4): (config, workdir, state)."""
  workdir = str(tmp_path_factory.mktemp("tiny_edm_run"))
  config = digits_edm.get_config("tiny")
  state = loop.train(config, workdir, progress=False)
  return config, workdir, state


@pytest.fixture(scope="session")
def tiny_vp_run(tmp_path_factory):
  """A 4-step tiny digits VP v-prediction run with label dropout: (config, workdir, state)."""
  workdir = str(tmp_path_factory.mktemp("tiny_vp_run"))
  config = digits_vp.get_config("tiny")
  state = loop.train(config, workdir, progress=False)
  return config, workdir, state


# The digits classifier (cm_jax.eval.digits_classifier) caches its weights in the user's
# cache directory; tests keep theirs in a fixed temp directory instead, so it is trained
# once per machine (deterministic recipe) and nothing is written to ~/.cache.
os.environ.setdefault("CM_JAX_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), "cm_jax_test_cache"))
