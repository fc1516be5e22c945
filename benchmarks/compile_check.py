"""``python -m benchmarks.compile_check``: compile jmat's fused kernels for a device, without one.

    python -m benchmarks.compile_check --target sm90 [--strict] [--out DIR] [case ...]

Interpret mode and lowering cannot see what a device compiler makes of a kernel: TF32
products, register spills, shared memory. This check hands jmat's kernels to the real
compilers on a CPU-only machine and prints what the hardware would run.

``--target sm90`` (NVIDIA H100): each case is lowered for ``cuda`` here; the Triton IR jax
hands to XLA is captured (jax's own Pallas Triton lowering, observed through its internal
``lower_jaxpr_to_triton_module``) and compiled for sm_90a with the pip ``triton`` compiler
(ptxas ships in its wheel) in its own venv, ``${JMAT_TRITON_VENV:-~/.cache/jmat-triton-venv}``
(made on first use with ``pip install triton==3.9.0``, about a minute). Per kernel: warps and
stages, registers, spill bytes, shared memory, the tensor-core instructions (wgmma/mma.sync)
and their input types. ``--strict`` exits 1 unless every kernel compiles, spills nothing, fits
227 KiB of shared memory and feeds its tensor cores the input dtype (bf16/f16: no tf32).

``--target tpu`` (Mosaic on libtpu's compile-only TPU topologies) is not written yet.

Cases (bfloat16, B=1, H=16, L=4096, D=128 unless named): flex causal, window 1024, documents,
causal + softcap, GQA 16:4, d=64, float16, float32 (TF32), L=4000, d=80, d=96 with GQA 16:4 and
L=4000 (head dims and lengths that are no power of two: masked loads), SDPA causal (also with
a dense bool attn_mask at L=4000), and decoding
(16 queries, GQA 16:4, no mask); each as the forward and as the gradient of q, k, v (the forward
of a gradient run also holds AUTO's probe of the backward).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

B, H, L = 1, 16, 4096
TRITON_VENV = Path(os.environ.get("JMAT_TRITON_VENV", Path.home() / ".cache/jmat-triton-venv"))
TRITON_VERSION = "3.9.0"
SHARED_LIMIT_KIB = 227  # an H100's shared memory per block


def _spec(heads: int = H, length: int = L, d: int = 128, dtype: Any = jnp.bfloat16):
  return jax.ShapeDtypeStruct((B, heads, length, d), dtype)


def _flex(mask_mod=None, score_mod=None, kv_heads: int = H, d: int = 128, length: int = L,
          dtype: Any = jnp.bfloat16, queries: int | None = None):
  import jmat

  queries = length if queries is None else queries
  block_mask = None if mask_mod is None else jmat.create_block_mask(mask_mod, None, None, queries,
                                                                   length)

  def forward(q, k, v):
    return jmat.flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask,
                               enable_gqa=kv_heads != H, kernel_options={"BACKEND": "TRITON"})

  return forward, (_spec(d=d, length=queries, dtype=dtype), _spec(kv_heads, length, d, dtype),
                   _spec(kv_heads, length, d, dtype))


def _sdpa_causal():
  import jmat

  def forward(q, k, v):
    return jmat.scaled_dot_product_attention(q, k, v, is_causal=True, implementation="pallas")

  return forward, (_spec(), _spec(), _spec())


def _sdpa_masked(length: int):
  """SDPA causal with a dense bool attn_mask (a blocked operand read with masked loads)."""
  import jmat

  mask = jnp.tril(jnp.ones((length, length), jnp.bool_), 64)

  def forward(q, k, v):
    return jmat.scaled_dot_product_attention(q, k, v, mask, is_causal=True,
                                             implementation="pallas")

  spec = _spec(length=length)
  return forward, (spec, spec, spec)


def _documents():
  from jmat import mods

  ids = jnp.repeat(jnp.arange(4), jnp.array([700, 1500, 900, L - 3100]))
  return mods.generate_doc_mask_mod(mods.causal_mask, ids)


def _softcap(score, b, h, q_idx, kv_idx):
  return 30.0 * jnp.tanh(score / 30.0)


def _varlen(decode: bool):
  """varlen_attn on the Triton kernel, packed (T, H, D): a prefill of four causal sequences
  (GQA 16:4), or a decode step of 16 sequences, one query each against 4096 keys."""
  import numpy as np

  import jmat

  if decode:
    cu_q, cu_k = np.arange(17, dtype=np.int32), np.arange(17, dtype=np.int32) * L
    max_q, max_k, window = 1, L, (-1, -1)
  else:
    cu_q = cu_k = np.cumsum([0, 700, 1500, 900, L - 3100]).astype(np.int32)
    max_q = max_k = 1500
    window = (-1, 0)

  def forward(q, k, v):
    return jmat.attention.varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, window_size=window,
                                      enable_gqa=True, kernel_options={"BACKEND": "TRITON"})

  def packed(tokens, heads):
    return jax.ShapeDtypeStruct((tokens, heads, 128), jnp.bfloat16)

  return forward, (packed(int(cu_q[-1]), H), packed(int(cu_k[-1]), 4), packed(int(cu_k[-1]), 4))


def _cases() -> dict[str, Callable[[], tuple[Callable[..., Any], tuple[Any, ...]]]]:
  from jmat import mods

  return {
      "flex_causal": lambda: _flex(mods.causal_mask),
      "flex_window1024": lambda: _flex(mods.generate_sliding_window(1024)),
      "flex_documents": lambda: _flex(_documents()),
      "flex_causal_softcap": lambda: _flex(mods.causal_mask, _softcap),
      "flex_causal_gqa4": lambda: _flex(mods.causal_mask, kv_heads=4),
      "flex_causal_d64": lambda: _flex(mods.causal_mask, d=64),
      "flex_causal_f16": lambda: _flex(mods.causal_mask, dtype=jnp.float16),
      "flex_causal_f32": lambda: _flex(mods.causal_mask, dtype=jnp.float32),  # TF32 products
      # a length that is no multiple of the tiles: keys past the end are masked loads
      "flex_causal_l4000": lambda: _flex(mods.causal_mask, length=4000),
      # head dims that are no power of two (tiles of 128 columns, masked loads past D; GQA 16:4
      # stacks 4 heads, L=4000 masks the last query tile's rows too)
      "flex_causal_d80": lambda: _flex(mods.causal_mask, d=80),
      "flex_causal_d96_gqa4_l4000": lambda: _flex(mods.causal_mask, d=96, kv_heads=4,
                                                  length=4000),
      "sdpa_causal": _sdpa_causal,
      # SDPA causal with a dense bool attn_mask at a length that is no multiple of the tiles
      "sdpa_causal_mask_l4000": lambda: _sdpa_masked(4000),
      # decoding: 16 new queries against 4096 keys (the forward splits the keys)
      "flex_decode16_gqa4": lambda: _flex(kv_heads=4, queries=16),
      # varlen_attn (issue 22): packed causal prefill, and one decode step of 16 sequences
      "varlen_prefill_gqa4": lambda: _varlen(decode=False),
      "varlen_decode16_gqa4": lambda: _varlen(decode=True),
  }


def capture_triton(out: Path, wanted: list[str]) -> list[dict[str, Any]]:
  """Lowers each case for ``cuda`` and saves every Triton kernel's IR and launch parameters."""
  # jax's Pallas Triton registration calls lowering.lower_jaxpr_to_triton_module: watched here.
  from jax._src.pallas.triton import lowering
  from jax._src.pallas.triton import pallas_call_registration as _  # noqa: F401 (registers)

  captured: list[dict[str, Any]] = []
  lower = lowering.lower_jaxpr_to_triton_module

  def capture(jaxpr, grid_mapping, *args, **kwargs):
    result = lower(jaxpr, grid_mapping, *args, **kwargs)
    caller = sys._getframe(1).f_locals  # the registration's launch parameters
    captured.append(dict(name=caller.get("name"), num_warps=caller.get("num_warps"),
                         num_stages=caller.get("num_stages"), grid=list(result.grid),
                         text=result.module.operation.get_asm(enable_debug_info=False)))
    return result

  cases = _cases()
  records = []
  lowering.lower_jaxpr_to_triton_module = capture
  try:
    for case in wanted:
      forward, args = cases[case]()

      def loss(*a, forward=forward):
        return jnp.sum(forward(*a).astype(jnp.float32))

      for kind, fn in (("fwd", forward), ("grad", jax.grad(loss, argnums=(0, 1, 2)))):
        captured.clear()
        error = None
        with warnings.catch_warnings():
          warnings.simplefilter("ignore")
          try:
            jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))
          except Exception as e:  # recorded; the next case goes on
            error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        seen = set()
        for c in captured:
          digest = hashlib.sha1(c["text"].encode()).hexdigest()[:8]
          if digest in seen:
            continue
          seen.add(digest)
          stem = f"{case}.{kind}.{c['name']}.{digest}"
          (out / f"{stem}.ttir").write_text(c["text"])
          meta = {k: c[k] for k in ("name", "num_warps", "num_stages", "grid")}
          (out / f"{stem}.json").write_text(json.dumps(
              meta | {"dtype": str(args[0].dtype), "case": case, "kind": kind}))
        records.append(dict(case=case, kind=kind, error=error, kernels=len(seen)))
        print(json.dumps(records[-1]), flush=True)
  finally:
    lowering.lower_jaxpr_to_triton_module = lower
  return records


def _triton_python() -> Path:
  python = TRITON_VENV / "bin" / "python"
  if not python.exists() or subprocess.run([python, "-c", "import triton"],
                                           capture_output=True).returncode:
    subprocess.run([sys.executable, "-m", "venv", TRITON_VENV], check=True)
    subprocess.run([TRITON_VENV / "bin" / "pip", "install", "-q", f"triton=={TRITON_VERSION}"],
                   check=True)
  return python


def strict_failures(records: list[dict[str, Any]], rows: list[dict[str, Any]]) -> list[str]:
  """What breaks the bar: no kernel, a failed compile, spills, > 227 KiB, non-input-dtype MMA."""
  bad = [f"{r['case']}.{r['kind']}: lowering failed: {r['error']}" for r in records
         if r["error"]]
  bad += [f"{r['case']}.{r['kind']}: no Triton kernel" for r in records
          if not r["error"] and not r["kernels"]]
  for r in rows:
    k = r["kernel"]
    if not r["ok"]:
      bad.append(f"{k}: does not compile")
      continue
    if r["spill_bytes"]:
      bad.append(f"{k}: spills {r['spill_bytes']} bytes")
    if r["shared_kib"] > SHARED_LIMIT_KIB:
      bad.append(f"{k}: {r['shared_kib']} KiB shared memory > {SHARED_LIMIT_KIB}")
    want = {"bfloat16": "bf16", "float16": "f16"}.get(r["dtype"])
    if want and (r["wgmma"] + r["mma_sync"]) and set(r["mma_input_types"]) != {want}:
      bad.append(f"{k}: tensor-core inputs {r['mma_input_types']} for {r['dtype']} operands")
  return bad


def sm90(out: Path, wanted: list[str]) -> list[str]:
  records = capture_triton(out, wanted)
  script = Path(__file__).with_name("sm90_compile.py")
  subprocess.run([_triton_python(), script, out], check=True)
  rows = json.loads((out / "compile.json").read_text())
  return strict_failures(records, rows)


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m benchmarks.compile_check",
                                   description="compile jmat's fused kernels for a device")
  parser.add_argument("--target", choices=("sm90", "tpu"), required=True)
  parser.add_argument("--strict", action="store_true",
                      help="exit 1 unless every kernel meets the bar")
  parser.add_argument("--out", type=Path, help="where the IR, PTX and compile.json go")
  parser.add_argument("cases", nargs="*", help="case names (default: all)")
  args = parser.parse_args(argv)
  if args.target == "tpu":
    print("--target tpu: not written yet (see ../shared/tools/tpu-aot)", file=sys.stderr)
    return 2
  sys.path.insert(0, os.getcwd())  # the jmat of this checkout
  names = list(_cases())
  unknown = [c for c in args.cases if c not in names]
  if unknown:
    parser.error(f"unknown cases {unknown}; valid: {names}")
  out = args.out or Path(tempfile.mkdtemp(prefix="jmat-sm90-"))
  out.mkdir(parents=True, exist_ok=True)
  bad = sm90(out, args.cases or names)
  print(f"files: {out}")
  for line in bad:
    print("FAIL", line)
  kernels = len(json.loads((out / "compile.json").read_text()))
  print(f"{kernels - len({b.split(':')[0] for b in bad})} of {kernels} kernels hold")
  return 1 if (args.strict and bad) else 0


if __name__ == "__main__":
  sys.exit(main())
