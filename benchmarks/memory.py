"""One point of the memory suite, in a process of its own: ``python -m benchmarks.memory``.

The peak resident set size (see :func:`_rss_bytes`) of a fresh process belongs
to that point alone: the interpreter, one library, the inputs, compilation and
one causal forward+backward (gradients of ``sum(attention(q, k, v))`` for q, k
and v). This module imports only the standard
library at the top, so a torch point never loads JAX and a JAX point never loads
torch. JAX points also report XLA's compiled ``memory_analysis()`` temporaries;
one whose temporaries exceed ``--limit`` is not run but reported as skipped, with
the size XLA asked for, rather than exhausting the machine. torch's CPU SDPA is a
flash kernel (O(L) memory) and needs no such guard.

Prints one JSON record: ``{"status": "ok", "peak_rss_bytes", "baseline_rss_bytes",
"temp_bytes", "time_s"}`` or ``{"status": "skipped" | "failed", "reason"}``.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from benchmarks.timing import failed, skipped


def _rss_bytes() -> int:
  """This process's peak resident set so far.

  Linux: ``VmHWM`` of /proc/self/status, the high-water mark of this process's own
  memory map. ``ru_maxrss`` is not used there because Linux carries the parent's
  peak over into it across fork/vfork + exec: every point would report at least
  the size of the benchmark process that launched it. Elsewhere ``ru_maxrss``
  (kB on Linux, bytes on macOS).
  """
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith("VmHWM:"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return peak if sys.platform == "darwin" else peak * 1024


def _measured(step: Callable[[], object], temp: int | None) -> dict[str, Any]:
  """Runs one forward+backward ``step`` and records the peak RSS around it."""
  baseline = _rss_bytes()
  start = time.perf_counter()
  step()
  return {
      "status": "ok",
      "peak_rss_bytes": _rss_bytes(),
      "baseline_rss_bytes": baseline,
      "temp_bytes": temp,
      "time_s": time.perf_counter() - start,
  }


def _jax_point(competitor: str, shape: tuple[int, ...], device: str, limit: int) -> dict[str, Any]:
  import jax
  import jax.numpy as jnp

  from benchmarks.attention import JMAT_IMPLEMENTATIONS, jax_nn_attention, jmat_attention

  if competitor == "jax.nn":
    batch, heads, length, head_dim = shape
    shape = (batch, length, heads, head_dim)
    attention = jax_nn_attention(True)
  elif competitor in JMAT_IMPLEMENTATIONS:
    attention = jmat_attention(JMAT_IMPLEMENTATIONS[competitor], True)
    if not callable(attention):
      return skipped(attention.reason)
  else:
    raise ValueError(f"unknown competitor {competitor!r}")

  def loss(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    return jnp.sum(attention(q, k, v))

  with jax.default_device(jax.devices(device)[0]):
    keys = jax.random.split(jax.random.key(0), 3)
    q, k, v = (jax.random.normal(key, shape, jnp.float32) for key in keys)
    compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, k, v).compile()
  analysis = compiled.memory_analysis()
  temp = None if analysis is None else int(analysis.temp_size_in_bytes)
  if temp is not None and temp > limit:
    return skipped(
        f"XLA's compiled forward+backward needs {temp / 2**30:.1f} GB of temporaries, "
        f"over the {limit / 2**30:.0f} GB limit of this run: not run"
    )
  return _measured(lambda: jax.block_until_ready(compiled(q, k, v)), temp)


def _torch_point(shape: tuple[int, ...], device: str) -> dict[str, Any]:
  import torch

  torch_device = "cuda" if device == "gpu" and torch.cuda.is_available() else "cpu"
  generator = torch.Generator().manual_seed(0)
  q, k, v = (
      torch.randn(*shape, generator=generator)
      .to(torch_device)
      .requires_grad_()
      for _ in range(3)
  )

  def step() -> None:
    torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()
    if torch_device == "cuda":
      torch.cuda.synchronize()

  return _measured(step, None)


def main(argv: Sequence[str] | None = None) -> int:
  """The subprocess side: measure one point, print its record as one JSON line."""
  parser = argparse.ArgumentParser(prog="python -m benchmarks.memory")
  parser.add_argument("competitor", help="torch, jax.nn, 'jmat default', 'jmat dense', ...")
  parser.add_argument("shape", help="B,H,L,D of query, key and value, e.g. 1,8,4096,64")
  parser.add_argument("--device", default="cpu", help="a JAX platform (torch: gpu means cuda)")
  parser.add_argument("--limit", type=int, required=True, help="most XLA temp bytes to run")
  args = parser.parse_args(argv)
  shape = tuple(int(d) for d in args.shape.split(","))
  try:
    if args.competitor == "torch":
      record = _torch_point(shape, args.device)
    else:
      record = _jax_point(args.competitor, shape, args.device, args.limit)
  except Exception as e:  # reported in the results: one failing point does not end the run
    record = failed(e)
  print(json.dumps(record))
  return 0


if __name__ == "__main__":
  sys.exit(main())
