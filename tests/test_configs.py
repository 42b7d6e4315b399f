"""Every config builds; the TFDS configs train end to end on mock data (no download)."""
import glob
import importlib
import os

import jax
import pytest
import tensorflow_datasets as tfds

from cm_jax.train import builders, loop
from cm_jax.train.state import count_params

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, "configs", "*.py"))
                 if not os.path.basename(p).startswith(("_", "base")))


@pytest.mark.parametrize("name", CONFIGS)
def test_full_and_tiny_variants_build(name):
  module = importlib.import_module(f"configs.{name}")
  for variant in ("", "tiny"):
    config = module.get_config(variant)
    parts = builders.build_parts(config)
    state = builders.abstract_train_state(parts, config)
    assert count_params(state.params) > 0
  with pytest.raises(ValueError, match="unknown config variant"):
    module.get_config("huge")


@pytest.mark.parametrize("name,classes", [("cifar10_edm", 0), ("imagenet64_edm", 1000)])
def test_tfds_config_trains_on_mock_data(name, classes, tmp_path):
  config = importlib.import_module(f"configs.{name}").get_config("tiny")
  config.data.update(num_threads=1, prefetch_buffer_size=8)
  with tfds.testing.mock_data(num_examples=16):
    state = loop.train(config, str(tmp_path), progress=False)
  assert int(state.step) == config.training.num_steps
  assert config.data.num_classes == classes
  assert all(jax.numpy.isfinite(x).all() for x in jax.tree.leaves(state.params))
