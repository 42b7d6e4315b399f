"""evaluate.py as a user runs it, on the tiny digits EDM run, with the digits detector."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args, check=True):
  result = subprocess.run([sys.executable, "evaluate.py", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
  if check and result.returncode != 0:
    raise AssertionError(f"{args} failed:\n{result.stdout}\n{result.stderr}")
  return result


@pytest.fixture(scope="module")
def run_eval(tiny_edm_run, tmp_path_factory):
  _, workdir, _ = tiny_edm_run
  d = tmp_path_factory.mktemp("eval")
  out = d / "eval.json"
  _run("--workdir", workdir, "--num", "40", "--steps", "2", "--batch_size", "16",
       "--ref", "data", "--detector", "digits", "--kid_subsets", "5",
       "--save_samples", str(d / "samples.npz"), "--save_ref_stats", str(d / "ref_stats.npz"),
       "--out", str(out))
  return d, json.loads(out.read_text())


def test_workdir_evaluation_writes_every_metric_and_the_protocol(run_eval, tiny_edm_run):
  _, result = run_eval
  m, p = result["metrics"], result["protocol"]
  for key in ("fd_digits", "is_mean", "is_std", "precision", "recall", "kid", "coverage",
              "class_entropy", "confident", "accuracy"):
    assert key in m and np.isfinite(m[key]), key
  assert m["fd_digits"] > 0 and 0 <= m["precision"] <= 1 and 0 <= m["coverage"] <= 1
  s = p["samples"]
  assert s["sampler"] == "heun" and s["num_steps"] == 2 and s["nfe"] == 3
  assert s["num"] == 40 and s["checkpoint_step"] == 4 and s["conditional"] is True
  assert p["reference"]["kind"] == "images" and p["reference"]["num"] == 1797
  assert p["detector"]["name"] == "digits" and len(p["detector"]["recipe_sha256"]) == 64
  assert p["kid"]["num_subsets"] == 5 and p["pr"]["k"] == 3
  assert "jax" in result["versions"]


def test_samples_file_against_saved_statistics_gives_the_same_fd(run_eval):
  d, first = run_eval
  out = d / "again.json"
  r = _run("--samples", str(d / "samples.npz"), "--ref", str(d / "ref_stats.npz"),
           "--detector", "digits", "--out", str(out))
  assert "wrote" in r.stdout
  result = json.loads(out.read_text())
  assert result["metrics"]["fd_digits"] == pytest.approx(first["metrics"]["fd_digits"],
                                                         rel=1e-6)
  assert "precision" not in result["metrics"]  # statistics only: no PR / KID
  assert "statistics only" in result["protocol"]["pr"]
  assert result["protocol"]["reference"]["kind"] == "stats"


def test_inception_without_weights_is_a_clear_error(tmp_path):
  np.savez(tmp_path / "s.npz", np.zeros((4, 8, 8, 1), np.uint8))
  r = _run("--samples", str(tmp_path / "s.npz"), "--ref", "digits", check=False)
  assert r.returncode != 0 and "--inception_weights" in r.stderr


def test_digits_quality_benchmark_reuses_a_trained_run(tiny_edm_run, tmp_path):
  import shutil
  _, workdir, _ = tiny_edm_run
  runs = tmp_path / "runs"
  shutil.copytree(workdir, runs / "digits_edm_tiny")  # already at its 4 steps: reused
  r = subprocess.run([sys.executable, "benchmarks/digits_quality.py", "--variant", "tiny",
                      "--methods", "edm", "--teacher_steps", "3", "--num", "30",
                      "--runs", str(runs)], cwd=ROOT, capture_output=True, text=True,
                     timeout=600)
  assert r.returncode == 0, r.stdout + r.stderr
  assert "| edm | 3 | 5 |" in r.stdout
  result = json.loads((runs / "digits_quality_tiny.json").read_text())
  (row,) = result["rows"]
  assert row["train_s"] is None and row["nfe"] == 5 and row["num_samples"] == 30
  assert np.isfinite(row["fd_digits"]) and row["accuracy"] is not None
  assert (runs / "digits_quality_tiny.md").read_text().count("| edm |") == 1


def test_reference_specs_map_to_data_configs():
  from cm_jax.eval import evaluator
  cfg = evaluator._data_cfg_for("tfds:cifar10:train", image_size=32, tfds_data_dir="/d")
  assert (cfg.name, cfg.tfds_name, cfg.split, cfg.image_size, cfg.data_dir) == (
      "tfds", "cifar10", "train", 32, "/d")
  cfg = evaluator._data_cfg_for("tfds:imagenet_resized/64x64:validation:64")
  assert (cfg.tfds_name, cfg.split, cfg.image_size) == ("imagenet_resized/64x64", "validation", 64)
  assert evaluator._data_cfg_for("digits").name == "digits"
  with pytest.raises(ValueError, match="needs --workdir"):
    evaluator._data_cfg_for("data")
  with pytest.raises(ValueError, match="tfds:NAME:SPLIT"):
    evaluator._data_cfg_for("cifar10")
  images, info = evaluator.reference_images("digits", num=50, seed=1)
  assert images.shape == (50, 8, 8, 1) and images.dtype == np.uint8 and info["num"] == 50
