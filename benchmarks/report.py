"""Results: the derived figures, ``results.json``, ``results.md``, the PNG plots, the README block.

Derived figures of a timed competitor (``status == "ok"``):

* ``gflops``: the case's useful FLOPs over the median time;
* ``ratio_vs_jnp``: the suite's JAX reference time over this competitor's time,
  taken round by round (the rounds interleave competitors, so each pair ran under
  the same load) and the median kept; above 1 is faster than the reference;
* ``ratio_vs_torch``: the same against ``torch``;
* ``pct_of_peak``: ``gflops`` as a percentage of the machine's measured peak for
  the dtype: the best GFLOP/s any competitor reached on any GEMM case (suites
  ``products``, ``dtypes``, ``family``) of that dtype in these results.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

SUITE_ORDER = ("products", "eager", "dtypes", "family", "attention", "memory")
GEMM_SUITES = ("products", "dtypes", "family")
TIMED_FIELDS = (
    "median_s", "min_s", "max_s", "samples", "calls_per_sample", "samples_s",
    "gflops", "ratio_vs_jnp", "ratio_vs_torch", "pct_of_peak",
)
README_START, README_END = "<!-- bench:start -->", "<!-- bench:end -->"
DEFINITIONS = {
    "median_s": "median over rounds of the seconds per call (a sample is back-to-back calls, "
                "each waited on until its result is ready)",
    "min_s, max_s": "the fastest and slowest round",
    "samples_s": "seconds per call of each round, in round order (competitors take turns in "
                 "every round, in a fresh random order, each once the process is idle: "
                 "waiting up to run.settle_s for other libraries' spinning threads)",
    "gflops": "the case's useful FLOPs (flops) over median_s, in 1e9 per second",
    "ratio_vs_jnp": "median over rounds of (the suite's reference time / this time); above 1 is "
                    "faster than the reference (suite.reference)",
    "ratio_vs_torch": "the same against torch",
    "pct_of_peak": "gflops as a percentage of peak_gflops for the case's dtype: the best GFLOP/s "
                   "any competitor reached on any GEMM case (products, dtypes, family)",
    "peak_rss_bytes": "memory suite: peak resident set (VmHWM) of the fresh process of the point",
    "temp_bytes": "memory suite: XLA's compiled memory_analysis().temp_size_in_bytes",
}


# ---------------------------------------------------------------- derived figures


def _paired_ratio(reference: Mapping[str, Any] | None, record: Mapping[str, Any]) -> float | None:
  if not reference or reference.get("status") != "ok":
    return None
  pairs = zip(reference["samples_s"], record["samples_s"], strict=False)
  return round(statistics.median(ref / own for ref, own in pairs), 4)


def peaks(results: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
  """The best GFLOP/s per dtype over every GEMM case, with where it was reached."""
  best: dict[str, dict[str, Any]] = {}
  for suite_name in GEMM_SUITES:
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


def derive(results: dict[str, Any]) -> None:
  """Fills the derived figures of every timed record in place (after runs are merged)."""
  results["definitions"] = DEFINITIONS
  results["peak_gflops"] = peak = peaks(results)
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
        record["ratio_vs_jnp"] = _paired_ratio(reference, record)
        record["ratio_vs_torch"] = _paired_ratio(torch, record)
        record["pct_of_peak"] = round(100 * gflops / dtype_peak, 2) if dtype_peak else None


def merge(previous: Mapping[str, Any] | None, current: dict[str, Any]) -> dict[str, Any]:
  """``current`` plus the suites of ``previous`` (same machine) that this run did not redo."""
  if previous and previous.get("tag") == current["tag"]:
    kept = {k: v for k, v in previous.get("suites", {}).items() if k not in current["suites"]}
    suites = {**kept, **current["suites"]}
    order = sorted(suites, key=lambda k: SUITE_ORDER.index(k) if k in SUITE_ORDER else 99)
    current["suites"] = {k: suites[k] for k in order}
  derive(current)
  return current


# ---------------------------------------------------------------- formatting


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


def _table(header: list[str], rows: Iterable[list[str]]) -> list[str]:
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  return lines + ["| " + " | ".join(row) + " |" for row in rows]


def _footnotes(cases: Iterable[Mapping[str, Any]]) -> list[str]:
  reasons: dict[str, set[str]] = {}
  for case in cases:
    for name, record in case["results"].items():
      if record["status"] != "ok":
        reasons.setdefault(f"{record['status']}: {record['reason']}", set()).add(name)
  return [f"- {', '.join(sorted(names))} — {text}" for text, names in sorted(reasons.items())]


def _per_call(suite: Mapping[str, Any]) -> bool:
  """Suites whose figure is the time per call rather than GFLOP/s."""
  return suite["name"] in ("eager", "attention")


def _cell(suite: Mapping[str, Any], record: Mapping[str, Any]) -> str:
  if record["status"] != "ok":
    return record["status"]
  figure = fmt_time(record["median_s"]) if _per_call(suite) else fmt_gflops(record["gflops"])
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


def suite_markdown(suite: Mapping[str, Any]) -> list[str]:
  lines = [f"## {suite['name']}: {suite['title']}", "", _run_line(suite["run"]), ""]
  if suite["kind"] == "memory":
    header = ["case", *suite["competitors"]]
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
    lines += ["Peak RSS of one forward+backward in a fresh process (and XLA's compiled "
              "temporaries, and the time of that one step):", ""]
    lines += _table(header, rows)
  else:
    unit = "time per call" if _per_call(suite) else "GFLOP/s"
    lines += [f"Median {unit} (ratio to {suite['reference']}, above 1 is faster):", ""]
    rows = [[c["name"]] + [_cell(suite, c["results"][n]) for n in suite["competitors"]]
            for c in suite["cases"]]
    lines += _table(["case", *suite["competitors"]], rows)
    focus = suite["competitors"][0]
    lines += ["", f"{focus} in detail:", ""]
    rows = []
    for case in suite["cases"]:
      r = case["results"][focus]
      if r["status"] != "ok":
        rows.append([case["name"], r["status"], "", "", "", ""])
        continue
      pct = "—" if r["pct_of_peak"] is None else f"{r['pct_of_peak']:.0f}%"
      rows.append([
          case["name"],
          f"{fmt_time(r['median_s'])} [{fmt_time(r['min_s'])} – {fmt_time(r['max_s'])}]",
          fmt_gflops(r["gflops"]), fmt_ratio(r["ratio_vs_jnp"]), fmt_ratio(r["ratio_vs_torch"]),
          pct,
      ])
    header = ["case", "median [min – max]", "GFLOP/s", f"vs {suite['reference']}", "vs torch",
              "% of peak"]
    lines += _table(header, rows)
  notes = list(suite.get("notes", [])) + _footnotes(suite["cases"])
  if notes:
    lines += [""] + [n if n.startswith("- ") else f"- {n}" for n in notes]
  return lines + [""]


def machine_line(machine: Mapping[str, Any]) -> str:
  v = machine["versions"]
  memory = fmt_bytes(machine["memory_bytes"])
  return (
      f"{machine['cpu_model']}, {machine['cores']} cores ({', '.join(machine['cpu_flags'])}), "
      f"{memory} RAM; JAX device {machine['device_platform']} ({machine['device_kind']}); "
      f"jax {v['jax']}, jaxlib {v['jaxlib']}, numpy {v['numpy']}, torch {v['torch']} "
      f"({machine['torch_threads']} threads), jmat {v['jmat']}."
  )


def markdown(results: Mapping[str, Any]) -> str:
  lines = [f"# jmat benchmarks: {results['tag']}", "", machine_line(results["machine"]), ""]
  peak = results["peak_gflops"]
  if peak:
    lines += ["Measured peak (best GFLOP/s of any competitor on a GEMM case) per dtype: "
              + "; ".join(f"{d} {p['gflops']:.0f} ({p['competitor']}, {p['case']})"
                          for d, p in sorted(peak.items())) + ".", ""]
  lines += ["Ratios are taken round by round (competitors interleaved) and the median kept.", ""]
  for suite in results["suites"].values():
    lines += suite_markdown(suite)
  return "\n".join(lines)


# ---------------------------------------------------------------- plots


def _ok(record: Mapping[str, Any]) -> bool:
  return record["status"] == "ok"


def _bars(ax, suite: Mapping[str, Any], cases: list[Mapping[str, Any]], per_call: bool) -> None:
  names = suite["competitors"]
  width = 0.8 / len(names)
  for i, name in enumerate(names):
    xs, ys, lo, hi = [], [], [], []
    for j, case in enumerate(cases):
      r = case["results"][name]
      if not _ok(r):
        continue
      xs.append(j + (i - (len(names) - 1) / 2) * width)
      if per_call:
        ys.append(r["median_s"] * 1e6)
        lo.append(ys[-1] - r["min_s"] * 1e6)
        hi.append(r["max_s"] * 1e6 - ys[-1])
      else:
        ys.append(r["gflops"])
        lo.append(ys[-1] - case["flops"] / r["max_s"] / 1e9)
        hi.append(case["flops"] / r["min_s"] / 1e9 - ys[-1])
    ax.bar(xs, ys, width, yerr=[lo, hi], label=name, capsize=2)
  ax.set_xticks(range(len(cases)), [c["name"] for c in cases], rotation=20, ha="right",
                fontsize=7)
  ax.set_ylabel("µs per call (lower is better)" if per_call else "GFLOP/s")
  ax.grid(axis="y", alpha=0.3)


def _length(case: Mapping[str, Any]) -> int:
  return case["info"]["length"]


def _lines(ax, suite, cases, x, y, log_y: bool = True) -> None:
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


def plots(results: Mapping[str, Any], out: Path) -> list[Path]:
  """Writes one PNG per suite present; returns their paths."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  written = []
  suites = results["suites"]
  tag = results["tag"]
  for name, suite in suites.items():
    cases = suite["cases"]
    if name == "products":
      sweep = [c for c in cases if c["name"].startswith("square")]
      shaped = [c for c in cases if not c["name"].startswith("square")]
      fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
      _lines(axes[0], suite, sweep, lambda c: c["info"]["shapes"][0][0], lambda r: r["gflops"],
             log_y=False)
      axes[0].set_xlabel("n, for (n, n) @ (n, n)")
      axes[0].set_ylabel("GFLOP/s (median)")
      axes[0].set_title("square sweep")
      _bars(axes[1], suite, shaped, per_call=False)
      axes[1].set_title("issue shapes")
      axes[0].legend(fontsize=7)
    elif name == "attention":
      fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
      for ax, causal in zip(axes, (False, True), strict=True):
        _lines(ax, suite, [c for c in cases if c["info"]["causal"] == causal], _length,
               lambda r: r["median_s"] * 1e3)
        ax.set_xlabel("sequence length L")
        ax.set_title("causal" if causal else "not causal")
      axes[0].set_ylabel("forward time, ms (median)")
      axes[0].legend(fontsize=7)
    elif name == "memory":
      fig, axes = plt.subplots(1, 1, figsize=(8, 4.2))
      _lines(axes, suite, cases, _length, lambda r: r["peak_rss_bytes"] / 2**30)
      axes.set_xlabel("sequence length L (causal)")
      axes.set_ylabel("peak RSS of forward+backward, GB")
      axes.legend(fontsize=7)
    else:
      fig, axes = plt.subplots(1, 1, figsize=(8, 4.2))
      _bars(axes, suite, cases, per_call=_per_call(suite))
      axes.legend(fontsize=7)
      if name == "eager":
        axes.set_yscale("log")
    fig.suptitle(f"jmat {name}: {suite['title']} ({tag})", fontsize=9)
    fig.tight_layout()
    path = out / f"{name}.png"
    fig.savefig(path, dpi=80)
    plt.close(fig)
    written.append(path)
  return written


# ---------------------------------------------------------------- files


def write(results: dict[str, Any], out: Path) -> list[Path]:
  """Merges with any earlier results in ``out``, then writes JSON, Markdown and plots."""
  out.mkdir(parents=True, exist_ok=True)
  json_path = out / "results.json"
  previous = json.loads(json_path.read_text()) if json_path.exists() else None
  results = merge(previous, results)
  json_path.write_text(json.dumps(results, indent=1) + "\n")
  md_path = out / "results.md"
  md_path.write_text(markdown(results) + "\n")
  return [json_path, md_path, *plots(results, out)]


# ---------------------------------------------------------------- README


def _value(suite: Mapping[str, Any], record: Mapping[str, Any]) -> str:
  if record["status"] != "ok":
    return record["status"]
  return fmt_time(record["median_s"]) if _per_call(suite) else fmt_gflops(record["gflops"])


def headline(suite: Mapping[str, Any]) -> list[str]:
  """One table: every competitor's figure, then the first jmat competitor's ratios."""
  focus = suite["competitors"][0]
  names = suite["competitors"]
  if suite["kind"] == "memory":
    rows = [[c["name"]] + [_memory_value(c["results"][n]) for n in names] for c in suite["cases"]]
    return _table(["case", *names], rows)
  rows = []
  for case in suite["cases"]:
    r = case["results"][focus]
    ok = r["status"] == "ok"
    pct = f"{r['pct_of_peak']:.0f}%" if ok and r["pct_of_peak"] is not None else "—"
    rows.append(
        [case["name"]] + [_value(suite, case["results"][n]) for n in names]
        + [fmt_ratio(r["ratio_vs_jnp"]) if ok else "—",
           fmt_ratio(r["ratio_vs_torch"]) if ok else "—"]
        + ([] if suite["name"] == "eager" else [pct])
    )
  unit = "time per call" if _per_call(suite) else "GFLOP/s"
  header = ["case", *(f"{n} ({unit})" if i == 0 else n for i, n in enumerate(names)),
            f"{focus} vs {suite['reference']}", f"{focus} vs torch"]
  if suite["name"] != "eager":  # a few dozen FLOPs: a percentage of peak says nothing
    header.append(f"{focus} % of peak")
  return _table(header, rows)


def _memory_value(record: Mapping[str, Any]) -> str:
  if record["status"] != "ok":
    return record["status"]
  return fmt_bytes(record["peak_rss_bytes"])


def _span(values: list[float]) -> str:
  low, high = min(values), max(values)
  return f"{low:.2f}×" if f"{low:.2f}" == f"{high:.2f}" else f"{low:.2f}–{high:.2f}×"


def _ratios(suite: Mapping[str, Any] | None, name: str, key: str = "ratio_vs_jnp",
            cases: Iterable[str] | None = None) -> list[float]:
  if not suite:
    return []
  wanted = None if cases is None else set(cases)
  return [
      c["results"][name][key] for c in suite["cases"]
      if (wanted is None or c["name"] in wanted) and c["results"].get(name, {}).get(key)
  ]


def _record(suite: Mapping[str, Any] | None, case: str, name: str) -> Mapping[str, Any] | None:
  for c in (suite or {}).get("cases", []):
    if c["name"] == case and c["results"].get(name, {}).get("status") == "ok":
      return c["results"][name]
  return None


def summary(results: Mapping[str, Any]) -> list[str]:
  """A few sentences computed from the results (nothing typed in by hand)."""
  suites = results["suites"]
  out = []
  products = suites.get("products")
  jmat, control = _ratios(products, "jmat"), _ratios(products, "jnp again")
  if jmat and control:
    same = [c["info"].get("same_hlo_as_jnp") for c in products["cases"]]
    out.append(
        f"Compiled products: jmat runs at {_span(jmat)} the speed of jax.jit(jnp.matmul) over "
        f"all {len(jmat)} cases; a second, identical jnp.matmul program (the A/A control) runs "
        f"at {_span(control)} in the same rounds, so differences of that size are noise. "
        "jmat's optimized HLO is instruction for instruction jnp.matmul's on "
        f"{sum(map(bool, same))} of the {len(same)} cases (checked in the run)."
    )
  eager = _ratios(suites.get("eager"), "jmat")
  if eager:
    out.append(f"Eager calls on tiny shapes: jmat runs at {_span(eager)} the speed of jnp.matmul.")
  dtypes = suites.get("dtypes")
  bf16 = [c for c in (dtypes or {}).get("cases", []) if c["dtype"] == "bfloat16"]
  if bf16:
    r = bf16[0]["results"]
    jax_best = max((r[n]["gflops"] for n in ("jmat", "jnp", "lax", "einsum")
                    if r[n]["status"] == "ok"), default=None)
    if r["jmat"]["status"] == "ok" and r["jnp"]["status"] == "ok":
      out.append(
          f"bfloat16 GEMM: jmat {fmt_gflops(r['jmat']['gflops'])} GFLOP/s, "
          f"{fmt_ratio(r['jmat']['ratio_vs_jnp'])} jnp.matmul (float32 accumulation compiles "
          "to a native bf16 GEMM)"
          + (f"; torch {fmt_gflops(r['torch']['gflops'])} GFLOP/s through oneDNN against the best"
             f" JAX {fmt_gflops(jax_best)}" if r["torch"]["status"] == "ok" and jax_best else "")
          + "."
      )
  family = suites.get("family")
  if family:
    chain = [c for c in family["cases"] if c["name"].startswith("multi_dot")]
    fused = [c["name"] for c in family["cases"] if not c["name"].startswith("multi_dot")]
    jmat_chain = chain and chain[0]["results"]["jmat"]
    if jmat_chain and jmat_chain["status"] == "ok":
      naive = chain[0]["results"]["jnp left-to-right"]
      if naive["status"] == "ok":
        faster = _paired_ratio(jmat_chain, naive)
        out.append(
            f"multi_dot: jmat runs at {fmt_ratio(jmat_chain['ratio_vs_jnp'])} the speed of "
            f"jnp.linalg.multi_dot and {fmt_ratio(1 / faster if faster else None)} that of the "
            "left-to-right jnp chain."
        )
    fused_ratios = _ratios(family, "jmat", cases=fused)
    if fused_ratios:
      out.append(
          f"addmm / baddbmm / linear: jmat runs at {_span(fused_ratios)} the speed of the "
          "equivalent jitted jnp expression."
      )
  attention = suites.get("attention")
  for length in (2048, 8192):
    mine = _record(attention, f"causal L={length}", "jmat default")
    if mine:
      torch = _record(attention, f"causal L={length}", "torch")
      jax_nn = _record(attention, f"causal L={length}", "jax.nn")
      parts = [f"causal attention, L={length}: jmat default {fmt_time(mine['median_s'])}"]
      if torch:
        parts.append(f"{mine['median_s'] / torch['median_s']:.2f}× torch SDPA's time "
                     f"({fmt_time(torch['median_s'])})")
      if jax_nn:
        parts.append(f"{fmt_ratio(mine['ratio_vs_jnp'])} faster than "
                     f"jax.nn.dot_product_attention ({fmt_time(jax_nn['median_s'])})")
      out.append(", ".join(parts) + ".")
  memory = suites.get("memory")
  if memory:
    longest = memory["cases"][-1]
    mine = longest["results"]["jmat default"]
    if mine["status"] == "ok":
      out.append(
          f"Attention forward+backward at {longest['name']}: jmat default peaks at "
          f"{fmt_bytes(mine['peak_rss_bytes'])} of RSS (the whole process)."
      )
  return out


def readme_section(results: Mapping[str, Any], prefix: str) -> str:
  """The README's benchmark block: the machine, one table per suite, the plots."""
  suites = results["suites"]
  loads = ", ".join(
      f"{name} {s['run']['load_average_before'][0]}" for name, s in suites.items()
      if s["run"].get("load_average_before")
  )
  dates = sorted(s["run"]["started"] for s in suites.values())
  start = dates[0].replace("T", " ")[:16]
  lines = [
      README_START, "## Benchmarks", "",
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
  highlights = summary(results)
  if highlights:
    lines += ["In short:", ""] + [f"- {h}" for h in highlights] + [""]
  for name, suite in suites.items():
    lines += [f"### {name}: {suite['title']}", ""] + headline(suite) + [""]
    lines += [f"- {n}" for n in suite.get("notes", [])] + _footnotes(suite["cases"])
    lines += ["", f"![{name}]({prefix}/{name}.png)", ""]
  return "\n".join(lines + [README_END])


def update_readme(readme: Path, out: Path) -> None:
  """Replaces the README's benchmark block (between the markers) with the results in ``out``."""
  import os

  results = json.loads((out / "results.json").read_text())
  prefix = Path(os.path.relpath(out, readme.resolve().parent)).as_posix()
  block = readme_section(results, prefix)
  text = readme.read_text()
  if README_START in text and README_END in text:
    head, rest = text.split(README_START, 1)
    text = head + block + rest.split(README_END, 1)[1]
  else:
    text = text.rstrip("\n") + "\n\n" + block + "\n"
  readme.write_text(text)
