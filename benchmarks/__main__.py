"""``python -m benchmarks``: jmat against jnp, lax, einsum, numpy and torch, side by side.

    python -m benchmarks                      # every suite, full sizes (~15 min on 2 cores)
    python -m benchmarks --quick              # every suite, small sizes (a smoke test)
    python -m benchmarks --suite products --suite eager --device cpu --out /tmp/bench

Results go to ``OUT/<machine-tag>/``: ``results.json`` (every figure, the machine,
the load), ``results.md`` (tables) and one PNG per suite. Suites measured again
replace their earlier results there; the others are kept.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402

from benchmarks.report import SUITE_ORDER as SUITE_NAMES  # noqa: E402

DEFAULT_OUT = Path(__file__).resolve().parent / "results"


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="python -m benchmarks", description=__doc__.splitlines()[0].replace("``", ""),
      formatter_class=argparse.RawDescriptionHelpFormatter, epilog="\n".join(
          __doc__.splitlines()[2:5]),
  )
  parser.add_argument(
      "--suite", action="append", choices=(*SUITE_NAMES, "all"),
      help="what to measure (repeatable; default: all)",
  )
  parser.add_argument("--quick", action="store_true", help="small sizes, few rounds (~1 min)")
  parser.add_argument(
      "--device", default=None,
      help="a JAX platform from jax.devices(): cpu, gpu, tpu (default: JAX's default backend)",
  )
  parser.add_argument(
      "--out", type=Path, default=None,
      help=f"results root; results go to OUT/<machine-tag>/ (default: {DEFAULT_OUT})",
  )
  parser.add_argument(
      "--readme", type=Path, default=None,
      help="also rewrite the benchmark block of this README from the results",
  )
  return parser


def _device(name: str | None) -> jax.Device:
  platform = name or jax.default_backend()
  try:
    return jax.devices(platform)[0]
  except RuntimeError:
    available = sorted({d.platform for d in jax.devices()} | {"cpu"})
    raise SystemExit(
        f"python -m benchmarks: no JAX device {platform!r}; available: {available}"
    ) from None


def _run_timed(suite, settings, bar) -> list[dict[str, Any]]:
  from benchmarks import timing

  cases = []
  for case in suite.cases:
    bar.set_postfix_str(case.name, refresh=False)
    records = timing.measure(case.build(), settings, bar.update)
    cases.append({
        "name": case.name, "dtype": case.dtype, "flops": case.flops, "info": dict(case.info),
        "results": records,
    })
  return cases


def main(argv: Sequence[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  if argv[:1] == ["--"]:  # ``python -m jmat bench -- --quick`` passes the separator on
    argv = argv[1:]
  args = _parser().parse_args(argv)
  # float64 needs 64-bit types; set before any array exists, for every suite alike.
  jax.config.update("jax_enable_x64", True)

  from tqdm import tqdm

  from benchmarks import attention, family, machine, products, report, timing
  from benchmarks.competitors import Target, torch_device_for

  selected = SUITE_NAMES if not args.suite or "all" in args.suite else tuple(
      dict.fromkeys(args.suite))
  device = _device(args.device)
  target = Target(device, torch_device_for(device))
  info = machine.info(device, target.torch_device)
  tag = machine.tag(info) + ("-quick" if args.quick and args.out is None else "")
  out = (args.out or DEFAULT_OUT) / tag
  settings = (
      timing.Settings(repeats=3, min_sample_s=0.005, max_calls_per_sample=100)
      if args.quick else timing.Settings(repeats=15, min_sample_s=0.05, settle_s=0.5)
  )
  builders: dict[str, Callable[[Target, bool], timing.Suite]] = {
      "products": products.products_suite,
      "eager": products.eager_suite,
      "dtypes": products.dtypes_suite,
      "family": family.family_suite,
      "attention": attention.attention_suite,
  }
  print(f"jmat benchmarks on {machine.short(info)} -> {out}", file=sys.stderr)
  results: dict[str, Any] = {"schema_version": 1, "tag": tag, "machine": info, "suites": {}}
  paths: list[Path] = []
  for name in selected:
    started = datetime.datetime.now(datetime.timezone.utc)
    load_before, clock = machine.load_average(), time.perf_counter()
    if name == "memory":
      points = len(attention.memory_lengths(args.quick)) * len(attention.COMPETITORS)
      with tqdm(total=points, desc=name, unit="point") as bar:
        cases = attention.memory_run(device.platform, args.quick, bar.update)
      suite_record: dict[str, Any] = {
          "kind": "memory", "title": attention.MEMORY_TITLE,
          "competitors": list(attention.COMPETITORS), "reference": "jax.nn",
          "notes": list(attention.MEMORY_NOTES),
      }
    else:
      suite = builders[name](target, args.quick)
      total = len(suite.cases) * len(suite.competitors) * (settings.repeats + 1)
      with tqdm(total=total, desc=name, unit="run") as bar:
        cases = _run_timed(suite, settings, bar)
      suite_record = {
          "kind": "time", "title": suite.title, "competitors": list(suite.competitors),
          "reference": suite.reference, "notes": list(suite.notes),
      }
    suite_record["name"] = name
    suite_record["run"] = {
        "started": started.isoformat(timespec="seconds"),
        "duration_s": round(time.perf_counter() - clock, 1),
        "quick": args.quick,
        "device": device.platform,
        "jax_enable_x64": True,
        "repeats": 1 if name == "memory" else settings.repeats,
        "min_sample_s": None if name == "memory" else settings.min_sample_s,
        "settle_s": None if name == "memory" else settings.settle_s,
        "load_average_before": load_before,
        "load_average_after": machine.load_average(),
    }
    suite_record["cases"] = cases
    results["suites"][name] = suite_record
    paths = report.write(results, out)  # after every suite: a late failure loses nothing
  if args.readme is not None:
    report.update_readme(args.readme, out)
  for path in paths:
    print(path)
  return 0


if __name__ == "__main__":
  sys.exit(main())
