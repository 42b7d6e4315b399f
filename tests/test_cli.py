"""train.py and sample.py as a user runs them (subprocesses from the repository root)."""
import os
import subprocess
import sys

import numpy as np
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args, check=True):
  result = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
  if check and result.returncode != 0:
    raise AssertionError(f"{args} failed:\n{result.stdout}\n{result.stderr}")
  return result


def test_dry_run_imagenet64_prints_exact_param_count():
  out = _run("train.py", "--config", "configs/imagenet64_edm.py", "--dry_run").stdout
  assert "params: 295899267" in out.splitlines()
  assert "GiB" in out


def test_dry_run_tiny_matches_initialised_count(tiny_edm_run):
  from cm_jax.train.state import count_params
  _, _, state = tiny_edm_run
  out = _run("train.py", "--config", "configs/digits_edm.py:tiny", "--dry_run").stdout
  assert f"params: {count_params(state.params)}" in out.splitlines()


def test_unknown_config_key_is_an_error():
  result = _run("train.py", "--config", "configs/digits_edm.py:tiny", "--dry_run",
                "--config.optim.learning_rate=1e-4", check=False)
  assert result.returncode != 0
  assert "learning_rate" in result.stderr


def test_sample_cli_writes_npz_and_png(tiny_edm_run, tmp_path):
  config, workdir, _ = tiny_edm_run
  out = tmp_path / "samples.npz"
  _run("sample.py", "--workdir", workdir, "--num", "10", "--steps", "3", "--seed", "0",
       "--batch_size", "4", "--out", str(out))
  data = np.load(out)
  assert data["arr_0"].shape == (10, 8, 8, 1) and data["arr_0"].dtype == np.uint8
  assert data["arr_1"].shape == (10,)
  grid = Image.open(tmp_path / "samples.png")
  assert max(grid.size) >= 256  # small images are enlarged so a person can see them


def test_sample_cli_without_checkpoint_says_so(tmp_path):
  result = _run("sample.py", "--workdir", str(tmp_path / "nothing"), check=False)
  assert result.returncode != 0
  assert "train a model there first" in result.stderr
