"""The flex suite: ``jmat.flex_attention`` against ``torch.compile(flex_attention)`` and jax.nn.

B=1, H=8, D=64, float32, self-attention, forward unless the case says otherwise.
Competitors:

* ``jmat``: ``jax.jit`` of ``jmat.flex_attention(q, k, v, score_mod, block_mask=mask)``
  with the ``jmat.create_block_mask`` BlockMask built once, outside the timing, and
  passed to the jitted function as an argument;
* ``torch``: ``torch.compile(flex_attention, dynamic=False)`` with torch's
  ``create_block_mask`` of the same mask_mod (written as attention-gym writes it);
  compiled on its warm-up call (~25-40 s a case, not timed). ``--quick`` skips it;
* ``jax.nn``: ``jax.jit(jax.nn.dot_product_attention)`` with ``local_window_size``,
  which runs dense on CPU (the reference of ``ratio_vs_jnp``), on the sliding-window
  case at L=8192 only: it has no score_mod, and dense at L=16384 needs 17 GB.

FLOPs count the useful work, ``4 B H D`` per allowed (query, key) pair.

The last case is forward+backward (gradients of ``sum(out)`` for q, k, v) of a
causal document mask: timed at L=8192, and at L=32768 run once in a fresh process
of its own (``python -m benchmarks.flex 32768``, peak RSS measured with
:mod:`benchmarks.memory`'s helper) when the case is built; that record is the
case's ``info["memory"]``. torch's flex_attention has no CPU backward.

SDPA causal at L=8192 (``jmat.scaled_dot_product_attention`` vs torch SDPA) is
the ``attention`` suite's ``causal L=8192`` case.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import competitors as comp
from benchmarks import derive, plots
from benchmarks.formatting import fmt_bytes, fmt_span, fmt_time
from benchmarks.spec import Record, SuiteSpec
from benchmarks.timing import Call, Case, Skipped, Suite, failed, skipped, subprocess_record

BATCH, HEADS, HEAD_DIM = 1, 8, 64
COMPETITORS = ("jmat", "torch", "jax.nn")
WINDOW = 255  # torch's `q_idx - kv_idx <= 255`: a window of 256 keys, the query's own included
SOFTCAP = 50.0  # Gemma 2's attention logit cap
DOCUMENT_FRACTIONS = (0.0, 0.4, 0.7, 0.9, 1.0)  # 4 packed documents of unequal lengths
MEMORY_TIMEOUT_S = 900
MEMORY_LIMIT_BYTES = 4 * 2**30
NO_JAX_NN = Skipped("jax.nn.dot_product_attention has no score_mod or block sparsity (dense "
                    "on CPU): measured on the first sliding-window case only")


def document_ids(length: int) -> np.ndarray:
  """The document of every position: 4 documents of 40%, 30%, 20% and 10% of ``length``."""
  bounds = np.round(length * np.asarray(DOCUMENT_FRACTIONS)).astype(int)
  return np.repeat(np.arange(len(bounds) - 1, dtype=np.int32), np.diff(bounds))


# ---------------------------------------------------------------- the masks, three ways
# Each kind: the jmat mask_mod (jmat.mods), the same mask as a torch user writes it
# (attention-gym's form), and the allowed keys of every query (for the FLOPs). The
# accelerator runs (benchmarks.accelerators) use the same three, and splash attention's.
MASKS = ("causal", "sliding window", "documents", "prefix-LM")
MASK_NOTE = (
    f"sliding window {WINDOW + 1}: q - {WINDOW} <= kv <= q (jmat.mods.generate_sliding_window"
    f"({WINDOW})); documents: 4 packed documents of 40/30/20/10% of L, causal within each; "
    "prefix-LM: the first L/4 positions see each other, the rest causal; softcap: "
    f"{SOFTCAP:g} * tanh(score / {SOFTCAP:g}), causal."
)


def jmat_mask(kind: str, length: int) -> Callable[..., Any]:
  import jmat

  if kind == "sliding window":
    return jmat.mods.generate_sliding_window(WINDOW)
  if kind == "documents":
    return jmat.mods.generate_doc_mask_mod(jmat.mods.causal_mask, jnp.asarray(document_ids(length)))
  if kind == "prefix-LM":
    return jmat.mods.generate_prefix_lm_mask(length // 4)
  return jmat.mods.causal_mask


def torch_mask(torch: Any, kind: str, length: int, device: str = "cpu") -> Callable[..., Any]:
  if kind == "sliding window":
    return lambda b, h, q, kv: (q >= kv) & (q - kv <= WINDOW)
  if kind == "documents":
    ids = torch.from_numpy(document_ids(length)).to(device)
    offsets = torch.from_numpy(
        np.searchsorted(document_ids(length), np.arange(4)).astype(np.int32)).to(device)

    def document(b, h, q, kv):  # attention-gym's generate_doc_mask_mod(causal_mask, offsets)
      q_logical, kv_logical = q - offsets[ids[q]], kv - offsets[ids[kv]]
      return (ids[q] == ids[kv]) & (q_logical >= kv_logical)

    return document
  if kind == "prefix-LM":
    prefix = length // 4
    return lambda b, h, q, kv: (kv < prefix) | (q >= kv)
  return lambda b, h, q, kv: q >= kv


def key_range(kind: str, length: int) -> tuple[np.ndarray, np.ndarray]:
  """The first and last key each query may attend to (every mask here allows one run of keys).

  ``kind`` is one of :data:`MASKS`, or ``"full"`` (every key).
  """
  position = np.arange(length)
  if kind == "full":
    return np.zeros(length, int), np.full(length, length - 1)
  if kind == "sliding window":
    return np.maximum(position - WINDOW, 0), position
  if kind == "documents":
    ids = document_ids(length)
    return np.searchsorted(ids, ids), position
  if kind == "prefix-LM":
    return np.zeros(length, int), np.maximum(position, length // 4 - 1)
  return np.zeros(length, int), position


def allowed_keys(kind: str, length: int) -> np.ndarray:
  """How many keys each query may attend to."""
  first, last = key_range(kind, length)
  return last - first + 1


def computed_pairs(kind: str, length: int, block: int) -> int:
  """The (query, key) pairs of every ``block x block`` tile holding an allowed pair.

  What a block-sparse kernel computes over a block mask of ``BLOCK_SIZE`` ``block``
  (``jmat.create_block_mask`` and torch's list exactly these blocks, full or
  partial): the allowed pairs plus the masked-out pairs of partial blocks. Ragged
  last blocks count their real rows and columns.
  """
  first, last = key_range(kind, length)
  n = -(-length // block)
  rows = np.arange(length) // block
  # Each query marks the key blocks its run of keys touches: +1 at the first, -1 after the last.
  marks = np.zeros((n, n + 1), np.int64)
  np.add.at(marks, (rows, first // block), 1)
  np.add.at(marks, (rows, last // block + 1), -1)
  touched = np.cumsum(marks, axis=1)[:, :n] > 0
  sizes = np.diff(np.minimum(np.arange(n + 1) * block, length))
  return int(sizes @ touched @ sizes)


def attention_flops(pairs: float, batch: int, heads: int, head_dim: int,
                    backward: bool = False) -> float:
  """``4 B H D`` per (query, key) pair; forward+backward 3.5 times that."""
  forward = 4.0 * batch * heads * head_dim * pairs
  return forward * 3.5 if backward else forward  # FlashAttention's count: backward = 2.5 x forward


def flops(kind: str, length: int, backward: bool = False) -> float:
  return attention_flops(float(allowed_keys(kind, length).sum()), BATCH, HEADS, HEAD_DIM,
                         backward)


# ---------------------------------------------------------------- competitors


@functools.cache
def jmat_mods(kind: str, length: int, softcap: bool):
  """``(score_mod or None, BlockMask)`` of the case, as a jmat user writes them (built once
  per case: its jmat competitors and the backend query share them)."""
  import jmat

  mask = jmat.create_block_mask(jmat_mask(kind, length), None, None, length, length)
  return (jmat.mods.generate_tanh_softcap(SOFTCAP) if softcap else None), mask


def jmat_fn(kind: str, length: int, softcap: bool, backward: bool,
            kernel_options: Mapping[str, Any] | None = None):
  """``(jitted (q, k, v, block_mask) -> out or grads, block_mask)``."""
  import jmat

  score_mod, mask = jmat_mods(kind, length, softcap)
  options = None if kernel_options is None else dict(kernel_options)

  def attend(q, k, v, block_mask):
    return jmat.flex_attention(q, k, v, score_mod, block_mask=block_mask,
                               kernel_options=options)

  return jax.jit(comp.jax_grads(attend) if backward else attend), mask


@functools.cache
def _torch_flex() -> Callable[..., Any]:
  """One compiled flex_attention for every case (it recompiles per mask_mod / score_mod)."""
  import torch
  from torch.nn.attention.flex_attention import flex_attention

  return torch.compile(flex_attention, dynamic=False)


def torch_pick(kind: str, length: int, softcap: bool, device: str = "cpu",
                backward: bool = False) -> Callable[[Any], Callable[..., Any]]:
  """torch's flex_attention of the case on ``device`` (with ``backward``: the gradients of
  ``sum(out)`` for q, k and v, which must require grad)."""

  def pick(torch: Any) -> Callable[..., Any]:
    from torch.nn.attention.flex_attention import create_block_mask

    mask = create_block_mask(torch_mask(torch, kind, length, device), None, None, length,
                             length, device=device)
    def softcap_mod(score, b, h, q, kv):  # attention-gym's generate_tanh_softcap(SOFTCAP)
      return SOFTCAP * torch.tanh(score / SOFTCAP)

    attend = functools.partial(_torch_flex(), score_mod=softcap_mod if softcap else None,
                               block_mask=mask)
    return comp.torch_grads(torch, attend) if backward else attend

  return pick


def case_name(kind: str, length: int, softcap: bool = False, backward: bool = False) -> str:
  """``sliding window 256 L=8192``, ``causal + softcap 50 L=8192``, ``documents fwd+bwd L=8192``."""
  label = f"sliding window {WINDOW + 1}" if kind == "sliding window" else kind
  if softcap:
    label += f" + softcap {SOFTCAP:g}"
  return f"{label}{' fwd+bwd' if backward else ''} L={length}"


def _jax_nn_window(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
  return jax.nn.dot_product_attention(q, k, v, local_window_size=(WINDOW, 0))


def _case(target: comp.Target, kind: str, length: int, *, softcap: bool = False,
          torch: bool = True, jax_nn: bool = False) -> Case:
  def build() -> dict[str, Call | Skipped]:
    shape = (BATCH, HEADS, length, HEAD_DIM)
    q, k, v = target.random([shape] * 3, "float32")
    fn, mask = jmat_fn(kind, length, softcap, backward=False)
    calls: dict[str, Call | Skipped] = {
        "jmat": target.jax_call(lambda q, k, v: fn(q, k, v, mask), q, k, v),
        "torch": (target.torch_call(torch_pick(kind, length, softcap), q, k, v) if torch
                  else Skipped("--quick: torch.compile(flex_attention) takes ~40 s per case")),
        "jax.nn": NO_JAX_NN,
    }
    if jax_nn:
      from benchmarks.attention import to_jax_nn_layout

      calls["jax.nn"] = target.jax_call(jax.jit(_jax_nn_window),
                                        *(to_jax_nn_layout(x) for x in (q, k, v)))
    return calls

  info = {"length": length, "mask": kind, "softcap": SOFTCAP if softcap else None,
          "shape": [BATCH, HEADS, length, HEAD_DIM], "pass": "forward",
          "allowed_fraction": round(float(allowed_keys(kind, length).sum()) / length**2, 4)}
  return Case(case_name(kind, length, softcap), flops(kind, length), "float32", build, info)


def _backward_case(target: comp.Target, length: int, memory_length: int) -> Case:
  """Forward+backward of a causal document mask, timed at ``length``; peak RSS at
  ``memory_length`` in a fresh process (one call at L=32768 takes minutes: not timed here)."""
  info: dict[str, Any] = {"length": length, "mask": "documents", "softcap": None,
                          "shape": [BATCH, HEADS, length, HEAD_DIM], "pass": "forward+backward"}

  def build() -> dict[str, Call | Skipped]:
    # Measured first, while this process holds no inputs (the point's process is its own).
    info["memory"] = {"length": memory_length,
                      **memory_point(memory_length, target.device.platform)}
    q, k, v = target.random([(BATCH, HEADS, length, HEAD_DIM)] * 3, "float32")
    fn, mask = jmat_fn("documents", length, softcap=False, backward=True)
    return {
        "jmat": target.jax_call(lambda q, k, v: fn(q, k, v, mask), q, k, v),
        "torch": Skipped("torch's flex_attention has no CPU backward"),
        "jax.nn": NO_JAX_NN,
    }

  return Case(case_name("documents", length, backward=True),
              flops("documents", length, backward=True), "float32", build, info)


def flex_suite(target: comp.Target, quick: bool) -> Suite:
  if quick:
    cases = (
        _case(target, "sliding window", 512, torch=False, jax_nn=True),
        _case(target, "documents", 512, softcap=True, torch=False),
        _backward_case(target, 512, memory_length=1024),
    )
  else:
    cases = (
        _case(target, "sliding window", 8192, jax_nn=True),
        _case(target, "sliding window", 16384),
        _case(target, "documents", 8192),
        _case(target, "prefix-LM", 8192),
        _case(target, "causal", 8192, softcap=True),
        _backward_case(target, 8192, memory_length=32768),
    )
  return Suite(
      "flex", f"Flex attention, B={BATCH}, H={HEADS}, D={HEAD_DIM}, float32, forward (and one "
      "forward+backward)",
      COMPETITORS, "jax.nn", cases,
      notes=(
          "torch is torch.compile(flex_attention, dynamic=False) with torch's create_block_mask "
          "of the same mask; jmat is jax.jit of jmat.flex_attention with a BlockMask argument; "
          "both block masks are built once, outside the timing (BLOCK_SIZE 128).",
          MASK_NOTE + f" jax.nn's sliding window: local_window_size=({WINDOW}, 0).",
          "GFLOP/s count the useful work, 4*B*H*D per allowed (query, key) pair; fwd+bwd 3.5x "
          "that. ratio_vs_jnp is taken against jax.nn.dot_product_attention (jitted).",
          "documents fwd+bwd: gradients of sum(out) for q, k, v; info.memory is the peak RSS of a "
          "fresh process (python -m benchmarks.flex) that compiles and runs it once at "
          "info.memory.length (with that one call's time_s).",
          "SDPA causal L=8192: see the attention suite.",
      ),
  )


# ---------------------------------------------------------------- how the suite is reported


def _torch_time_ratio(record: Mapping[str, Any]) -> float | None:
  """jmat's time over torch's, from the paired ratio (below 1: jmat is faster)."""
  ratio = record.get("ratio_vs_torch")
  return 1.0 / ratio if ratio else None


def _summary(suite: Record) -> list[str]:
  out = []
  window = {c["info"]["length"]: c for c in suite["cases"]
            if c["info"]["mask"] == "sliding window" and c["info"]["pass"] == "forward"}
  if 8192 in window and 16384 in window:
    short, long = (derive.record(suite, window[n]["name"], "jmat") for n in (8192, 16384))
    torch = derive.record(suite, window[8192]["name"], "torch")
    jax_nn = derive.record(suite, window[8192]["name"], "jax.nn")
    if short and long:
      parts = [f"flex attention, sliding window 256, L=8192: jmat {fmt_time(short['median_s'])}"]
      if torch and _torch_time_ratio(short):
        parts.append(f"{_torch_time_ratio(short):.2f}× the time of torch.compile(flex_attention)"
                     f" ({fmt_time(torch['median_s'])})")
      if jax_nn:
        parts.append(f"{short['ratio_vs_jnp']:.1f}× faster than jax.nn.dot_product_attention "
                     f"({fmt_time(jax_nn['median_s'])})")
      parts.append(f"L=16384 takes {long['median_s'] / short['median_s']:.2f}× the L=8192 time "
                   f"(fastest rounds: {long['min_s'] / short['min_s']:.2f}×)")
      out.append(", ".join(parts) + ".")
  others = [c for c in suite["cases"] if c["info"]["mask"] != "sliding window"
            and c["info"]["pass"] == "forward" and c["results"]["jmat"].get("ratio_vs_torch")]
  if others:
    ratios = [_torch_time_ratio(c["results"]["jmat"]) or 0.0 for c in others]
    names = ", ".join(c["name"] for c in others)
    out.append(f"flex attention, {names}: jmat takes {fmt_span(ratios)} the time of "
               "torch.compile(flex_attention).")
  for case in suite["cases"]:
    memory = case["info"].get("memory") or {}
    if memory.get("status") == "ok":
      out.append(f"flex attention forward+backward, causal documents, L={memory['length']}: "
                 f"peak RSS {fmt_bytes(memory['peak_rss_bytes'])} (the whole process), one call "
                 f"{fmt_time(memory['time_s'])}.")
  return out


FLEX_SPEC = SuiteSpec("flex", build=flex_suite, summary=_summary, plot=plots.log_bars,
                      per_call=True)


# ---------------------------------------------------------------- memory, in a fresh process


def memory_point(length: int, device: str) -> dict[str, Any]:
  """Peak RSS of one causal-documents forward+backward in a fresh ``python -m benchmarks.flex``."""
  command = [sys.executable, "-m", "benchmarks.flex", str(length), "--device", device,
             "--limit", str(MEMORY_LIMIT_BYTES)]
  return subprocess_record(command, MEMORY_TIMEOUT_S)


def _memory(length: int, device: str, limit: int) -> dict[str, Any]:
  from benchmarks.memory import _measured

  with jax.default_device(jax.devices(device)[0]):
    keys = jax.random.split(jax.random.key(0), 3)
    q, k, v = (jax.random.normal(key, (BATCH, HEADS, length, HEAD_DIM), jnp.float32)
               for key in keys)
    fn, mask = jmat_fn("documents", length, softcap=False, backward=True)
    compiled = fn.lower(q, k, v, mask).compile()
  analysis = compiled.memory_analysis()
  temp = None if analysis is None else int(analysis.temp_size_in_bytes)
  if temp is not None and temp > limit:
    return skipped(f"XLA's compiled forward+backward needs {temp / 2**30:.1f} GB of "
                   f"temporaries, over the {limit / 2**30:.0f} GB limit: not run")
  return _measured(lambda: jax.block_until_ready(compiled(q, k, v, mask)), temp)


def main(argv: Sequence[str] | None = None) -> int:
  """The subprocess side: one memory point, printed as one JSON line (benchmarks.memory's)."""
  parser = argparse.ArgumentParser(prog="python -m benchmarks.flex")
  parser.add_argument("length", type=int, help="L of the causal document mask, e.g. 32768")
  parser.add_argument("--device", default="cpu", help="a JAX platform")
  parser.add_argument("--limit", type=int, default=MEMORY_LIMIT_BYTES,
                      help="most XLA temp bytes to run")
  args = parser.parse_args(argv)
  try:
    record = _memory(args.length, args.device, args.limit)
  except Exception as e:  # reported in the results: a failing point does not end the run
    record = failed(e)
  print(json.dumps(record))
  return 0


if __name__ == "__main__":
  sys.exit(main())
