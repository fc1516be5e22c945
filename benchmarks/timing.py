"""Timing: every competitor of a case is warmed up, then measured in interleaved rounds.

Every round times each competitor once, in a fresh random order, so a burst of
load from another process hits all competitors alike instead of one of them.

Before every sample the process waits until it is idle (:func:`settle`): numpy's
OpenBLAS worker threads spin for ~100 ms after each call returns (torch's for a few
ms), burning one of this machine's two cores, and on an early run the competitor
that happened to follow numpy or torch lost 5-20% to that. A sample is a few
back-to-back calls (enough to last ``min_sample_s``), each waited on until its
result is ready; a figure is the median of the samples with their min and max.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import statistics
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

# One seeded generator for the whole run: every round of every case gets its own
# order (a generator per case would repeat the same orders in every case).
_ORDER = random.Random(0)

Call = Callable[[], Any]
"""A zero-argument call that returns only once its result is ready (block_until_ready)."""


@dataclasses.dataclass(frozen=True)
class Skipped:
  """A competitor that cannot run this case; ``reason`` goes to the results as it is."""

  reason: str


@dataclasses.dataclass(frozen=True)
class Case:
  """One measured problem: its name, its useful FLOPs and how to build every competitor.

  ``build`` allocates the inputs and returns ``{competitor: Call or Skipped}``; it runs
  only when the case is measured, so a sweep never holds every size's inputs at once.
  ``computed_flops`` (block-sparse attention on an accelerator) counts the work of
  every computed block, the masked-out pairs of partial blocks included: what the
  hardware did, against its peak, where ``flops`` is what the result needed.
  """

  name: str
  flops: float
  dtype: str
  build: Callable[[], Mapping[str, Call | Skipped]]
  info: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  computed_flops: float | None = None


@dataclasses.dataclass(frozen=True)
class Settings:
  """How hard to measure.

  Attributes:
    repeats: rounds per case, unless one round takes so long that ``repeats``
      rounds would exceed ``case_budget_s``; never fewer than ``min_repeats``.
    min_sample_s: the shortest sample; fast calls are repeated back to back.
    settle_s: the longest wait for the process to go idle before a sample (0:
      no wait), so the previous competitor's spinning worker threads do not
      steal the cores from the next one.
  """

  repeats: int
  min_sample_s: float
  settle_s: float = 0.0
  max_calls_per_sample: int = 1000
  case_budget_s: float = 20.0
  min_repeats: int = 3

  def rounds(self, round_s: float) -> int:
    affordable = int(self.case_budget_s / max(round_s, 1e-9))
    return max(min(self.min_repeats, self.repeats), min(self.repeats, affordable))


def skipped(reason: str) -> dict[str, Any]:
  return {"status": "skipped", "reason": reason}


def failed(error: BaseException) -> dict[str, Any]:
  text = f"{type(error).__name__}: {error}".strip()
  return {"status": "failed", "reason": text.splitlines()[0][:300]}


def _calls_per_sample(call: Call, settings: Settings) -> tuple[int, float]:
  """How many calls make one sample, and how long that sample should take."""
  start = time.perf_counter()
  call()
  once = max(time.perf_counter() - start, 1e-7)
  calls = max(1, min(settings.max_calls_per_sample, math.ceil(settings.min_sample_s / once)))
  return calls, calls * once


def settle(limit_s: float, step_s: float = 0.01) -> float:
  """Waits (up to ``limit_s``) until this process's threads burn no CPU; returns the wait.

  ``time.process_time`` counts every thread of the process, so a worker pool that
  is still spinning after its last call shows up as CPU time spent while we sleep.
  """
  start = time.perf_counter()
  while time.perf_counter() - start < limit_s:
    cpu = time.process_time()
    time.sleep(step_s)
    if time.process_time() - cpu < 0.1 * step_s:
      break
  return time.perf_counter() - start


def _sample(call: Call, calls: int, settle_s: float) -> float:
  if settle_s:
    settle(settle_s)
  start = time.perf_counter()
  for _ in range(calls):
    call()
  return (time.perf_counter() - start) / calls


def measure(
    competitors: Mapping[str, Call | Skipped],
    settings: Settings,
    tick: Callable[[int], object] = lambda n: None,
) -> dict[str, dict[str, Any]]:
  """Times every runnable competitor in interleaved rounds; returns a record per competitor.

  A record is ``{"status": "ok", "median_s", "min_s", "max_s", "samples",
  "calls_per_sample", "samples_s"}`` (seconds per call; ``samples_s[r]`` is round
  ``r``, so competitors can be compared round by round), or ``{"status": "skipped" |
  "failed", "reason"}``. ``tick(n)`` reports progress: ``settings.repeats + 1`` per
  competitor in all, however many rounds the case's time budget allows.
  """
  records: dict[str, dict[str, Any]] = {}
  runnable: dict[str, Call] = {}
  calls: dict[str, int] = {}
  round_s = 0.0
  for name, call in competitors.items():
    if isinstance(call, Skipped):
      records[name] = skipped(call.reason)
      tick(settings.repeats + 1)
      continue
    try:
      call()  # compiles, and warms caches and thread pools
      calls[name], sample_s = _calls_per_sample(call, settings)
      round_s += sample_s
    except Exception as e:  # a competitor that breaks is reported, not fatal to the run
      records[name] = failed(e)
      tick(settings.repeats + 1)
    else:
      runnable[name] = call
      tick(1)
  samples: dict[str, list[float]] = {name: [] for name in runnable}
  order = list(runnable)
  rounds = settings.rounds(round_s) if order else 0
  tick((settings.repeats - rounds) * len(order))
  for _ in range(rounds):
    for name in _ORDER.sample(order, len(order)):
      samples[name].append(_sample(runnable[name], calls[name], settings.settle_s))
      tick(1)
  for name in runnable:
    times = samples[name]
    records[name] = {
        "status": "ok",
        "median_s": statistics.median(times),
        "min_s": min(times),
        "max_s": max(times),
        "samples": len(times),
        "calls_per_sample": calls[name],
        "samples_s": [float(f"{t:.4g}") for t in times],
    }
  return {name: records[name] for name in competitors}


@dataclasses.dataclass(frozen=True)
class Suite:
  """A family of cases measured against the same competitors.

  ``reference`` names the JAX baseline that ``ratio_vs_jnp`` is taken against (for
  most suites ``jnp``, the jitted jnp expression; for attention
  ``jax.nn.dot_product_attention``); ``ratio_vs_torch`` is taken against ``torch``.
  ``jax_enable_x64``: whether its JAX competitors run with 64-bit types on (the
  runner's setting), or turn them off for their calls.
  """

  name: str
  title: str
  competitors: tuple[str, ...]
  reference: str
  cases: tuple[Case, ...]
  notes: tuple[str, ...] = ()
  jax_enable_x64: bool = True


def subprocess_record(command: Sequence[str], timeout_s: float) -> dict[str, Any]:
  """Runs ``command`` (a fresh process that prints its record as its last JSON line).

  Returns that record, or a failed one naming the time-out or the exit code and the
  last line of stderr: one point that fails does not end a run.
  """
  try:
    done = subprocess.run(list(command), capture_output=True, text=True, timeout=timeout_s)
  except subprocess.TimeoutExpired:
    return {"status": "failed", "reason": f"no result within {timeout_s} s"}
  lines = done.stdout.strip().splitlines()
  if done.returncode != 0 or not lines:
    tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
    return {"status": "failed", "reason": f"exit code {done.returncode}: {tail[:300]}"}
  return json.loads(lines[-1])
