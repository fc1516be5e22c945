"""Ring attention on 8 simulated devices: per-device memory, layouts and masks.

    python -m benchmarks.ring_attention                    # both parts, compiled only
    python -m benchmarks.ring_attention --time             # and the forward passes timed
    python -m benchmarks.ring_attention --lengths 512 1024 --mask-lengths 2048 --out /tmp/ring.json

Runs in a process of its own: ``XLA_FLAGS=--xla_force_host_platform_device_count=8``
must be set before JAX is imported, so this module imports only the standard
library at the top and sets it (if JAX is already imported with fewer devices,
``main`` runs itself again in a child process). ``B=1, H=8, E=64``, float32,
the sequence sharded over 8 devices throughout.

**Causal memory** (``--lengths``, L = 1024 .. 16384 by default). For causal
attention it compiles, without running:

* ``jmat.parallel.ring_attention`` (the key/value blocks travel around the ring),
* ``jmat.parallel.allgather_attention`` (every device gathers all keys/values),
* single-device ``jmat.scaled_dot_product_attention(implementation="blockwise")``
  on the whole sequence (one device, for scale),

and records XLA's ``memory_analysis()`` per device (arguments, outputs,
temporaries) for the forward pass and for forward+backward, next to the
formulas of ``docs/distributed.md``, and the bytes of the collectives read
from the compiled HLO. ``--time`` also runs the forward passes (median of 5).

**Layouts and masks** (``--mask-lengths``, L = 4096 and 16384 by default). For
each mask of :data:`MASKS` (built with ``jmat.create_block_mask`` for the global
sequence, BLOCK_SIZE 128) and each layout (``"contiguous"``, ``"zigzag"``) it
records the (query block, key block) pairs each device computes
(``jmat.parallel.work_per_device``) and their ``max / mean``, and compiles the
ring's forward pass with the mask: XLA's per-device ``memory_analysis()`` next
to the formula (tiles of the mask's block size). ``--time`` times two calls,
interleaved round by round (median of 5):

* ``time_s``: the whole sharded call. The 8 simulated devices share this
  machine's cores, so this is close to the work of *all* devices divided among
  the cores: it compares the variants' total work, and hides most of the
  imbalance a real mesh would pay for;
* ``busiest_time_s``: the same ring with the mask cut to the queries of the
  busiest device (``max`` of ``work_per_device``): the other seven compute
  nothing but still pass their blocks on, so this is the busiest device's
  compute plus the ring's transfers, with the machine to itself. A ring step
  on a real mesh lasts as long as its busiest device: this is the per-device
  figure that compares the layouts. The mask ``"none"`` (nothing computed)
  times the transfers and loops alone; the table's ``busiest - none`` is the
  difference, about the busiest device's compute (the transfers overlap the
  compute only partly on this machine, so it is an estimate).

The inputs are random and not permuted into the layout (the values do not
change the work). Timed with :mod:`benchmarks.timing`, as every suite.

Prints Markdown tables; ``--out`` writes the records as JSON:
``{"config": {...}, "points": [{"length", "variant", "pass", "argument_bytes",
"output_bytes", "temp_bytes", "formula_temp_bytes", "collective_bytes", "time_s"}, ...],
"layouts": [{"length", "mask", "layout", "work", "max_over_mean", "argument_bytes",
"temp_bytes", "formula_temp_bytes", "time_s", "busiest_device", "busiest_time_s"}, ...]}``
(``collective_bytes``: see :func:`collective_bytes`).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from collections.abc import Callable, Sequence
from typing import Any

from benchmarks import timing  # the standard library only: jax is not imported yet

DEVICES = 8
FLAG = f"--xla_force_host_platform_device_count={DEVICES}"
BATCH, HEADS, HEAD_DIM = 1, 8, 64
DEFAULT_LENGTHS = (1024, 2048, 4096, 8192, 16384)
# Layouts and masks: masks over the global sequence, blocks of BLOCK_SIZE x BLOCK_SIZE.
DEFAULT_MASK_LENGTHS = (4096, 16384)
LAYOUTS = ("contiguous", "zigzag")
MASKS = ("causal", "sliding window", "documents", "prefix-LM", "none")
BLOCK_SIZE = 128
WINDOW = 1024  # jmat.mods.generate_sliding_window(1024): 1025 keys, the query's own included
DOC_MEDIAN, DOC_SIGMA, DOC_SEED = 1024, 1.0, 0  # log-normal document lengths, in tokens
MASK_NOTE = (
    f"BLOCK_SIZE {BLOCK_SIZE}; sliding window: jmat.mods.generate_sliding_window({WINDOW}); "
    "documents: a packed batch, jmat.mods.generate_doc_mask_mod(causal_mask, ids) (causal "
    f"within each document) with log-normal lengths (median {DOC_MEDIAN}, sigma {DOC_SIGMA:g}, "
    f"numpy seed {DOC_SEED}, the last one cut to fit); prefix-LM: the first L/4 positions see "
    "each other, the rest causal; none: nothing computed (the ring's transfers and loops)"
)
_ITEMSIZE = 4  # float32
_ARRAY = re.compile(r"(pred|[fsu]\d+|bf16)\[([\d,]*)\]")
_BITS = {"pred": 8, "bf16": 16}


def _tile(n: int, limit: int = 512) -> int:
  """jmat.parallel's tile for ``n`` rows, with its default limit."""
  from jmat._src import block_sparse  # imports jax: not before the device flags are set

  return block_sparse.block_for(n, limit, dividing=True)


def formulas(h: int, q_len: int, k_len: int, e: int, ev: int, devices: int, itemsize: int,
             acc_itemsize: int = 4, tile: tuple[int, int] | None = None) -> dict[str, int]:
  """Per-device bytes of sequence-sharded attention, the formulas of docs/distributed.md.

  Args:
    h: batch * heads on each device.
    q_len: ``L``; k_len: ``S``; e: ``E``; ev: ``Ev``.
    devices: ``n``, the devices along the sequence axis.
    itemsize: bytes per input element; acc_itemsize: per score/carry element (float32).
    tile: the kernel's ``(t_q, t_k)``: a block mask's ``BLOCK_SIZE``; without one
      (``None``) the ring's default tiles of ``L/n`` and ``S/n``.

  Returns:
    ``ring`` and ``allgather``: temporaries of a forward pass; ``gathered_kv``:
    the keys and values all-gathering holds; ``*_sent``: bytes each device sends
    in a forward pass and in a backward pass.
  """
  lb, sb = q_len // devices, k_len // devices
  kv_block = h * sb * (e + ev) * itemsize
  carry = h * lb * (ev + 2) * acc_itemsize
  tq, tk = (_tile(lb), _tile(sb)) if tile is None else tile
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
          x = _inputs(shape, sharding)
          point["time_s"] = _medians({"forward": lambda c=compiled, x=x: c(x, x, x)})["forward"]
        points.append(point)
  return points


# One call per sample, 5 rounds (the median is kept), as this benchmark always measured.
_TIMING = timing.Settings(repeats=5, min_sample_s=0.0, min_repeats=5)


def _inputs(shape: tuple[int, ...], sharding: Any) -> Any:
  """A random float32 array of ``shape`` placed with ``sharding`` (None: the default device)."""
  import jax
  import numpy as np

  return jax.device_put(np.random.default_rng(0).standard_normal(shape, np.float32), sharding)


def _medians(calls: dict[str, Callable[[], Any]]) -> dict[str, float | None]:
  """The median seconds of each call, timed in interleaved rounds (None if it failed)."""
  import jax

  records = timing.measure(
      {name: lambda call=call: jax.block_until_ready(call()) for name, call in calls.items()},
      _TIMING,
  )
  return {name: record.get("median_s") for name, record in records.items()}


def document_lengths(length: int, median: int = DOC_MEDIAN, sigma: float = DOC_SIGMA,
                     seed: int = DOC_SEED) -> list[int]:
  """A packed batch: log-normal document lengths (at least 1 token) summing to ``length``.

  Documents are drawn until they fill ``length`` and the last one is cut to fit,
  so a longer ``length`` with the same seed packs the same first documents.
  """
  import numpy as np

  rng = np.random.default_rng(seed)
  lengths: list[int] = []
  while sum(lengths) < length:
    lengths.append(max(1, round(float(rng.lognormal(np.log(median), sigma)))))
  lengths[-1] -= sum(lengths) - length
  return lengths


def mask_mod(kind: str, length: int) -> Callable[..., Any]:
  """The jmat mask_mod of one of :data:`MASKS` over a global sequence of ``length``."""
  import jax.numpy as jnp
  import numpy as np

  import jmat

  if kind == "causal":
    return jmat.mods.causal_mask
  if kind == "sliding window":
    return jmat.mods.generate_sliding_window(WINDOW)
  if kind == "documents":
    lengths = document_lengths(length)
    ids = np.repeat(np.arange(len(lengths), dtype=np.int32), lengths)
    return jmat.mods.generate_doc_mask_mod(jmat.mods.causal_mask, jnp.asarray(ids))
  if kind == "prefix-LM":
    return jmat.mods.generate_prefix_lm_mask(length // 4)
  if kind == "none":
    return lambda b, h, q_idx, kv_idx: q_idx < 0
  raise ValueError(f"unknown mask {kind!r}; expected one of {MASKS}")


def only_device(mod: Callable[..., Any], device: int, layout: str,
                length: int) -> Callable[..., Any]:
  """``mod`` cut to the queries ``device`` holds under ``layout``: the others compute nothing."""
  import jax.numpy as jnp
  import numpy as np

  from jmat._src import layouts

  owner = np.empty(length, np.int32)
  for held, positions in enumerate(layouts.device_positions(layout, DEVICES, length)):
    owner[positions] = held
  owner = jnp.asarray(owner)

  def alone(b, h, q_idx, kv_idx):
    return mod(b, h, q_idx, kv_idx) & (owner[q_idx] == device)

  return alone


def _measure_layouts(lengths: Sequence[int], timed: bool) -> list[dict[str, Any]]:
  """The layouts-and-masks records: work per device, memory and (``timed``) times."""
  import jax
  import jax.numpy as jnp
  from jax.sharding import NamedSharding, PartitionSpec

  import jmat

  mesh = jax.make_mesh((DEVICES,), ("seq",), axis_types=(jax.sharding.AxisType.Auto,))
  sharded = NamedSharding(mesh, PartitionSpec(None, None, "seq", None))
  records = []
  for length in lengths:
    shape = (BATCH, HEADS, length, HEAD_DIM)
    arg = jax.ShapeDtypeStruct(shape, jnp.float32, sharding=sharded)
    formula = formulas(BATCH * HEADS, length, length, HEAD_DIM, HEAD_DIM, DEVICES, _ITEMSIZE,
                       tile=(BLOCK_SIZE, BLOCK_SIZE))["ring"]
    x = _inputs(shape, sharded) if timed else None
    for kind in MASKS:
      mod = mask_mod(kind, length)
      mask = jmat.create_block_mask(mod, None, None, length, length, BLOCK_SIZE=BLOCK_SIZE)
      calls = {}
      for layout in LAYOUTS:

        def forward(q, k, v, block_mask, layout=layout):
          return jmat.parallel.ring_attention(q, k, v, mesh=mesh, axis_name="seq",
                                              block_mask=block_mask, layout=layout)

        compiled = jax.jit(forward).lower(arg, arg, arg, mask).compile()
        stats = compiled.memory_analysis()
        work = jmat.parallel.work_per_device(mask, DEVICES, layout)
        mean = sum(work) / len(work)
        busiest = max(range(DEVICES), key=work.__getitem__) if any(work) else None
        records.append({
            "length": length, "mask": kind, "layout": layout, "work": list(work),
            "max_over_mean": max(work) / mean if mean else None,
            "argument_bytes": stats.argument_size_in_bytes,
            "temp_bytes": stats.temp_size_in_bytes, "formula_temp_bytes": formula,
            "time_s": None, "busiest_device": busiest, "busiest_time_s": None,
        })
        if timed:
          calls[layout] = lambda c=compiled, m=mask, x=x: c(x, x, x, m)
          if busiest is not None:
            alone = jmat.create_block_mask(only_device(mod, busiest, layout, length), None,
                                           None, length, length, BLOCK_SIZE=BLOCK_SIZE)
            solo = jax.jit(forward).lower(arg, arg, arg, alone).compile()
            calls[f"{layout}, busiest"] = lambda c=solo, m=alone, x=x: c(x, x, x, m)
      if timed:
        medians = _medians(calls)
        for record in records[-len(LAYOUTS):]:
          record["time_s"] = medians[record["layout"]]
          record["busiest_time_s"] = medians.get(f"{record['layout']}, busiest")
  return records


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


def _seconds(t: float | None) -> str:
  return "" if t is None else f"{t:.3f}"


def layout_table(records: list[dict[str, Any]]) -> str:
  """The Markdown table of the layouts-and-masks records (MiB per device, seconds).

  ``busiest - none s`` is the busiest device's time less the ring's alone (the
  mask ``"none"`` at the same length and layout): about its compute.
  """
  idle = {(r["length"], r["layout"]): r["time_s"] for r in records if r["mask"] == "none"}
  lines = [
      "| L | mask | layout | blocks per device | max/mean | temp MiB | formula MiB | "
      "8 devices s | busiest alone s | busiest - none s |",
      "|---:|---|---|---|---:|---:|---:|---:|---:|---:|",
  ]
  for r in records:
    ratio = "" if r["max_over_mean"] is None else f"{r['max_over_mean']:.2f}"
    blocks = " ".join(str(w) for w in r["work"])
    ring = idle.get((r["length"], r["layout"]))
    compute = None if None in (r["busiest_time_s"], ring) else r["busiest_time_s"] - ring
    lines.append(
        f"| {r['length']} | {r['mask']} | {r['layout']} | {blocks} | {ratio} | "
        f"{_mib(r['temp_bytes'])} | {_mib(r['formula_temp_bytes'])} | "
        f"{_seconds(r['time_s'])} | {_seconds(r['busiest_time_s'])} | {_seconds(compute)} |"
    )
  return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="python -m benchmarks.ring_attention", description=__doc__.splitlines()[0]
  )
  parser.add_argument("--lengths", type=int, nargs="+", default=list(DEFAULT_LENGTHS),
                      help=f"sequence lengths of the causal memory table, multiples of {DEVICES}")
  parser.add_argument("--mask-lengths", type=int, nargs="*", default=list(DEFAULT_MASK_LENGTHS),
                      help="sequence lengths of the layouts-and-masks table, multiples of "
                      f"{2 * DEVICES * BLOCK_SIZE} (none: skip it)")
  parser.add_argument("--out", help="write the records as JSON to this file")
  parser.add_argument("--time", action="store_true", help="also time the forward passes")
  return parser


def main(argv: Sequence[str] | None = None) -> int:
  parser = _parser()
  args = parser.parse_args(argv)
  unit = 2 * DEVICES * BLOCK_SIZE  # a zigzag chunk must be whole mask blocks
  if any(length <= 0 or length % unit for length in args.mask_lengths):
    parser.error(f"--mask-lengths must be positive multiples of {unit}, got {args.mask_lengths}")
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
  print(table(points), flush=True)
  layouts = _measure_layouts(args.mask_lengths, args.time)
  if layouts:
    print(f"\nLayouts and masks ({MASK_NOTE}):\n")
    print(layout_table(layouts))
  if args.out:
    config = {"devices": DEVICES, "batch": BATCH, "heads": HEADS, "head_dim": HEAD_DIM,
              "dtype": "float32", "is_causal": True, "block_size": BLOCK_SIZE,
              "masks": MASK_NOTE}
    with open(args.out, "w") as f:
      json.dump({"config": config, "points": points, "layouts": layouts}, f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
