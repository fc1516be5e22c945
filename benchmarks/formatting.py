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


def machine_line(machine: Mapping[str, Any]) -> str:
  v = machine["versions"]
  memory = fmt_bytes(machine["memory_bytes"])
  return (
      f"{machine['cpu_model']}, {machine['cores']} cores ({', '.join(machine['cpu_flags'])}), "
      f"{memory} RAM; JAX device {machine['device_platform']} ({machine['device_kind']}); "
      f"jax {v['jax']}, jaxlib {v['jaxlib']}, numpy {v['numpy']}, torch {v['torch']} "
      f"({machine['torch_threads']} threads), jmat {v['jmat']}."
  )
