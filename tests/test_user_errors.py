"""Every user mistake the scripts know of ends in one line on stderr, exit status != 0, and
leaves every run directory as it was (issue: reliability, "every user error one line").

Each case runs the script as a user would (a subprocess from the repository root) and
fails before anything is compiled, so a case costs little more than the import of JAX.
The run directories are the session's tiny EDM run, a copy of it for train.py to refuse,
and two freshly initialised (untrained) runs: a consistency model for --ts and an
unconditional EDM model for --class_label.
"""
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from cm_testlib import micro, save_run
from configs import digits_ct, digits_edm, digits_mcm_cd

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = "configs/digits_edm.py:tiny"


@pytest.fixture(scope="module")
def places(tiny_edm_run, tmp_path_factory):
  """Paths the cases refer to: run directories, damaged files, a file in a directory's place."""
  root = tmp_path_factory.mktemp("user_errors")
  p = {"edm": tiny_edm_run[1], "tmp": str(root)}
  p["copy"] = str(root / "copy")  # train.py is pointed at a copy: the fixture stays pristine
  shutil.copytree(tiny_edm_run[1], p["copy"])
  p["torn"] = str(root / "torn")  # one checkpoint whose data position is torn JSON
  shutil.copytree(tiny_edm_run[1], p["torn"])
  shutil.rmtree(os.path.join(p["torn"], "checkpoints", "2"))
  with open(os.path.join(p["torn"], "checkpoints", "4", "data", "metadata"), "w") as f:
    f.write('{"process_count": 1, "proc')
  p["ct"], _ = save_run(str(root / "ct"), micro(digits_ct.get_config("tiny")))
  uncond = micro(digits_edm.get_config("tiny"))
  uncond.data.num_classes = 0
  p["uncond"], _ = save_run(str(root / "uncond"), uncond)
  p["mcm"], _ = save_run(str(root / "mcm"), micro(digits_mcm_cd.get_config("tiny")))  # S = 2
  np.savez(root / "empty.npz", np.zeros((0, 8, 8, 1), np.uint8))
  (root / "text.npz").write_text("not an archive")
  (root / "a_file").write_text("")
  (root / "garbage.pt").write_bytes(np.random.default_rng(0).bytes(4096))
  (root / "garbage.pkl").write_bytes(np.random.default_rng(1).bytes(4096))
  torch.save({"w": torch.zeros(2), "hook": print}, root / "code.pt")  # refers to a function
  return p


def _snapshot(paths):
  """Every file and directory under `paths` with size and modification time."""
  seen = {}
  for top in paths:
    for dirpath, dirnames, filenames in os.walk(top):
      seen[dirpath] = "dir"
      for name in filenames:
        st = os.stat(os.path.join(dirpath, name))
        seen[os.path.join(dirpath, name)] = (st.st_size, st.st_mtime_ns)
  return seen


# (script and arguments with {placeholders}, words the one line must hold, a directory
# that must not exist afterwards).
CASES = {
    # train.py: the config
    "unknown config key": ("train.py --config " + TINY + " --workdir {tmp}/n1 "
                           "--config.optim.learning_rate=1e-4",
                           ["--config.optim.learning_rate", "no such field"], "{tmp}/n1"),
    "missing config file": ("train.py --config configs/nope.py --workdir {tmp}/n2",
                            ["configs/nope.py", "no such file"], "{tmp}/n2"),
    "unknown variant": ("train.py --config configs/digits_edm.py:bogus --workdir {tmp}/n3",
                        ["unknown config variant 'bogus'"], "{tmp}/n3"),
    "save_every 0": ("train.py --config " + TINY + " --workdir {tmp}/n4 "
                     "--config.training.save_every=0", ["save_every", ">= 1"], "{tmp}/n4"),
    "log_every 0": ("train.py --config " + TINY + " --workdir {tmp}/n5 "
                    "--config.training.log_every=0", ["log_every", ">= 1"], "{tmp}/n5"),
    "keep_checkpoints 0": ("train.py --config " + TINY + " --workdir {copy} "
                           "--config.training.keep_checkpoints=0",
                           ["keep_checkpoints", ">= 1"], None),
    "steps 0": ("train.py --config " + TINY + " --workdir {tmp}/n6 --steps 0",
                ["--steps", ">= 1"], "{tmp}/n6"),
    "steps negative": ("train.py --config " + TINY + " --workdir {tmp}/n7 --steps -3",
                       ["--steps", ">= 1"], "{tmp}/n7"),
    # train.py: the run directory
    "workdir is a file": ("train.py --config " + TINY + " --workdir {tmp}/a_file",
                          ["a_file", "is a file"], None),
    "workdir under a file": ("train.py --config " + TINY + " --workdir {tmp}/a_file/run",
                             ["cannot be made", "is a file"], None),
    "resume another method": ("train.py --config configs/digits_vp.py:tiny --workdir {copy}",
                              ["another train state", "method.name 'edm' != 'vp'"], None),
    "resume another network": ("train.py --config " + TINY + " --workdir {copy} "
                               "--config.model.model_channels=24",
                               ["another train state", "model.model_channels"], None),
    "torn data position": ("train.py --config " + TINY + " --workdir {torn}",
                           ["could be read", "4/data/metadata", "JSONDecodeError"], None),
    "teacher missing": ("train.py --config configs/digits_cd.py:tiny --workdir {tmp}/n8 "
                        "--config.method.teacher_workdir={tmp}/no_teacher",
                        ["no_teacher", "has no checkpoints"], "{tmp}/n8"),
    # sample.py
    "sample no workdir": ("sample.py --workdir {tmp}/none", ["train a model there first"],
                          "{tmp}/none"),
    "sample num 0": ("sample.py --workdir {edm} --num 0", ["--num", ">= 1"], None),
    "sample num negative": ("sample.py --workdir {edm} --num -5", ["--num", ">= 1"], None),
    "sample steps 0": ("sample.py --workdir {edm} --steps 0", ["--steps", ">= 1"], None),
    "sample batch 0": ("sample.py --workdir {edm} --batch_size 0", ["--batch_size", ">= 1"],
                       None),
    "out not npz": ("sample.py --workdir {edm} --out {tmp}/x.png", ["--out must be a .npz"],
                    None),
    "ts on a diffusion model": ("sample.py --workdir {edm} --ts 0,20",
                                ["--ts applies to consistency models", "'edm'"], None),
    "ts not integers": ("sample.py --workdir {ct} --ts 0,1.5", ["--ts must be integer"], None),
    "ts out of range": ("sample.py --workdir {ct} --ts 0,500", ["--ts", "must lie in"], None),
    "ts not increasing": ("sample.py --workdir {ct} --ts 20,3", ["--ts", "increase strictly"],
                          None),
    "unknown EMA": ("sample.py --workdir {edm} --params nope", ["no EMA named 'nope'"], None),
    "multistep steps not a divisor of S": (
        "sample.py --workdir {mcm} --steps 3 --num 2",
        ["S = 2 segments", "a divisor of 2", "got 3"], None),
    "multistep S above the teacher steps": (
        "train.py --config configs/digits_mcm_cd.py:tiny --workdir {tmp}/n_mcm "
        "--config.method.student_steps=128", ["student_steps S = 128", "teacher_steps_min"],
        "{tmp}/n_mcm"),
    "multistep teacher not a diffusion model": (
        "train.py --config configs/digits_mcm_cd.py:tiny --workdir {tmp}/n_mcm2 "
        "--config.method.teacher_workdir={ct}", ["method is 'ct', not one of ('vp', 'edm')"],
        "{tmp}/n_mcm2"),
    "unknown sampler": ("sample.py --workdir {edm} --sampler nope --num 2 --steps 2",
                        ["sampler 'nope'", "heun"], None),
    "class label unconditional": ("sample.py --workdir {uncond} --class_label 3",
                                  ["--class_label 3", "unconditional"], None),
    "class label out of range": ("sample.py --workdir {edm} --class_label 10",
                                 ["--class_label must be in [0, 10)"], None),
    # evaluate.py
    "unknown metric": ("evaluate.py --workdir {edm} --ref digits --detector digits "
                       "--metrics fd,foo", ["--metrics", "'foo'", "fd,is,pr,kid"], None),
    "evaluate num 0": ("evaluate.py --workdir {edm} --ref digits --detector digits --num 0",
                       ["--num", ">= 1"], None),
    "empty npz": ("evaluate.py --samples {tmp}/empty.npz --ref digits --detector digits",
                  ["empty.npz", "holds no images"], None),
    "npz not an archive": ("evaluate.py --samples {tmp}/text.npz --ref digits "
                           "--detector digits", ["text.npz", "not a samples .npz"], None),
    # checkpoints from elsewhere
    "garbage pt": ("-m cm_jax.interop import --source openai --checkpoint {tmp}/garbage.pt "
                   "--preset imagenet64 --method cd --workdir {tmp}/n9",
                   ["garbage.pt", "damaged, or not a PyTorch file"], "{tmp}/n9"),
    "pt with code": ("-m cm_jax.interop import --source openai --checkpoint {tmp}/code.pt "
                     "--preset imagenet64 --method cd --workdir {tmp}/n10",
                     ["code.pt", "not loaded"], "{tmp}/n10"),
    "garbage pkl": ("-m cm_jax.interop import --source edm --checkpoint {tmp}/garbage.pkl "
                    "--preset cifar10-ncsnpp --workdir {tmp}/n11",
                    ["garbage.pkl", "not a readable EDM network pickle"], "{tmp}/n11"),
    "garbage inception pth": ("-m cm_jax.eval.inception_convert {tmp}/garbage.pt "
                              "{tmp}/inception.npz --allow_nonstandard",
                              ["garbage.pt", "damaged, or not a PyTorch file"],
                              "{tmp}/inception.npz"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_user_error_is_one_line_and_changes_no_run(places, case):
  command, words, absent = CASES[case]
  args = command.format(**places).split()
  runs = [places[k] for k in ("edm", "copy", "torn", "ct", "uncond")]
  before = _snapshot(runs)
  result = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
  err = result.stderr.strip()
  assert result.returncode != 0, (case, result.stdout[-1000:], err[-2000:])
  assert "Traceback" not in err and err.count("\n") == 0, (case, err[-3000:])
  for word in words:
    assert word in err, (case, err)
  assert "weights_only=False" not in err  # never advise running a file's code
  assert _snapshot(runs) == before, case
  if absent:
    assert not os.path.exists(absent.format(**places)), (case, "left behind")


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_an_unwritable_workdir_is_one_line(tmp_path):
  locked = tmp_path / "locked"
  locked.mkdir(mode=0o555)
  result = subprocess.run([sys.executable, "train.py", "--config", TINY, "--workdir",
                           str(locked / "run")], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
  assert result.returncode != 0 and result.stderr.strip().count("\n") == 0
  assert "not writable" in result.stderr


def test_sigterm_stops_without_saying_done(tmp_path):
  """A preempted run says where it stopped and how to go on, not "done"."""
  workdir = tmp_path / "run"
  proc = subprocess.Popen([sys.executable, "train.py", "--config", TINY, "--workdir",
                           str(workdir), "--steps", "50"], cwd=ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 240
  # The workdir is made after the loop listens for signals: from then a SIGTERM is a stop.
  while not workdir.exists() and proc.poll() is None and time.time() < deadline:
    time.sleep(0.2)
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err[-2000:]
  assert "stopped by SIGTERM after step 1 of 50" in out, out
  assert "rerun the same command" in out and "done:" not in out
  assert sorted(os.listdir(workdir / "checkpoints")) == ["1"]
