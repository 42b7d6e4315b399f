"""A damaged newest checkpoint: readers and the trainer use the newest readable one, say so
in one line, and never delete anything; when none reads, one line says so. Checksums saved
with every checkpoint catch bytes that changed on disk; NaN weights are reported at restore.

The damage is what preemptions and full disks leave: a data file truncated or zero-filled,
an empty step directory, a step without its config item. Copies of the session's tiny EDM
run (checkpoints at steps 2 and 4) are damaged, never the fixture itself.
"""
import glob
import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cm_jax import runs
from cm_jax.train import loop
from cm_jax.train.checkpoint import RunCheckpoints
from cm_jax.train.restore import restore_train_state
from cm_jax.utils import checksums

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# TensorStore leaves the reads of a damaged file's other chunks as coroutines that are
# never awaited once the first read failed: Python reports them as unraisable, harmless.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


def _data_files(workdir, step):
  """The step's array data files (OCDBT chunks). Every one is damaged: which chunk holds
  the EMA a reader restores is Orbax's business, and damage to the parts a reader never
  reads must not block it (tested below)."""
  return glob.glob(os.path.join(workdir, "checkpoints", str(step), "state", "*", "d", "*"))


def truncate(workdir, step):
  for path in _data_files(workdir, step):
    with open(path, "r+b") as f:
      f.truncate(os.path.getsize(path) // 2)


def zero_fill(workdir, step):
  for path in _data_files(workdir, step):
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
      f.write(b"\0" * size)


def empty_step(workdir, step):
  os.makedirs(os.path.join(workdir, "checkpoints", str(step)))


def drop_config(workdir, step):
  shutil.rmtree(os.path.join(workdir, "checkpoints", str(step), "config"))


@pytest.fixture
def copy_run(tiny_edm_run, tmp_path):
  def make(name="run"):
    dest = str(tmp_path / name)
    shutil.copytree(tiny_edm_run[1], dest)
    return dest
  return make


@pytest.mark.parametrize("damage,bad,good", [(truncate, 4, 2), (zero_fill, 4, 2),
                                             (empty_step, 6, 4), (drop_config, 4, 2)])
def test_readers_use_the_newest_readable_checkpoint(copy_run, capsys, damage, bad, good):
  workdir = copy_run()
  damage(workdir, bad)
  before = sorted(os.listdir(os.path.join(workdir, "checkpoints")))
  run = runs.load_run(workdir, "ema")
  assert run.step == good
  runs.load_config(workdir)  # the config of a readable step (the same run's)
  err = capsys.readouterr().err.strip().splitlines()
  lines = [line for line in err if "unreadable" in line]
  assert lines and all(f"checkpoint step {bad} in" in line and f"using step {good}" in line
                       and "left in place" in line for line in lines)
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == before


def test_a_named_or_every_checkpoint_unreadable_is_one_line(copy_run):
  workdir = copy_run()
  zero_fill(workdir, 4)
  with pytest.raises(runs.UnreadableCheckpointError, match="checkpoint step 4 .* unreadable") as e:
    runs.load_run(workdir, "ema", step=4)
  assert "\n" not in str(e.value)
  zero_fill(workdir, 2)
  with pytest.raises(runs.UnreadableCheckpointError, match="could be read") as e:
    runs.load_run(workdir, "ema")
  assert "\n" not in str(e.value) and "step 4:" in str(e.value) and "step 2:" in str(e.value)
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4"]
  with pytest.raises(runs.RunRequestError, match="no EMA named .ema_0.5."):
    runs.load_run(copy_run("other"), "ema_0.5")  # a wrong request is not a damaged file


def test_training_resumes_from_the_newest_readable_and_sets_the_broken_one_aside(
    tiny_edm_run, copy_run, capsys):
  config = tiny_edm_run[0]
  workdir = copy_run()
  zero_fill(workdir, 4)
  state = loop.train(config, workdir, num_steps=6, progress=False)
  out = capsys.readouterr()
  assert "resumed from step 2" in out.out and int(state.step) == 6
  assert "moved to" in out.err and "checkpoint step 4" in out.err
  aside = os.path.join(workdir, "checkpoints_unreadable", "4")
  assert os.path.isdir(aside) and os.listdir(aside)  # kept, not deleted
  assert RunCheckpoints(workdir, read_only=True).latest_step() == 6
  assert runs.load_run(workdir, "ema", step=4).step == 4  # step 4 saved afresh


def test_sample_py_falls_back_in_one_loud_line(copy_run, tmp_path):
  workdir = copy_run()
  truncate(workdir, 4)
  out = str(tmp_path / "s.npz")
  r = subprocess.run([sys.executable, "sample.py", "--workdir", workdir, "--num", "4",
                      "--steps", "2", "--out", out], cwd=ROOT, capture_output=True, text=True,
                     timeout=300)
  assert r.returncode == 0, r.stderr[-2000:]
  assert "from step 2" in r.stdout and os.path.exists(out)
  warnings = [line for line in r.stderr.splitlines() if "unreadable" in line]
  assert len(warnings) == 1 and "checkpoint step 4" in warnings[0], r.stderr[-2000:]


# -- checksums: bytes that changed on disk, NaN weights --------------------------------------


def test_checksums_are_the_word_sums_worked_out_in_numpy():
  x = np.array([[1.5, -2.0, 3.25], [0.0, 7.0, np.pi]], np.float32)
  h = np.array([1.0, -3.5], jnp.bfloat16)
  sums, bad = checksums.tree_stats({"a": {"w": jnp.asarray(x)}, "n": jnp.int32(7),
                                    "h": jnp.asarray(h), "b": jnp.array([True, False, True])})
  words = [int(v) for v in x.reshape(-1).view(np.uint32)]  # float32 bits as uint32
  want = [sum(words) % 2**32, sum((i + 1) * v for i, v in enumerate(words)) % 2**32]
  assert sums["a/w"] == want and bad == []
  assert sums["n"] == [7, 7]
  hw = [int(v) for v in h.view(np.uint16)]  # bfloat16: 1.0 is 0x3F80
  assert hw[0] == 0x3F80 and sums["h"] == [sum(hw), hw[0] + 2 * hw[1]]
  assert sums["b"] == [2, 1 + 3]
  flipped = x.copy()
  flipped.view(np.uint32)[1, 2] ^= 1 << 20  # one bit
  assert checksums.tree_stats({"a": {"w": jnp.asarray(flipped)}})[0]["a/w"] != want
  swapped = x[:, ::-1].copy()  # the same words elsewhere: s1 equal, s2 not
  s_swapped = checksums.tree_stats({"w": jnp.asarray(swapped)})[0]["w"]
  assert s_swapped[0] == want[0] and s_swapped[1] != want[1]
  x[0, 0] = np.nan
  assert checksums.tree_stats({"w": jnp.asarray(x)}, "ema/halflife")[1] == ["ema/halflife/w"]


def _tamper_checksum(workdir, step, part="ema/"):
  """Changes one saved sum of `part`: exactly what a flipped bit in its arrays looks like."""
  path = os.path.join(workdir, "checkpoints", str(step), "checksums", "metadata")
  with open(path) as f:
    item = json.load(f)
  key = sorted(k for k in item["sums"] if k.startswith(part))[0]
  item["sums"][key][0] = (item["sums"][key][0] + 1) % 2**32
  with open(path, "w") as f:
    json.dump(item, f)
  return key


def test_changed_bytes_count_as_unreadable(tiny_edm_run, copy_run, capsys):
  workdir = copy_run()
  key = _tamper_checksum(workdir, 4)
  assert runs.load_run(workdir, "ema").step == 2
  err = capsys.readouterr().err
  assert "checksum mismatch" in err and key in err and "checkpoint step 4" in err
  with pytest.raises(runs.UnreadableCheckpointError, match="checksum mismatch"):
    runs.load_run(workdir, "ema", step=4)
  state = loop.train(tiny_edm_run[0], workdir, num_steps=4, progress=False)  # resumes at 2
  assert int(state.step) == 4
  assert os.path.isdir(os.path.join(workdir, "checkpoints_unreadable", "4"))


def test_damage_to_parts_readers_never_read_does_not_block_them(tiny_edm_run, copy_run,
                                                                capsys):
  """Changed optimizer-state bytes and a torn data position: sampling, evaluation, export
  and teacher loading (runs.load_run) read step 4 as if nothing happened; train.py, which
  needs both, passes over step 4 in one line naming what is damaged."""
  workdir = copy_run()
  key = _tamper_checksum(workdir, 4, part="opt_state/")
  assert runs.load_run(workdir, "ema").step == 4 and runs.load_run(workdir, "online").step == 4
  assert "unreadable" not in capsys.readouterr().err
  state = loop.train(tiny_edm_run[0], workdir, num_steps=4, progress=False)  # resumes at 2
  err = capsys.readouterr().err
  assert int(state.step) == 4 and "checkpoint step 4" in err and key in err

  torn = copy_run("torn")
  with open(os.path.join(torn, "checkpoints", "4", "data", "metadata"), "w") as f:
    f.write('{"process_count": 1, "proc')
  assert runs.load_run(torn, "ema").step == 4
  assert "unreadable" not in capsys.readouterr().err
  loop.train(tiny_edm_run[0], torn, num_steps=4, progress=False)
  err = capsys.readouterr().err
  assert "checkpoint step 4" in err and "data position 4/data/metadata" in err


def test_nan_weights_are_reported_at_restore(tiny_edm_run, copy_run, capsys):
  config = tiny_edm_run[0]
  workdir = copy_run()
  state, step = restore_train_state(workdir, config)
  nan_ema = jax.tree.map(lambda x: jnp.full_like(x, jnp.nan), state.ema)
  ckpts = RunCheckpoints(workdir, async_save=False)
  ckpts.save(6, state.replace(ema=nan_ema), {"processes": [], "process_count": 1}, config,
             wait=True)
  ckpts.close()
  capsys.readouterr()
  run = runs.load_run(workdir, "ema")
  assert run.step == 6
  err = capsys.readouterr().err
  assert "the ema/halflife weights of step 6" in err and "NaN/inf" in err
  assert runs.load_run(workdir, "online").step == 6  # the online weights are fine
  assert "NaN" not in capsys.readouterr().err


# -- a save that fails in the background (disk full) --------------------------------------


def test_a_failed_background_save_stops_the_run_in_one_line(tiny_edm_run, tmp_path,
                                                              monkeypatch):
  """The second save fails where a full disk fails it: Orbax's background commit (the
  rename of its temporary directory) raises ENOSPC. The run stops right away with one line
  naming it, and the first checkpoint stays good."""
  import errno  # pylint: disable=g-import-not-at-top
  config = tiny_edm_run[0].copy_and_resolve_references()
  config.training.update(save_every=2, log_every=2)
  real_save, real_rename, calls = RunCheckpoints.save, os.rename, []

  def full_disk_rename(src, dst, *a, **k):
    raise OSError(errno.ENOSPC, "No space left on device", str(src))

  def save(self, step, *a, **k):
    calls.append(step)
    if len(calls) == 2:  # once step 2 is committed, nothing more can be
      self.manager.wait_until_finished()
      monkeypatch.setattr(os, "rename", full_disk_rename)
    return real_save(self, step, *a, **k)

  monkeypatch.setattr(RunCheckpoints, "save", save)
  workdir = str(tmp_path / "full")
  with pytest.raises(Exception) as e:
    loop.train(config, workdir, num_steps=8, progress=False)
  monkeypatch.setattr(os, "rename", real_rename)
  message = str(e.value)
  assert type(e.value).__name__ == "CheckpointSaveError", repr(e.value)
  assert "\n" not in message and "No space left on device" in message
  assert "the last good checkpoint is step 2" in message
  # Stopped at the first step or save after the background commit of step 4 failed
  # (the tiny steps take milliseconds, so that may be the next save).
  assert calls[:2] == [2, 4] and len(calls) <= 3
  assert runs.load_run(workdir, "ema").step == 2
