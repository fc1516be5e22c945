"""The block-sparse attention kernel's interface, shared by SDPA, flex and ring attention.

Queries are cut into blocks of ``block_q`` rows and keys into blocks of
``block_k``. A :class:`KeyBlocks` table lists, per query block, the key blocks
it visits: *full* ones (every pair allowed: no mask is evaluated) and
*partial* ones (the mask is evaluated per entry). Blocks in neither list are
never computed, so the work is proportional to the non-empty blocks.

Scores may be rewritten per block (``Mods.score``, e.g. a vmapped torch-style
``score_mod``) and masked per block (``Mods.mask``). What those functions read
besides positions comes in :class:`Operands`: ``whole`` is any pytree the mods
receive as it is (e.g. a bias table a ``score_mod`` captured), ``blocked`` a
tuple of 5-D arrays ``(M|1, R|1, G|1, L|1, S|1)`` that the kernel slices to the
current block (e.g. SDPA's dense masks). Every backend (``jmat._src.kernels``:
``xla``, the CPU default; ``triton`` for GPUs; ``mosaic`` for TPUs) takes the
same tables, mods and operands and gives the same ``(out, lse)`` and the
gradients of q, k, v, the scale and the float operands.

Layout: ``q (M, R, G, L, E)``, ``k (M, R, S, E)``, ``v (M, R, S, Ev)``. ``M``
indexes the rows of the block table (one per distinct block mask), ``R`` the
batch/head rows that share it, ``G`` the query heads that share one key/value
head (grouped-query attention; 1 otherwise).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jmat._src import online_softmax as osm


def ceil_div(a: int, b: int) -> int:
  """``ceil(a / b)`` for positive ``b``: the number of blocks of ``b`` that cover ``a``."""
  return -(-a // b)


def causal(q_pos, k_pos):
  """torch's causal rule: a key is visible when its position is at most the query's.

  The top-left-aligned ``tril(ones(L, S))`` of SDPA's ``is_causal`` for
  positions counted from 0; the block tables, SDPA's masks, ring attention and
  the ready ``jmat.mods.causal_mask`` all use this one rule. Broadcasts.
  """
  return k_pos <= q_pos


def block_for(n: int, block: int, *, dividing: bool = False) -> int:
  """The block size for a side of ``n`` rows, at most ``block``.

  A side no longer than ``block`` is one block of exactly ``n`` rows (no
  padding: decoding with ``L = 1`` computes one row, not ``block``). A longer
  side is cut into blocks of ``block`` (the last one padded), or, with
  ``dividing`` (ring attention, whose blocks travel without padding), of the
  largest divisor of ``n`` in ``(block / 8, block]``; ``n`` has none (a large
  prime, say), it stays one block: tiny tiles would cost more than they save.
  """
  n = max(n, 1)
  if n <= block or not dividing:
    return min(n, block)
  for size in range(block, block // 8, -1):
    if n % size == 0:
      return size
  return n


class Operands(NamedTuple):
  """What the mods read besides positions (every leaf an input of the kernel's custom_vjp).

  Attributes:
    whole: any pytree, passed to the mods as it is (captured tables, document ids).
    blocked: 5-D arrays ``(M|1, R|1, G|1, L|1, S|1)``, sliced to the current block.
  """

  whole: Any = ()
  blocked: tuple[Any, ...] = ()


class KeyBlocks(NamedTuple):
  """Per query block, the key blocks to visit: the arrays of a block mask.

  With ``indices`` and ``full_indices`` None the lists are ranges: full blocks
  ``0 .. full_num - 1``, then partial blocks ``full_num .. full_num + num - 1``
  (causal and unmasked attention: O(n_q) memory instead of O(n_q * n_k)).

  Attributes:
    num: ``(M, n_q)`` int32, how many partial key blocks each query block visits.
    indices: ``(M, n_q, n_k)`` int32, their indices first (ascending), then filler; or None.
    full_num: ``(M, n_q)`` int32, how many full key blocks.
    full_indices: ``(M, n_q, n_k)`` int32, their indices first, then filler; or None.
  """

  num: jax.Array
  indices: jax.Array | None
  full_num: jax.Array
  full_indices: jax.Array | None


def key_blocks_from_dense(partial: jax.Array, full: jax.Array) -> KeyBlocks:
  """A :class:`KeyBlocks` table from boolean ``(M, n_q, n_k)`` partial and full block maps.

  A block holding padding keys (past the true key length) must not be marked
  full: the kernel checks key bounds only in partial blocks.
  """

  def listed(which):
    order = jnp.argsort(jnp.logical_not(which), axis=-1, stable=True)
    return jnp.sum(which, axis=-1, dtype=jnp.int32), order.astype(jnp.int32)

  num, indices = listed(partial)
  full_num, full_indices = listed(full)
  return KeyBlocks(num, indices, full_num, full_indices)


def causal_key_blocks(
    q_len: int,
    kv_len: int,
    block_q: int,
    block_k: int,
    *,
    q_offset: int | jax.Array = 0,
    k_offset: int | jax.Array = 0,
) -> KeyBlocks:
  """The key blocks of torch's top-left causal mask, as ranges (``M = 1``).

  Query row ``r`` sits at position ``q_offset + r`` and key column ``c`` at
  ``k_offset + c`` (ring attention passes the offsets of its blocks); a key is
  visible when its position is at most the query's. Blocks wholly below the
  diagonal are full; a block holding padding keys (past ``kv_len``) never is,
  so the bound check runs there. Blocks above the diagonal are not listed.
  """
  n_q, n_k = ceil_div(q_len, block_q), ceil_div(kv_len, block_k)
  i = jnp.arange(n_q, dtype=jnp.int32)
  first_q = q_offset + i * block_q
  last_q = q_offset + jnp.minimum((i + 1) * block_q, q_len) - 1
  # By the causal rule, key block j is full iff its last key k_offset + (j + 1) * block_k - 1
  # is visible from first_q, and visible at all iff its first key k_offset + j * block_k is
  # visible from last_q.
  full = jnp.clip((first_q - k_offset + 1) // block_k, 0, kv_len // block_k)
  end = jnp.clip((last_q - k_offset) // block_k + 1, 0, n_k)
  partial = jnp.maximum(end - full, 0)
  return KeyBlocks(partial[None].astype(jnp.int32), None, full[None].astype(jnp.int32), None)


# What a (query block, key block) pair of a table is, in block_map's int32 map.
NEVER, PARTIAL, FULL = 0, 1, 2


def block_map(blocks: KeyBlocks, n_k: int) -> jax.Array:
  """The ``(M, n_q, n_k)`` int32 map of a table: NEVER visited, PARTIAL or FULL per block pair.

  Ranges (index lists None) are materialised; in index lists, the filler after
  the listed entries may repeat an index (a listed one stays marked) or lie past
  ``n_k`` (dropped).
  """
  t = jax.lax.iota(jnp.int32, n_k)

  def listed(num, indices, first):
    if indices is None:  # ranges: blocks first .. first + num - 1
      return (t >= first[..., None]) & (t < (first + num)[..., None])
    m, i, s = (jax.lax.broadcasted_iota(jnp.int32, indices.shape, a) for a in range(3))
    return jnp.zeros(num.shape + (n_k,), jnp.bool_).at[m, i, indices].max(
        s < num[..., None], mode="drop")

  full = listed(blocks.full_num, blocks.full_indices, jnp.zeros_like(blocks.full_num))
  partial = listed(blocks.num, blocks.indices, blocks.full_num)
  return jnp.where(full, FULL, jnp.where(partial, PARTIAL, NEVER)).astype(jnp.int32)


def key_major_blocks(blocks: KeyBlocks, n_k: int) -> KeyBlocks:
  """The key-major copy of a table: for every key block, its full and partial query blocks.

  What a dk/dv pass that loops over query blocks per key block reads (as
  splash attention's ``MaskInfo`` for its dkv kernel), so that no two programs
  write the same key block. ``n_k`` is the number of key blocks.

  Returns:
    A :class:`KeyBlocks` with ``num``/``full_num`` ``(M, n_k)`` and index lists ``(M, n_k, n_q)``.
  """
  by_key = jnp.swapaxes(block_map(blocks, n_k), 1, 2)
  return key_blocks_from_dense(by_key == PARTIAL, by_key == FULL)


def coarsen(blocks: KeyBlocks, n_k: int, factor_q: int, factor_k: int) -> KeyBlocks:
  """The table of blocks ``factor_q`` by ``factor_k`` times larger, from a finer one.

  A coarse block is full when every block inside it is, never visited when
  none is, partial otherwise (blocks past the fine table count as never
  visited, so a coarse block reaching past the sequence is never full: its
  padding is bounds-checked). The mask of a partial block is evaluated per
  entry, so any block size gives the same attention.
  """
  kinds = block_map(blocks, n_k)
  m, n_q = kinds.shape[:2]
  rows, cols = ceil_div(n_q, factor_q), ceil_div(n_k, factor_k)
  kinds = jnp.pad(kinds, ((0, 0), (0, rows * factor_q - n_q), (0, cols * factor_k - n_k)))
  kinds = kinds.reshape(m, rows, factor_q, cols, factor_k)
  full = jnp.all(kinds == 2, axis=(2, 4))
  return key_blocks_from_dense(jnp.any(kinds > 0, axis=(2, 4)) & ~full, full)


def dense_key_blocks(q_len: int, kv_len: int, block_q: int, block_k: int,
                     masked: bool = False) -> KeyBlocks:
  """Every key block for every query block, as ranges (``M = 1``).

  Full, except a block holding padding keys; with ``masked`` all are partial
  (a dense mask must be evaluated in every block).
  """
  n_q, n_k = ceil_div(q_len, block_q), ceil_div(kv_len, block_k)
  full = 0 if masked else kv_len // block_k
  return KeyBlocks(jnp.full((1, n_q), n_k - full, jnp.int32), None,
                   jnp.full((1, n_q), full, jnp.int32), None)


@dataclasses.dataclass(frozen=True)
class Mods:
  """How the kernel rewrites and masks a block of scores (static: part of the jit cache key).

  A backend calls them on a tile of ``R'`` rows and ``G'`` heads: all of them
  (the xla backend) or one row and one or all heads (the Pallas kernels), so
  the functions index what they read by ``r`` and ``g``, never by position in
  the tile, and capture no array (every array they read is an operand).

  Attributes:
    score: ``score(s, m, r, g, q_pos, k_pos, operands) -> s`` with ``s`` of
      shape ``(R', G', bq, bk)`` (already scaled), ``m`` the block table row
      (int32 scalar), ``r (R',)`` and ``g (G',)`` int32 the tile's rows and
      heads within their group, ``q_pos (bq,)`` and ``k_pos (bk,)`` int32
      positions, ``operands`` an :class:`Operands` with ``blocked`` sliced to
      the tile.
    mask: ``mask(m, r, g, q_pos, k_pos, operands)`` -> bool broadcastable to
      ``(R', G', bq, bk)``, True = may attend. Evaluated only in partial blocks.
    causal: what ``mask`` declares of torch's causal rule (:func:`causal` at the
      call's offsets): ``"exact"``, it is that rule; ``"within"``, it allows causal
      pairs only (the rule and something else, e.g. SDPA's ``is_causal`` with an
      ``attn_mask``); None, nothing. A kernel may then list causal tiles at its own
      tile instead of at the table's blocks.
  """

  score: Callable[..., jax.Array] | None = None
  mask: Callable[..., jax.Array] | None = None
  causal: Literal["exact", "within"] | None = None


@dataclasses.dataclass(frozen=True)
class Geometry:
  """Static sizes: true lengths (before padding) and block sizes."""

  q_len: int
  kv_len: int
  block_q: int
  block_k: int


def _static(default: Any = dataclasses.MISSING) -> Any:
  return dataclasses.field(default=default, metadata={"static": True})


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Call:
  """One call of the kernel, as every backend receives it (a pytree: static fields are aux data).

  Attributes:
    q: ``(M, R, G, L, E)`` queries.
    k: ``(M, R, S, E)`` keys.
    v: ``(M, R, S, Ev)`` values.
    blocks: the key blocks of every query block, in blocks of ``(block_q, block_k)``.
    operands: what the mods read.
    scale: the factor of ``q @ k^T``, a scalar array of the compute dtype (differentiable).
    mods: the score and mask functions.
    block_q: rows of a query block (of the tables).
    block_k: keys of a key block.
    needs_max: the caller also wants every query's largest score (flex's ``max_scores``).
    chains: the xla backend's CPU chains (see ``kernels.xla.forward_blocks``).
    q_offset: the position of query row 0 (int32 scalar, may be traced): what the mods see
      is ``q_offset + row``; ring attention's (query chunk, key chunk) pairs pass their
      chunks' global offsets. Bounds (padding) are checked on rows, not positions.
    k_offset: the position of key row 0.
  """

  q: jax.Array
  k: jax.Array
  v: jax.Array
  blocks: KeyBlocks
  operands: Operands
  scale: jax.Array
  mods: Mods = _static()
  block_q: int = _static()
  block_k: int = _static()
  needs_max: bool = _static(False)
  chains: int = _static(1)
  q_offset: jax.Array | int = 0
  k_offset: jax.Array | int = 0


def retiled(call: Call, block_q: int, block_k: int) -> Call:
  """``call`` on a table of ``(block_q, block_k)`` blocks, multiples of its own blocks."""
  if (block_q, block_k) == (call.block_q, call.block_k):
    return call
  n_k = ceil_div(call.k.shape[-2], call.block_k)
  blocks = coarsen(call.blocks, n_k, block_q // call.block_q, block_k // call.block_k)
  return dataclasses.replace(call, blocks=blocks, block_q=block_q, block_k=block_k)


def backward_queries(q: jax.Array, scale: jax.Array) -> jax.Array:
  """The queries the backward pass differentiates: ``q * scale`` in the compute dtype.

  Scaled once, whatever the input dtype (the forward pass scales half-precision
  score blocks instead), so the score block's gradient with respect to them is
  ``dS @ k`` without the factor: :func:`scale_gradients` turns it into the
  gradients of ``q`` and of ``scale``.
  """
  dtype = osm.compute_dtype(q.dtype)
  return q.astype(dtype) * scale.astype(dtype)


def scale_gradients(dq_scaled: jax.Array, q: jax.Array,
                    scale: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``(dq, d_scale)`` from the gradient with respect to the queries of :func:`backward_queries`.

  Scores are ``s = (q * scale) @ k^T``, so ``dq = scale * dq_scaled`` and
  ``d_scale = sum(q * dq_scaled)`` (a sum over this call's queries: callers
  that split the queries over devices add the parts up).
  """
  dtype = dq_scaled.dtype
  d_scale = jnp.sum(dq_scaled * q.astype(dtype))
  return dq_scaled * scale.astype(dtype), d_scale.astype(scale.dtype)


def backward_statistics(out: jax.Array, d_out: jax.Array, lse: jax.Array, d_lse: jax.Array,
                        dtype: Any) -> tuple[jax.Array, jax.Array]:
  """The per-row statistics a FlashAttention-2 backward reads: ``(delta, lse)`` in ``dtype``.

  ``delta = rowsum(d_out * out) - d_lse`` (the gradient of the output and of
  the lse through the softmax, so ``ds = p * (dp - delta)``), summed in
  ``dtype`` (the compute dtype, whatever ``out``'s). The forward's ``lse`` is
  ``-inf`` for a row that saw no key: it comes back ``+inf``, which makes that
  row's recomputed ``p = exp(s - lse)`` exactly 0 (no NaN from ``-inf - -inf``).

  Args:
    out: ``(..., rows, Ev)`` the forward's output.
    d_out: its cotangent, same shape.
    lse: ``(..., rows)`` the forward's logsumexp.
    d_lse: its cotangent, same shape.
    dtype: the compute dtype.
  """
  delta = jnp.sum(d_out.astype(dtype) * out.astype(dtype), axis=-1) - d_lse.astype(dtype)
  return delta, jnp.where(jnp.isneginf(lse), jnp.inf, lse)


def pad(x: jax.Array, axis: int, size: int, broadcast: bool = False) -> jax.Array:
  """Pads ``axis`` of ``x`` with zeros at the end to ``size`` (with ``broadcast``, a 1 stays 1)."""
  extra = size - x.shape[axis]
  if extra <= 0 or (broadcast and x.shape[axis] == 1):
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis % x.ndim] = (0, extra)
  return jnp.pad(x, widths)


def zero_cotangent(x):
  """A zero cotangent of ``x``: float0 for integer and boolean arrays."""
  x = jnp.asarray(x)
  if jnp.issubdtype(x.dtype, jnp.inexact):
    return jnp.zeros_like(x)
  return np.zeros(x.shape, jax.dtypes.float0)


def lowering_limitation(error: Exception) -> bool:
  """Whether a Pallas lowering's ``error`` says the kernel cannot express a call.

  An unimplemented primitive (``NotImplementedError``), a shape or block rule
  (``ValueError``) or Pallas' own lowering error: a reason to run the call on
  another backend. Anything else (a jmat bug, a missing device, a crash) says
  nothing about the call, so a kernel's ``unsupported`` lets it propagate.
  """
  if isinstance(error, ValueError) and "only AbstractMesh exists" in str(error):
    # jax 0.11 lowers part of a Pallas TPU call again without platforms when no device is
    # assigned (the probe's abstract mesh): the probe's environment, not the call.
    return False
  return (isinstance(error, NotImplementedError | ValueError)
          or type(error).__name__ in ("LoweringException", "LoweringError"))
