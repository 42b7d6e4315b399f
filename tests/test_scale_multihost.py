"""Two processes (4 simulated CPU devices each, gloo over 127.0.0.1) train, stop, resume.

Both processes run tests/scale_worker.py `multihost`: jax.distributed on a
loopback coordinator, a (data=4, fsdp=2) mesh over the 8 global devices (so
parameters and Adam moments are sharded across the two processes and Orbax
writes one piece per process), each process reading its own shard of the
digits data. They start a long run; once it has logged step 2, process 1
alone gets SIGTERM. Both must stop after the same step S (the stop request
travels with process 1's next batch, so every process reads it from the same
step's metrics), save and exit 0. Then both restart from the checkpoint
(parameters and each process's data position) and train to step S + 2.

Reference: ONE process with 8 devices training S + 2 steps in one go on the same
global batches. A single process normally reads the whole data set 1-way
(process_count=1: another shuffle, other batches), so the reference is fed the
two processes' shards side by side (scale_worker.ConcatShards: next() returns
process 0's 8 rows then process 1's 8 rows), which is exactly the global batch
`jax.make_array_from_process_local_data` assembles when process p owns the
p-th block of the mesh's devices. The loss's noise is drawn for the global
batch from one key, which is sharding-invariant under jit, so the runs must
agree to float tolerance.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "scale_worker.py")
TIMEOUT = 600


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _start_two(out, workdir, steps):
  port = _free_port()
  return [subprocess.Popen([sys.executable, WORKER, "multihost", out, workdir, str(steps),
                            str(i), str(port)], cwd=ROOT, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True) for i in range(2)]


def _finish(procs):
  outputs = []
  try:
    for p in procs:
      outputs.append(p.communicate(timeout=TIMEOUT)[0])
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.communicate()
  for p, text in zip(procs, outputs):
    assert p.returncode == 0, "\n".join(l for l in text.splitlines() if "[Gloo]" not in l)[-5000:]
  return outputs


def _logged_steps(workdir):
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  return [json.loads(line)["step"] for line in open(path) if line.strip()]


def test_two_processes_preempt_restart_and_match_one_process(tmp_path):
  workdir, out = str(tmp_path / "run"), str(tmp_path / "two.npz")
  # Phase 1: a long run; SIGTERM reaches process 1 only (process 0 writes the logs).
  procs = _start_two(out, workdir, 10000)
  deadline = time.time() + TIMEOUT
  try:
    while not any(s >= 2 for s in _logged_steps(workdir)):
      assert all(p.poll() is None for p in procs), _finish(procs)
      assert time.time() < deadline, "no progress"
      time.sleep(0.1)
    procs[1].send_signal(signal.SIGTERM)
  finally:
    outputs = _finish(procs)
  stopped = max(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())
  assert 3 <= stopped < 10000
  # Both processes stopped after the same step: the request travelled with a batch.
  assert f"stopped by SIGTERM after step {stopped}" in outputs[1]
  assert f"stopped by a signal on another process after step {stopped}" in outputs[0]

  # Phase 2: both restart from that checkpoint and train two more steps.
  target = stopped + 2
  outputs = _finish(_start_two(out, workdir, target))
  assert all(f"resumed from step {stopped}" in text for text in outputs)
  assert os.path.exists(os.path.join(workdir, "samples", f"step_{target:07d}.png"))

  ref_out = str(tmp_path / "one.npz")
  result = subprocess.run([sys.executable, WORKER, "concat", ref_out, str(tmp_path / "ref"),
                           str(target)], cwd=ROOT, capture_output=True, text=True,
                          timeout=TIMEOUT)
  assert result.returncode == 0, result.stderr[-5000:]

  two, one = np.load(out), np.load(ref_out)
  assert int(two["__step"]) == int(one["__step"]) == target
  assert sorted(two.files) == sorted(one.files)
  for key in two.files:
    np.testing.assert_allclose(two[key], one[key], rtol=1e-5, atol=1e-6, err_msg=key)
  # Both processes' data positions are in the checkpoint (8 rows per step each).
  with open(os.path.join(workdir, "checkpoints", str(target), "data", "metadata")) as f:
    item = json.load(f)
  assert item["process_count"] == 2
  assert [s["process_index"] for s in item["processes"]] == [0, 1]
  assert [s["grain"]["next_index"] for s in item["processes"]] == [8 * target] * 2
