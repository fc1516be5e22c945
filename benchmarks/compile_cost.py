"""What ``AUTO`` costs a CPU-only program: trace, lower and compile time against ``BACKEND XLA``.

    python -m benchmarks.compile_cost [--repeats 3] [--layers 4] [--length 1024]

A 4-layer flex training step (causal mask, tanh softcap, a loss and its gradient
with respect to every layer's weights) is traced, lowered, compiled and run once,
in a fresh process each time (so no cache helps), alternating ``AUTO`` with
``{"BACKEND": "XLA"}``; then ``AUTO`` inside ``jmat.attention.kernel_platforms("cuda",
"tpu")``, which also traces both fused kernels (what an export for accelerators from
this machine pays). Prints each run and the medians' ratios to XLA.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

_CHILD = r"""
import json, sys, time
import jax, jax.numpy as jnp
import jmat
from jmat import mods
mode, layers, length = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
options = {"BACKEND": "XLA"} if mode == "XLA" else None
heads, dim = 4, 64
mask = jmat.create_block_mask(mods.causal_mask, None, None, length, length)
softcap = mods.generate_tanh_softcap(30.0)

def loss(weights, x):
  for w in weights:
    q, k, v = (jnp.einsum("ble,ef->blf", x, w[i]).reshape(1, length, heads, dim)
               .transpose(0, 2, 1, 3) for i in range(3))
    o = jmat.flex_attention(q, k, v, softcap, mask, kernel_options=options)
    x = x + o.transpose(0, 2, 1, 3).reshape(1, length, heads * dim)
  return jnp.mean(x ** 2)

key = jax.random.key(0)
weights = [jax.random.normal(jax.random.fold_in(key, i), (3, heads * dim, heads * dim)) * 0.02
           for i in range(layers)]
x = jax.random.normal(key, (1, length, heads * dim))
step = jax.jit(jax.value_and_grad(loss))
context = (jmat.attention.kernel_platforms("cuda", "tpu") if mode == "AUTO+accelerators"
           else jmat.attention.kernel_platforms())
start = time.perf_counter()
with context:
  lowered = step.trace(weights, x).lower()
traced = time.perf_counter() - start
compiled = lowered.compile()
compiled_at = time.perf_counter() - start
jax.block_until_ready(compiled(weights, x))
print(json.dumps({"mode": mode, "trace_lower_s": traced, "compile_s": compiled_at - traced,
                  "first_step_s": time.perf_counter() - start}))
"""

MODES = ("XLA", "AUTO", "AUTO+accelerators")


def run(repeats: int, layers: int, length: int) -> dict[str, dict[str, float]]:
  """Median seconds per mode: ``trace_lower_s``, ``compile_s``, ``first_step_s``."""
  rows = []
  for _ in range(repeats):
    for mode in MODES:
      out = subprocess.run([sys.executable, "-c", _CHILD, mode, str(layers), str(length)],
                           capture_output=True, text=True, check=True).stdout
      row = json.loads(out.strip().splitlines()[-1])
      print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}))
      rows.append(row)
  return {mode: {key: statistics.median(r[key] for r in rows if r["mode"] == mode)
                 for key in ("trace_lower_s", "compile_s", "first_step_s")} for mode in MODES}


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--layers", type=int, default=4)
  parser.add_argument("--length", type=int, default=1024)
  args = parser.parse_args(argv)
  medians = run(args.repeats, args.layers, args.length)
  base = medians["XLA"]
  for mode, row in medians.items():
    ratios = ", ".join(f"{key} {row[key]:.2f} s ({row[key] / base[key]:.2f}x XLA)" for key in row)
    print(f"{mode}: {ratios}")


if __name__ == "__main__":
  main()
