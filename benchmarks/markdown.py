"""``results.md``: every suite's full tables (min/max, every skip reason) and how it was run."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from benchmarks.formatting import (
    counts_computed_blocks,
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


def _cell(spec: SuiteSpec, record: Mapping[str, Any]) -> str:
  if record["status"] != "ok":
    return record["status"]
  figure = fmt_time(record["median_s"]) if spec.per_call else fmt_gflops(record["gflops"])
  if "tflops_computed" in record:
    figure += f", {fmt_tflops(record['tflops_computed'])} TFLOP/s"
  return f"{figure} ({fmt_ratio(record['ratio_vs_jnp'])})"


def _run_line(run: Mapping[str, Any]) -> str:
  load = run.get("load_average_before"), run.get("load_average_after")
  how = (
      "one fresh process per point" if run["min_sample_s"] is None else
      f"{run['repeats']} interleaved rounds per case (fewer where a round is slow: see "
      f"samples), each in a random order, samples of >= {run['min_sample_s']} s, each "
      f"after the process went idle (waiting up to {run.get('settle_s') or 0} s)"
  )
  return (
      f"Run {run['started']} ({run['duration_s']:.0f} s, {'quick' if run['quick'] else 'full'}); "
      f"{how}; load average (1, 5, 15 min) before {load[0]}, after {load[1]}."
  )


def _memory_tables(suite: Mapping[str, Any]) -> list[str]:
  rows = []
  for case in suite["cases"]:
    row = [case["name"]]
    for name in suite["competitors"]:
      r = case["results"][name]
      if r["status"] != "ok":
        row.append(r["status"])
        continue
      temp = f", XLA temp {fmt_bytes(r['temp_bytes'])}" if r["temp_bytes"] is not None else ""
      row.append(f"{fmt_bytes(r['peak_rss_bytes'])}{temp}, {fmt_time(r['time_s'])}")
    rows.append(row)
  return ["Peak RSS of one forward+backward in a fresh process (and XLA's compiled "
          "temporaries, and the time of that one step):", ""] + table(
              ["case", *suite["competitors"]], rows)


def _timed_tables(spec: SuiteSpec, suite: Mapping[str, Any]) -> list[str]:
  unit = "time per call" if spec.per_call else "GFLOP/s"
  device = counts_computed_blocks(suite)
  if device:
    unit += ", TFLOP/s over the computed blocks"
  lines = [f"Median {unit} (ratio to {suite['reference']}, above 1 is faster):", ""]
  rows = [[c["name"]] + [_cell(spec, c["results"][n]) for n in suite["competitors"]]
          for c in suite["cases"]]
  lines += table(["case", *suite["competitors"]], rows)
  focus = suite["competitors"][0]
  lines += ["", f"{focus} in detail:", ""]
  rows = []
  for case in suite["cases"]:
    r = case["results"][focus]
    if r["status"] != "ok":
      rows.append([case["name"], r["status"]] + [""] * (6 if device else 4))
      continue
    pct = "—" if r["pct_of_peak"] is None else f"{r['pct_of_peak']:.0f}%"
    rows.append([
        case["name"],
        f"{fmt_time(r['median_s'])} [{fmt_time(r['min_s'])} – {fmt_time(r['max_s'])}]",
        fmt_gflops(r["gflops"]), fmt_ratio(r["ratio_vs_jnp"]), fmt_ratio(r["ratio_vs_torch"]),
        pct,
    ] + ([fmt_tflops(r["tflops_computed"]), fmt_pct(r["pct_of_device_peak"])]
         if "tflops_computed" in r else ["—", "—"] if device else []))
  header = ["case", "median [min – max]", "GFLOP/s", f"vs {suite['reference']}", "vs torch",
            "% of peak"]
  if device:
    header += ["TFLOP/s (computed blocks)", "% of device peak"]
  return lines + table(header, rows)


def suite_markdown(spec: SuiteSpec, suite: Mapping[str, Any]) -> list[str]:
  lines = [f"## {suite['name']}: {suite['title']}", "", _run_line(suite["run"]), ""]
  if suite["kind"] == "memory":
    lines += _memory_tables(suite)
  else:
    lines += _timed_tables(spec, suite)
  notes = list(suite.get("notes", [])) + footnotes(suite["cases"])
  if notes:
    lines += [""] + [n if n.startswith("- ") else f"- {n}" for n in notes]
  return lines + [""]


def markdown(results: Mapping[str, Any], specs: Mapping[str, SuiteSpec]) -> str:
  lines = [f"# jmat benchmarks: {results['tag']}", "", machine_line(results["machine"]), ""]
  peak = results["peak_gflops"]
  if peak:
    lines += ["Measured peak (best GFLOP/s of any competitor on a GEMM case) per dtype: "
              + "; ".join(f"{d} {p['gflops']:.0f} ({p['competitor']}, {p['case']})"
                          for d, p in sorted(peak.items())) + ".", ""]
  lines += ["Ratios are taken round by round (competitors interleaved) and the median kept.", ""]
  for name, suite in results["suites"].items():
    lines += suite_markdown(spec_of(specs, name), suite)
  return "\n".join(lines)
