"""torch 2.13's ``varlen_attn`` on jmat's block-sparse kernel: packed sequences, paged K/V, decode.

Sequences of different lengths are packed along one token axis ``(T, H, D)``
and delimited by cumulative offsets, as FlashAttention's varlen API. The
kernel's tables are built from the offsets: each sequence's queries start a
new query block (so a block belongs to one sequence; padding rows fill the
last block of each), and a query block lists only the key blocks of its own
sequence that its window reaches. The mask compares sequence ids and
positions that travel as blocked operands; the keys are never copied into a
padded ``(B, S)`` layout. Whole blocks inside a sequence (and its window) are
*full*: the mask is not evaluated there.

Decode (a few queries per sequence against long keys): on a GPU or TPU each
sequence's key blocks are split into parts: the query rows are repeated once
per part, every copy becomes a query block of its own (a program of the Pallas
kernel), and the parts are merged by their logsumexp (flash-decoding). All
query heads of a key/value head are one kernel row (the kernel's ``G`` axis),
as for grouped-query attention everywhere in jmat. Where XLA runs (CPUs) a
decode loop of its own (:func:`_decode`) walks each sequence's key blocks
where they lie, a slice of the packed keys or pages of the pool (the kernel's
tables would need the keys head-major, a copy of the cache per step); its
gradients are the XLA kernel's.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.typing import ArrayLike

from jmat._src import backends, block_sparse, checks, online_softmax
from jmat._src.flex_attention import AuxRequest
from jmat._src.kernels import xla

_OP = "attention.varlen_attn"
# Query and key blocks of the kernel's tables; short query runs (decode) take longer key
# blocks (fewer table entries per sequence; the Pallas kernels cut them into their tiles).
_BLOCK_Q = 128
_BLOCK_K = 128
_DECODE_BLOCK_K = 512
# A query run this short is a decode step: its keys are split across programs on GPUs/TPUs
# (and, as for flex, the XLA loops' CPU decode steps fold longer runs of keys).
_DECODE_MAX_Q = xla.DECODE_MAX_Q
# Split-KV on an accelerator aims at this many programs (query blocks x kv heads x splits).
_TARGET_PROGRAMS = 256


def _query_block(max_q: int, total_q: int, n_seq: int, smallest: int) -> int:
  """The query block: a power of two, at least ``smallest`` (the backend's least tile), at most
  128, covering ``max_q`` if it can, halved while the padding of each sequence's last block would
  more than double the rows."""
  block = smallest
  while block < min(max_q, _BLOCK_Q):
    block *= 2
  while block > smallest and n_seq * (block - 1) > max(total_q, n_seq):
    block //= 2
  return block


# The least query block of each backend's tiles: the Triton kernel's tiles are powers of two of
# at least 16 rows, the Mosaic kernel's multiples of 8 sublanes; the XLA loops take any.
_SMALLEST_BLOCK_Q = {"XLA": 1, "TRITON": 16, "MOSAIC": 8}


def _splits(num_splits: int | None, max_q: int, max_k: int, n_blocks: int, kv_heads: int,
            block_k: int) -> int:
  """How many parts each sequence's keys are split into (``num_splits`` or jmat's choice)."""
  if num_splits is not None:
    return num_splits
  if max_q > _DECODE_MAX_Q:
    return 1
  programs = max(n_blocks * kv_heads, 1)
  return int(max(1, min(block_sparse.ceil_div(max_k, block_k),
                        _TARGET_PROGRAMS // programs)))


class _Tables:
  """Where every query row and key sits, from the offsets (all arrays int32, traced)."""

  def __init__(self, cu_q, cu_k, used_k, total_q: int, total_k: int, block_q: int,
               window: tuple[int, int]):
    n = cu_q.shape[0] - 1
    len_q = cu_q[1:] - cu_q[:-1]
    len_k = used_k
    blocks_per_seq = (len_q + block_q - 1) // block_q
    block_end = jnp.cumsum(blocks_per_seq)
    row_start = (block_end - blocks_per_seq) * block_q
    self.rows = block_sparse.ceil_div(total_q + n * (block_q - 1), block_q) * block_q
    row = jnp.arange(self.rows, dtype=jnp.int32)
    seq = jnp.searchsorted(block_end, row // block_q, side="right").astype(jnp.int32)
    seq_c = jnp.minimum(seq, n - 1)
    local = row - row_start[seq_c]
    valid = (seq < n) & (local < len_q[seq_c])
    # The query's position among its sequence's keys: FlashAttention aligns a sequence's
    # queries with the end of its keys (bottom-right).
    aligned = local + len_k[seq_c] - len_q[seq_c]
    self.token = jnp.where(valid, cu_q[seq_c] + local, 0)  # the packed query of each row
    self.valid = valid
    self.q_seg = jnp.where(valid, seq_c, -1)
    self.q_pos = aligned
    token = jnp.arange(total_q, dtype=jnp.int32)
    tseq = jnp.clip(jnp.searchsorted(cu_q, token, side="right").astype(jnp.int32) - 1, 0, n - 1)
    self.row_of_token = row_start[tseq] + token - cu_q[tseq]
    key = jnp.arange(total_k, dtype=jnp.int32)
    kseq = jnp.clip(jnp.searchsorted(cu_k, key, side="right").astype(jnp.int32) - 1, 0, n - 1)
    k_local = key - cu_k[kseq]
    self.k_seg = jnp.where((key >= cu_k[0]) & (k_local < len_k[kseq]), kseq, -2)
    self.k_pos = k_local
    left, right = window
    base = cu_k[seq_c]
    lo = base + (jnp.clip(aligned - left, 0, len_k[seq_c]) if left >= 0 else 0)
    hi = base + (jnp.clip(aligned + right + 1, 0, len_k[seq_c]) if right >= 0
                 else len_k[seq_c])
    hi = jnp.maximum(hi, lo)
    self.lo = jnp.where(valid, lo, 0)
    self.hi = jnp.where(valid, hi, 0)


def _key_blocks(tables: _Tables, block_q: int, block_k: int, n_k: int,
                splits: int) -> block_sparse.KeyBlocks:
  """The table: per query block (and split), its full then partial key blocks (M = 1)."""
  big = jnp.iinfo(jnp.int32).max
  lo, hi, valid = (x.reshape(-1, block_q) for x in (tables.lo, tables.hi, tables.valid))
  seen = hi > lo
  start = jnp.min(jnp.where(seen, lo, big), axis=1)
  end = jnp.max(jnp.where(seen, hi, 0), axis=1)
  any_seen = jnp.any(seen, axis=1)
  p0 = jnp.where(any_seen, start // block_k, 0)
  p1 = jnp.where(any_seen, (end + block_k - 1) // block_k, 0)
  # A key block is full when every row of the query block sees all of it (padding rows are
  # dropped afterwards, whatever they see).
  f_lo = jnp.max(jnp.where(valid, lo, 0), axis=1)
  f_hi = jnp.min(jnp.where(valid, hi, big), axis=1)
  f0 = (f_lo + block_k - 1) // block_k
  f1 = f_hi // block_k
  per = (p1 - p0 + splits - 1) // splits
  part = jnp.arange(splits, dtype=jnp.int32)[:, None]
  s0 = jnp.minimum(p0 + part * per, p1)
  s1 = jnp.minimum(s0 + per, p1)
  fc0 = jnp.clip(f0, s0, s1)
  fc1 = jnp.clip(f1, fc0, s1)
  t = jnp.arange(n_k, dtype=jnp.int32)
  first = (fc0 - s0)[..., None]
  partial = jnp.where(t < first, s0[..., None] + t, fc1[..., None] + t - first)
  full = fc0[..., None] + t

  def rows(x):  # (splits, n_q, ...) -> (1, splits * n_q, ...), int32
    return x.reshape((1, -1) + x.shape[2:]).astype(jnp.int32)

  return block_sparse.KeyBlocks(rows((fc0 - s0) + (s1 - fc1)), rows(jnp.minimum(partial, n_k - 1)),
                                rows(fc1 - fc0), rows(jnp.minimum(full, n_k - 1)))


def _mask(window: tuple[int, int]):
  """The mod: a query row sees a key of its own sequence inside its window."""
  left, right = window

  def mask(m, r, g, q_pos, k_pos, operands):
    del m, r, g, q_pos, k_pos
    q_seg, q_at, k_seg, k_at = operands.blocked
    allowed = q_seg == k_seg
    if right >= 0:
      allowed = allowed & (k_at <= q_at + right)
    if left >= 0:
      allowed = allowed & (k_at >= q_at - left)
    return allowed

  return mask


def _attend(query, key, value, cu_q, cu_k, used_k, scale, *, max_q: int, max_k: int,
            window: tuple[int, int], splits: int | None, options: backends.KernelOptions):
  """Packed varlen attention: ``(out (Tq, Hq, Ev), lse (Hq, Tq))`` on the backend ``options``
  name, or (AUTO) on each platform's, with tables tiled for that backend."""
  run = functools.partial(_attend_on, query, key, value, cu_q, cu_k, used_k, scale,
                          max_q=max_q, max_k=max_k, window=window, options=options)
  if options.backend != "AUTO":
    return run(backend=options.backend, splits=splits)
  # num_splits=None: no split in the CPU's kernel loops (one program at a time), jmat's
  # choice on a GPU or TPU; the tables of each platform are tiled for its kernel.
  cpu = splits if splits is not None else 1
  return backends.per_platform(lambda: run(backend="XLA", splits=cpu),
                               {"cuda": lambda: run(backend="TRITON", splits=splits),
                                "tpu": lambda: run(backend="MOSAIC", splits=splits)})()


def _attend_on(query, key, value, cu_q, cu_k, used_k, scale, *, max_q: int, max_k: int,
               window: tuple[int, int], splits: int | None, options: backends.KernelOptions,
               backend: str):
  """:func:`_attend` with tables tiled for ``backend`` (the kernel still runs where ``options``
  say: AUTO falls back to XLA where the fused kernel cannot run the call)."""
  total_q, heads, dim = query.shape
  total_k, kv_heads, _ = key.shape
  v_dim = value.shape[-1]
  n = cu_q.shape[0] - 1
  dtype = online_softmax.compute_dtype(query.dtype)
  if total_q == 0 or total_k == 0 or n == 0:
    return (jnp.zeros((total_q, heads, v_dim), query.dtype),
            jnp.full((heads, total_q), -jnp.inf, dtype))
  group = heads // kv_heads
  block_q = _query_block(max_q, total_q, n, _SMALLEST_BLOCK_Q[backend])
  block_k = block_sparse.block_for(total_k, _DECODE_BLOCK_K if max_q <= _DECODE_MAX_Q
                                   else _BLOCK_K)
  tables = _Tables(cu_q, cu_k, used_k, total_q, total_k, block_q, window)
  n_q, n_k = tables.rows // block_q, block_sparse.ceil_div(total_k, block_k)
  parts = _splits(splits, max_q, max_k, n_q, kv_heads, block_k)
  blocks = _key_blocks(tables, block_q, block_k, n_k, parts)

  rows = jnp.where(tables.valid[:, None, None], query[tables.token], 0)
  q = jnp.swapaxes(rows, 0, 1).reshape(kv_heads, group, tables.rows, dim)
  q = jnp.tile(q, (1, 1, parts, 1))[None]
  k = jnp.swapaxes(key, 0, 1)[None]
  v = jnp.swapaxes(value, 0, 1)[None]

  def blocked(x, axis):
    shape = [1, 1, 1, 1, 1]
    shape[axis] = x.shape[0]
    return x.astype(jnp.int32).reshape(shape)

  operands = block_sparse.Operands((), (
      blocked(jnp.tile(tables.q_seg, parts), 3), blocked(jnp.tile(tables.q_pos, parts), 3),
      blocked(tables.k_seg, 4), blocked(tables.k_pos, 4)))
  call = block_sparse.Call(q, k, v, blocks, operands, scale,
                           mods=block_sparse.Mods(None, _mask(window)),
                           block_q=block_q, block_k=block_k)
  out, lse = backends.attend(_OP, call, options)[:2]
  out = out[0].reshape(kv_heads, group, parts, tables.rows, v_dim)
  lse = lse[0].reshape(kv_heads, group, parts, tables.rows)
  out, lse = jnp.moveaxis(out, 2, 0), jnp.moveaxis(lse, 2, 0)
  if parts > 1:
    out, lse = online_softmax.merge_parts(out, lse)
  else:
    out, lse = out[0], lse[0]
  out = out.reshape(heads, tables.rows, v_dim)[:, tables.row_of_token]
  lse = lse.reshape(heads, tables.rows)[:, tables.row_of_token]
  return jnp.swapaxes(out, 0, 1).astype(query.dtype), lse.astype(dtype)


# The decode loop's key block: this many keys of one sequence per step (a page or a few pages
# of a paged cache). Fixed, whatever the batch, and aligned with each sequence's first key, so a
# sequence's sums run in the same order in every batch. XLA:CPU copies every block a loop reads
# (a dynamic slice is materialised): 1024 keys of 8 heads of 128 (4 MiB of keys in float32, as
# much of values) stay in the cores' caches between the copy and the products; 512 (more steps)
# and 2048 or more (out of cache) measured slower (docs/inference.md).
_DECODE_STEP = 1024


class _Cache(NamedTuple):
  """Where the decode loop reads a sequence's keys: a packed run or a paged pool, in place.

  Attributes:
    key: ``(Tk, Hkv, D)`` packed, or ``(pages, page_size, Hkv, D)`` paged.
    value: likewise, ``Dv`` last.
    start: ``(N,)`` int32 each sequence's first packed key (unused when paged).
    table: ``(N, max_pages)`` int32 page table (paged only, else None).
  """

  key: jax.Array
  value: jax.Array
  start: jax.Array
  table: jax.Array | None

  def step(self) -> int:
    """Keys per loop step: :data:`_DECODE_STEP`, or whole pages of about that many."""
    if self.table is None:
      return _DECODE_STEP
    return max(1, _DECODE_STEP // self.key.shape[1]) * self.key.shape[1]

  def in_place(self, i, size: int) -> jax.Array:
    """How many blocks of sequence ``i`` (from its first) :meth:`read` slices in place."""
    if self.table is not None:
      return jnp.asarray(jnp.iinfo(jnp.int32).max, jnp.int32)
    return (self.key.shape[0] - self.start[i]) // size

  def read(self, i, j, size: int, sliced: bool) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Keys ``j * size ...`` of sequence ``i``: ``(k (size, Hkv, D), v, positions (size,))``.

    Key ``t`` of the block is the sequence's key ``j * size + t`` whatever else the arrays
    hold (so a sequence's sums do not depend on the batch); past its end it is any key, which
    the caller masks by position. A packed block is a slice (``sliced``: for blocks below
    :meth:`in_place`) or gathered (a block reaching past the end of the arrays, where
    ``dynamic_slice`` would clamp its start).
    """
    at = j * size + lax.iota(jnp.int32, size)
    if self.table is None:
      first = self.start[i] + j * size
      if sliced:
        k, v = (lax.dynamic_slice_in_dim(x, first, size, 0) for x in (self.key, self.value))
      else:
        rows = jnp.minimum(first + lax.iota(jnp.int32, size), self.key.shape[0] - 1)
        k, v = self.key[rows], self.value[rows]
      return k, v, at
    page = self.key.shape[1]
    count = size // page
    slots = jnp.clip(j * count + lax.iota(jnp.int32, count), 0, self.table.shape[1] - 1)
    pages = self.table[i, slots]
    k, v = (x[pages].reshape((size,) + x.shape[2:]) for x in (self.key, self.value))
    return k, v, at


def _decode_forward(query, cache: _Cache, cu_q, used, scale, *, max_q: int,
                    window: tuple[int, int], splits: int | None):
  """Short query runs on XLA (the CPU decode path): ``(out (Tq, Hq, Ev), lse (Hq, Tq))``.

  A loop over the sequences; for each, a loop over the key blocks its queries see (a dynamic
  trip count: a short sequence costs its own blocks), each block read in place (a slice of the
  packed keys, or pages of the pool). All query heads of a key/value head and all the
  sequence's queries are the rows of one product per block, folded into an online softmax.
  Blocks are used keys first, as they lie (:func:`online_softmax.online_softmax_fold_keys_first`:
  the products are multiply-reduces, so no block is transposed). With ``splits`` parts
  (``None``: one) each part of every sequence's blocks is a loop nest of its own, merged by
  logsumexp (XLA's CPU runtime ran two such loops one after the other: no faster). Forward
  only: :func:`_decode` gives it the kernel's gradients.
  """
  total_q, heads, dim = query.shape
  kv_heads, v_dim = cache.key.shape[-2], cache.value.shape[-1]
  group = heads // kv_heads
  n = cu_q.shape[0] - 1
  dtype = online_softmax.compute_dtype(query.dtype)
  parts = splits or 1
  size = cache.step()
  len_q = cu_q[1:] - cu_q[:-1]
  j = jnp.arange(max_q, dtype=jnp.int32)
  row_valid = j[None, :] < len_q[:, None]                                   # (N, Lq)
  token = jnp.where(row_valid, cu_q[:-1, None] + j, 0)
  q = jnp.where(row_valid[..., None, None], query[token], 0)                # (N, Lq, Hq, D)
  q = (q.astype(dtype) * scale).reshape(n, max_q, kv_heads, group, dim)
  q = jnp.moveaxis(q, 1, 3).reshape(n, kv_heads, group * max_q, dim)      # rows (g, l)
  aligned = j[None, :] + (used - len_q)[:, None]                            # (N, Lq)
  left, right = window
  # The keys any query of a sequence sees: [lo, hi).
  last = aligned[:, 0] + jnp.maximum(len_q, 1) - 1
  lo = jnp.clip(aligned[:, 0] - left, 0, used) if left >= 0 else jnp.zeros_like(used)
  hi = jnp.clip(last + right + 1, 0, used) if right >= 0 else used
  first_block = lo // size
  blocks = jnp.where((hi > lo) & (len_q > 0), (hi + size - 1) // size - first_block, 0)
  per_part = (blocks + parts - 1) // parts

  def sequence(part, i, carry):
    q_i, at = q[i], aligned[i]

    def step(sliced, b, tile):
      k_b, v_b, pos = cache.read(i, b, size, sliced)
      # Keys first, as the block lies in the cache: (size, Hkv, G * Lq) scores from a
      # multiply-reduce over D (a matrix product would transpose the block first).
      s = jnp.sum(k_b.astype(dtype)[:, :, None, :] * q_i[None], axis=-1)
      key_at, query_at = pos[:, None], at[None, :]
      ok = key_at < used[i]                                                 # (size, 1|Lq)
      if right >= 0:
        ok = ok & (key_at <= query_at + right)
      if left >= 0:
        ok = ok & (key_at >= query_at - left)
      ok = jnp.broadcast_to(ok[:, None, None, :], (size, 1, group, max_q))
      s = jnp.where(ok.reshape(size, 1, group * max_q), s, -jnp.inf)
      return online_softmax.online_softmax_fold_keys_first(tile, s, v_b)

    begin = first_block[i] + part * per_part[i]
    end = jnp.minimum(begin + per_part[i], first_block[i] + blocks[i])
    end = jnp.maximum(begin, end)
    tile = online_softmax.online_softmax_init((kv_heads,), group * max_q, v_dim, dtype=dtype)
    # The blocks read in place, then the rest (at most the last block of the sequences that end
    # the packed arrays).
    split = jnp.clip(cache.in_place(i, size), begin, end)
    if cache.table is not None or cache.key.shape[0] >= size:
      tile = lax.fori_loop(begin, split, functools.partial(step, True), tile)
    else:
      split = begin
    tile = lax.fori_loop(split, end, functools.partial(step, False), tile)
    return tuple(lax.dynamic_update_index_in_dim(x, t, i, 0)
                 for x, t in zip(carry, tile, strict=True))

  init = online_softmax.online_softmax_init((n, kv_heads), group * max_q, v_dim, dtype=dtype)
  # One loop nest per part: independent loops, which XLA's CPU runtime runs concurrently.
  carries = [lax.fori_loop(0, n, functools.partial(sequence, p), init) for p in range(parts)]
  carry = carries[0]
  if parts > 1:
    acc, row_max, row_sum = (jnp.stack(x) for x in zip(*carries, strict=True))
    carry = online_softmax.online_softmax_merge((acc, row_max, row_sum))
  out = online_softmax.online_softmax_finish(carry, dtype)                  # (N, Hkv, G*Lq, Dv)
  lse = online_softmax.online_softmax_logsumexp(carry)
  # (N, Hkv, G, Lq, ...) -> the packed tokens
  out = jnp.moveaxis(out.reshape(n, heads, max_q, v_dim), 2, 1).reshape(n * max_q, heads, v_dim)
  lse = jnp.swapaxes(lse.reshape(n, heads, max_q), 0, 1).reshape(heads, n * max_q)
  t = jnp.arange(total_q, dtype=jnp.int32)
  seq = jnp.clip(jnp.searchsorted(cu_q, t, side="right").astype(jnp.int32) - 1, 0, n - 1)
  row = seq * max_q + t - cu_q[seq]
  return out[row].astype(query.dtype), lse[:, row]


@functools.partial(jax.custom_vjp, nondiff_argnums=(8, 9))
def _decode(query, key, value, scale, cu_q, cu_k, block_table, used, static, kernel):
  """The decode loop's ``(out, lse)``, differentiable by the block-sparse kernel's backward.

  The loop's trip counts are dynamic (a sequence costs its own blocks), so it has no reverse
  mode of its own; its gradients are those of ``kernel`` (a function of the same arguments
  computing the same attention on the block-sparse kernel, whose backward recomputes blocks).
  """
  del kernel
  cache = _Cache(key, value, cu_k[:-1], block_table)
  max_q, window, splits = static
  return _decode_forward(query, cache, cu_q, used, scale, max_q=max_q, window=window,
                         splits=splits)


def _decode_fwd(query, key, value, scale, cu_q, cu_k, block_table, used, static, kernel):
  out = _decode(query, key, value, scale, cu_q, cu_k, block_table, used, static, kernel)
  return out, (query, key, value, scale, cu_q, cu_k, block_table, used)


def _decode_bwd(static, kernel, residuals, cotangents):
  del static
  query, key, value, scale, cu_q, cu_k, block_table, used = residuals
  _, vjp = jax.vjp(lambda q, k, v, s: kernel(q, k, v, s, cu_q, cu_k, block_table, used),
                   query, key, value, scale)
  ints = (cu_q, cu_k, block_table, used)
  return (*vjp(cotangents), *(None if x is None else block_sparse.zero_cotangent(x)
                              for x in ints))


_decode.defvjp(_decode_fwd, _decode_bwd)


@functools.partial(jax.jit, static_argnames=("max_q", "max_k", "window", "enable_gqa",
                                             "num_splits", "options"))
def _varlen(query, key, value, cu_seq_q, cu_seq_k, seqused_k, block_table, scale, *,
            max_q: int, max_k: int, window: tuple[int, int], enable_gqa: bool,
            num_splits: int | None, options: backends.KernelOptions):
  del enable_gqa  # checked before tracing
  cu_q = cu_seq_q.astype(jnp.int32)
  scale = online_softmax.attention_scale(_OP, scale, query.shape[-1],
                                         online_softmax.compute_dtype(query.dtype))
  if block_table is not None:
    block_table = block_table.astype(jnp.int32)
    n, pages = block_table.shape
    span = pages * key.shape[1]
    cu_k = jnp.arange(n + 1, dtype=jnp.int32) * span
  else:
    cu_k = cu_seq_k.astype(jnp.int32)
  if seqused_k is not None:
    used = jnp.minimum(seqused_k.astype(jnp.int32), cu_k[1:] - cu_k[:-1])
  else:
    used = cu_k[1:] - cu_k[:-1]
  static: dict[str, Any] = dict(max_q=max_q, max_k=max_k, window=window)
  n = cu_q.shape[0] - 1
  empty = query.shape[0] == 0 or key.shape[0] == 0 or n == 0
  decode = (not empty and max_q <= _DECODE_MAX_Q and options.backend in ("AUTO", "XLA"))

  def kernel(query, key, value, scale, cu_q, cu_k, block_table, used, options=options,
             splits=num_splits):
    k, v = key, value
    if block_table is not None:  # the kernels read each sequence's pages in order
      k = key[block_table].reshape(-1, *key.shape[2:])
      v = value[block_table].reshape(-1, *value.shape[2:])
    return _attend(query, k, v, cu_q, cu_k, used, scale, splits=splits, options=options,
                   **static)

  args = (query, key, value, scale, cu_q, cu_k, block_table, used)
  if not decode:
    return kernel(*args)
  # The loop's gradients: the XLA kernel's backward (the loop runs where XLA does).
  on_kernel = functools.partial(kernel, options=dataclasses.replace(options, backend="XLA"),
                                splits=1)
  on_xla = functools.partial(_decode, *args, (max_q, window, num_splits), on_kernel)
  if options.backend == "XLA":
    return on_xla()
  # AUTO: the decode loop where XLA runs (CPUs), the fused kernels on GPUs and TPUs.
  return backends.per_platform(on_xla, {"cuda": functools.partial(kernel, *args),
                                        "tpu": functools.partial(kernel, *args)})()


def varlen_attn(
    query: ArrayLike,
    key: ArrayLike,
    value: ArrayLike,
    cu_seq_q: ArrayLike,
    cu_seq_k: ArrayLike | None,
    max_q: int,
    max_k: int,
    *,
    return_aux: AuxRequest | None = None,
    scale: ArrayLike | None = None,
    window_size: tuple[int, int] = (-1, -1),
    enable_gqa: bool = False,
    seqused_k: ArrayLike | None = None,
    block_table: ArrayLike | None = None,
    num_splits: int | None = None,
    kernel_options: dict[str, Any] | None = None,
) -> jax.Array | tuple[jax.Array, jax.Array]:
  """Attention over packed sequences of different lengths, as torch 2.13's ``varlen_attn``.

  Sequence ``i`` owns queries ``query[cu_seq_q[i]:cu_seq_q[i + 1]]`` and keys
  ``key[cu_seq_k[i]:cu_seq_k[i + 1]]`` (the first ``seqused_k[i]`` of them when
  ``seqused_k`` is given); its queries attend to its keys only. With
  ``window_size=(left, right)`` a query sees the keys from ``left`` before to
  ``right`` after its own position (``-1``: unbounded), where a sequence's
  queries are aligned with the *end* of its keys (FlashAttention's bottom-right
  rule): ``(-1, 0)`` is causal, and a single decode query sees its whole cache.
  For every query head ``h`` and key/value head ``h // (Hq // Hkv)``::

    out[t, h] = softmax over the visible keys s of (scale * query[t, h] @ key[s, h_kv]),
                @ value[s, h_kv]

  The kernel's tables come from the offsets (no padded ``(B, S)`` copy of the
  keys); short query runs (decode) split each sequence's keys across programs
  and merge the parts by logsumexp. Differentiable in ``query``, ``key``,
  ``value`` and ``scale`` (not through ``block_table``/``seqused_k``, as torch).
  On a CPU it runs (torch's raises NotImplementedError there).

  Args:
    query: ``(Tq, Hq, D)``: every sequence's queries, packed.
    key: ``(Tk, Hkv, D)``, or ``(pages, page_size, Hkv, D)`` with ``block_table``.
    value: ``(Tk, Hkv, Dv)``, or ``(pages, page_size, Hkv, Dv)`` with ``block_table``.
    cu_seq_q: ``(N + 1,)`` integer offsets of the sequences' queries: 0, then
      non-decreasing (may be traced under jit).
    cu_seq_k: ``(N + 1,)`` integer offsets of their keys (ignored with ``block_table``).
    max_q: the longest query run (a Python int; static).
    max_k: the longest key run (a Python int; static).
    return_aux: ``AuxRequest(lse=True)`` also returns the natural-log logsumexp.
    scale: factor of ``query @ key^T`` (a number or 0-d array, differentiable);
      default ``1 / sqrt(D)``.
    window_size: ``(left, right)`` FlashAttention window, ``-1`` unbounded.
    enable_gqa: allow ``Hkv < Hq`` (``Hkv`` must divide ``Hq``).
    seqused_k: ``(N,)`` integers: sequence ``i`` uses only its first
      ``seqused_k[i]`` keys (required with ``block_table``).
    block_table: ``(N, max_pages)`` integers: the pages of each sequence, in
      order, into the ``(pages, page_size, Hkv, D)`` pools ``key`` and ``value``.
    num_splits: split each sequence's keys into this many parts merged by
      logsumexp; ``1`` never splits (a sequence's result then does not depend
      on the rest of the batch); None lets jmat choose (for short query runs:
      one part on a CPU, whose decode loop is bound by reading the cache;
      enough parts to fill a GPU or TPU).
    kernel_options: jmat's addition (as flex attention's): ``{"BACKEND":
      "AUTO" | "XLA" | "TRITON" | "MOSAIC", "INTERPRET": bool, ...}``.

  Returns:
    ``out (Tq, Hq, Dv)`` in the query's dtype; with ``return_aux.lse`` also
    ``lse (Hq, Tq)`` in float32 (float64 for float64 inputs), ``-inf`` for a
    query that sees no key (whose output is 0).

  Raises:
    ShapeError: wrong ranks, sizes that disagree, ``Hq != Hkv`` without
      ``enable_gqa``, offsets that do not start at 0 or decrease (when
      concrete), a page index past the pool (when concrete), a window below -1.
    TypeError: non-floating or differing dtypes, non-integer offsets or tables.
    ValueError: ``block_table`` without ``seqused_k``, a bad ``num_splits``.

  Example:
    >>> q = k = v = jnp.ones((7, 4, 16))  # two sequences: 3 and 4 tokens
    >>> cu = jnp.array([0, 3, 7])
    >>> jmat.attention.varlen_attn(q, k, v, cu, cu, 4, 4, window_size=(-1, 0)).shape
    (7, 4, 16)
  """
  options = backends.kernel_options(_OP, kernel_options)
  query, key, value = (jnp.asarray(x) for x in checks.check_varlen_arrays(
      _OP, query, key, value))
  cu_seq_q = jnp.asarray(cu_seq_q)
  cu_seq_k = None if cu_seq_k is None else jnp.asarray(cu_seq_k)
  seqused_k = None if seqused_k is None else jnp.asarray(seqused_k)
  block_table = None if block_table is None else jnp.asarray(block_table)
  window = checks.check_varlen(
      _OP, query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, window_size, enable_gqa,
      seqused_k, block_table, num_splits, return_aux)
  out, lse = _varlen(query, key, value, cu_seq_q, cu_seq_k, seqused_k, block_table, scale,
                     max_q=int(max_q), max_k=int(max_k), window=window,
                     enable_gqa=enable_gqa, num_splits=num_splits, options=options)
  if return_aux is not None and return_aux.lse:
    return out, lse
  return out

