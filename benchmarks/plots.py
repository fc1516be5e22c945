"""The PNG plots: one figure per suite, drawn by the suite's own ``plot`` or as bars.

The helpers (:func:`bars`, :func:`lines`, :func:`figure`) are what the suites' ``plot``
functions draw with.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from benchmarks.spec import SuiteSpec, spec_of


def _ok(record: Mapping[str, Any]) -> bool:
  return record["status"] == "ok"


def bars(ax, suite: Mapping[str, Any], cases: list[Mapping[str, Any]], per_call: bool,
         *, computed: bool = False) -> None:
  """One bar per (case, competitor), with the min-max range as error bars.

  The figure is the time per call (``per_call``), the GFLOP/s of the useful work, or
  (``computed``) the TFLOP/s over the computed blocks (``computed_flops``).
  """
  names = suite["competitors"]
  width = 0.8 / len(names)

  def figure(case: Mapping[str, Any], seconds: float) -> float:
    if computed:
      return case["computed_flops"] / seconds / 1e12
    return seconds * 1e6 if per_call else case["flops"] / seconds / 1e9

  for i, name in enumerate(names):
    xs, ys, lo, hi = [], [], [], []
    for j, case in enumerate(cases):
      r = case["results"][name]
      if not _ok(r):
        continue
      xs.append(j + (i - (len(names) - 1) / 2) * width)
      ys.append(figure(case, r["median_s"]))
      low, high = sorted((figure(case, r["min_s"]), figure(case, r["max_s"])))
      lo.append(ys[-1] - low)
      hi.append(high - ys[-1])
    ax.bar(xs, ys, width, yerr=[lo, hi], label=name, capsize=2)
  ax.set_xticks(range(len(cases)), [c["name"] for c in cases], rotation=20, ha="right",
                fontsize=7)
  ax.set_ylabel("TFLOP/s over the computed blocks" if computed else
                "µs per call (lower is better)" if per_call else "GFLOP/s")
  ax.grid(axis="y", alpha=0.3)


def lines(
    ax,
    suite: Mapping[str, Any],
    cases: list[Mapping[str, Any]],
    x: Callable[[Mapping[str, Any]], float],
    y: Callable[[Mapping[str, Any]], float],
    log_y: bool = True,
) -> None:
  """One line per competitor: ``y(record)`` against ``x(case)``, on a log2 x axis."""
  from matplotlib.ticker import FuncFormatter, NullFormatter

  for name in suite["competitors"]:
    points = [(x(c), y(c["results"][name])) for c in cases if _ok(c["results"][name])]
    if points:
      ax.plot(*zip(*points, strict=True), marker="o", label=name)
  ax.set_xscale("log", base=2)
  ax.set_xticks(sorted({x(c) for c in cases}))
  plain = FuncFormatter(lambda v, _: f"{v:g}")
  ax.xaxis.set_major_formatter(plain)
  ax.xaxis.set_minor_formatter(NullFormatter())
  if log_y:
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(plain)
  ax.grid(alpha=0.3, which="both")


def length(case: Mapping[str, Any]) -> int:
  """The sequence length of an attention case (its ``info["length"]``)."""
  return case["info"]["length"]


def default_plot(spec: SuiteSpec, suite: Mapping[str, Any], plt) -> Any:
  fig, axes = plt.subplots(1, 1, figsize=(8, 4.2))
  bars(axes, suite, suite["cases"], per_call=spec.per_call)
  axes.legend(fontsize=7)
  return fig


def log_bars(suite: Mapping[str, Any], plt) -> Any:
  """Per-call bars of every case on a log scale (the flex and decode suites: times that span
  orders of magnitude)."""
  fig, axes = plt.subplots(1, 1, figsize=(8, 4.2))
  bars(axes, suite, suite["cases"], per_call=True)
  axes.legend(fontsize=7)
  axes.set_yscale("log")
  return fig


def plots(results: Mapping[str, Any], out: Path, specs: Mapping[str, SuiteSpec]) -> list[Path]:
  """Writes one PNG per suite present; returns their paths."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  written = []
  for name, suite in results["suites"].items():
    spec = spec_of(specs, name)
    fig = spec.plot(suite, plt) if spec.plot else default_plot(spec, suite, plt)
    fig.suptitle(f"jmat {name}: {suite['title']} ({results['tag']})", fontsize=9)
    fig.tight_layout()
    path = out / f"{name}.png"
    fig.savefig(path, dpi=80)
    plt.close(fig)
    written.append(path)
  return written
