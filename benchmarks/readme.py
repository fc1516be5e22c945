"""The README's benchmark block: the machine, "In short" (each suite's own summary), one
table per suite and its plot, written between the ``bench`` markers.

A run on a GPU or TPU has a block of its own (``<!-- bench:gpu:start -->`` ...), so
``--readme`` with a device run adds or updates that block and leaves the CPU one as it is.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from benchmarks.formatting import (
    counts_computed_blocks,
    describe_accelerator,
    fmt_bytes,
    fmt_gflops,
    fmt_pct,
    fmt_ratio,
    fmt_tflops,
    fmt_time,
    footnotes,
    machine_line,
    table,
)
from benchmarks.spec import SuiteSpec, spec_of

README_START, README_END = "<!-- bench:start -->", "<!-- bench:end -->"


def markers(machine: Mapping[str, Any]) -> tuple[str, str]:
  """The markers around the block of this machine's platform (the CPU block's are unnamed)."""
  platform = machine["device_platform"]
  if platform == "cpu":
    return README_START, README_END
  return f"<!-- bench:{platform}:start -->", f"<!-- bench:{platform}:end -->"


def _value(spec: SuiteSpec, record: Mapping[str, Any]) -> str:
  if record["status"] != "ok":
    return record["status"]
  figure = fmt_time(record["median_s"]) if spec.per_call else fmt_gflops(record["gflops"])
  if "tflops_computed" in record:
    figure += f", {fmt_tflops(record['tflops_computed'])}"
  return figure


def _memory_value(record: Mapping[str, Any]) -> str:
  if record["status"] != "ok":
    return record["status"]
  return fmt_bytes(record["peak_rss_bytes"])


def headline(spec: SuiteSpec, suite: Mapping[str, Any]) -> list[str]:
  """One table: every competitor's figure, then the first jmat competitor's ratios.

  On an accelerator (cases that count their computed blocks) every figure is the time
  and the TFLOP/s over the computed blocks, and the last column is the first
  competitor's percentage of the device's peak (``n/a`` for a device not in
  :data:`benchmarks.machine.PEAK_BF16_TFLOPS`).
  """
  focus = suite["competitors"][0]
  names = suite["competitors"]
  if suite["kind"] == "memory":
    rows = [[c["name"]] + [_memory_value(c["results"][n]) for n in names] for c in suite["cases"]]
    return table(["case", *names], rows)
  with_peak = spec.of_peak
  device = counts_computed_blocks(suite)
  rows = []
  for case in suite["cases"]:
    r = case["results"][focus]
    ok = r["status"] == "ok"
    pct = f"{r['pct_of_peak']:.0f}%" if ok and r["pct_of_peak"] is not None else "—"
    if device:
      pct = fmt_pct(r.get("pct_of_device_peak")) if ok else "—"
    rows.append(
        [case["name"]] + [_value(spec, case["results"][n]) for n in names]
        + [fmt_ratio(r["ratio_vs_jnp"]) if ok else "—",
           fmt_ratio(r["ratio_vs_torch"]) if ok else "—"]
        + ([pct] if with_peak else [])
    )
  unit = "time per call" if spec.per_call else "GFLOP/s"
  if device:
    unit += ", TFLOP/s over the computed blocks"
  header = ["case", *(f"{n} ({unit})" if i == 0 else n for i, n in enumerate(names)),
            f"{focus} vs {suite['reference']}", f"{focus} vs torch"]
  if with_peak:
    header.append(f"{focus} % of {'device ' if device else ''}peak")
  return table(header, rows)


def summary(results: Mapping[str, Any], specs: Mapping[str, SuiteSpec]) -> list[str]:
  """The "In short" sentences: each suite's own summary of its results, in suite order."""
  return [sentence for name, suite in results["suites"].items()
          for sentence in spec_of(specs, name).summary(suite)]


def readme_section(results: Mapping[str, Any], prefix: str, specs: Mapping[str, SuiteSpec]) -> str:
  """The README's benchmark block: the machine, one table per suite, the plots."""
  suites = results["suites"]
  loads = ", ".join(
      f"{name} {s['run']['load_average_before'][0]}" for name, s in suites.items()
      if s["run"].get("load_average_before")
  )
  dates = sorted(s["run"]["started"] for s in suites.values())
  start = dates[0].replace("T", " ")[:16]
  opening, closing = markers(results["machine"])
  accelerator = describe_accelerator(results["machine"])
  lines = [
      opening, "## Benchmarks" + (f" on {accelerator}" if accelerator else ""), "",
      "`pip install -e '.[bench]' && python -m benchmarks` (or `python -m jmat bench`; "
      "`--quick`, `--suite NAME`, `--device`, `--out DIR`; `python -m benchmarks --help`). "
      f"The figures below are from a full run started {start} UTC on "
      f"{machine_line(results['machine'])}",
      "",
      "Every figure is the median of interleaved rounds (all competitors take turns, so load "
      "from other work hits them alike); ratios are taken round by round, and above 1 means "
      "jmat is faster. The machine was shared with other jobs; 1-minute load average at the "
      f"start of each suite: {loads}. Every table with min/max and every skip reason: "
      f"[results.md]({prefix}/results.md); raw figures: [results.json]({prefix}/results.json).",
      "",
  ]
  highlights = summary(results, specs)
  if highlights:
    lines += ["In short:", ""] + [f"- {h}" for h in highlights] + [""]
  for name, suite in suites.items():
    lines += [f"### {name}: {suite['title']}", ""] + headline(spec_of(specs, name), suite) + [""]
    lines += [f"- {n}" for n in suite.get("notes", [])] + footnotes(suite["cases"])
    lines += ["", f"![{name}]({prefix}/{name}.png)", ""]
  return "\n".join(lines + [closing])


def update_readme(readme: Path, out: Path, specs: Mapping[str, SuiteSpec]) -> None:
  """Replaces the README's benchmark block (between the markers) with the results in ``out``."""
  results = json.loads((out / "results.json").read_text())
  prefix = Path(os.path.relpath(out, readme.resolve().parent)).as_posix()
  block = readme_section(results, prefix, specs)
  start, end = markers(results["machine"])
  text = readme.read_text()
  if start in text and end in text:
    head, rest = text.split(start, 1)
    text = head + block + rest.split(end, 1)[1]
  else:
    text = text.rstrip("\n") + "\n\n" + block + "\n"
  readme.write_text(text)
