"""Derived figures of the results, and the queries the suites' summaries make of them.

Derived figures of a timed competitor (``status == "ok"``):

* ``gflops``: the case's useful FLOPs over the median time;
* ``ratio_vs_jnp``: the suite's JAX reference time over this competitor's time,
  taken round by round (the rounds interleave competitors, so each pair ran under
  the same load) and the median kept; above 1 is faster than the reference;
* ``ratio_vs_torch``: the same against ``torch``;
* ``pct_of_peak``: ``gflops`` as a percentage of the machine's measured peak for
  the dtype: the best GFLOP/s any competitor reached on any GEMM case (the suites
  whose spec says ``gemm``) of that dtype in these results.

Cases that count their computed blocks (``computed_flops``: the attention suites on
a GPU or TPU) also get:

* ``tflops_computed``: ``computed_flops`` over the median time, in 1e12 per second;
* ``pct_of_device_peak``: that as a percentage of the accelerator's peak dense
  bfloat16 TFLOP/s (:data:`benchmarks.machine.PEAK_BF16_TFLOPS`), for half-precision
  cases on a device that table knows; None otherwise.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

TIMED_FIELDS = (
    "median_s", "min_s", "max_s", "samples", "calls_per_sample", "samples_s",
    "gflops", "ratio_vs_jnp", "ratio_vs_torch", "pct_of_peak",
)
HALF = ("bfloat16", "float16")  # the dtypes a peak dense bf16 TFLOP/s figure applies to


def definitions(gemm_suites: Sequence[str]) -> dict[str, str]:
  """What each field of ``results.json`` means (written into the file itself)."""
  gemm = ", ".join(gemm_suites)
  return {
      "median_s": "median over rounds of the seconds per call (a sample is back-to-back calls, "
                  "each waited on until its result is ready)",
      "min_s, max_s": "the fastest and slowest round",
      "samples_s": "seconds per call of each round, in round order (competitors take turns in "
                   "every round, in a fresh random order, each once the process is idle: "
                   "waiting up to run.settle_s for other libraries' spinning threads)",
      "gflops": "the case's useful FLOPs (flops) over median_s, in 1e9 per second",
      "ratio_vs_jnp": "median over rounds of (the suite's reference time / this time); above 1 "
                      "is faster than the reference (suite.reference)",
      "ratio_vs_torch": "the same against torch",
      "pct_of_peak": "gflops as a percentage of peak_gflops for the case's dtype: the best "
                     f"GFLOP/s any competitor reached on any GEMM case ({gemm})",
      "tflops_computed": "accelerator attention cases: computed_flops (4*B*H*D per pair of "
                         "every computed block, masked-out pairs of partial blocks included; "
                         "3.5x for forward+backward) over median_s, in 1e12 per second",
      "pct_of_device_peak": "tflops_computed as a percentage of machine.accelerator."
                            "peak_bf16_tflops (half-precision cases; null where unknown)",
      "peak_rss_bytes": "memory suite: peak resident set (VmHWM) of the fresh process of the "
                        "point",
      "temp_bytes": "memory suite: XLA's compiled memory_analysis().temp_size_in_bytes",
  }


def paired_ratio(reference: Mapping[str, Any] | None, record: Mapping[str, Any]) -> float | None:
  """Median over rounds of ``reference``'s time over ``record``'s (None without a reference)."""
  if not reference or reference.get("status") != "ok":
    return None
  pairs = zip(reference["samples_s"], record["samples_s"], strict=False)
  return round(statistics.median(ref / own for ref, own in pairs), 4)


def peaks(results: Mapping[str, Any], gemm_suites: Sequence[str]) -> dict[str, dict[str, Any]]:
  """The best GFLOP/s per dtype over every GEMM case, with where it was reached."""
  best: dict[str, dict[str, Any]] = {}
  for suite_name in gemm_suites:
    for case in results["suites"].get(suite_name, {}).get("cases", []):
      for name, record in case["results"].items():
        if record["status"] != "ok":
          continue
        gflops = case["flops"] / record["median_s"] / 1e9
        if gflops > best.get(case["dtype"], {}).get("gflops", 0.0):
          best[case["dtype"]] = {
              "gflops": round(gflops, 2), "suite": suite_name, "case": case["name"],
              "competitor": name,
          }
  return best


def derive(results: dict[str, Any], gemm_suites: Sequence[str]) -> None:
  """Fills the derived figures of every timed record in place (after runs are merged)."""
  results["definitions"] = definitions(gemm_suites)
  results["peak_gflops"] = peak = peaks(results, gemm_suites)
  device_peak = (results["machine"].get("accelerator") or {}).get("peak_bf16_tflops")
  for suite in results["suites"].values():
    if suite.get("kind") != "time":
      continue
    for case in suite["cases"]:
      reference = case["results"].get(suite["reference"])
      torch = case["results"].get("torch")
      dtype_peak = peak.get(case["dtype"], {}).get("gflops")
      for record in case["results"].values():
        if record["status"] != "ok":
          continue
        gflops = case["flops"] / record["median_s"] / 1e9
        record["gflops"] = float(f"{gflops:.4g}")
        record["ratio_vs_jnp"] = paired_ratio(reference, record)
        record["ratio_vs_torch"] = paired_ratio(torch, record)
        record["pct_of_peak"] = round(100 * gflops / dtype_peak, 2) if dtype_peak else None
        if case.get("computed_flops"):
          tflops = case["computed_flops"] / record["median_s"] / 1e12
          record["tflops_computed"] = float(f"{tflops:.4g}")
          known = device_peak and case["dtype"] in HALF
          pct = 100 * tflops / device_peak if known else None
          record["pct_of_device_peak"] = None if pct is None else float(f"{pct:.4g}")


def merge(
    previous: Mapping[str, Any] | None,
    current: dict[str, Any],
    order: Sequence[str],
    gemm_suites: Sequence[str],
) -> dict[str, Any]:
  """``current`` plus the suites of ``previous`` (same machine) that this run did not redo.

  Suites are kept in ``order`` (the registered suites'), unknown ones last.
  """
  if previous and previous.get("tag") == current["tag"]:
    kept = {k: v for k, v in previous.get("suites", {}).items() if k not in current["suites"]}
    suites = {**kept, **current["suites"]}
    ordered = sorted(suites, key=lambda k: order.index(k) if k in order else len(order))
    current["suites"] = {k: suites[k] for k in ordered}
  derive(current, gemm_suites)
  return current


# ---------------------------------------------------------------- queries for the summaries


def ratios(suite: Mapping[str, Any], name: str, key: str = "ratio_vs_jnp",
           cases: Iterable[str] | None = None) -> list[float]:
  """``key`` of competitor ``name`` over the suite's cases (or those named), where it exists."""
  wanted = None if cases is None else set(cases)
  return [
      c["results"][name][key] for c in suite["cases"]
      if (wanted is None or c["name"] in wanted) and c["results"].get(name, {}).get(key)
  ]


def record(suite: Mapping[str, Any], case: str, name: str) -> Mapping[str, Any] | None:
  """Competitor ``name``'s record in case ``case``, if it ran."""
  for c in suite.get("cases", []):
    if c["name"] == case and c["results"].get(name, {}).get("status") == "ok":
      return c["results"][name]
  return None
