"""``python -m benchmarks``: jmat against jnp, lax, einsum, numpy and torch, side by side.

    python -m benchmarks                      # every suite, full sizes (~15 min on 2 cores)
    python -m benchmarks --quick              # every suite, small sizes (a smoke test)
    python -m benchmarks --suite products --suite eager --device cpu --out /tmp/bench
    python -m benchmarks --suite flex --suite attention --device gpu   # or tpu: Pallas vs peers
    python -m benchmarks --suite decode       # one decoding step over a paged or contiguous cache
    python -m benchmarks --suite decode --device gpu   # or tpu: vs torch's and JAX's decode kernels

With ``--device gpu`` or ``tpu`` the flex and attention suites are those of
:mod:`benchmarks.accelerators` (jmat's Triton or Mosaic kernel against torch.compile's
flex_attention and cuDNN, or against splash attention), reported in TFLOP/s over the
computed blocks and as a share of the device's peak; the decode suite is that of
:mod:`benchmarks.decode_device` (jmat's paged decode against torch's flex decoding and
varlen_attn and JAX's paged and ragged kernels), reported in GB/s of the cache read.

Results go to ``OUT/<machine-tag>/``: ``results.json`` (every figure, the machine,
the load), ``results.md`` (tables) and one PNG per suite. Suites measured again
replace their earlier results there; the others are kept.

Adding a suite: write a module that defines a :class:`benchmarks.spec.SuiteSpec`
(``build(target, quick) -> timing.Suite`` for a timed suite, its ``summary`` sentences
for the README, optionally its ``plot``) and add that spec to ``SUITES`` below, one line.
The runner, ``results.json``/``results.md``, the plots and the README block pick it up
from there; nothing else names a suite.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402

from benchmarks import (  # noqa: E402
    accelerators,
    attention,
    decode_device,
    family,
    flex,
    products,
)
from benchmarks.spec import SuiteSpec  # noqa: E402

# Every suite, in the order they run and are reported: one line each.
SUITES: tuple[SuiteSpec, ...] = (
    products.PRODUCTS_SPEC,
    products.EAGER_SPEC,
    products.DTYPES_SPEC,
    family.FAMILY_SPEC,
    accelerators.on_device(attention.ATTENTION_SPEC, accelerators.attention_suite),
    attention.MEMORY_SPEC,
    accelerators.on_device(flex.FLEX_SPEC, accelerators.flex_suite),
    decode_device.DECODE_SPEC,
)
SPECS = {spec.name: spec for spec in SUITES}
SUITE_NAMES = tuple(SPECS)

DEFAULT_OUT = Path(__file__).resolve().parent / "results"


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="python -m benchmarks", description=__doc__.splitlines()[0].replace("``", ""),
      formatter_class=argparse.RawDescriptionHelpFormatter, epilog="\n".join(
          __doc__.splitlines()[2:6]),
  )
  parser.add_argument(
      "--suite", action="append", choices=(*SUITE_NAMES, "all"),
      help="what to measure (repeatable; default: all)",
  )
  parser.add_argument("--quick", action="store_true", help="small sizes, few rounds (~1 min)")
  parser.add_argument(
      "--device", default=None,
      help="a JAX platform from jax.devices(): cpu, gpu, tpu (default: JAX's default backend); "
      "on gpu or tpu the flex and attention suites pit jmat's Pallas kernel against the "
      "device's own",
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


# What a device run needs, for the one-line refusal where JAX finds no such device.
_NEEDS = {
    "gpu": "jax with CUDA (pip install -U 'jax[cuda12]') on a machine with an NVIDIA GPU",
    "cuda": "jax with CUDA (pip install -U 'jax[cuda12]') on a machine with an NVIDIA GPU",
    "tpu": "jax with libtpu (pip install -U 'jax[tpu]') on a TPU VM",
}


def _device(name: str | None) -> jax.Device:
  if name in (None, "gpu", "cuda"):
    # torch may share a GPU with JAX in this process: JAX takes memory as it needs it instead
    # of preallocating 75% of it (read when JAX starts its backends, below).
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
  platform = name or jax.default_backend()
  try:
    return jax.devices(platform)[0]
  except RuntimeError:
    available = sorted({d.platform for d in jax.devices()} | {"cpu"})
    needs = f"; --device {platform} needs {_NEEDS[platform]}" if platform in _NEEDS else ""
    raise SystemExit(
        f"python -m benchmarks: no JAX device {platform!r} here (jax {jax.__version__} sees "
        f"{', '.join(available)}){needs}"
    ) from None


def _run_timed(suite, settings, bar, measured=lambda cases: None) -> list[dict[str, Any]]:
  """Every case of ``suite`` timed; ``measured(cases)`` after each, with the cases so far."""
  from benchmarks import timing

  cases = []
  for case in suite.cases:
    bar.set_postfix_str(case.name, refresh=False)
    records = timing.measure(case.build(), settings, bar.update)
    counted = {} if case.computed_flops is None else {"computed_flops": case.computed_flops}
    cases.append({
        "name": case.name, "dtype": case.dtype, "flops": case.flops, **counted,
        "info": dict(case.info), "results": records,
    })
    measured(list(cases))
  return cases


def _run(args, device, settings, started, clock, load_before, x64, timed) -> dict[str, Any]:
  """How a suite was run: the ``run`` field of its record."""
  from benchmarks import machine

  return {
      "started": started.isoformat(timespec="seconds"),
      "duration_s": round(time.perf_counter() - clock, 1),
      "quick": args.quick,
      "device": device.platform,
      "device_kind": device.device_kind,
      "jax_enable_x64": x64,
      "repeats": settings.repeats if timed else 1,
      "min_sample_s": settings.min_sample_s if timed else None,
      "settle_s": settings.settle_s if timed else None,
      "load_average_before": load_before,
      "load_average_after": machine.load_average(),
  }


def _record(fields, name, cases, run) -> dict[str, Any]:
  return {**fields, "name": name, "run": run, "cases": cases}


def _checkpoint(results, out, name, fields, planned, run, cases) -> None:
  """Writes suite ``name`` with the ``cases`` measured so far, its title saying so."""
  from benchmarks import report

  if len(cases) < planned:
    title = f"{fields['title']} (partial: {len(cases)} of {planned} cases)"
    results["suites"][name] = _record({**fields, "title": title}, name, cases, run())
    report.write(results, out, SPECS)


def main(argv: Sequence[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  if argv[:1] == ["--"]:  # ``python -m jmat bench -- --quick`` passes the separator on
    argv = argv[1:]
  args = _parser().parse_args(argv)
  # float64 needs 64-bit types; set before any array exists, for every suite alike.
  jax.config.update("jax_enable_x64", True)

  from tqdm import tqdm

  from benchmarks import machine, readme, report, timing
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
  print(f"jmat benchmarks on {machine.short(info)} -> {out}", file=sys.stderr)
  results: dict[str, Any] = {"schema_version": 1, "tag": tag, "machine": info, "suites": {}}
  paths: list[Path] = []
  for name in selected:
    started = datetime.datetime.now(datetime.timezone.utc)
    load_before, clock = machine.load_average(), time.perf_counter()
    spec = SPECS[name]
    suite_record: dict[str, Any]
    x64 = True
    if spec.measure is not None:
      with tqdm(total=spec.points(args.quick), desc=name, unit="point") as bar:
        suite_record, cases = spec.measure(device.platform, args.quick, bar.update)
    else:
      if spec.build is None:
        raise SystemExit(f"python -m benchmarks: suite {name} has neither build nor measure")
      suite = spec.build(target, args.quick)
      total = len(suite.cases) * len(suite.competitors) * (settings.repeats + 1)
      suite_record = {
          "kind": "time", "title": suite.title, "competitors": list(suite.competitors),
          "reference": suite.reference, "notes": list(suite.notes),
      }
      x64 = suite.jax_enable_x64

      # A lent accelerator's run may be cut short: there every case measured is written.
      checkpoint = functools.partial(
          _checkpoint, results, out, name, suite_record, len(suite.cases), functools.partial(
              _run, args, device, settings, started, clock, load_before, x64, True),
      ) if device.platform != "cpu" else lambda cases: None
      with tqdm(total=total, desc=name, unit="run") as bar:
        cases = _run_timed(suite, settings, bar, checkpoint)
    results["suites"][name] = _record(suite_record, name, cases, _run(
        args, device, settings, started, clock, load_before, x64, spec.measure is None))
    paths = report.write(results, out, SPECS)  # after every suite: a late failure loses nothing
  if args.readme is not None:
    readme.update_readme(args.readme, out, SPECS)
  for path in paths:
    print(path)
  return 0


if __name__ == "__main__":
  sys.exit(main())
