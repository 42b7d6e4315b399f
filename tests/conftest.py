"""Fixtures shared across test modules: the tiny digits EDM run, trained once."""
import pytest

from configs import digits_edm
from cm_jax.train import loop


@pytest.fixture(scope="session")
def tiny_edm_run(tmp_path_factory):
  """A 4-step tiny digits EDM run (checkpoints at steps 2 and 4): (config, workdir, state)."""
  workdir = str(tmp_path_factory.mktemp("tiny_edm_run"))
  config = digits_edm.get_config("tiny")
  state = loop.train(config, workdir, progress=False)
  return config, workdir, state
