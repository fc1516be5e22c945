"""The decode suite: one decoding step's attention (L=1) over a KV cache, jmat against torch.

GQA 32:8 (32 query heads, 8 key/value heads), head dim 128, float32, every sequence's cache
full (``S`` keys), pages of 128 positions (torch's default block). Competitors:

* ``jmat paged``: ``jax.jit`` of ``PagedAttention.convert_logical_block_mask`` (the logical
  mask passed in) then ``jmat.flex_attention`` of ``(B, 32, 1, 128)`` queries over the paged
  pool ``(1, 8, B * S, 128)``, whose pages are handed out in torch's order (interleaved
  between sequences, as they are after sequences grow side by side);
* ``jmat flex``: ``jmat.flex_attention`` with L=1 over a contiguous ``(B, 8, S, 128)`` cache
  (a BlockMask of the valid lengths, passed in);
* ``jmat varlen``: ``jmat.attention.varlen_attn`` of ``(B, 32, 128)`` queries (one per
  sequence, ``cu_seq_q = 0..B``) over the packed cache ``(B * S, 8, 128)`` (``cu_seq_k``), as a
  server packs sequences of different lengths;
* ``jmat varlen paged``: ``varlen_attn`` over a page pool ``(pages, 128, 8, 128)`` with the
  same pages as ``jmat paged`` (``block_table``, ``seqused_k``);
* ``torch``: ``torch.compile(flex_attention)`` over torch's ``PagedAttention`` (its
  ``convert_logical_block_mask`` in the step, as jmat's), compiled on the warm-up call (~35 s a
  case, not timed; ``--quick`` skips it);
* ``torch SDPA``: ``torch.nn.functional.scaled_dot_product_attention(enable_gqa=True)`` over
  the contiguous cache;
* ``jnp dense``: the jitted jnp step (``einsum``, masked softmax, ``einsum``): the reference.

The logical block masks are built once, outside the timing (a decoding loop slices or updates
them; building them is not attention). FLOPs: ``4 B Hq D S``. The default grid takes a few
minutes on 2 cores; ``JMAT_DECODE_GRID=full`` runs cache 1k-32k x batch 1-64 (up to 128k
cached positions in all).
"""

from __future__ import annotations

import functools
import itertools
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import competitors as comp
from benchmarks import derive, plots
from benchmarks.formatting import fmt_span, fmt_time
from benchmarks.spec import Record, SuiteSpec
from benchmarks.timing import Call, Case, Skipped, Suite

HEADS, KV_HEADS, HEAD_DIM, PAGE = 32, 8, 128, 128
COMPETITORS = ("jmat paged", "jmat flex", "jmat varlen", "jmat varlen paged", "torch",
               "torch SDPA", "jnp dense")
QUICK_GRID = ((2, 1024),)
DEFAULT_GRID = ((1, 32768), (8, 4096), (32, 1024), (64, 1024))
MOST_POSITIONS = 131072  # B * S of the full grid: 1 GiB per float32 K+V copy


def grid(quick: bool) -> tuple[tuple[int, int], ...]:
  """The ``(batch, cache length)`` cases: quick, default, or the full grid."""
  if quick:
    return QUICK_GRID
  if os.environ.get("JMAT_DECODE_GRID") == "full":
    return tuple((b, s) for s, b in itertools.product((1024, 4096, 16384, 32768),
                                                      (1, 8, 32, 64)) if b * s <= MOST_POSITIONS)
  return DEFAULT_GRID


def reservations(batch: int, length: int, run: int = 1) -> list[tuple[int, int]]:
  """The ``reserve(b, end)`` calls of ``batch`` sequences growing side by side to ``length``,
  ``run`` pages of ``PAGE`` at a time (``run`` must divide ``length // PAGE``): their pages
  interleave in runs of ``run`` (1: page by page, as sequences decoding in step)."""
  step = run * PAGE
  return [(b, end) for end in range(step, length + 1, step) for b in range(batch)]


def page_table(batch: int, length: int, run: int = 1) -> np.ndarray:
  """The ``(batch, length // PAGE)`` int32 page table those reservations give in torch's
  PagedAttention (and jmat's): pages handed out in increasing order, each reservation's run
  in reverse (torch takes the last free pages of its ``[n - 1, ..., 0]`` list)."""
  table = np.zeros((batch, length // PAGE), np.int32)
  handed = 0
  for b, end in reservations(batch, length, run):
    start = end // PAGE - run
    table[b, start: start + run] = np.arange(handed + run - 1, handed - 1, -1)
    handed += run
  return table


def _pages(batch: int, length: int, run: int = 1):
  """jmat's PagedAttention after :func:`reservations`: its page table is :func:`page_table`."""
  import jmat

  paged = jmat.attention.PagedAttention(batch * length // PAGE, PAGE, batch)
  for b, end in reservations(batch, length, run):
    paged = paged.reserve(b, end)
  return paged


def _paged_cache(paged, k: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """The contiguous ``(B, H, S, D)`` k and v laid out in the pool ``(1, H, pages * PAGE, D)``."""
  batch, heads, length, dim = k.shape
  table = np.asarray(paged.page_table)[:, : length // PAGE]
  slots = (table[:, :, None] * PAGE + np.arange(PAGE)).reshape(batch, length)
  pools = []
  for x in (k, v):
    pool = np.zeros((1, heads, paged.n_pages * PAGE, dim), x.dtype)
    pool[0][:, slots.reshape(-1)] = np.swapaxes(x, 0, 1).reshape(heads, batch * length, dim)
    pools.append(pool)
  return pools[0], pools[1]


def _valid(lengths):
  return lambda b, h, q_idx, kv_idx: kv_idx < lengths[b]


@functools.cache
def _jitted() -> dict[str, Callable[..., Any]]:
  import jmat

  def paged_step(paged, q, k_cache, v_cache, logical):
    physical = paged.convert_logical_block_mask(logical)
    return jmat.flex_attention(q, k_cache, v_cache, block_mask=physical, enable_gqa=True)

  def flex_step(q, k, v, block_mask):
    return jmat.flex_attention(q, k, v, block_mask=block_mask, enable_gqa=True)

  def dense_step(q, k, v, lengths):
    batch, heads, _, dim = q.shape
    grouped = q.reshape(batch, k.shape[1], heads // k.shape[1], dim)
    s = jnp.einsum("bhgd,bhsd->bhgs", grouped, k) / np.sqrt(dim).astype(q.dtype)
    s = jnp.where(jnp.arange(k.shape[2]) < lengths[:, None, None, None], s, -jnp.inf)
    out = jnp.einsum("bhgs,bhsd->bhgd", jax.nn.softmax(s, axis=-1), v)
    return out.reshape(batch, heads, 1, dim)

  def varlen_step(q, k, v, cu_q, cu_k, length):
    return jmat.attention.varlen_attn(q, k, v, cu_q, cu_k, 1, length, enable_gqa=True)

  def varlen_paged_step(q, k_pages, v_pages, cu_q, table, used, length):
    return jmat.attention.varlen_attn(q, k_pages, v_pages, cu_q, None, 1, length,
                                      enable_gqa=True, seqused_k=used, block_table=table)

  return {"paged": jax.jit(paged_step), "flex": jax.jit(flex_step),
          "dense": jax.jit(dense_step),
          "varlen": jax.jit(varlen_step, static_argnums=5),
          "varlen paged": jax.jit(varlen_paged_step, static_argnums=6)}


@functools.cache
def _torch_flex() -> Callable[..., Any]:
  import torch
  from torch.nn.attention.flex_attention import flex_attention

  # One compilation per case: past dynamo's default limit of 8 it would fall back to eager
  # flex, which expands the pool over the batch and materialises every score (tens of GB).
  torch._dynamo.config.recompile_limit = 64
  return torch.compile(flex_attention, dynamic=False)


def _torch_paged(batch: int, length: int, k: np.ndarray, v: np.ndarray) -> Call:
  """torch.compile(flex_attention) over torch's PagedAttention holding ``k`` and ``v``."""
  import torch
  from torch.nn.attention.experimental._paged_attention import PagedAttention
  from torch.nn.attention.flex_attention import create_block_mask

  paged = PagedAttention(batch * length // PAGE, PAGE, batch, device="cpu")
  for b, end in reservations(batch, length):
    paged.reserve(torch.tensor(b), torch.tensor(end))
  shape = (1, KV_HEADS, batch * length, HEAD_DIM)
  k_cache, v_cache = torch.zeros(shape), torch.zeros(shape)
  positions = torch.arange(length).expand(batch, length)
  paged.assign(torch.arange(batch), positions, torch.from_numpy(k), torch.from_numpy(v),
               k_cache, v_cache)
  lengths = torch.full((batch,), length)
  logical = create_block_mask(_valid(lengths), batch, None, 1, length, device="cpu",
                              BLOCK_SIZE=(1, PAGE))
  q = torch.from_numpy(np.random.default_rng(1).standard_normal(
      (batch, HEADS, 1, HEAD_DIM), dtype=np.float32))
  flex = _torch_flex()

  def step():
    physical = paged.convert_logical_block_mask(logical)
    return flex(q, k_cache, v_cache, block_mask=physical, enable_gqa=True)

  return step


def _case(target: comp.Target, batch: int, length: int, torch_flex: bool) -> Case:
  def build() -> dict[str, Call | Skipped]:
    import jmat

    q = np.random.default_rng(1).standard_normal((batch, HEADS, 1, HEAD_DIM), dtype=np.float32)
    k, v = target.random([(batch, KV_HEADS, length, HEAD_DIM)] * 2, "float32")
    lengths = np.full((batch,), length, np.int32)
    fns = _jitted()
    paged = _pages(batch, length)
    k_pool, v_pool = _paged_cache(paged, k, v)
    # The valid lengths as a logical mask over pages: converted for the pool, as it is for
    # the contiguous cache.
    mask = jmat.create_block_mask(_valid(jnp.asarray(lengths)), batch, None, 1, length,
                                  BLOCK_SIZE=(1, PAGE))
    paged_args = [jax.device_put(x, target.device) for x in (q, k_pool, v_pool)]
    # varlen's layouts: packed (B * S, 8, 128) keys, and the pool's pages as (pages, 128, 8,
    # 128) under the same page table.
    cu_q = np.arange(batch + 1, dtype=np.int32)
    packed = [np.ascontiguousarray(np.swapaxes(x, 1, 2)).reshape(-1, KV_HEADS, HEAD_DIM)
              for x in (k, v)]
    pages = [np.ascontiguousarray(x[0].reshape(KV_HEADS, -1, PAGE, HEAD_DIM).transpose(
        1, 2, 0, 3)) for x in (k_pool, v_pool)]
    table = np.asarray(paged.page_table)[:, : length // PAGE].astype(np.int32)
    q_packed = q[:, :, 0]
    calls: dict[str, Call | Skipped] = {
        "jmat paged": lambda: jax.block_until_ready(
            fns["paged"](paged, *paged_args, mask)),
        "jmat flex": target.jax_call(lambda q, k, v: fns["flex"](q, k, v, mask), q, k, v),
        "jmat varlen": target.jax_call(
            lambda q, k, v, cu_q, cu_k: fns["varlen"](q, k, v, cu_q, cu_k, length),
            q_packed, *packed, cu_q, cu_q * length),
        "jmat varlen paged": target.jax_call(
            lambda q, k, v, cu_q, table, used: fns["varlen paged"](
                q, k, v, cu_q, table, used, length),
            q_packed, *pages, cu_q, table, lengths),
        "torch": (
            (comp.NO_TORCH if target.torch_device is None
             else _torch_paged(batch, length, k, v)) if torch_flex
            else Skipped("--quick: torch.compile(flex_attention) takes ~35 s per case")),
        "torch SDPA": target.torch_call(
            lambda torch: functools.partial(torch.nn.functional.scaled_dot_product_attention,
                                            enable_gqa=True), q, k, v),
        "jnp dense": target.jax_call(fns["dense"], q, k, v, lengths),
    }
    return calls

  info = {"batch": batch, "cache": length, "heads": [HEADS, KV_HEADS], "head_dim": HEAD_DIM,
          "page_size": PAGE, "kv_bytes": 2 * batch * length * KV_HEADS * HEAD_DIM * 4}
  return Case(f"B={batch} S={length}", 4.0 * batch * HEADS * HEAD_DIM * length, "float32",
              build, info)


def decode_suite(target: comp.Target, quick: bool) -> Suite:
  cases = tuple(_case(target, b, s, torch_flex=not quick) for b, s in grid(quick))
  return Suite(
      "decode", f"Decode attention, one query per sequence, GQA {HEADS}:{KV_HEADS}, "
      f"D={HEAD_DIM}, float32, every cache full", COMPETITORS, "jnp dense", cases,
      notes=(
          f"jmat paged and torch: flex attention over a PagedAttention pool of pages of {PAGE} "
          "(interleaved between sequences), the logical mask converted in the step; jmat flex "
          "and torch SDPA: a contiguous (B, 8, S, 128) cache; jmat varlen: varlen_attn over "
          "the packed (B*S, 8, 128) cache; jmat varlen paged: varlen_attn over the same pages "
          "as jmat paged, (pages, 128, 8, 128) with a block_table.",
          "torch is torch.compile(flex_attention, dynamic=False); ratio_vs_torch is against it, "
          "the summary also gives the ratio to torch SDPA.",
          "GFLOP/s count 4*B*Hq*D*S; decode is memory-bound: kv_bytes in info is what one step "
          "must read.",
      ),
  )


def _summary(suite: Record) -> list[str]:
  out = []
  peers = {"torch": "torch.compile(flex) over its PagedAttention",
           "torch SDPA": "torch SDPA over a contiguous cache"}
  for mine in ("jmat paged", "jmat flex", "jmat varlen", "jmat varlen paged"):
    for peer, words in peers.items():
      ratios = []
      for case in suite["cases"]:
        record = case["results"][mine]
        ratio = record.get("status") == "ok" and derive.paired_ratio(
            case["results"].get(peer), record)
        if ratio:
          ratios.append(1.0 / ratio)
      if ratios:
        out.append(f"decode attention ({len(ratios)} cases, batch x cache up to "
                   f"{max(c['info']['batch'] * c['info']['cache'] for c in suite['cases'])} "
                   f"positions): {mine} takes {fmt_span(ratios)} the time of {words}.")
  for case in suite["cases"]:
    record = case["results"]["jmat paged"]
    if record.get("status") == "ok":
      out.append(f"decode {case['name']}: jmat paged {fmt_time(record['median_s'])}.")
      break
  return out


DECODE_SPEC = SuiteSpec("decode", build=decode_suite, summary=_summary, plot=plots.log_bars,
                        per_call=True, of_peak=False)

