"""The attention suites: forward time against sequence length L (causal and not) and memory.

B=1, H=8, D=64, float32, self-attention (S = L). Competitors:

* ``jmat default`` / ``jmat dense`` / ``jmat blockwise``:
  ``jmat.scaled_dot_product_attention`` with ``implementation=None``, ``"dense"``
  and ``"blockwise"`` (jitted at definition), on ``(B, H, L, D)`` arrays;
* ``jax.nn``: ``jax.jit(jax.nn.dot_product_attention)`` (the reference of
  ``ratio_vs_jnp``), on the same values laid out as it expects, ``(B, L, H, D)``;
* ``torch``: ``torch.nn.functional.scaled_dot_product_attention`` on ``(B, H, L, D)``.

The FLOPs are the two products' useful work: ``4 B H L^2 D``, halved when causal.

The memory suite runs each (L, competitor) point of a causal forward+backward in
a fresh ``python -m benchmarks.memory`` process (see that module) and records its
peak RSS and XLA's compiled temporaries.
"""

from __future__ import annotations

import functools
import importlib.util
import sys
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from benchmarks import competitors as comp
from benchmarks import derive, plots
from benchmarks.formatting import fmt_bytes, fmt_ratio, fmt_time
from benchmarks.spec import Record, SuiteSpec
from benchmarks.timing import Call, Case, Skipped, Suite, skipped, subprocess_record

BATCH, HEADS, HEAD_DIM = 1, 8, 64
JMAT_IMPLEMENTATIONS = {"jmat default": None, "jmat dense": "dense", "jmat blockwise": "blockwise"}
COMPETITORS = (*JMAT_IMPLEMENTATIONS, "jax.nn", "torch")
SDPA = "scaled_dot_product_attention"


def flops(length: int, causal: bool) -> float:
  full = 4.0 * BATCH * HEADS * length * length * HEAD_DIM
  return full / 2 if causal else full


def jmat_attention(implementation: str | None, causal: bool):
  """``q, k, v -> jmat.scaled_dot_product_attention(...)``, or Skipped while it does not exist."""
  sdpa = comp.jmat_op(SDPA)
  if isinstance(sdpa, Skipped):
    return sdpa
  return functools.partial(sdpa, is_causal=causal, implementation=implementation)


@functools.cache
def jax_nn_attention(causal: bool):
  return jax.jit(functools.partial(jax.nn.dot_product_attention, is_causal=causal))


def to_jax_nn_layout(x: np.ndarray) -> np.ndarray:
  """``(B, H, L, D)`` -> ``(B, L, H, D)``, the layout jax.nn.dot_product_attention takes."""
  return np.ascontiguousarray(np.swapaxes(x, 1, 2))


def _case(target: comp.Target, length: int, causal: bool) -> Case:
  def build() -> dict[str, Call | Skipped]:
    shape = (BATCH, HEADS, length, HEAD_DIM)
    q, k, v = target.random([shape] * 3, "float32")
    calls: dict[str, Call | Skipped] = {}
    for name, implementation in JMAT_IMPLEMENTATIONS.items():
      fn = jmat_attention(implementation, causal)
      calls[name] = fn if isinstance(fn, Skipped) else target.jax_call(fn, q, k, v)
    calls["jax.nn"] = target.jax_call(
        jax_nn_attention(causal), *(to_jax_nn_layout(x) for x in (q, k, v))
    )
    calls["torch"] = target.torch_call(
        lambda torch: functools.partial(
            torch.nn.functional.scaled_dot_product_attention, is_causal=causal
        ),
        q, k, v,
    )
    return calls

  kind = "causal" if causal else "full"
  info = {"length": length, "causal": causal, "shape": [BATCH, HEADS, length, HEAD_DIM]}
  return Case(f"{kind} L={length}", flops(length, causal), "float32", build, info)


def attention_suite(target: comp.Target, quick: bool) -> Suite:
  lengths = (128, 256) if quick else (256, 512, 1024, 2048, 4096, 8192)
  cases = tuple(_case(target, n, causal) for causal in (False, True) for n in lengths)
  return Suite(
      "attention", f"Attention forward, B={BATCH}, H={HEADS}, D={HEAD_DIM}, float32",
      COMPETITORS, "jax.nn", cases,
      notes=(
          "ratio_vs_jnp is taken against jax.nn.dot_product_attention (jitted).",
          "GFLOP/s count the useful work of the two products, 4*B*H*L^2*D, halved when causal.",
      ),
  )


# XLA's compiled temporaries undercount the peak: dense forward+backward at L=8192
# reported 6 GB of temporaries and reached 10.7 GB (jax.nn) and 16.3 GB (jmat dense)
# of RSS on the first full run. A 4 GB limit keeps every point well under 16 GB.
MEMORY_LIMIT_BYTES = 4 * 2**30
MEMORY_TIMEOUT_S = 900
# The longest sequences are run for jmat's default (the claim under test) and torch
# only: a blockwise point there costs another minute of a 15-minute run and
# repeats the default's measurement once the default is blockwise.
MEMORY_LONGEST = 32768
MEMORY_LONGEST_COMPETITORS = ("jmat default", "torch")
MEMORY_TITLE = (
    f"Attention forward+backward memory, causal, B={BATCH}, H={HEADS}, D={HEAD_DIM}, float32"
)
MEMORY_NOTES = (
    "peak_rss_bytes: the peak resident set of a fresh process that imports one library, makes "
    "the inputs, compiles and runs one forward+backward; baseline_rss_bytes: the same just "
    "before that step.",
    "temp_bytes: XLA's compiled memory_analysis().temp_size_in_bytes (JAX competitors only).",
    f"JAX points whose compiled temporaries exceed {MEMORY_LIMIT_BYTES // 2**30} GB are skipped "
    "(not run): peak RSS runs 2-3x XLA's temporaries, and a dense attention must not exhaust "
    "the machine.",
    f"L={MEMORY_LONGEST} is run for {' and '.join(MEMORY_LONGEST_COMPETITORS)} only (time "
    "budget).",
)


def memory_lengths(quick: bool) -> tuple[int, ...]:
  return (256, 512) if quick else (1024, 2048, 4096, 8192, 16384, 32768)


def memory_point(competitor: str, length: int, device: str) -> dict[str, Any]:
  """Measures one point in a fresh subprocess; returns its record (ok, skipped or failed)."""
  command = [
      sys.executable, "-m", "benchmarks.memory", competitor,
      ",".join(map(str, (BATCH, HEADS, length, HEAD_DIM))),
      "--device", device, "--limit", str(MEMORY_LIMIT_BYTES),
  ]
  return subprocess_record(command, MEMORY_TIMEOUT_S)


def memory_run(device: str, quick: bool, tick: Callable[[int], object] = lambda n: None
               ) -> list[dict[str, Any]]:
  """Every (L, competitor) point of the memory suite; one case per L."""
  cases = []
  for length in memory_lengths(quick):
    results = {}
    for competitor in COMPETITORS:
      if competitor == "torch" and importlib.util.find_spec("torch") is None:
        results[competitor] = skipped("torch is not installed (pip install -e '.[bench]')")
      elif length >= MEMORY_LONGEST and competitor not in MEMORY_LONGEST_COMPETITORS:
        results[competitor] = skipped(
            f"L={MEMORY_LONGEST} is run for {' and '.join(MEMORY_LONGEST_COMPETITORS)} only, "
            "to keep a full run under 15 minutes"
        )
      else:
        results[competitor] = memory_point(competitor, length, device)
      tick(1)
    cases.append({
        "name": f"causal L={length}",
        "dtype": "float32",
        "info": {"length": length, "causal": True, "shape": [BATCH, HEADS, length, HEAD_DIM]},
        "results": results,
    })
  return cases


def memory_measure(device: str, quick: bool, tick: Callable[[int], object] = lambda n: None
                   ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
  """The memory suite's record fields and its cases (see :class:`benchmarks.spec.SuiteSpec`)."""
  fields = {"kind": "memory", "title": MEMORY_TITLE, "competitors": list(COMPETITORS),
            "reference": "jax.nn", "notes": list(MEMORY_NOTES)}
  return fields, memory_run(device, quick, tick)


# ---------------------------------------------------------------- how the suites are reported


def _attention_summary(suite: Record) -> list[str]:
  out = []
  for length in (2048, 8192):
    case = f"causal L={length}"
    mine = derive.record(suite, case, "jmat default")
    if not mine:
      continue
    torch, jax_nn = derive.record(suite, case, "torch"), derive.record(suite, case, "jax.nn")
    parts = [f"causal attention, L={length}: jmat default {fmt_time(mine['median_s'])}"]
    if torch:
      parts.append(f"{mine['median_s'] / torch['median_s']:.2f}× torch SDPA's time "
                   f"({fmt_time(torch['median_s'])})")
    if jax_nn:
      parts.append(f"{fmt_ratio(mine['ratio_vs_jnp'])} faster than "
                   f"jax.nn.dot_product_attention ({fmt_time(jax_nn['median_s'])})")
    out.append(", ".join(parts) + ".")
  return out


def _attention_plot(suite: Record, plt):
  fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
  for ax, causal in zip(axes, (False, True), strict=True):
    plots.lines(ax, suite, [c for c in suite["cases"] if c["info"]["causal"] == causal],
                plots.length, lambda r: r["median_s"] * 1e3)
    ax.set_xlabel("sequence length L")
    ax.set_title("causal" if causal else "not causal")
  axes[0].set_ylabel("forward time, ms (median)")
  axes[0].legend(fontsize=7)
  return fig


def _memory_summary(suite: Record) -> list[str]:
  longest = suite["cases"][-1]
  mine = longest["results"]["jmat default"]
  if mine["status"] != "ok":
    return []
  return [f"Attention forward+backward at {longest['name']}: jmat default peaks at "
          f"{fmt_bytes(mine['peak_rss_bytes'])} of RSS (the whole process)."]


def _memory_plot(suite: Record, plt):
  fig, axes = plt.subplots(1, 1, figsize=(8, 4.2))
  plots.lines(axes, suite, suite["cases"], plots.length, lambda r: r["peak_rss_bytes"] / 2**30)
  axes.set_xlabel("sequence length L (causal)")
  axes.set_ylabel("peak RSS of forward+backward, GB")
  axes.legend(fontsize=7)
  return fig


ATTENTION_SPEC = SuiteSpec("attention", build=attention_suite, summary=_attention_summary,
                           plot=_attention_plot, per_call=True)
MEMORY_SPEC = SuiteSpec(
    "memory", measure=memory_measure,
    points=lambda quick: len(memory_lengths(quick)) * len(COMPETITORS),
    summary=_memory_summary, plot=_memory_plot,
)
