"""Ring attention on 8 simulated devices: per-device memory vs sequence length.

    python -m benchmarks.ring_attention                    # L = 1024 .. 16384
    python -m benchmarks.ring_attention --lengths 512 1024 --out /tmp/ring.json --time

Runs in a process of its own: ``XLA_FLAGS=--xla_force_host_platform_device_count=8``
must be set before JAX is imported, so this module imports only the standard
library at the top and sets it (if JAX is already imported with fewer devices,
``main`` runs itself again in a child process).

For each sequence length and for causal attention (``B=1, H=8, E=64``,
float32, sequence sharded over 8 devices) it compiles, without running:

* ``jmat.parallel.ring_attention`` (the key/value blocks travel around the ring),
* ``jmat.parallel.allgather_attention`` (every device gathers all keys/values),
* single-device ``jmat.scaled_dot_product_attention(implementation="blockwise")``
  on the whole sequence (one device, for scale),

and records XLA's ``memory_analysis()`` per device (arguments, outputs,
temporaries) for the forward pass and for forward+backward, next to the
formulas of ``docs/distributed.md``, and the bytes of the collectives read
from the compiled HLO. ``--time`` also runs the forward passes (median
of 5; the 8 "devices" share this machine's cores, so times compare the
variants, not a real mesh; timed with :mod:`benchmarks.timing`, as every suite).

Prints a Markdown table; ``--out`` writes the records as JSON:
``{"config": {...}, "points": [{"length", "variant", "pass", "argument_bytes",
"output_bytes", "temp_bytes", "formula_temp_bytes", "collective_bytes", "time_s"}, ...]}``
(``collective_bytes``: see :func:`collective_bytes`).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

from benchmarks import timing  # the standard library only: jax is not imported yet

DEVICES = 8
FLAG = f"--xla_force_host_platform_device_count={DEVICES}"
BATCH, HEADS, HEAD_DIM = 1, 8, 64
DEFAULT_LENGTHS = (1024, 2048, 4096, 8192, 16384)
_ITEMSIZE = 4  # float32
_ARRAY = re.compile(r"(pred|[fsu]\d+|bf16)\[([\d,]*)\]")
_BITS = {"pred": 8, "bf16": 16}


def _tile(n: int, limit: int = 512) -> int:
  """jmat.parallel's tile for ``n`` rows, with its default limit."""
  from jmat._src import block_sparse  # imports jax: not before the device flags are set

  return block_sparse.block_for(n, limit, dividing=True)


def formulas(h: int, q_len: int, k_len: int, e: int, ev: int, devices: int, itemsize: int,
             acc_itemsize: int = 4) -> dict[str, int]:
  """Per-device bytes of sequence-sharded attention, the formulas of docs/distributed.md.

  Args:
    h: batch * heads on each device.
    q_len: ``L``; k_len: ``S``; e: ``E``; ev: ``Ev``.
    devices: ``n``, the devices along the sequence axis.
    itemsize: bytes per input element; acc_itemsize: per score/carry element (float32).

  Returns:
    ``ring`` and ``allgather``: temporaries of a forward pass; ``gathered_kv``:
    the keys and values all-gathering holds; ``*_sent``: bytes each device sends
    in a forward pass and in a backward pass.
  """
  lb, sb = q_len // devices, k_len // devices
  kv_block = h * sb * (e + ev) * itemsize
  carry = h * lb * (ev + 2) * acc_itemsize
  tq, tk = _tile(lb), _tile(sb)
  return {
      "ring": 2 * kv_block + 2 * h * tq * tk * acc_itemsize + carry,
      "gathered_kv": devices * kv_block,
      "allgather": devices * kv_block + 2 * h * tq * tk * acc_itemsize + carry,
      "forward_sent": (devices - 1) * kv_block,
      "ring_backward_sent": (devices - 1) * kv_block
      + devices * h * sb * (e + ev) * acc_itemsize,
      "allgather_backward_sent": (devices - 1) * kv_block
      + (devices - 1) * h * sb * (e + ev) * acc_itemsize,
  }


def _array_bytes(hlo_type: str) -> int:
  kind, dims = _ARRAY.match(hlo_type).groups()
  bits = _BITS.get(kind, int(re.sub(r"\D", "", kind) or 8))
  count = 1
  for d in filter(None, dims.split(",")):
    count *= int(d)
  return count * bits // 8


_COLLECTIVE = re.compile(
    r"\s(all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute)(-start)?\("
)


def collective_bytes(hlo: str) -> int:
  """Result bytes of the collective instructions of a compiled module.

  An instruction inside a loop body counts once: for the ring that is one trip
  around it (one block per permute), for all-gather the whole gathered array.
  """
  total = 0
  for line in hlo.splitlines():
    if _COLLECTIVE.search(line):
      result = line.split("=", 1)[1].strip()
      match = _ARRAY.search(result)
      if match:
        total += _array_bytes(match.group(0))
  return total


def _measure(lengths: Sequence[int], timed: bool) -> list[dict[str, Any]]:
  import functools

  import jax
  import jax.numpy as jnp
  from jax.sharding import NamedSharding, PartitionSpec

  import jmat

  mesh = jax.make_mesh((DEVICES,), ("seq",), axis_types=(jax.sharding.AxisType.Auto,))
  sharded = NamedSharding(mesh, PartitionSpec(None, None, "seq", None))
  variants = {
      "ring": functools.partial(
          jmat.parallel.ring_attention, mesh=mesh, axis_name="seq", is_causal=True
      ),
      "allgather": functools.partial(
          jmat.parallel.allgather_attention, mesh=mesh, axis_name="seq", is_causal=True
      ),
      "blockwise, 1 device": functools.partial(
          jmat.scaled_dot_product_attention, is_causal=True, implementation="blockwise"
      ),
  }
  points = []
  for length in lengths:
    shape = (BATCH, HEADS, length, HEAD_DIM)
    f = formulas(BATCH * HEADS, length, length, HEAD_DIM, HEAD_DIM, DEVICES, _ITEMSIZE)
    for name, fn in variants.items():
      sharding = None if name.startswith("blockwise") else sharded
      arg = jax.ShapeDtypeStruct(shape, jnp.float32, sharding=sharding)

      def loss(q, k, v, fn=fn):
        return jnp.sum(fn(q, k, v))

      passes = {"forward": fn, "forward+backward": jax.grad(loss, argnums=(0, 1, 2))}
      for pass_name, step in passes.items():
        compiled = jax.jit(step).lower(arg, arg, arg).compile()
        stats = compiled.memory_analysis()
        hlo = compiled.as_text()
        point = {
            "length": length,
            "variant": name,
            "pass": pass_name,
            "argument_bytes": stats.argument_size_in_bytes,
            "output_bytes": stats.output_size_in_bytes,
            "temp_bytes": stats.temp_size_in_bytes,
            "formula_temp_bytes": f.get(name) if pass_name == "forward" else None,
            "collective_bytes": collective_bytes(hlo),
            "time_s": None,
        }
        if timed and pass_name == "forward":
          point["time_s"] = _time(compiled, shape, sharding)
        points.append(point)
  return points


# One call per sample, 5 rounds (the median is kept), as this benchmark always measured.
_TIMING = timing.Settings(repeats=5, min_sample_s=0.0, min_repeats=5)


def _time(compiled, shape, sharding) -> float | None:
  """The median seconds of one forward call, by the shared harness (None if it failed)."""
  import jax
  import numpy as np

  x = jax.device_put(np.random.default_rng(0).standard_normal(shape, np.float32), sharding)
  record = timing.measure(
      {"forward": lambda: jax.block_until_ready(compiled(x, x, x))}, _TIMING
  )["forward"]
  return record.get("median_s")


def _mib(n: int | None) -> str:
  return "" if n is None else f"{n / 2**20:.2f}"


def table(points: list[dict[str, Any]]) -> str:
  """The Markdown table of the records (MiB per device)."""
  lines = [
      "| L | variant | pass | args MiB | temp MiB | formula MiB | collectives MiB | time s |",
      "|---:|---|---|---:|---:|---:|---:|---:|",
  ]
  for p in points:
    time_s = "" if p["time_s"] is None else f"{p['time_s']:.4f}"
    lines.append(
        f"| {p['length']} | {p['variant']} | {p['pass']} | {_mib(p['argument_bytes'])} | "
        f"{_mib(p['temp_bytes'])} | {_mib(p['formula_temp_bytes'])} | "
        f"{_mib(p['collective_bytes'])} | {time_s} |"
    )
  return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="python -m benchmarks.ring_attention", description=__doc__.splitlines()[0]
  )
  parser.add_argument("--lengths", type=int, nargs="+", default=list(DEFAULT_LENGTHS),
                      help=f"sequence lengths, multiples of {DEVICES}")
  parser.add_argument("--out", help="write the records as JSON to this file")
  parser.add_argument("--time", action="store_true", help="also time the forward passes")
  return parser


def main(argv: Sequence[str] | None = None) -> int:
  args = _parser().parse_args(argv)
  if "jax" not in sys.modules and FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {FLAG}".strip()
  import jax

  if jax.device_count() < DEVICES:
    # JAX was imported before the flag was set: measure in a fresh process.
    argv = list(sys.argv[1:] if argv is None else argv)
    env = dict(os.environ, XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} {FLAG}".strip())
    return subprocess.run(
        [sys.executable, "-m", "benchmarks.ring_attention", *argv], env=env, check=False
    ).returncode
  points = _measure(args.lengths, args.time)
  print(table(points))
  if args.out:
    config = {"devices": DEVICES, "batch": BATCH, "heads": HEADS, "head_dim": HEAD_DIM,
              "dtype": "float32", "is_causal": True}
    with open(args.out, "w") as f:
      json.dump({"config": config, "points": points}, f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
