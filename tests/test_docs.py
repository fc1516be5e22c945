"""The API reference site builds with ``mkdocs build --strict`` (any warning fails it)."""

import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_mkdocs_build_strict(tmp_path):
  site = tmp_path / "site"
  result = subprocess.run(
      [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
      cwd=ROOT, capture_output=True, text=True, timeout=300,
      env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
  assert result.returncode == 0, result.stdout + result.stderr
  products = (site / "products" / "index.html").read_text()
  # mkdocstrings rendered the docstrings, and their doctests as code (not as quotes)
  for anchor in ('id="jmat.matmul"', 'id="jmat.bmm"', 'id="jmat.ShapeError"'):
    assert anchor in products
  assert '<span class="gp">&gt;&gt;&gt; </span>' in products
  attention = (site / "attention" / "index.html").read_text()
  assert 'id="jmat.attention.flax_attention_fn"' in attention
  assert 'id="jmat.flex_attention"' in (site / "flex" / "index.html").read_text()
  for page in ("porting", "family", "distributed", "benchmarks", "examples"):
    assert (site / page / "index.html").exists()
