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


def _one_line_failure(result, *words, progress_bar=False):
  """Exit status != 0 and the error in one line (after a progress bar, when sampling ran)."""
  assert result.returncode != 0
  err = result.stderr.strip()
  if progress_bar:
    err = err.splitlines()[-1]
  assert err.count("\n") == 0, err
  for w in words:
    assert w in err, err


def test_sample_cli_refuses_non_finite_samples(tiny_edm_run, tmp_path):
  """NaN weights used to give all-black images and exit 0; now nothing is written."""
  import jax
  import jax.numpy as jnp
  from cm_jax.train.checkpoint import RunCheckpoints
  config, _, state = tiny_edm_run
  nan = lambda tree: jax.tree.map(lambda x: jnp.full_like(x, jnp.nan), tree)
  bad = state.replace(params=nan(state.params), ema={k: nan(v) for k, v in state.ema.items()})
  workdir = tmp_path / "nan_run"
  ckpts = RunCheckpoints(str(workdir), async_save=False)
  ckpts.save(4, bad, {"imported": True}, config, wait=True)
  ckpts.close()
  out = tmp_path / "s.npz"
  result = _run("sample.py", "--workdir", str(workdir), "--num", "4", "--steps", "3",
                "--batch_size", "4", "--out", str(out), check=False)
  _one_line_failure(result, "NaN", "sample.py: step 4, weights 'halflife'", progress_bar=True)
  assert not out.exists()
