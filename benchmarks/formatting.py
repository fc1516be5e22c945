"""How figures read: times, bytes, ratios and GFLOP/s as text, Markdown tables, the machine line.

Shared by ``results.md`` (:mod:`benchmarks.markdown`), the README block
(:mod:`benchmarks.readme`) and the suites' own summaries.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any


def fmt_time(seconds: float) -> str:
  if seconds >= 1:
    return f"{seconds:.2f} s"
  if seconds >= 1e-3:
    return f"{seconds * 1e3:.3g} ms"
  return f"{seconds * 1e6:.3g} µs"


def fmt_bytes(n: float | None) -> str:
  if n is None:
    return "n/a"
  return f"{n / 2**30:.2f} GB" if n >= 2**30 else f"{n / 2**20:.0f} MB"


def fmt_ratio(ratio: float | None) -> str:
  return "—" if ratio is None else f"{ratio:.2f}×"


def fmt_gflops(gflops: float) -> str:
  return f"{gflops:.3g}" if gflops < 100 else f"{gflops:.0f}"


def fmt_tflops(tflops: float) -> str:
  return f"{tflops:.3g}" if tflops < 100 else f"{tflops:.0f}"


def fmt_pct(pct: float | None) -> str:
  """A percentage of a peak; ``n/a`` where the peak is unknown."""
  return "n/a" if pct is None else f"{pct:.0f}%" if pct >= 10 else f"{pct:.2g}%"


def fmt_span(values: list[float]) -> str:
  """``0.97–1.01×``, or one ratio where the lowest and highest read the same."""
  low, high = min(values), max(values)
  return f"{low:.2f}×" if f"{low:.2f}" == f"{high:.2f}" else f"{low:.2f}–{high:.2f}×"


def table(header: list[str], rows: Iterable[list[str]]) -> list[str]:
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  return lines + ["| " + " | ".join(row) + " |" for row in rows]


def footnotes(cases: Iterable[Mapping[str, Any]]) -> list[str]:
  """One line per distinct skip or failure reason, naming the competitors it hit."""
  reasons: dict[str, set[str]] = {}
  for case in cases:
    for name, record in case["results"].items():
      if record["status"] != "ok":
        reasons.setdefault(f"{record['status']}: {record['reason']}", set()).add(name)
  return [f"- {', '.join(sorted(names))} — {text}" for text, names in sorted(reasons.items())]


def counts_computed_blocks(suite: Mapping[str, Any]) -> bool:
  """Whether a suite's cases count their computed blocks (its tables then show TFLOP/s)."""
  return any(case.get("computed_flops") for case in suite["cases"])


def describe_accelerator(machine: Mapping[str, Any]) -> str | None:
  """``1 x NVIDIA H200 (989 bf16 TFLOP/s peak)``, or None for a run without one."""
  acc = machine.get("accelerator")  # absent from results written before it was recorded
  if not acc:
    return None
  peak = acc["peak_bf16_tflops"]
  known = f"{peak:g} bf16 TFLOP/s peak" if peak else "peak not in PEAK_BF16_TFLOPS"
  return f"{acc['count']} x {acc['name']} ({known})"


def machine_line(machine: Mapping[str, Any]) -> str:
  v = machine["versions"]
  memory = fmt_bytes(machine["memory_bytes"])
  accelerator = describe_accelerator(machine)
  extra = "" if accelerator is None else f"; accelerator {accelerator}" + "".join(
      f", {name} {version}" for name, version in machine["accelerator"]["versions"].items())
  return (
      f"{machine['cpu_model']}, {machine['cores']} cores ({', '.join(machine['cpu_flags'])}), "
      f"{memory} RAM; JAX device {machine['device_platform']} ({machine['device_kind']}){extra}; "
      f"jax {v['jax']}, jaxlib {v['jaxlib']}, numpy {v['numpy']}, torch {v['torch']} "
      f"({machine['torch_threads']} threads), jmat {v['jmat']}."
  )
