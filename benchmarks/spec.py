"""The interface between a suite module and the runner and report: one ``SuiteSpec`` per suite.

A suite module (``products``, ``family``, ``attention``, ...) defines a ``SuiteSpec``
for each suite it measures; ``benchmarks/__main__.py`` lists them in ``SUITES``, one
line each, in the order they run and are reported. Everything the report says about
a suite comes from its spec: no other module names a suite or a case.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

from benchmarks.timing import Suite

Record = Mapping[str, Any]
"""A suite as stored in ``results.json``: name, kind, title, competitors, reference, notes,
run, cases (each with name, dtype, flops, info and a result per competitor)."""


@dataclasses.dataclass(frozen=True)
class SuiteSpec:
  """One suite of ``python -m benchmarks``: how to measure it and how to report it.

  A timed suite gives ``build``; a suite measured some other way (the memory suite:
  one fresh process per point) gives ``measure`` and ``points`` instead.

  Attributes:
    name: the suite's name: ``--suite NAME``, its key in ``results.json``, ``NAME.png``.
    build: ``build(target, quick) -> timing.Suite``: the cases and competitors to time.
    measure: ``measure(platform, quick, tick) -> (fields, cases)``: ``fields`` are the
      suite record's ``kind``, ``title``, ``competitors``, ``reference`` and ``notes``,
      ``cases`` its cases; ``tick(n)`` reports progress.
    points: ``points(quick)``: how many ticks ``measure`` makes (the progress bar's total).
    summary: ``summary(record) -> sentences``: what the README's "In short" says about
      this suite, computed from its record alone (derived figures filled in); ``[]`` if
      the figures it needs are missing.
    plot: ``plot(record, plt) -> figure``: the suite's figure (``plt`` is
      ``matplotlib.pyplot``); ``None``: one bar per competitor and case.
    per_call: the suite's figure is the time per call (else GFLOP/s).
    gemm: its cases count toward the measured peak GFLOP/s per dtype (``pct_of_peak``).
    of_peak: the README table shows the first competitor's percentage of that peak (not
      where the cases are a few dozen FLOPs and the time is dispatch overhead).
  """

  name: str
  build: Callable[[Any, bool], Suite] | None = None
  measure: Callable[..., tuple[dict[str, Any], list[dict[str, Any]]]] | None = None
  points: Callable[[bool], int] = lambda quick: 0
  summary: Callable[[Record], list[str]] = lambda record: []
  plot: Callable[[Record, Any], Any] | None = None
  per_call: bool = False
  gemm: bool = False
  of_peak: bool = True


def spec_of(specs: Mapping[str, SuiteSpec], name: str) -> SuiteSpec:
  """The spec of suite ``name``; a suite no module registers any more is reported plainly."""
  return specs.get(name) or SuiteSpec(name)
