"""The ``xla`` backend of the block-sparse kernel: nested ``lax.fori_loop``s (the CPU default).

For each query block a loop over its listed key blocks (dynamic trip counts)
folds them into an online softmax (:mod:`jmat._src.online_softmax`); full
blocks skip the mask. A short query over many key blocks may be split-KV
(flash-decoding: :func:`split_blocks`, :func:`splits_for`): its list is cut
into parts walked side by side and merged by logsumexp. The backward pass
(FlashAttention-2's, in a ``jax.custom_vjp``) recomputes every block, so
memory stays O(L * E), and gives
the gradients of q, k, v, the scale and the float operands. Ring attention
calls :func:`forward_blocks` and :func:`backward_blocks` directly, one ring
step at a time. On a GPU or TPU the same program would run as a chain of tiny
kernels: there the Pallas backends (:mod:`jmat._src.kernels.triton`,
:mod:`jmat._src.kernels.mosaic`) run it fused.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, cast

import jax
import jax.numpy as jnp
from jax import lax

from jmat._src import online_softmax as osm
from jmat._src.block_sparse import (
    Call,
    Geometry,
    KeyBlocks,
    Mods,
    Operands,
    backward_queries,
    backward_statistics,
    ceil_div,
    pad,
    scale_gradients,
    zero_cotangent,
)


class _Tile(NamedTuple):
  """Where a score block sits: what :class:`Mods` functions receive besides the scores."""

  m: jax.Array
  r: jax.Array
  g: jax.Array
  q_pos: jax.Array
  k_pos: jax.Array


def _heads(q: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The ``r`` and ``g`` of every block of ``q (M, R, G, L, E)``: all rows and heads at once."""
  return lax.iota(jnp.int32, q.shape[1]), lax.iota(jnp.int32, q.shape[2])


def _row(x: jax.Array, m: jax.Array) -> jax.Array:
  """``x[m]`` (``x[0]`` if that dim is a broadcast 1)."""
  return x[0] if x.shape[0] == 1 else lax.dynamic_index_in_dim(x, m, 0, keepdims=False)


def _rows(x: jax.Array, start: jax.Array | int, size: int, axis: int) -> jax.Array:
  """``size`` entries of ``axis`` from ``start`` (the whole axis if it is a broadcast 1)."""
  if x.shape[axis] == 1:
    return x
  return lax.dynamic_slice_in_dim(x, start, size, axis % x.ndim)


def _put(x: jax.Array, part: jax.Array, m, start, axis: int, add: bool = False) -> jax.Array:
  """``x[m]`` with ``part`` written (or added) from ``start`` along ``axis`` (in place in loops)."""
  starts = [m] + [0] * (x.ndim - 1)
  starts[axis % x.ndim] = start
  starts = [jnp.asarray(s, jnp.int32) for s in starts]
  part = part[None]
  if add:
    part = part + lax.dynamic_slice(x, starts, part.shape)
  return lax.dynamic_update_slice(x, part.astype(x.dtype), starts)


def _operands_at(operands: Operands, m, row: jax.Array, col: jax.Array, geo: Geometry):
  """The operands the mods of block ``(m, rows from row, keys from col)`` see."""
  sliced = tuple(
      _rows(_rows(_row(x, m), row, geo.block_q, -2), col, geo.block_k, -1)
      for x in operands.blocked
  )
  return Operands(operands.whole, sliced)


def _block(x: jax.Array, m, col, size: int) -> jax.Array:
  """``x[m, :, col:col + size]`` of a 4-D ``x`` in one slice (broadcast 1s kept whole).

  Slicing the block straight from ``x`` (rather than ``x[m]``, then its rows) keeps XLA from
  copying the whole of row ``m`` inside the loop before the block is taken: a decoding step
  (one query block per row) read its K and V three times that way.
  """
  size, col = (1, 0) if x.shape[-2] == 1 else (size, col)
  starts = [jnp.asarray(s, jnp.int32) for s in (m if x.shape[0] > 1 else 0, 0, col, 0)]
  return lax.dynamic_slice(x, starts, (1, x.shape[1], size, x.shape[3]))[0]


def _key_block(k: jax.Array, v: jax.Array, m, j, geo: Geometry, k_offset):
  """Key block ``j`` of table row ``m``: ``(first column, keys, values, key positions)``."""
  col = j * geo.block_k
  k_j, v_j = _block(k, m, col, geo.block_k), _block(v, m, col, geo.block_k)
  return col, k_j, v_j, k_offset + col + lax.iota(jnp.int32, geo.block_k)


def _scores(q_i, k_j, scale, dtype, mods: Mods, tile: _Tile, ops: Operands) -> jax.Array:
  """One score block ``(R, G, bq, bk)``: ``q_i @ k_j^T`` (times ``scale``), then ``Mods.score``."""
  s = jnp.einsum("rgqe,rke->rgqk", q_i, k_j, preferred_element_type=dtype)
  if scale is not None:
    s = s * scale.astype(dtype)
  if mods.score is not None:
    s = mods.score(s, *tile, ops).astype(dtype)
  return s


def _allowed(mods: Mods, geo: Geometry, rows: jax.Array, tile: _Tile,
             ops: Operands) -> jax.Array:
  """Which entries of a partial block of key ``rows`` may attend: in bounds and allowed by
  ``Mods.mask``."""
  allowed = (rows < geo.kv_len)[None, None, None, :]
  if mods.mask is not None:
    allowed = allowed & mods.mask(*tile, ops)
  return allowed


def _visit(blocks: KeyBlocks, m, i, body, state):
  """Runs ``state = body(masked, j, state)`` over the full, then the partial key blocks."""

  def loop(masked, num, indices, first, state):
    def step(t, s):
      return body(masked, first + t if indices is None else indices[m, i, t], s)

    return lax.fori_loop(0, num[m, i], step, state)

  state = loop(False, blocks.full_num, blocks.full_indices, 0, state)
  return loop(True, blocks.num, blocks.indices, blocks.full_num[m, i], state)


def _visit_grouped(blocks: KeyBlocks, m, i, group: int, body, state):
  """:func:`_visit` taking ``group`` consecutive entries of a list per step.

  Runs ``state = body(masked, js (group,), valid (group,), state)``: entries past
  the end of a list repeat its last one and are not ``valid`` (the body masks
  them), so a step reads ``group`` listed blocks wherever they lie and the
  steps are ``group`` times fewer.
  """
  t = lax.iota(jnp.int32, group)

  def loop(masked, num, indices, first, state):
    count = num[m, i]

    def step(s, state):
      entry = s * group + t
      valid = entry < count
      entry = jnp.minimum(entry, jnp.maximum(count - 1, 0))
      js = first + entry if indices is None else indices[m, i, entry]
      return body(masked, js, valid, state)

    return lax.fori_loop(0, (count + group - 1) // group, step, state)

  state = loop(False, blocks.full_num, blocks.full_indices, 0, state)
  return loop(True, blocks.num, blocks.indices, blocks.full_num[m, i], state)


def split_blocks(blocks: KeyBlocks, n_k: int, parts: int) -> KeyBlocks:
  """The table cut into ``parts``: part ``p`` lists entries ``p * per ...`` of every list.

  Each query block's full and partial lists are cut into ``parts`` runs of
  ``per = ceil(num / parts)`` entries (the last ones shorter or empty), so every
  part visits about as many blocks. Returns explicit lists with a leading part
  axis: ``num (P, M, n_q)``, ``indices (P, M, n_q, n_k)`` (and the same for full).
  """
  t = lax.iota(jnp.int32, n_k)

  def split(num, indices, first):
    if indices is None:  # a range from first
      indices = jnp.minimum(first[..., None] + t, n_k - 1)
    per = (num + parts - 1) // parts
    counts, lists = [], []
    for p in range(parts):
      start = jnp.minimum(p * per, num)
      counts.append(jnp.clip(num - p * per, 0, per))
      at = jnp.minimum(start[..., None] + t, n_k - 1)
      lists.append(jnp.take_along_axis(jnp.broadcast_to(indices, at.shape), at, axis=-1))
    return jnp.stack(counts).astype(jnp.int32), jnp.stack(lists).astype(jnp.int32)

  full_num, full_indices = split(blocks.full_num, blocks.full_indices,
                                 jnp.zeros_like(blocks.full_num))
  num, indices = split(blocks.num, blocks.indices, blocks.full_num)
  return KeyBlocks(num, indices, full_num, full_indices)


def _visit_parts(parts: KeyBlocks, m, i, body, tile: osm.Carry) -> osm.Carry:
  """:func:`_visit` over the parts of :func:`split_blocks` at once, merged by logsumexp.

  Step ``t`` folds entry ``t`` of every part's list (``vmap`` over the parts: one
  batched product for all of them, so ``P`` times fewer sequential steps); a part
  whose list is shorter keeps its carry. Part 0 starts from ``tile``, the others
  from the empty carry.
  """
  count = parts.num.shape[0]
  empty = (jnp.zeros_like(tile[0]), jnp.full_like(tile[1], -jnp.inf), jnp.zeros_like(tile[2]))
  states = tuple(jnp.stack([x] + [e] * (count - 1)) for x, e in zip(tile, empty, strict=True))

  def loop(masked, num, indices, states):
    counts = num[:, m, i]

    def step(t, states):
      folded = jax.vmap(lambda j, s: body(masked, j, s))(indices[:, m, i, t], states)
      keep = t < counts
      return tuple(jnp.where(keep.reshape((-1,) + (1,) * (new.ndim - 1)), new, old)
                   for new, old in zip(folded, states, strict=True))

    return lax.fori_loop(0, jnp.max(counts), step, states)

  states = loop(False, parts.full_num, parts.full_indices, states)
  states = loop(True, parts.num, parts.indices, states)
  return osm.online_softmax_merge(states)


def forward_blocks(
    carry: osm.Carry,
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    blocks: KeyBlocks,
    operands: Operands,
    scale: jax.Array | None,
    *,
    mods: Mods,
    geo: Geometry,
    q_offset: int | jax.Array = 0,
    k_offset: int | jax.Array = 0,
    chains: int = 1,
    splits: int = 1,
    group: int = 1,
) -> osm.Carry:
  """Folds every listed key block into the online-softmax carry of its query block.

  Args:
    carry: ``(acc (M, R, G, Lp, Ev), row_max (M, R, G, Lp), row_sum)``.
    q: ``(M, R, G, Lp, E)`` with ``Lp`` a multiple of ``block_q``.
    k: ``(M, R, Sp, E)`` with ``Sp`` a multiple of ``block_k``.
    v: ``(M, R, Sp, Ev)``.
    blocks: the key blocks per query block.
    operands: ``(whole, blocked)`` for the mods.
    scale: multiplies ``q @ k^T``; None if ``q`` is already scaled.
    mods: the score and mask functions.
    geo: true lengths and block sizes.
    q_offset: the position of query row 0 (ring attention's block offset).
    k_offset: the position of key row 0.
    chains: splits a query block's rows into that many independent chains of
      online-softmax updates: XLA's CPU runtime runs independent ops concurrently,
      so the elementwise work of the chains (max, exp, sums: single-threaded per
      op) can use both cores of a 2-core machine (up to 1.3x faster forward,
      measured on one; results do not depend on it).
    splits: split-KV (flash-decoding): every query block's key blocks are cut into
      that many parts (:func:`split_blocks`) walked side by side, one batched step
      for all parts, and merged by logsumexp (:func:`_visit_parts`); ``chains`` is
      then 1. Results equal the unsplit loop's to rounding.
    group: a step folds that many consecutive entries of a list at once, read where
      they lie (:func:`_visit_grouped`; a CPU decode step's, :func:`decode_group`);
      ``chains`` is then 1, and ``splits`` takes precedence.

  Returns:
    The updated carry.
  """
  n_q = blocks.num.shape[1]
  bq = geo.block_q
  dtype = carry[0].dtype
  parts = split_blocks(blocks, ceil_div(k.shape[-2], geo.block_k), splits) if splits > 1 else None
  group = group if parts is None else 1
  chains = chains if bq % (8 * chains) == 0 and splits == 1 and group == 1 else 1
  heads = _heads(q)
  rows = bq // chains

  def query_block(mi, carry):
    m, i = (jnp.asarray(x, jnp.int32) for x in divmod(mi, n_q))
    row = i * bq
    q_i = _rows(_row(q, m), row, bq, -2)
    q_pos = q_offset + row + lax.iota(jnp.int32, bq)
    axes = (-2, -1, -1)  # the rows of acc, row_max and row_sum
    tile = tuple(_rows(_row(x, m), row, bq, axis) for x, axis in zip(carry, axes, strict=True))
    chain = [slice(c * rows, (c + 1) * rows) for c in range(chains)]
    tiles = tuple(tuple(x[..., part, :] if axis == -2 else x[..., part]
                        for x, axis in zip(tile, axes, strict=True)) for part in chain)

    def fold(masked, j, tiles):
      col, k_j, v_j, k_pos = _key_block(k, v, m, j, geo, k_offset)
      whole, sliced = _operands_at(operands, m, row, col, geo)
      updated = []
      for part, tile in zip(chain, tiles, strict=True):
        ops = Operands(whole, tuple(x if x.shape[-2] == 1 else x[..., part, :] for x in sliced))
        at = _Tile(m, *heads, q_pos[part], k_pos)
        s = _scores(q_i[..., part, :], k_j, scale, dtype, mods, at, ops)
        if masked:
          s = jnp.where(_allowed(mods, geo, col + lax.iota(jnp.int32, geo.block_k), at, ops),
                        s, -jnp.inf)
        updated.append(osm.online_softmax_fold(tile, s, v_j[:, None]))
      return tuple(updated)

    def fold_group(masked, js, valid, tile):
      cols = [js[t] * geo.block_k for t in range(group)]
      k_j, v_j = (jnp.concatenate([_block(x, m, col, geo.block_k) for col in cols], axis=-2)
                  for x in (k, v))
      rows = (js[:, None] * geo.block_k + lax.iota(jnp.int32, geo.block_k)).reshape(-1)
      at = _Tile(m, *heads, q_pos, k_offset + rows)
      ops = [_operands_at(operands, m, row, col, geo) for col in cols]
      ops = Operands(ops[0].whole, tuple(
          x[0] if x[0].shape[-1] == 1 else jnp.concatenate(x, axis=-1)
          for x in zip(*(o.blocked for o in ops), strict=True)))
      s = _scores(q_i, k_j, scale, dtype, mods, at, ops)
      keep = jnp.repeat(valid, geo.block_k)[None, None, None, :]
      if masked:
        keep = keep & _allowed(mods, geo, rows, at, ops)
      return osm.online_softmax_fold(tile, jnp.where(keep, s, -jnp.inf), v_j[:, None])

    if parts is not None:
      whole_tile = cast(osm.Carry, tile)
      tile = _visit_parts(parts, m, i, lambda masked, j, t: fold(masked, j, (t,))[0], whole_tile)
    elif group > 1:
      tile = _visit_grouped(blocks, m, i, group, fold_group, cast(osm.Carry, tile))
    else:
      tiles = _visit(blocks, m, i, fold, tiles)
      tile = tuple(jnp.concatenate([t[n] for t in tiles], axis=axes[n]) for n in range(3))
    return tuple(_put(x, t, m, row, axis) for x, t, axis in zip(carry, tile, axes, strict=True))

  return lax.fori_loop(0, blocks.num.shape[0] * n_q, query_block, carry)


def _float_leaves(tree) -> list[bool]:
  return [jnp.issubdtype(jnp.result_type(x), jnp.inexact) for x in jax.tree.leaves(tree)]


def _split(tree, which: list[bool]):
  leaves = jax.tree.leaves(tree)
  floats = [x for x, f in zip(leaves, which, strict=True) if f]
  return floats, [x for x, f in zip(leaves, which, strict=True) if not f]


def _merge(tree, which: list[bool], floats, others):
  floats, others = iter(floats), iter(others)
  leaves = [next(floats) if f else next(others) for f in which]
  return jax.tree.unflatten(jax.tree.structure(tree), leaves)


def _add_block(acc: jax.Array, block: jax.Array, m, row, col) -> jax.Array:
  """Adds a block's gradient into a blocked operand's accumulator (summing broadcast dims)."""
  block = block.reshape((1,) + block.shape) if block.ndim == acc.ndim - 1 else block
  axes = tuple(a for a in range(acc.ndim) if acc.shape[a] == 1 and block.shape[a] != 1)
  block = jnp.sum(block, axis=axes, keepdims=True) if axes else block
  starts = [jnp.asarray(s, jnp.int32) for s in (
      m if acc.shape[0] > 1 else 0, 0, 0, row if acc.shape[3] > 1 else 0,
      col if acc.shape[4] > 1 else 0)]
  current = lax.dynamic_slice(acc, starts, block.shape)
  return lax.dynamic_update_slice(acc, current + block.astype(acc.dtype), starts)


def backward_blocks(
    grads: tuple[jax.Array, jax.Array, jax.Array, list[jax.Array]],
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    blocks: KeyBlocks,
    operands: Operands,
    scale: jax.Array | None,
    d_out: jax.Array,
    lse: jax.Array,
    delta: jax.Array,
    *,
    mods: Mods,
    geo: Geometry,
    q_offset: int | jax.Array = 0,
    k_offset: int | jax.Array = 0,
):
  """Adds the gradients of every listed block: FlashAttention-2's backward, block by block.

  ``p = exp(s - lse)`` is recomputed per block; ``ds = p * (dp - delta)`` with
  ``dp = d_out @ v^T`` and ``delta = rowsum(d_out * out) - d_lse``; the score
  block's vector-Jacobian product (through ``Mods.score``) gives the gradients
  of ``q``, ``k`` and of the float operands.

  Args:
    grads: ``(dq, dk, dv, d_operands)`` accumulators: ``dq`` like ``q``, ``dk``
      and ``dv`` like ``k`` and ``v`` (compute dtype), ``d_operands`` a list of
      the float operand leaves' accumulators (whole leaves, then blocked ones).
    q, k, v, blocks, operands, scale: as :func:`forward_blocks`.
    d_out: ``(M, R, G, Lp, Ev)`` output cotangent, compute dtype.
    lse: ``(M, R, G, Lp)`` logsumexp of the forward pass, ``+inf`` where nothing was seen
      (``block_sparse.backward_statistics`` gives it and ``delta``).
    delta: ``(M, R, G, Lp)``.
    mods, geo, q_offset, k_offset: as :func:`forward_blocks`.

  Returns:
    The updated ``grads``.
  """
  n_q = blocks.num.shape[1]
  bq = geo.block_q
  dtype = d_out.dtype
  whole, blocked = operands
  heads = _heads(q)
  whole_float = _float_leaves(whole)
  whole_f, whole_o = _split(whole, whole_float)
  blocked_float = [jnp.issubdtype(x.dtype, jnp.inexact) for x in blocked]

  def query_block(mi, grads):
    dq, dk, dv, d_ops = grads
    m, i = (jnp.asarray(x, jnp.int32) for x in divmod(mi, n_q))
    row = i * bq
    q_i = _rows(_row(q, m), row, bq, -2)
    do_i = _rows(_row(d_out, m), row, bq, -2)
    lse_i, delta_i = (_rows(_row(x, m), row, bq, -1)[..., None] for x in (lse, delta))
    q_pos = q_offset + row + lax.iota(jnp.int32, bq)

    def fold(masked, j, state):
      dq_i, dk, dv, d_ops = state
      col, k_j, v_j, k_pos = _key_block(k, v, m, j, geo, k_offset)
      _, sliced = _operands_at(operands, m, row, col, geo)
      sliced_f, sliced_o = _split(list(sliced), blocked_float)

      tile = _Tile(m, *heads, q_pos, k_pos)

      def scores(q_i, k_j, whole_f, sliced_f):
        ops = Operands(_merge(whole, whole_float, whole_f, whole_o),
                       tuple(_merge(list(sliced), blocked_float, sliced_f, sliced_o)))
        return _scores(q_i, k_j, scale, dtype, mods, tile, ops)

      s, vjp = jax.vjp(scores, q_i, k_j, whole_f, sliced_f)
      if masked:
        # Masked before the exponent, as in the forward pass: exp(-inf - lse) is 0, so the
        # masked probabilities carry no gradient and nothing is selected again afterwards
        # (a select-then-multiply fusion of this loop crashes XLA:CPU's float64 AVX-512
        # code generation in jaxlib 0.10.2; README, known issues).
        rows = col + lax.iota(jnp.int32, geo.block_k)
        s = jnp.where(_allowed(mods, geo, rows, tile, Operands(whole, sliced)), s, -jnp.inf)
      p = jnp.exp(s - lse_i)
      dv_j = jnp.einsum("rgqk,rgqv->rkv", p, do_i, preferred_element_type=dtype)
      dp = jnp.einsum("rgqv,rkv->rgqk", do_i, v_j.astype(dtype), preferred_element_type=dtype)
      dq_b, dk_j, d_whole, d_sliced = vjp(p * (dp - delta_i))
      dk = _put(dk, dk_j.astype(dtype), m, col, -2, add=True)
      dv = _put(dv, dv_j, m, col, -2, add=True)
      n_whole = len(d_whole)
      d_ops = [a + g.astype(a.dtype) for a, g in zip(d_ops[:n_whole], d_whole, strict=True)] + [
          _add_block(a, g, m, row, col) for a, g in zip(d_ops[n_whole:], d_sliced, strict=True)]
      return dq_i + dq_b.astype(dtype), dk, dv, d_ops

    dq_i = jnp.zeros_like(q_i, dtype=dtype)
    dq_i, dk, dv, d_ops = _visit(blocks, m, i, fold, (dq_i, dk, dv, d_ops))
    return _put(dq, dq_i, m, row, -2, add=True), dk, dv, d_ops

  return lax.fori_loop(0, blocks.num.shape[0] * n_q, query_block, grads)


def prescale(q: jax.Array, scale: jax.Array) -> tuple[jax.Array, jax.Array | None]:
  """``(q * scale, None)`` when ``q`` is in its compute dtype, else ``(q, scale)``.

  Scaling the ``(L, E)`` queries once instead of every ``(L, S)`` score block
  saves a pass over each block (as torch's math kernel, which scales q before
  the product); half-precision queries keep their dtype and are scaled per block.
  """
  dtype = osm.compute_dtype(q.dtype)
  if q.dtype == dtype:
    return q * scale.astype(dtype), None
  return q, scale


def _forward(q, k, v, blocks, operands, scale, offsets, mods: Mods, geo: Geometry,
             chains: int, splits: int, group: int):
  dtype = osm.compute_dtype(q.dtype)
  q_s, rest = prescale(q, scale)
  carry = osm.online_softmax_init(q.shape[:3], q.shape[3], v.shape[-1], dtype=dtype)
  carry = forward_blocks(carry, q_s, k, v, blocks, operands, rest, mods=mods, geo=geo,
                         q_offset=offsets[0], k_offset=offsets[1], chains=chains,
                         splits=splits, group=group)
  return osm.online_softmax_finish(carry, q.dtype), osm.online_softmax_logsumexp(carry), carry[1]


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9, 10, 11))
def _attend(q, k, v, blocks, operands, scale, offsets, mods: Mods, geo: Geometry, chains: int,
            splits: int, group: int):
  return _forward(q, k, v, blocks, operands, scale, offsets, mods, geo, chains, splits, group)


def _attend_fwd(q, k, v, blocks, operands, scale, offsets, mods, geo, chains, splits, group):
  out, lse, row_max = _forward(q, k, v, blocks, operands, scale, offsets, mods, geo, chains,
                               splits, group)
  return (out, lse, row_max), (q, k, v, blocks, operands, scale, offsets, out, lse)


def _attend_bwd(mods: Mods, geo: Geometry, chains: int, splits: int, group: int, residuals,
                cotangents):
  del chains, splits, group  # the backward pass has none of them (it walks the whole table)
  q, k, v, blocks, operands, scale, offsets, out, lse = residuals
  d_out, d_lse, _ = cotangents  # the row maxima are returned without gradient
  dtype = lse.dtype
  d_out = d_out.astype(dtype)
  delta, lse = backward_statistics(out, d_out, lse, d_lse, dtype)
  whole, blocked = operands
  floats = [x for x in jax.tree.leaves(whole) + list(blocked)
            if jnp.issubdtype(x.dtype, jnp.inexact)]
  grads = (jnp.zeros(q.shape, dtype), jnp.zeros(k.shape, dtype), jnp.zeros(v.shape, dtype),
           [jnp.zeros(x.shape, dtype) for x in floats])
  dq, dk, dv, d_floats = backward_blocks(
      grads, backward_queries(q, scale), k, v, blocks, operands, None, d_out, lse, delta,
      mods=mods, geo=geo, q_offset=offsets[0], k_offset=offsets[1])
  dq, d_scale = scale_gradients(dq, q, scale)
  d_floats = iter(d_floats)

  def cotangent(x):
    return next(d_floats).astype(x.dtype) if jnp.issubdtype(x.dtype, jnp.inexact) else (
        zero_cotangent(x))

  d_operands = Operands(jax.tree.map(cotangent, whole), tuple(cotangent(x) for x in blocked))
  return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype),
          jax.tree.map(zero_cotangent, blocks), d_operands, d_scale,
          jax.tree.map(zero_cotangent, offsets))


_attend.defvjp(_attend_fwd, _attend_bwd)



def attend(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    blocks: KeyBlocks,
    operands: Operands,
    scale: jax.Array,
    *,
    mods: Mods,
    block_q: int,
    block_k: int,
    chains: int = 1,
    splits: int = 1,
    group: int = 1,
    with_max: bool = False,
    q_offset: int | jax.Array = 0,
    k_offset: int | jax.Array = 0,
) -> tuple[jax.Array, ...]:
  """Block-sparse attention of ``q (M, R, G, L, E)`` over ``k, v (M, R, S, E|Ev)``.

  Pads L and S to whole blocks (padding keys are masked), runs the kernel and
  its custom backward, and returns ``(out (M, R, G, L, Ev), lse (M, R, G, L))``
  with ``out`` in q's dtype and ``lse`` (natural log, ``-inf`` for a query that
  sees no key) in the compute dtype. ``blocks`` must list blocks of
  ``(block_q, block_k)`` and never mark full a block that holds padding keys
  (bounds are checked in partial blocks only); blocked operands are
  ``(M|1, R|1, G|1, L|1, S|1)``;
  ``chains``, ``splits`` and ``group``: see :func:`forward_blocks`. With ``with_max`` also every
  query's largest score ``(M, R, G, L)`` (``-inf`` where it saw no key; no
  gradient flows through it, as torch's ``max_scores``). ``q_offset`` and
  ``k_offset``: the positions of query and key row 0 (see
  :class:`~jmat._src.block_sparse.Call`).
  """
  length, keys = q.shape[-2], k.shape[-2]
  geo = Geometry(length, keys, block_q, block_k)
  lp, sp = ceil_div(length, block_q) * block_q, ceil_div(keys, block_k) * block_k
  blocked = tuple(pad(pad(x, -2, lp, True), -1, sp, True) for x in operands.blocked)
  out, lse, row_max = cast(tuple[jax.Array, jax.Array, jax.Array], _attend(
      pad(q, -2, lp), pad(k, -2, sp), pad(v, -2, sp), blocks, Operands(operands.whole, blocked),
      jnp.asarray(scale), (jnp.asarray(q_offset, jnp.int32), jnp.asarray(k_offset, jnp.int32)),
      mods, geo, chains, splits, group))
  if with_max:
    return out[..., :length, :], lse[..., :length], lax.stop_gradient(row_max[..., :length])
  return out[..., :length, :], lse[..., :length]


# Split-KV on the XLA loops (see forward_blocks), per platform, for a query of at most one block
# against at least _SPLIT_MIN_BLOCKS key blocks. On a CPU the loops are bound by memory
# bandwidth and no split measured faster (docs/inference.md); on a GPU or TPU (where the XLA
# loops are the fallback of the fused kernels) every loop step is a chain of small kernel
# launches, so fewer, larger steps are the point of flash-decoding.
_SPLIT_MIN_BLOCKS = 8
SPLITS = {"cpu": 1, "cuda": 16, "tpu": 16}


def splits_for(call: Call, platform: str, split_kv: int | None = None) -> int:
  """How many parts :func:`run` cuts the key blocks of ``call`` into on ``platform``.

  ``split_kv`` (torch's ``SPLIT_KV`` kernel option) asks for that many parts; by
  default :data:`SPLITS` of the platform where the keys are long. Only short
  queries (one query block) are split, never into more parts than key blocks.
  """
  n_k = ceil_div(call.k.shape[-2], call.block_k)
  if call.q.shape[-2] > call.block_q:
    return 1
  if split_kv is not None:
    return max(1, min(split_kv, n_k))
  parts = SPLITS.get(platform, SPLITS["cpu"])
  if parts <= 1 or n_k < _SPLIT_MIN_BLOCKS:
    return 1
  return min(parts, n_k // 2)


# A decode step on a CPU (a query of one block) folds list entries of about this many bytes of
# keys at once (all rows of the block: 8 heads x 1024 keys x 128 in float32): the loops copy
# every block they read (XLA:CPU materialises a dynamic slice), and a step's copies and products
# of that size stay in the cores' caches; flex over a cache of 32768 keys with a mask of
# 128-key blocks took 56 ms in 256 steps, 45 ms in 32 (docs/inference.md).
CPU_DECODE_BYTES = 4 << 20
# A decode step: a query of one block and at most this many rows (varlen's short query runs
# too), so that a step's scores stay as small as its keys.
DECODE_MAX_Q = 16


def decode_group(call: Call, platform: str) -> int:
  """How many list entries a step of :func:`forward_blocks` folds for ``call`` on ``platform``:
  about :data:`CPU_DECODE_BYTES` of keys for a CPU decode step (at least one entry), else 1."""
  if platform != "cpu" or call.q.shape[-2] > min(call.block_q, DECODE_MAX_Q):
    return 1
  _, rows, _, dim = call.k.shape
  entry = rows * call.block_k * max(dim, 1) * call.k.dtype.itemsize
  return max(1, min(CPU_DECODE_BYTES // entry, ceil_div(call.k.shape[-2], call.block_k)))


def run(call: Call, *, platform: str = "cpu", split_kv: int | None = None):
  """:func:`attend` on a :class:`~jmat._src.block_sparse.Call` lowered for ``platform``:
  ``(out, lse[, max])``; ``split_kv``: see :func:`splits_for`; ``group``: :func:`decode_group`."""
  return attend(call.q, call.k, call.v, call.blocks, call.operands, call.scale, mods=call.mods,
                block_q=call.block_q, block_k=call.block_k, chains=call.chains,
                splits=splits_for(call, platform, split_kv), group=decode_group(call, platform),
                with_max=call.needs_max,
                q_offset=call.q_offset, k_offset=call.k_offset)
