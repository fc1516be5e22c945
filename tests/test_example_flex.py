"""``examples/flex_attention.py --fast`` runs, draws its block mask, matches dense attention and
gives finite gradients for q, k, v and the captured bias table."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "flex_attention.py"


def test_flex_attention_example_runs_fast():
  done = subprocess.run([sys.executable, str(EXAMPLE), "--fast"], capture_output=True, text=True,
                        timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]
  out = done.stdout
  picture = [line for line in out.splitlines() if line and set(line) <= set("█░·")]
  # L=1024 in blocks of 64: a 16 x 16 picture.
  assert len(picture) == 16 and all(len(line) == 16 for line in picture), out
  assert "·" in out and "█" in out and "░" in out
  error = re.search(r"max \|flex - dense\| = (\S+)", out)
  assert error is not None and float(error.group(1)) < 1e-5, out
  norms = re.findall(r"d loss / d (\w+) .* norm (\S+)", out)
  assert [name for name, _ in norms] == ["q", "k", "v", "table"], out
  assert all(0.0 < float(norm) < float("inf") for _, norm in norms), out
