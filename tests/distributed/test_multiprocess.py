"""jmat across 2 OS processes: ``jax.distributed`` on localhost, 4 CPU devices each, gloo.

Each process runs ``multiprocess_worker.py`` (ring attention over the 8 global
devices, values and gradients, causal and not, and a batch-sharded ``bmm``) and checks
its own shards against numpy in float64. Run by hand, in two shells:

    python tests/distributed/multiprocess_worker.py --process-id 0 --port 12355
    python tests/distributed/multiprocess_worker.py --process-id 1 --port 12355

The 8-device child suite of tests/test_parallel.py collects this directory too; this
test starts its own processes whatever the devices of the process it runs in, so only
the main run starts them.
"""

from __future__ import annotations

import json
import os
import pathlib
import socket
import subprocess
import sys

import pytest

if os.environ.get("JMAT_REQUIRE_8_DEVICES"):
  pytest.skip("runs in the main test process (it starts its own)", allow_module_level=True)

WORKER = pathlib.Path(__file__).with_name("multiprocess_worker.py")
ROOT = WORKER.parents[2]
PROCESSES = 2
TIMEOUT_S = 240  # the whole test; about 30 s on a loaded 2-core machine


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def test_ring_attention_and_bmm_across_two_processes():
  port = _free_port()
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
  workers = [
      subprocess.Popen(
          [sys.executable, str(WORKER), "--process-id", str(i), "--num-processes",
           str(PROCESSES), "--port", str(port)],
          cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
      )
      for i in range(PROCESSES)
  ]
  try:
    outputs = [w.communicate(timeout=TIMEOUT_S) for w in workers]
  finally:  # a hung or failed process must not outlive the test (nor block the other one)
    for w in workers:
      if w.poll() is None:
        w.kill()
        w.wait()
  reports = []
  for w, (out, err) in zip(workers, outputs, strict=True):
    assert w.returncode == 0, f"stdout:\n{out[-3000:]}\nstderr:\n{err[-6000:]}"
    (line,) = [x for x in out.splitlines() if x.startswith("{")]
    reports.append(json.loads(line))
  assert sorted(r["process_id"] for r in reports) == list(range(PROCESSES))
  for report in reports:
    assert report["devices"] == 4 * PROCESSES
    errors = report["max_errors"]
    assert {"bmm", "ring causal out", "ring causal dq", "ring full dv",
            "ring documents zigzag out", "ring documents zigzag dk"} <= set(errors)
    print(f"process {report['process_id']}: max errors {errors}")
