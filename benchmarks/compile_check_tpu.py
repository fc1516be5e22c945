"""``python -m benchmarks.compile_check_tpu``: jmat's Mosaic kernels through the real TPU compiler.

The ``tpu`` target of the pre-device checks: compile every case for real TPU chips (v5e, v6e;
v4 and v5p on request) on a machine without one, with libtpu's compile-only topologies, beside
JAX's splash attention at the same shapes. Does every case compile with the Mosaic kernel (Mosaic
verification, SMEM and VMEM budgets), and what HBM temporaries does it need? Interpret mode and
lowering cannot see a table that overflows SMEM or a program that overflows VMEM; this can.

Run from the repository root in a venv with jax, jaxlib and the libtpu that jax's ``tpu`` extra
pins (``python -m venv ~/.cache/jmat-tpu-venv && ~/.cache/jmat-tpu-venv/bin/pip install
"jax[tpu]"``)::

    ~/.cache/jmat-tpu-venv/bin/python -m benchmarks.compile_check_tpu [--strict] \
        [--chips v5e,v6e] [CASE_REGEX]

``--strict`` exits 1 unless every case compiles with its Mosaic kernel and the HBM temporaries of
a causal L=16384 call stay within splash's + 16 MiB (forward) and 1.25x splash's (gradient).
One JSON line per (chip, case, forward or gradient), with the grid of every Pallas kernel (its
last axis is the steps a query block walks; the dk/dv kernel's, per key block), then the
failures and a count.
"""

import argparse
import json
import os
import re
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the host; the TPU is a compile-only topology
os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-1")  # quiets libtpu's metadata probe
os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental import topologies  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec  # noqa: E402

import jmat  # noqa: E402
from jmat import mods  # noqa: E402

TOPOLOGIES = {"v5e": ("v5e:1x1", (1, 1, 1)), "v6e": ("v6e:1x1", (1, 1, 1)),
              "v4": ("v4:1x1x1", (1, 1, 1)), "v5p": ("v5p:1x1x1", (1, 1, 1))}
BF16 = jnp.bfloat16
MOSAIC = {"BACKEND": "MOSAIC"}


def struct(shape, sharding, dtype=BF16):
  return jax.ShapeDtypeStruct(tuple(shape), dtype, sharding=sharding)


def documents(length, n=8):
  cuts = np.sort(np.random.default_rng(0).choice(np.arange(1, length), n - 1, replace=False))
  return jnp.asarray(np.repeat(np.arange(n), np.diff(np.r_[0, cuts, length])).astype(np.int32))


def flex(length, sharding, heads=16, kv_heads=16, d=128, mask="causal", softcap=None,
         mask_heads=None, block=128):
  mask_mod = {"causal": mods.causal_mask,
              "window": mods.generate_sliding_window(1024),
              "documents": mods.generate_doc_mask_mod(mods.causal_mask, documents(length)),
              "window per head": lambda b, h, q, kv: (q >= kv) & (q - kv <= 512 * (h + 1))}[mask]
  block_mask = jmat.create_block_mask(mask_mod, None, mask_heads, length, length, BLOCK_SIZE=block)
  score_mod = mods.generate_tanh_softcap(softcap) if softcap else None

  def forward(q, k, v, block_mask):
    return jmat.flex_attention(q, k, v, score_mod, block_mask, enable_gqa=kv_heads != heads,
                               kernel_options=MOSAIC)

  tables = jax.tree.map(lambda x: struct(x.shape, sharding, x.dtype), block_mask)
  kv = struct((1, kv_heads, length, d), sharding)
  return forward, (struct((1, heads, length, d), sharding), kv, kv, tables)


def flex_decode(length, sharding, queries=16, heads=8, kv_heads=1, d=128):
  """A decode step through flex: ``queries`` new tokens of ``heads`` query heads sharing one
  key/value head against ``length`` cached keys (bottom-right causal): one program per call,
  so the forward splits its keys (flash-decoding) and merges the shares by lse."""
  block_mask = jmat.create_block_mask(mods.generate_causal_offset(length - queries), None, None,
                                      queries, length)

  def forward(q, k, v, block_mask):
    return jmat.flex_attention(q, k, v, block_mask=block_mask, enable_gqa=kv_heads != heads,
                               kernel_options=MOSAIC)

  tables = jax.tree.map(lambda x: struct(x.shape, sharding, x.dtype), block_mask)
  kv = struct((1, kv_heads, length, d), sharding)
  return forward, (struct((1, heads, queries, d), sharding), kv, kv, tables)


def batch_scaled(length, sharding, batch=3, heads=4, d=128):
  """A score_mod that reads the batch index: score * (b + 1)."""
  def forward(q, k, v):
    return jmat.flex_attention(q, k, v, score_mod=lambda s, b, h, q_idx, kv_idx: s * (b + 1),
                               kernel_options=MOSAIC)
  return forward, tuple(struct((batch, heads, length, d), sharding) for _ in range(3))


def sdpa(length, sharding, heads=16, kv_heads=4, d=128):
  def forward(q, k, v):
    return jmat.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=kv_heads != heads,
                                             implementation="pallas")
  kv = struct((1, kv_heads, length, d), sharding)
  return forward, (struct((1, heads, length, d), sharding), kv, kv)


def varlen(length, sharding, heads=16, kv_heads=4, d=128, decode=False):
  """varlen_attn on the Mosaic kernel, packed ``(T, H, D)``: a causal prefill of four sequences
  of ``length`` tokens in all, or one decode step of 16 sequences against ``length`` keys each."""
  if decode:
    cu_q, cu_k = np.arange(17, dtype=np.int32), np.arange(17, dtype=np.int32) * length
    max_q, max_k, window = 1, length, (-1, -1)
  else:
    cut = length // 8
    cu_q = cu_k = np.cumsum([0, cut, 3 * cut, 2 * cut, 2 * cut]).astype(np.int32)
    max_q = max_k = 3 * cut
    window = (-1, 0)

  def forward(q, k, v):
    return jmat.attention.varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, window_size=window,
                                      enable_gqa=kv_heads != heads, kernel_options=MOSAIC)

  tokens_q, tokens_k = int(cu_q[-1]), int(cu_k[-1])
  kv = struct((tokens_k, kv_heads, d), sharding)
  return forward, (struct((tokens_q, heads, d), sharding), kv, kv)


def splash(length, sharding, heads=16, d=128, mask="causal"):
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm
  one = {"causal": sm.CausalMask((length, length)),
         "window": sm.LocalMask((length, length), window_size=(1024, 0), offset=0)}[mask]
  kernel = sk.make_splash_mha(mask=sm.MultiHeadMask([one] * heads), head_shards=1, q_seq_shards=1)

  def forward(q, k, v):
    return jax.vmap(kernel)(q * d ** -0.5, k, v)
  return forward, tuple(struct((1, heads, length, d), sharding) for _ in range(3))


CASES = {
  "flex causal L16384": (flex, 16384, {}),
  "flex window1024 L16384": (flex, 16384, {"mask": "window"}),
  "flex documents L16384": (flex, 16384, {"mask": "documents"}),
  "flex causal+softcap L16384": (flex, 16384, {"softcap": 30.0}),
  "flex causal GQA 16:4 L16384": (flex, 16384, {"kv_heads": 4}),
  "flex causal GQA 64:4 L16384": (flex, 16384, {"heads": 64, "kv_heads": 4}),
  "flex causal d64 L16384": (flex, 16384, {"d": 64}),
  "flex causal per-head mask (16 heads) L16384": (flex, 16384, {"mask_heads": 16}),
  "flex window per head (16 heads) L16384": (flex, 16384, {"mask": "window per head",
                                                           "mask_heads": 16}),
  "flex causal L65536": (flex, 65536, {}),
  "flex score * (b + 1), batch 3, L2048": (batch_scaled, 2048, {}),
  "sdpa causal GQA 16:4 L16384": (sdpa, 16384, {}),
  "sdpa causal GQA 32:4 L16384": (sdpa, 16384, {"heads": 32}),
  "sdpa causal GQA 64:4 L16384": (sdpa, 16384, {"heads": 64}),
  "varlen prefill GQA 16:4 L16384": (varlen, 16384, {}),
  "varlen decode 16 x 4096 GQA 16:4": (varlen, 4096, {"decode": True}),
  "flex decode 16 queries x 32768 keys GQA 8:1": (flex_decode, 32768, {}),
  "splash causal L16384": (splash, 16384, {}),
  "splash window1024 L16384": (splash, 16384, {"mask": "window"}),
}


def grids(jaxpr) -> list:
  """The grid of every Pallas kernel in ``jaxpr`` and its sub-jaxprs (a cond's branches too)."""
  found = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "pallas_call":
      found.append(list(eqn.params["grid_mapping"].grid))
    for param in eqn.params.values():
      for inner in param if isinstance(param, tuple | list) else (param,):
        inner = getattr(inner, "jaxpr", inner)
        if hasattr(inner, "eqns") and eqn.primitive.name != "pallas_call":
          found += grids(inner)
  return found


def compile_case(build, length, kwargs, sharding, kind):
  # Exported for a TPU from this CPU: inside kernel_platforms("tpu") a BlockMask records its
  # list bounds (the kernel's shrunk grid), as it does on a TPU host.
  with jmat.attention.kernel_platforms("tpu"):
    forward, args = build(length, sharding, **kwargs)
    fn = forward if kind == "fwd" else jax.grad(
        lambda q, k, v, *rest: forward(q, k, v, *rest).astype(jnp.float32).sum(),
        argnums=(0, 1, 2))
    start = time.perf_counter()
    traced = jax.jit(fn).trace(*args)
    lowered = traced.lower()
  compiled = lowered.compile()
  memory = compiled.memory_analysis()
  return {"compile_s": round(time.perf_counter() - start, 1),
          "kernel_calls": lowered.as_text().count("tpu_custom_call"),
          "temp_mib": round(memory.temp_size_in_bytes / 2**20, 1) if memory else None,
          "grids": grids(traced.jaxpr.jaxpr)}


def main():
  try:
    import libtpu  # noqa: F401  (the compile-only topologies need it)
  except ImportError:
    raise SystemExit("benchmarks.compile_check_tpu needs libtpu: run it in a venv with "
                     "jax[tpu] installed (see this module's docstring)") from None
  parser = argparse.ArgumentParser(prog="python -m benchmarks.compile_check_tpu")
  parser.add_argument("pattern", nargs="?", default=".")
  parser.add_argument("--chips", default="v5e,v6e")
  parser.add_argument("--strict", action="store_true")
  args = parser.parse_args()
  rows = []
  for chip in args.chips.split(","):
    name, bounds = TOPOLOGIES[chip]
    topology = topologies.get_topology_desc(platform="tpu", topology_name=name,
                                            chips_per_host_bounds=bounds)
    sharding = NamedSharding(Mesh(np.array(topology.devices[:1]), ("x",)), PartitionSpec())
    for case, (build, length, kwargs) in CASES.items():
      if not re.search(args.pattern, case):
        continue
      for kind in ("fwd", "grad"):
        row = {"chip": chip, "case": case, "kind": kind}
        try:
          row.update(ok=True, **compile_case(build, length, kwargs, sharding, kind))
        except Exception as e:  # recorded: the next case goes on
          lines = [line for line in f"{type(e).__name__}: {e}".splitlines() if line.strip()]
          why = [line for line in lines
                 if re.search(r"(?i)smem|vmem|exceed|out of memory|limit", line)]
          row.update(ok=False, error=" | ".join(lines[:1] + why[:2])[:300])
        rows.append(row)
        print(json.dumps(row), flush=True)
  failures = []
  for row in rows:
    if row["case"].startswith("splash"):
      continue
    where = f"{row['chip']} {row['case']} {row['kind']}"
    if not row["ok"]:
      failures.append((where, f"does not compile: {row['error']}"))
    elif not row["kernel_calls"]:
      failures.append((where, "no Mosaic kernel in the program"))
  # memory beside splash, same chip, same shapes: causal L16384
  for chip in args.chips.split(","):
    pick = {(r["case"].split()[0], r["kind"]): r for r in rows
            if r["chip"] == chip and r["ok"] and r["case"].endswith("causal L16384")}
    for kind, factor, slack in (("fwd", 1.0, 16.0), ("grad", 1.25, 0.0)):
      mine, theirs = pick.get(("flex", kind)), pick.get(("splash", kind))
      if mine and theirs and mine["temp_mib"] > factor * theirs["temp_mib"] + slack:
        failures.append((f"{chip} flex causal L16384 {kind}",
                         f"{mine['temp_mib']} MiB HBM temp, splash {theirs['temp_mib']} MiB "
                         f"(allowed {factor}x + {slack:g} MiB)"))
  for where, why in failures:
    print(f"FAIL {where}: {why}")
  jmat_rows = [r for r in rows if not r["case"].startswith("splash")]
  print(f"{len(jmat_rows) - len({where for where, _ in failures})} of {len(jmat_rows)} compiles "
        f"hold (chips {args.chips})")
  if args.strict and failures:
    raise SystemExit(1)


if __name__ == "__main__":
  main()
