"""One decode step on the CPU: jmat's varlen_attn vs torch's SDPA over a contiguous cache vs a
dense jnp step (issue 22, item 6: the varlen side; benchmarks/decode.py has flex/PagedAttention).

Every sequence of the batch has ``cache`` keys and one new query; GQA 32:8, d=128, float32.
- ``jmat``: ``jmat.attention.varlen_attn`` on the packed cache ``(B * cache, 8, 128)`` with
  offsets (as a server packs sequences of different lengths), under jit.
- ``jmat_paged``: the same over a paged pool (16-token pages, a shuffled block table).
- ``torch``: ``torch.nn.functional.scaled_dot_product_attention(q (B, 32, 1, 128),
  k/v (B, 8, cache, 128), enable_gqa=True)``: a contiguous cache, torch's CPU kernels.
- ``dense``: ``jax.nn.dot_product_attention`` on ``(B, 1, 32, 128)`` / ``(B, cache, 8, 128)``
  under jit: what a JAX model does without varlen.

Competitors are timed in interleaved rounds (each round runs each once, in a new order);
a figure is the median over the rounds. Run: ``python -m benchmarks.decode_varlen [--quick]``.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import subprocess
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch

import jmat

HEADS, KV_HEADS, DIM, PAGE = 32, 8, 128, 16
# Batch x cache up to 64k tokens per step: each competitor holds its own copy of the cache
# (0.5 GB of float32 K and V per 64k tokens), which is what this 2-core machine's memory allows.
SIZES = [(1, 1024), (1, 8192), (1, 32768), (8, 1024), (8, 8192), (64, 1024)]
QUICK = [(1, 1024), (8, 4096), (64, 1024)]


def _cpu() -> str:
  out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
  for line in out.splitlines():
    if line.startswith("Model name"):
      return line.split(":", 1)[1].strip()
  return platform.processor()


def competitors(batch: int, cache: int, seed: int = 0):
  """``{name: zero-argument call that returns once its result is ready}`` for one case."""
  rng = np.random.default_rng(seed)
  q = rng.standard_normal((batch, HEADS, DIM), np.float32)
  k = rng.standard_normal((batch, cache, KV_HEADS, DIM), np.float32)
  v = rng.standard_normal((batch, cache, KV_HEADS, DIM), np.float32)
  cu_q = np.arange(batch + 1, dtype=np.int32)
  cu_k = np.arange(batch + 1, dtype=np.int32) * cache
  jq, jk, jv = jnp.asarray(q), jnp.asarray(k.reshape(-1, KV_HEADS, DIM)), jnp.asarray(
      v.reshape(-1, KV_HEADS, DIM))
  jcu_q, jcu_k = jnp.asarray(cu_q), jnp.asarray(cu_k)

  @jax.jit
  def step(q, k, v, cu_q, cu_k):
    return jmat.attention.varlen_attn(q, k, v, cu_q, cu_k, 1, cache, enable_gqa=True)

  pages = batch * cache // PAGE
  table = np.random.default_rng(seed).permutation(pages).reshape(batch, -1).astype(np.int32)
  pool_k = np.empty((pages, PAGE, KV_HEADS, DIM), np.float32)
  pool_v = np.empty_like(pool_k)
  pool_k[table.reshape(-1)] = k.reshape(-1, PAGE, KV_HEADS, DIM)
  pool_v[table.reshape(-1)] = v.reshape(-1, PAGE, KV_HEADS, DIM)
  jpk, jpv, jtable = jnp.asarray(pool_k), jnp.asarray(pool_v), jnp.asarray(table)
  used = jnp.full((batch,), cache, jnp.int32)

  @jax.jit
  def paged_step(q, pk, pv, cu_q, table, used):
    return jmat.attention.varlen_attn(q, pk, pv, cu_q, None, 1, cache, enable_gqa=True,
                                      seqused_k=used, block_table=table)

  dq, dk, dv = jnp.asarray(q[:, None]), jnp.asarray(k), jnp.asarray(v)
  dense = jax.jit(jax.nn.dot_product_attention)
  tq = torch.from_numpy(q[:, :, None])
  tk = torch.from_numpy(k.transpose(0, 2, 1, 3).copy())
  tv = torch.from_numpy(v.transpose(0, 2, 1, 3).copy())

  def torch_step():
    with torch.no_grad():
      return torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, enable_gqa=True)

  calls = {
      "jmat": lambda: step(jq, jk, jv, jcu_q, jcu_k).block_until_ready(),
      "jmat_paged": lambda: paged_step(jq, jpk, jpv, jcu_q, jtable, used).block_until_ready(),
      "torch": torch_step,
      "dense": lambda: dense(dq, dk, dv).block_until_ready(),
  }
  # The same answer from each (float32; a wrong competitor is worse than a slow one).
  want = torch_step()[:, :, 0].numpy()
  for name in ("jmat", "jmat_paged"):
    np.testing.assert_allclose(np.asarray(calls[name]()), want, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(np.asarray(calls["dense"]())[:, 0], want, rtol=1e-4, atol=1e-4)
  return calls


def measure(calls, rounds: int) -> dict[str, float]:
  """Median seconds per call over interleaved rounds (each round: every call once, shuffled)."""
  for call in calls.values():
    call()
  times: dict[str, list[float]] = {name: [] for name in calls}
  order = list(calls)
  for _ in range(rounds):
    random.shuffle(order)
    for name in order:
      start = time.perf_counter()
      calls[name]()
      times[name].append(time.perf_counter() - start)
  return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="three small cases")
  parser.add_argument("--rounds", type=int, default=15)
  args = parser.parse_args()
  random.seed(0)
  print(f"# {_cpu()}, {torch.get_num_threads()} torch threads, jax {jax.__version__}, "
        f"torch {torch.__version__}")
  print("| batch | cache | jmat ms | jmat paged ms | torch SDPA ms | dense jnp ms | "
        "torch / jmat | torch / paged |")
  print("|---:|---:|---:|---:|---:|---:|---:|---:|")
  rows = []
  for batch, cache in QUICK if args.quick else SIZES:
    t = measure(competitors(batch, cache), args.rounds)
    rows.append({"batch": batch, "cache": cache, **t})
    print(f"| {batch} | {cache} | {t['jmat'] * 1e3:.3f} | {t['jmat_paged'] * 1e3:.3f} | "
          f"{t['torch'] * 1e3:.3f} | {t['dense'] * 1e3:.3f} | {t['torch'] / t['jmat']:.2f} | "
          f"{t['torch'] / t['jmat_paged']:.2f} |", flush=True)
  print(json.dumps(rows))


if __name__ == "__main__":
  main()
