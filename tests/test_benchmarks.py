"""Smoke test of ``python -m benchmarks --quick``: it runs, writes its files, and they are complete.

A schema check only: no test here looks at a time (speed is measured, never asserted).
The quick run takes well under two minutes on two cores.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SUITES = ("products", "eager", "dtypes", "family", "attention", "memory", "flex")
TIMED = {
    "median_s": float, "min_s": float, "max_s": float, "samples": int, "calls_per_sample": int,
    "samples_s": list, "gflops": float, "ratio_vs_jnp": (float, type(None)),
    "ratio_vs_torch": (float, type(None)), "pct_of_peak": (float, type(None)),
}
MEMORY = {
    "peak_rss_bytes": int, "baseline_rss_bytes": int, "temp_bytes": (int, type(None)),
    "time_s": float,
}
COMPETITORS = {
    "products": ["jmat", "jnp", "jnp again", "lax", "einsum", "numpy", "torch"],
    "eager": ["jmat", "jnp", "numpy", "torch"],
    "dtypes": ["jmat", "jnp", "jnp again", "lax", "einsum", "numpy", "torch"],
    "family": ["jmat", "jnp", "jnp left-to-right", "numpy", "torch"],
    "attention": ["jmat default", "jmat dense", "jmat blockwise", "jax.nn", "torch"],
    "memory": ["jmat default", "jmat dense", "jmat blockwise", "jax.nn", "torch"],
    "flex": ["jmat", "torch", "jax.nn"],
}
# Competitors that exist whatever else is installed or still being written.
ALWAYS_RUN = {"jnp", "jnp again", "lax", "einsum", "numpy", "jax.nn"}


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
  out = tmp_path_factory.mktemp("bench")
  command = [sys.executable, "-m", "benchmarks", "--quick", "--out", str(out)]
  done = subprocess.run(command, capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  (folder,) = [p for p in out.iterdir() if p.is_dir()]
  return folder, json.loads((folder / "results.json").read_text())


def test_writes_json_markdown_and_one_png_per_suite(run):
  folder, results = run
  assert folder.name == results["tag"]
  markdown = (folder / "results.md").read_text()
  for suite in SUITES:
    assert f"## {suite}:" in markdown
    png = (folder / f"{suite}.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n"), suite


def test_machine_is_described(run):
  _, results = run
  machine = results["machine"]
  for key in ("cpu_model", "cores", "memory_bytes", "device_platform", "device_kind"):
    assert machine[key], key
  for package in ("jax", "jaxlib", "numpy", "jmat"):
    assert machine["versions"][package], package
  for suite in results["suites"].values():
    run_info = suite["run"]
    assert run_info["quick"] is True
    assert len(run_info["load_average_before"]) == 3


@pytest.mark.parametrize("suite_name", SUITES)
def test_every_case_holds_every_competitor_and_field(run, suite_name):
  _, results = run
  suite = results["suites"][suite_name]
  assert suite["competitors"] == COMPETITORS[suite_name]
  fields = MEMORY if suite_name == "memory" else TIMED
  assert suite["cases"], suite_name
  for case in suite["cases"]:
    assert list(case["results"]) == COMPETITORS[suite_name], case["name"]
    for name, record in case["results"].items():
      where = f"{suite_name} / {case['name']} / {name}"
      assert record["status"] in ("ok", "skipped"), f"{where}: {record}"
      if record["status"] == "skipped":
        assert record["reason"], where
        continue
      for field, kind in fields.items():
        assert isinstance(record[field], kind), f"{where}: {field} = {record[field]!r}"
      if suite_name != "memory":
        assert record["min_s"] <= record["median_s"] <= record["max_s"], where
        assert len(record["samples_s"]) == record["samples"], where
      if name in ALWAYS_RUN:
        assert record["status"] == "ok", where


def test_flex_records_the_peak_rss_of_a_fresh_forward_backward_process(run):
  _, results = run
  (case,) = [c for c in results["suites"]["flex"]["cases"] if "memory" in c["info"]]
  memory = case["info"]["memory"]
  assert memory["status"] == "ok", memory
  for field, kind in MEMORY.items():
    assert isinstance(memory[field], kind), f"{field} = {memory[field]!r}"


@pytest.mark.parametrize("suite_name", ["products", "eager", "dtypes"])
def test_the_core_ops_are_measured_against_jnp(run, suite_name):
  _, results = run
  for case in results["suites"][suite_name]["cases"]:
    jmat, jnp = case["results"]["jmat"], case["results"]["jnp"]
    assert jmat["status"] == "ok", case["name"]
    assert isinstance(jmat["ratio_vs_jnp"], float), case["name"]
    assert jnp["ratio_vs_jnp"] == 1.0, case["name"]  # a reference against itself, round by round


@pytest.mark.parametrize("suite_name", ["products", "dtypes"])
def test_compiled_cases_record_whether_jmat_compiles_to_jnps_program(run, suite_name):
  _, results = run
  for case in results["suites"][suite_name]["cases"]:
    assert isinstance(case["info"]["same_hlo_as_jnp"], bool), case["name"]


def test_dtypes_suite_covers_every_dtype(run):
  _, results = run
  dtypes = [case["dtype"] for case in results["suites"]["dtypes"]["cases"]]
  assert dtypes == ["float32", "bfloat16", "float16", "float64", "int32"]


def test_jmat_bench_reaches_the_benchmarks(capsys):
  from jmat.__main__ import main

  with pytest.raises(SystemExit) as exit_info:
    main(["bench", "--", "--help"])
  assert exit_info.value.code == 0
  assert "--suite" in capsys.readouterr().out
