"""The results files of a run: ``results.json`` (merged with earlier runs, derived figures
filled in), ``results.md`` and one PNG per suite.

Each job has its module: :mod:`benchmarks.derive` (derived figures),
:mod:`benchmarks.markdown` (``results.md``), :mod:`benchmarks.plots` (the PNGs) and
:mod:`benchmarks.readme` (the README block, with each suite's own summary).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from benchmarks import derive, markdown, plots
from benchmarks.spec import SuiteSpec


def write(results: dict[str, Any], out: Path, specs: Mapping[str, SuiteSpec]) -> list[Path]:
  """Merges with any earlier results in ``out``, then writes JSON, Markdown and plots."""
  out.mkdir(parents=True, exist_ok=True)
  json_path = out / "results.json"
  previous = json.loads(json_path.read_text()) if json_path.exists() else None
  gemm = [name for name, spec in specs.items() if spec.gemm]
  results = derive.merge(previous, results, list(specs), gemm)
  json_path.write_text(json.dumps(results, indent=1) + "\n")
  md_path = out / "results.md"
  md_path.write_text(markdown.markdown(results, specs) + "\n")
  return [json_path, md_path, *plots.plots(results, out, specs)]
