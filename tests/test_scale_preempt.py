"""SIGTERM (preemption) mid-run: finish the step, save, exit 0; the restart continues exactly.

`python train.py --config configs/digits_edm.py:tiny --steps 10000` is started
as a user would; once it has logged progress it gets SIGTERM. It must exit 0
with a checkpoint at the step it stopped at (S, not a multiple of save_every
in general), and `--steps S+2` from there must end where an uninterrupted
S+2-step run ends, parameters, EMA and optimizer state bit for bit.
The compiled step is the session fixture's (tiny_edm_run), so with the
persistent compilation cache neither run here compiles it again.
"""
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np

from cm_jax.train import loop
from cm_jax.train.checkpoint import RunCheckpoints, abstract_like

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = ["train.py", "--config", "configs/digits_edm.py:tiny"]


def _logged_steps(workdir):
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  return [json.loads(line)["step"] for line in open(path) if line.strip()]


def test_sigterm_saves_and_resumes_exactly(tiny_edm_run, tmp_path):
  config, _, _ = tiny_edm_run
  workdir = str(tmp_path / "preempted")
  proc = subprocess.Popen([sys.executable, *TRAIN, "--steps", "10000", "--workdir", workdir],
                          cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  try:
    deadline = time.time() + 300
    while not _logged_steps(workdir):  # the tiny config logs every 2 steps
      assert proc.poll() is None, proc.communicate()[0][-3000:]
      assert time.time() < deadline, "train.py logged no progress in 300 s"
      time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=120)[0]
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.communicate()
  assert proc.returncode == 0, output[-3000:]
  stopped = RunCheckpoints(workdir, read_only=True).latest_step()
  assert stopped is not None and 2 <= stopped < 10000
  assert f"stopped by SIGTERM after step {stopped}" in output
  assert _logged_steps(workdir)[-1] == stopped  # the partial window is logged too

  target = stopped + 2
  result = subprocess.run([sys.executable, *TRAIN, "--steps", str(target), "--workdir", workdir],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert f"resumed from step {stopped}" in result.stdout

  uninterrupted = loop.train(config, str(tmp_path / "straight"), num_steps=target,
                             progress=False)
  ckpts = RunCheckpoints(workdir, read_only=True)
  assert ckpts.latest_step() == target
  resumed, data_state, _ = ckpts.restore(abstract_like(uninterrupted))
  assert data_state["processes"][0]["grain"]["next_index"] == target * config.training.batch_size
  for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(uninterrupted)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
