"""The Pallas Mosaic (TPU) backend of the block-sparse attention kernel.

A drop-in for :func:`jmat._src.kernels.xla.run` (same tables in, same
``(out, lse)`` and gradients out), written as three Pallas TPU kernels after
splash attention (``jax/experimental/pallas/ops/tpu/splash_attention/``):

* the forward pass and the dq pass walk the table query-major: a grid
  ``(M, R, query tile, step)`` whose steps are the listed key blocks (full
  ones, then partial ones) read from scalar-prefetched step tables
  (:mod:`jmat._src.kernels.mosaic_tables`: int8/int16, coarsened to tiles of
  up to 512 and until they fit SMEM, as many steps as the longest list when
  the table is known while tracing, or when a ``BlockMask`` built from known
  tables recorded a bound on it: :class:`jmat._src.block_mask.ListBounds`).
  The tables drive the BlockSpec index maps, so unlisted key blocks are never
  fetched; steps past a query block's list re-point at its last listed block
  (nothing new is fetched) and skip compute. The online-softmax carry
  ``(m, l, acc)`` lives in VMEM scratch, set at the first step and finished
  at the last;
* the dk/dv pass walks a key-major copy of the same table (per key block, its
  full and partial query blocks), so every gradient block is written by one
  program and nothing needs atomics;
* a decode step (one query tile per row) with fewer programs than a chip has
  TensorCores splits the forward's key list into shares walked by programs of
  their own (a parallel grid axis ``(M, R, query tile, split, step)``), merged by
  their lse outside the kernel (flash-decoding, :attr:`Tiling.key_splits`); the
  backward runs unsplit.

The mods run in the kernels as far as a TPU can run them: each is traced at the
tile shapes, and what it reads of the whole operands by a position of one side,
a head or a row (document ids ``ids[q_idx]``, ``ids[b, kv_idx]``, ALiBi slopes
``slopes[h]``) is computed outside the kernels, O(L + S), and read per grid step
as a blocked operand is (:mod:`jmat._src.kernels.mosaic_mods`); a read depending on both
positions (``table[h, kv_idx - q_idx + D]``) is refused by :func:`unsupported`.

One program handles a query block of all ``G`` query heads of a key/value head
(grouped-query attention): queries and everything per query row are grouped as
``(M, R, n_q, G * tile_q, D)`` outside the kernels, so the K/V tile fetched
once serves the ``G`` heads and every product is one 2-D matmul; the query tile
is cut below the table's block when ``G`` times it would not fit VMEM. The
online softmax statistics are kept lane-replicated (``(rows, 128)``) in VMEM,
as splash does; ``lse`` and ``delta`` travel through HBM one value per row.

TPU tiling: the query tile is a multiple of 8 rows (sublanes), the key tile a
multiple of 128 (lanes), and head dims are padded to multiples of 128 lanes; a
length shorter than its block is one block, padded by the kernel. Compute
dtype: float32 for half and single precision inputs (float64 for float64,
which only interpret mode runs): scores, statistics and sums. The products
take their operands in the input dtype (``p`` cast to v's, bf16 products at
the MXU's rate), and the output is written in it; when differentiated, a
half-precision output keeps what rounding lost beside it, and the dq pass
corrects the scale's gradient for what ``p``'s rounding leaves in ``delta``
(see :func:`_dq_kernel`). ``q_offset``/``k_offset`` shift the positions the
mods see (ring attention's chunk pairs). ``interpret=True`` runs the kernels
on CPU.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, cast

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from jmat._src import online_softmax as osm
from jmat._src.block_mask import BoundedKeyBlocks
from jmat._src.block_sparse import (
    Call,
    KeyBlocks,
    Mods,
    backward_statistics,
    coarsen,
    lowering_limitation,
    pad,
    zero_cotangent,
)
from jmat._src.kernels.mosaic_mods import (
  Hoisted,
  Plan,
  in_kernel,
  make_plan,
  narrowed,
  outside_values,
)
from jmat._src.kernels.mosaic_tables import (
  DEFAULT_TILING,
  LANES,
  PREFIX,
  SUBLANES,
  BlockSizes,
  Geometry,
  Interpret,
  Steps,
  Tiling,
  block_steps,
  geometry,
  longest_lists,
  tile_kinds,
)

__all__ = ["LANES", "SUBLANES", "BlockSizes", "Interpret", "Tiling", "run", "unsupported"]


def _is_float(x) -> bool:
  return bool(jnp.issubdtype(x.dtype, jnp.inexact))


def _group(x: jax.Array, tile: int) -> jax.Array:
  """``(M, R, G, n * tile, D)`` -> ``(M, R, n, G * tile, D)``: a program's rows contiguous."""
  m, r, g, length, d = x.shape
  x = x.reshape(m, r, g, length // tile, tile, d).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(m, r, length // tile, g * tile, d)


def _ungroup(x: jax.Array, groups: int) -> jax.Array:
  """The inverse of :func:`_group`."""
  m, r, n, rows, d = x.shape
  x = x.reshape(m, r, n, groups, rows // groups, d).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(m, r, groups, n * rows // groups, d)


def _lanes(x: jax.Array, width: int) -> jax.Array:
  """A lane-replicated ``(rows, 128)`` statistic widened to ``(rows, width)``."""
  return jnp.tile(x, (1, width // LANES))


# --- inside the kernels -------------------------------------------------------------------


class _Inputs(NamedTuple):
  """The arrays of one pallas_call (their refs inside the kernel); None where a pass needs none.

  Query-side arrays are grouped ``(M, R, n_q, G * tile_q, D)``; ``lse`` and ``delta`` are
  ``(M, R, n_q, 1, G * tile_q)``, one value per row.
  """

  scale: Any
  q: Any
  k: Any
  v: Any
  blocked: tuple
  hoisted: list  # the mods' values computed outside (:class:`Hoisted`), in the plan's order
  d_out: Any = None
  lse: Any = None
  delta: Any = None
  d_lse: Any = None  # the lse's cotangent, as lse (the dq pass's correction)
  zeros: list | None = None  # aliased to the blocked operands' gradients: unvisited tiles stay 0


class _Tile(NamedTuple):
  """What the mods get of a grid step: table row, batch row, heads, query and key positions
  (shifted by the call's offsets), and the keys' rows in this call (for the bounds check)."""

  m: jax.Array
  rows: jax.Array
  heads: jax.Array
  q_pos: jax.Array
  k_pos: jax.Array
  k_row: jax.Array


def _tile_at(m, r, i, j, offsets, geo: Geometry) -> _Tile:
  # Each index vector is made in the layout the mods broadcast it back to (queries down the
  # sublanes, keys along the lanes, heads on a leading dim), so the two reshapes cancel.
  def iota(shape, axis, start=0):
    return (start + lax.broadcasted_iota(jnp.int32, shape, axis)).reshape(-1)

  k_row = iota((1, geo.tile_k), 1, j * geo.tile_k)
  q_offset, k_offset = (offsets[np.int32(n)] for n in range(2))  # 32-bit indices under x64 too
  return _Tile(m, jnp.full((1, 1, 1, 1), r, jnp.int32).reshape(-1), iota((1, geo.groups, 1, 1), 1),
               iota((geo.tile_q, 1), 0, q_offset + i * geo.tile_q), k_offset + k_row, k_row)


def _dot(a: jax.Array, b: jax.Array, contract: tuple[int, int], dtype) -> jax.Array:
  """``a`` times ``b`` over dims ``contract``: ``a`` cast to ``b``'s dtype, sums in ``dtype``.

  Single-precision products ask for full precision (not bfloat16 passes).
  """
  precision = lax.Precision.HIGHEST if jnp.dtype(b.dtype).itemsize >= 4 else None
  return lax.dot_general(a.astype(b.dtype), b, (((contract[0],), (contract[1],)), ((), ())),
                         precision=precision, preferred_element_type=dtype)


def _merge(values: list, flags: Sequence[bool], chosen: list) -> list:
  """``values`` with the entries where ``flags`` holds replaced, in order, by ``chosen``."""
  chosen_iter = iter(chosen)
  return [next(chosen_iter) if flag else x for x, flag in zip(values, flags, strict=True)]


class _Scores(NamedTuple):
  """A step's scores as a function of what they are differentiated in, and the mods' inputs.

  ``score(qk, scale, hoisted_diff, blocked_diff)`` is the score mod of ``scale * qk`` with the
  float values it reads in ``hoisted_diff`` (its values computed outside) and ``blocked_diff``
  (blocked tiles), both empty if not differentiated.
  """

  score: Callable[..., jax.Array]
  scale: jax.Array
  hoisted_diff: list
  blocked_diff: list
  blocked: list  # the blocked tiles (R' = 1, G|1, bq|1, bk|1)
  mask_hoisted: list  # the tiles of the mask mod's values computed outside


def _scores_at(ins: _Inputs, at: _Tile, plan: Plan, dtype, sides: Sequence[str | None] = (),
               wrt_blocked: bool = False) -> _Scores:
  """The score function of a step, differentiable in the float values the score mod computes
  outside for the grid ``sides`` (None: for all blocks) and, with ``wrt_blocked``, in the
  float blocked operands."""
  blocked = [ref[...][None] for ref in ins.blocked]
  hoisted = [ref[...].reshape(h.shape) for ref, h in zip(ins.hoisted, plan.hoisted, strict=True)]
  n_score = len(plan.score_hoisted)
  score_hoisted = hoisted[:n_score]
  hoisted_flags = [h.is_float and h.side in sides for h in plan.score_hoisted]
  blocked_flags = [f and wrt_blocked for f in plan.blocked_float]

  def score(qk, scale, hoisted_diff, blocked_diff):
    s = qk * scale
    if plan.score is None:
      return s
    args = (s, at.m, at.rows, at.heads, at.q_pos, at.k_pos)
    return in_kernel(plan.score, args, _merge(blocked, blocked_flags, blocked_diff),
                      _merge(score_hoisted, hoisted_flags, hoisted_diff), plan.narrow).astype(dtype)

  return _Scores(score, ins.scale[...].reshape(()).astype(dtype),
                 [x for x, f in zip(score_hoisted, hoisted_flags, strict=True) if f],
                 [x for x, f in zip(blocked, blocked_flags, strict=True) if f],
                 blocked, hoisted[n_score:])


def _products(ins: _Inputs, geo: Geometry, dtype) -> jax.Array:
  """``q @ k^T`` of a step as ``(1, G, tile_q, tile_k)``, the mods' layout."""
  qk = _dot(ins.q[...], ins.k[...], (1, 1), dtype)
  return qk.reshape(1, geo.groups, geo.tile_q, geo.tile_k)


def _masked(s: jax.Array, at: _Tile, plan: Plan, geo: Geometry, scores: _Scores,
            mask: bool, bounds: bool) -> jax.Array:
  """``s`` at ``-inf`` where a key is padding (with ``bounds``) or the mask mod refuses it."""
  allowed = None
  if bounds:
    allowed = (at.k_row < geo.kv_len)[None, None, None, :]
  if mask and plan.mask is not None:
    by_mod = in_kernel(plan.mask, (at.m, at.rows, at.heads, at.q_pos, at.k_pos), scores.blocked,
                        scores.mask_hoisted, plan.narrow)
    allowed = by_mod if allowed is None else allowed & by_mod
  return s if allowed is None else jnp.where(allowed, s, -jnp.inf)


def _walk(step: Callable[[bool, bool], None], where: _Position, geo: Geometry) -> None:
  """Runs ``step(mask, bounds)`` at a listed step: full blocks skip the mask, partial ones not."""
  t = where.t
  pl.when(t < where.full)(lambda: step(False, geo.bounds_in_full))
  pl.when((t >= where.full) & (t < where.count))(lambda: step(True, geo.bounds))


def _listed_step(ids: Sequence[Any], steps: int, splits: int) -> tuple:
  """``(m, r, outer block, step in its list)`` of grid ids ``(m, r, outer, t)``, or of a
  key-split grid's ``(m, r, outer, split, t)`` whose split ``s`` walks steps ``s * per`` to
  ``(s + 1) * per - 1`` of the ``steps`` of its list (``per = steps / splits``)."""
  if splits == 1:
    return tuple(ids)
  m, r, outer, split, t = ids
  return m, r, outer, split * (steps // splits) + t


def _blocks_of_step(index, m, outer, t, key_major: bool) -> tuple:
  """``(query block, key block)`` of a step: its grid's outer block and the block it lists."""
  listed = index[m, outer, t].astype(jnp.int32)
  return (listed, outer) if key_major else (outer, listed)


class _Position(NamedTuple):
  """Where a grid step is (inside a kernel): its tile, step (in its outer block's list), its
  outer block's counts, and whether it is the first or last step of its program."""

  at: _Tile
  t: jax.Array
  full: jax.Array
  count: jax.Array
  first: jax.Array
  last: jax.Array


def _grid_position(tables: Steps, geo: Geometry, key_major: bool) -> _Position:
  """The :class:`_Position` of the current grid step, from the scalar-prefetched ``tables``."""
  axes = 4 if geo.key_splits == 1 else 5
  ids = [pl.program_id(axis) for axis in range(axes)]
  m, r, outer, t = _listed_step(ids, tables.index.shape[-1], geo.key_splits)
  i, j = _blocks_of_step(tables.index, m, outer, t, key_major)
  full, count = (x[m, outer].astype(jnp.int32) for x in (tables.full, tables.count))
  return _Position(_tile_at(m, r, i, j, tables.offsets, geo), t, full, count, ids[-1] == 0,
                   ids[-1] == pl.num_programs(axes - 1) - 1)


def _forward_kernel(index, full, count, offsets, ins: _Inputs, out, lse, low, row_max, row_sum,
                    acc, *, plan: Plan, geo: Geometry):
  """The output, lse, and with ``low`` (a list of one ref, else empty) what rounding the output
  to its half-precision dtype lost, in that dtype (the backward's ``delta``)."""
  where = _grid_position(Steps(index, full, count, offsets), geo, key_major=False)
  at = where.at
  dtype = acc.dtype

  @pl.when(where.first)
  def _init():
    row_max[...] = jnp.full(row_max.shape, -jnp.inf, dtype)
    row_sum[...] = jnp.zeros(row_sum.shape, dtype)
    acc[...] = jnp.zeros(acc.shape, dtype)

  def step(mask: bool, bounds: bool):
    scores = _scores_at(ins, at, plan, dtype)
    s = scores.score(_products(ins, geo, dtype), scores.scale, [], [])
    s = _masked(s, at, plan, geo, scores, mask, bounds).reshape(geo.rows, geo.tile_k)
    old_max = row_max[...]
    new_max = jnp.maximum(old_max, jnp.max(s, axis=-1, keepdims=True))
    # While a row has seen no key its maximum is -inf; shifting by 0 then keeps
    # exp(-inf - shift) = 0 rather than exp(-inf + inf) = NaN.
    shift = jnp.where(new_max == -jnp.inf, 0.0, new_max)
    p = jnp.exp(s - _lanes(shift, geo.tile_k))
    rescale = jnp.exp(old_max - shift)
    row_sum[...] = rescale * row_sum[...] + jnp.sum(p, axis=-1, keepdims=True)
    row_max[...] = new_max
    # p @ v on v's dtype (bfloat16 products at the MXU's rate for half-precision inputs), summed
    # in the compute dtype, as splash and FlashAttention do.
    weighted = _dot(p, ins.v[...], (1, 0), dtype)
    acc[...] = _lanes(rescale, acc.shape[-1]) * acc[...] + weighted

  _walk(step, where, geo)

  @pl.when(where.last)
  def _finish():
    total = row_sum[...]
    seen = osm.seen_a_key(total)
    safe = jnp.where(seen, total, 1.0)
    result = acc[...] / _lanes(safe, acc.shape[-1])
    out[...] = result.astype(out.dtype)
    for ref in low:
      ref[...] = (result - out[...].astype(result.dtype)).astype(ref.dtype)
    # One value per row, the rows along the lanes: the column's transpose, row 0.
    lse[...] = jnp.where(seen, row_max[...] + jnp.log(safe), -jnp.inf).T[:1]


class _BackwardTile(NamedTuple):
  """A step's probabilities and gradients of ``q @ k^T`` (``(rows, tile_k)``), and the
  gradients of the scale and of the float values the score mod reads (their tile's part)."""

  p: jax.Array
  d_qk: jax.Array
  d_scale: jax.Array
  d_hoisted: list
  d_blocked: list
  d_s_sum: jax.Array | None = None
  p_slope: jax.Array | None = None


def _backward_tile(ins: _Inputs, at: _Tile, plan: Plan, geo: Geometry, mask: bool,
                   bounds: bool, sides: Sequence[str | None], wrt_blocked: bool,
                   row_sums: bool = False) -> _BackwardTile:
  """``p = exp(s - lse)``, ``dS = p * (dP - delta)`` and its vjp through the scale and mods.

  The scale's gradient is the vjp's too, ``sum(dS' * q @ k^T)`` summed in the compute dtype,
  so half-precision matmul inputs do not round it. ``sides`` and ``wrt_blocked`` choose the
  operand values differentiated (:func:`_scores_at`). With ``row_sums``, also the per-row sums
  of ``dS`` and of ``p * ds/dscale`` (``(rows, 1)``, for :func:`_dq_kernel`'s correction).
  """
  dtype = ins.lse.dtype
  scores = _scores_at(ins, at, plan, dtype, sides, wrt_blocked)
  qk = _products(ins, geo, dtype)
  s, vjp = jax.vjp(scores.score, qk, scores.scale, scores.hoisted_diff, scores.blocked_diff)
  # Masked before the exponent: exp(-inf - lse) is 0, so masked entries carry no gradient.
  s = _masked(s, at, plan, geo, scores, mask, bounds).reshape(geo.rows, geo.tile_k)
  p = jnp.exp(s - _column(ins.lse))
  d_p = _dot(ins.d_out[...], ins.v[...], (1, 1), dtype)
  d_s = p * (d_p - _column(ins.delta))
  d_qk, d_scale, d_hoisted, d_blocked = vjp(d_s.reshape(1, geo.groups, geo.tile_q, geo.tile_k))
  tile = _BackwardTile(p, d_qk.reshape(geo.rows, geo.tile_k), d_scale, d_hoisted, d_blocked)
  if not row_sums:
    return tile
  if plan.score is None:
    slope = qk
  else:
    _, slope = jax.jvp(lambda scale: scores.score(qk, scale, scores.hoisted_diff,
                                                  scores.blocked_diff),
                       (scores.scale,), (jnp.ones_like(scores.scale),))
  slope = jnp.where(p > 0, p * slope.reshape(p.shape), 0.0)
  return tile._replace(d_s_sum=jnp.sum(d_s, axis=-1, keepdims=True),
                       p_slope=jnp.sum(slope, axis=-1, keepdims=True))


def _column(ref) -> jax.Array:
  """A ``(1, rows)`` statistic (one value per query row) as a ``(rows, 1)`` column."""
  return ref[...].reshape(-1, 1)


def _accumulate(refs: Sequence[Any], grads: Sequence[jax.Array]) -> None:
  for ref, grad in zip(refs, grads, strict=True):
    ref[...] += grad.reshape(ref.shape).astype(ref.dtype)


def _dq_kernel(index, full, count, offsets, ins: _Inputs, dq, d_sums, d_blocked, dq_acc,
               d_s_sum, p_slope, *, plan: Plan, geo: Geometry):
  """dq, and per program the partial sums of the gradients of the scale and of the score mod's
  float values computed outside for every block or per query block (``d_sums``), and the
  blocked float operands' gradient tiles (``d_blocked``).

  The scale's gradient is corrected for ``delta``'s rounding: exactly, a row's ``dS`` sums to
  its ``d_lse`` (``delta = rowsum(p * dP) - d_lse``), but ``delta`` comes from a rounded output
  (half-precision ``p @ v`` and output), so the row sums' differences ``e`` from ``d_lse`` are
  the error; the scale's gradient, a sum that mostly cancels, would be off by
  ``sum_rows(e * rowsum(p * ds/dscale))``: subtracted.
  """
  where = _grid_position(Steps(index, full, count, offsets), geo, key_major=False)

  @pl.when(where.first)
  def _init():
    # Also the gradient tile of a query block that lists nothing, written back as it is.
    for ref in (dq_acc, *d_sums, *d_blocked, d_s_sum, p_slope):
      ref[...] = jnp.zeros(ref.shape, ref.dtype)

  def step(mask: bool, bounds: bool):
    tile = _backward_tile(ins, where.at, plan, geo, mask, bounds, (None, "q"), wrt_blocked=True,
                          row_sums=True)
    dq_acc[...] += _dot(tile.d_qk, ins.k[...], (1, 0), dq_acc.dtype)
    d_s_sum[...] += tile.d_s_sum
    p_slope[...] += tile.p_slope
    _accumulate(d_sums, (tile.d_scale, *tile.d_hoisted))
    for ref, grad in zip(d_blocked, tile.d_blocked, strict=True):
      # A key-broadcast operand's tile is every step's; a per-key one is this step's alone.
      grad = grad[0].astype(ref.dtype)
      ref[...] = ref[...] + grad if ref.shape[-1] == 1 else grad

  _walk(step, where, geo)

  @pl.when(where.last)
  def _finish():
    dq[...] = dq_acc[...].astype(dq.dtype)
    error = d_s_sum[...] - _column(ins.d_lse)  # exactly, dS sums to d_lse per row
    d_sums[0][...] -= jnp.sum(error * p_slope[...]).reshape(d_sums[0].shape)


def _dkv_kernel(index, full, count, offsets, ins: _Inputs, dk, dv, d_keys, dk_acc, dv_acc, *,
                plan: Plan, geo: Geometry):
  """dk, dv, and per key block the gradients of the score mod's float values computed outside
  per key block (``d_keys``)."""
  where = _grid_position(Steps(index, full, count, offsets), geo, key_major=True)

  @pl.when(where.first)
  def _init():
    for ref in (dk_acc, dv_acc, *d_keys):
      ref[...] = jnp.zeros(ref.shape, ref.dtype)

  def step(mask: bool, bounds: bool):
    tile = _backward_tile(ins, where.at, plan, geo, mask, bounds, ("k",), wrt_blocked=False)
    dv_acc[...] += _dot(tile.p, ins.d_out[...], (0, 0), dv_acc.dtype)
    dk_acc[...] += _dot(tile.d_qk, ins.q[...], (0, 0), dk_acc.dtype)
    _accumulate(d_keys, tile.d_hoisted)

  _walk(step, where, geo)

  @pl.when(where.last)
  def _finish():
    dk[...] = dk_acc[...].astype(dk.dtype)
    dv[...] = dv_acc[...].astype(dv.dtype)


# --- the pallas_calls ---------------------------------------------------------------------


def _spec(block_shape, where: Callable[..., tuple], key_major: bool,
          splits: int = 1) -> pl.BlockSpec:
  """A BlockSpec whose index map ``where(m, r, i, j)`` sees the listed block of each step (of a
  grid whose lists are cut into ``splits`` shares, see :func:`_listed_step`)."""

  def index_map(*args):
    *ids, index, _, _, _ = args
    m, r, outer, t = _listed_step(ids, index.shape[-1], splits)
    return where(m, r, *_blocks_of_step(index, m, outer, t, key_major))

  return pl.BlockSpec(block_shape, index_map)


def _query_spec(block: tuple[int, ...], key_major: bool, splits: int = 1) -> pl.BlockSpec:
  """The spec of ``(M, R, n_q, *block)`` arrays: one block per query block (grouped rows)."""
  return _spec((None, None, None, *block), lambda m, r, i, j: (m, r, i) + (0,) * len(block),
               key_major, splits)


def _split_spec(block: tuple[int, ...], splits: int) -> pl.BlockSpec:
  """The spec of a key-split forward's ``(M, R, n_q * splits, *block)`` partial results: one
  block per (query tile, split)."""
  return pl.BlockSpec((None, None, None, *block),
                      lambda m, r, i, split, t, *tables: (m, r, i * splits + split)
                      + (0,) * len(block))


def _key_spec(geo: Geometry, width: int, key_major: bool, shared: bool = False) -> pl.BlockSpec:
  """The spec of ``(M, R, S, width)`` arrays: one block per key block; with ``shared``, of a
  ``(1, R, S, width)`` pool every table row reads (no copy per row)."""
  return _spec((None, None, geo.tile_k, width),
               lambda m, r, i, j: (0 if shared else m, r, j, 0), key_major, geo.key_splits)


def _blocked_block(x: jax.Array, geo: Geometry) -> tuple[int, int, int]:
  """The ``(G|1, bq|1, bk|1)`` tile of a ``(M|1, R|1, G|1, L|1, S|1)`` blocked operand."""
  return (x.shape[2], geo.tile_q if x.shape[3] > 1 else 1, geo.tile_k if x.shape[4] > 1 else 1)


def _blocked_where(x: jax.Array) -> Callable[..., tuple]:
  """Its index map: broadcast dims stay at block 0."""
  return lambda m, r, i, j: (m if x.shape[0] > 1 else 0, r if x.shape[1] > 1 else 0, 0,
                             i if x.shape[3] > 1 else 0, j if x.shape[4] > 1 else 0)


def _hoisted_where(h: Hoisted) -> Callable[..., tuple]:
  """The index map of a value computed outside, ``(M|1, R|1, n|1, *block)``: its tile at the
  step's table row, batch row and block of its side (broadcast dims stay at block 0)."""

  def where(m, r, i, j):
    n = i if h.side == "q" else j if h.side == "k" else 0
    return (m if h.per_m else 0, r if h.per_r else 0, n) + (0,) * len(h.block)

  return where


def _in_specs(ins: _Inputs, geo: Geometry, plan: Plan, key_major: bool) -> _Inputs:
  """The BlockSpecs of a pass's inputs (None where the input is None)."""

  splits = geo.key_splits
  shared = ins.k.shape[0] != ins.q.shape[0]  # one key/value pool for every table row

  def rows_spec(x):
    return None if x is None else _query_spec((geo.rows, x.shape[-1]), key_major, splits)

  def stats_spec(x):
    return None if x is None else _query_spec((1, geo.rows), key_major, splits)

  return _Inputs(
      scale=_spec(ins.scale.shape, lambda m, r, i, j: (0, 0), key_major, splits),
      q=rows_spec(ins.q),
      k=_key_spec(geo, ins.k.shape[-1], key_major, shared),
      v=_key_spec(geo, ins.v.shape[-1], key_major, shared),
      blocked=tuple(_spec((None, None, *_blocked_block(x, geo)), _blocked_where(x), key_major,
                          splits) for x in ins.blocked),
      hoisted=[_spec((None, None, None, *h.block), _hoisted_where(h), key_major, splits)
               for h in plan.hoisted],
      d_out=rows_spec(ins.d_out), lse=stats_spec(ins.lse), delta=stats_spec(ins.delta),
      d_lse=stats_spec(ins.d_lse),
      zeros=None if ins.zeros is None else [pl.BlockSpec(memory_space=pl.ANY)
                                            for _ in ins.zeros])


def _cost(ins: _Inputs, out_shape, grid: tuple[int, ...], geo: Geometry,
          width: int) -> pl.CostEstimate:
  """What a pass costs, for XLA's scheduler: per grid step, products of ``width`` summed widths
  (e.g. ``E + Ev`` for the forward's ``q @ k^T`` and ``p @ v``) over a ``rows x tile_k`` tile,
  one exponential per score; every operand and result read or written once (a bound from
  below: key tiles are read once per query tile)."""
  steps = math.prod(grid)
  scores = steps * geo.rows * geo.tile_k
  moved = sum(x.size * jnp.dtype(x.dtype).itemsize
              for x in jax.tree.leaves((ins, out_shape)) if hasattr(x, "dtype"))
  return pl.CostEstimate(flops=2 * scores * width, transcendentals=scores,
                         bytes_accessed=int(moved))


def _call(kernel, name: str, steps: Steps, ins: _Inputs, out_shape, out_specs, scratch,
          geo: Geometry, plan: Plan, key_major: bool, width: int,
          aliases: dict[int, int] | None = None):
  """One pallas_call on the grid ``(M, R, outer block, step)`` of ``steps`` (``width``: the
  summed widths of a step's products, for its cost)."""
  rows, outer, inner = steps.index.shape
  splits = geo.key_splits
  # A key-split grid's splits are an axis of their own (each writes its own partial result).
  grid = (rows, ins.q.shape[1], outer) + ((inner,) if splits == 1 else (splits, inner // splits))
  # The axes before the steps write disjoint blocks: cores may split them; steps run in order.
  params = pltpu.CompilerParams(
      dimension_semantics=("parallel",) * (len(grid) - 1) + ("arbitrary",),
      vmem_limit_bytes=geo.vmem_limit)
  return pl.pallas_call(
      functools.partial(kernel, plan=plan, geo=geo),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=len(steps), grid=grid,
          in_specs=[_in_specs(ins, geo, plan, key_major)], out_specs=out_specs,
          scratch_shapes=scratch),
      out_shape=out_shape, compiler_params=params, interpret=geo.interpret,
      cost_estimate=_cost(ins, out_shape, grid, geo, width),
      input_output_aliases=aliases or {}, name=name)(*steps, ins)




def _forward(q, k, v, blocks: KeyBlocks, blocked, hoisted, scale, offsets, plan: Plan,
             geo: Geometry, residual: bool):
  """``out (M, R, n_q, rows, Ev)`` in q's dtype, ``lse (M, R, n_q, 1, rows)`` and, with
  ``residual`` and a half-precision q, the output's rounding error (else None)."""
  dtype = osm.compute_dtype(q.dtype)
  rows, splits = geo.rows, geo.key_splits
  per = pl.cdiv(geo.steps_q or geo.n_k, splits)  # steps of a split
  steps = block_steps(tile_kinds(blocks, geo), offsets, per * splits)
  m, r, tiles = q.shape[:3]
  low = residual and jnp.dtype(q.dtype).itemsize < jnp.dtype(dtype).itemsize
  if splits == 1:
    out_spec, lse_spec = _query_spec((rows, v.shape[-1]), False), _query_spec((1, rows), False)
  else:  # partial results per split, in the compute dtype, merged below
    out_spec, lse_spec = _split_spec((rows, v.shape[-1]), splits), _split_spec((1, rows), splits)
  out_struct = jax.ShapeDtypeStruct((m, r, tiles * splits, rows, v.shape[-1]),
                                    q.dtype if splits == 1 else dtype)
  kernel_low = low and splits == 1
  out, lse, lows = _call(
      _forward_kernel, "jmat_block_sparse_fwd", steps,
      _Inputs(scale.reshape(1, 1), q, k, v, tuple(blocked), list(hoisted)),
      (out_struct, jax.ShapeDtypeStruct((m, r, tiles * splits, 1, rows), dtype),
       [out_struct] * kernel_low),
      (out_spec, lse_spec, [out_spec] * kernel_low),
      [pltpu.VMEM((rows, LANES), dtype), pltpu.VMEM((rows, LANES), dtype),
       pltpu.VMEM((rows, v.shape[-1]), dtype)],
      geo, plan, key_major=False, width=q.shape[-1] + v.shape[-1])
  if splits == 1:
    return out, lse, (lows[0] if lows else None)
  merged, lse = osm.merge_parts(out.reshape(m, r, tiles, splits, rows, -1),
                                lse.reshape(m, r, tiles, splits, rows), 3)  # flash-decoding's
  out = merged.astype(q.dtype)
  return out, lse[..., None, :], ((merged - out.astype(dtype)).astype(q.dtype) if low else None)


@functools.partial(jax.custom_vjp, nondiff_argnums=(8, 9))
def _attend(q, k, v, blocks, blocked, hoisted, scale, offsets, plan: Plan, geo: Geometry):
  out, lse, _ = _forward(q, k, v, blocks, blocked, hoisted, scale, offsets, plan, geo, False)
  return out, lse


def _attend_fwd(q, k, v, blocks, blocked, hoisted, scale, offsets, plan, geo):
  # A half-precision output keeps what rounding lost beside it (in its dtype): the backward's
  # delta = rowsum(dO * O) then has float32's precision, which the scale's gradient (a sum that
  # mostly cancels) needs, at the memory cost of a float32 output only when differentiated.
  out, lse, low = _forward(q, k, v, blocks, blocked, hoisted, scale, offsets, plan, geo, True)
  return (out, lse), (q, k, v, blocks, blocked, hoisted, scale, offsets, out, low, lse)


def _blocked_gradient(grad: jax.Array, x: jax.Array) -> jax.Array:
  """A blocked operand's gradient from the dq pass's ``(M, R, n_q, G|1, bq|1, S|1)`` tiles."""
  if x.shape[3] > 1:
    m, r, n, g, rows, keys = grad.shape
    grad = grad.transpose(0, 1, 3, 2, 4, 5).reshape(m, r, g, n * rows, keys)
  else:
    grad = jnp.sum(grad, axis=2)
  broadcast = tuple(axis for axis in (0, 1) if x.shape[axis] == 1)
  return jnp.sum(grad, axis=broadcast, keepdims=True).astype(x.dtype)


def _hoisted_gradient(grad: jax.Array, x: jax.Array) -> jax.Array:
  """A value computed outside: its gradient ``(M|1, R|1, n|1, *block)`` from per-program
  ``(M, R, n, *block)`` tiles (summed over the dims it is broadcast along)."""
  broadcast = tuple(axis for axis in (0, 1, 2) if x.shape[axis] == 1)
  return jnp.sum(grad, axis=broadcast, keepdims=True).astype(x.dtype)


def _attend_bwd(plan: Plan, geo: Geometry, residuals, cotangents):
  geo = dataclasses.replace(geo, key_splits=1)  # the forward's key split is the forward's own
  q, k, v, blocks, blocked, hoisted, scale, offsets, out, low, lse = residuals
  d_out, d_lse = cotangents
  dtype = lse.dtype
  lead = q.shape[:3]  # (M, R, n_q): one partial sum or gradient tile per dq program
  out = out.astype(dtype) if low is None else out.astype(dtype) + low.astype(dtype)
  # lse and d_lse hold one value per row along the lanes, (M, R, n_q, 1, rows); out and d_out
  # one row per sublane, (M, R, n_q, rows, Ev): delta comes out as lse is.
  delta, lse = backward_statistics(out, d_out, lse[..., 0, :], d_lse[..., 0, :], dtype)
  delta, lse = delta[..., None, :], lse[..., None, :]
  kinds = tile_kinds(blocks, geo)

  # The score mod's float values computed outside: those for every block or per query block
  # get their gradients from the dq pass, those per key block from the dk/dv pass.
  diff = [(n, h.side) for n, h in enumerate(plan.score_hoisted) if h.is_float]
  by_queries = [n for n, side in diff if side != "k"]
  by_keys = [n for n, side in diff if side == "k"]
  summed = [(1, 1)] + [hoisted[n].shape[3:] for n in by_queries]
  tiled = [x for x, f in zip(blocked, plan.blocked_float, strict=True) if f]
  zeros = [jnp.zeros((*lead, *_blocked_block(x, geo)[:2], geo.padded_k if x.shape[4] > 1 else 1),
                     dtype) for x in tiled]
  # The cotangent of an output of q's dtype, back in it (losslessly) for the matmuls.
  ins = _Inputs(scale.reshape(1, 1), q, k, v, tuple(blocked), list(hoisted),
                d_out=d_out.astype(q.dtype), lse=lse, delta=delta, zeros=zeros,
                d_lse=d_lse.astype(dtype))
  steps = block_steps(kinds, offsets, geo.steps_q)
  first_zero = len(steps) + len(jax.tree.leaves(ins)) - len(zeros)  # after the prefetched tables

  dq, d_sums, d_tiles = _call(
      _dq_kernel, "jmat_block_sparse_dq", steps, ins,
      (jax.ShapeDtypeStruct(q.shape, q.dtype),
       [jax.ShapeDtypeStruct((*lead, *block), dtype) for block in summed],
       [jax.ShapeDtypeStruct(x.shape, dtype) for x in zeros]),
      (_query_spec((geo.rows, q.shape[-1]), False),
       [_query_spec(block, False) for block in summed],
       [_spec((None, None, None, *_blocked_block(x, geo)),
              lambda m, r, i, j, keys=x.shape[4]: (m, r, i, 0, 0, j if keys > 1 else 0), False)
        for x in tiled]),
      [pltpu.VMEM((geo.rows, q.shape[-1]), dtype), pltpu.VMEM((geo.rows, 1), dtype),
       pltpu.VMEM((geo.rows, 1), dtype)], geo, plan, key_major=False,
      width=2 * q.shape[-1] + v.shape[-1],
      aliases={first_zero + n: 1 + len(summed) + n for n in range(len(zeros))})

  key_blocks = [hoisted[n].shape[3:] for n in by_keys]
  # A pool shared by every table row gets its gradient per row (in the compute dtype), summed.
  shared = k.shape[0] != q.shape[0]
  rows_k = (q.shape[0], *k.shape[1:-1])
  # The key-major walk transposes the kinds map itself, not through block_sparse.key_major_blocks:
  # the grid reads narrow-integer step tables (mosaic_tables.block_steps), not index lists.
  dk, dv, d_keys = _call(
      _dkv_kernel, "jmat_block_sparse_dkv", block_steps(kinds.swapaxes(1, 2), offsets, geo.steps_k),
      ins._replace(zeros=None, d_lse=None),
      tuple(jax.ShapeDtypeStruct((*rows_k, x.shape[-1]), dtype if shared else x.dtype)
            for x in (k, v))
      + ([jax.ShapeDtypeStruct((*rows_k[:2], geo.n_k, *block), dtype) for block in key_blocks],),
      (_key_spec(geo, k.shape[-1], True), _key_spec(geo, v.shape[-1], True),
       [_spec((None, None, None, *block),
              lambda m, r, i, j, block=block: (m, r, j) + (0,) * len(block), True)
        for block in key_blocks]),
      [pltpu.VMEM((geo.tile_k, k.shape[-1]), dtype), pltpu.VMEM((geo.tile_k, v.shape[-1]), dtype)],
      geo, plan, key_major=True, width=2 * (k.shape[-1] + v.shape[-1]))

  if shared:
    dk, dv = (jnp.sum(d, axis=0, keepdims=True).astype(x.dtype) for d, x in ((dk, k), (dv, v)))
  d_hoisted = [jnp.zeros_like(x) if _is_float(x) else zero_cotangent(x) for x in hoisted]
  for n, grad in zip(by_queries + by_keys, d_sums[1:] + d_keys, strict=True):
    d_hoisted[n] = _hoisted_gradient(grad, hoisted[n])
  d_tiles = iter(d_tiles)
  d_blocked = tuple(_blocked_gradient(next(d_tiles), x) if _is_float(x) else zero_cotangent(x)
                    for x in blocked)
  d_scale = jnp.sum(d_sums[0]).reshape(scale.shape).astype(scale.dtype)
  return (dq, dk, dv, jax.tree.map(zero_cotangent, blocks), d_blocked, d_hoisted, d_scale,
          zero_cotangent(offsets))


_attend.defvjp(_attend_fwd, _attend_bwd)


def run(call: Call, *, interpret: Interpret = False,
        tiling: Tiling = DEFAULT_TILING) -> tuple[jax.Array, jax.Array]:
  """Block-sparse attention of ``call``: ``q (M, R, G, L, E)`` over ``k, v (M|1, R, S, E|Ev)``.

  Keys and values of ``M = 1`` are one pool every table row reads (flex's key/value batch of 1
  against a query batch, a paged cache): indexed by the kernels, never copied per row.

  The Mosaic backend of the interface of :mod:`jmat._src.block_sparse`, with its
  contract: ``call.blocks`` lists blocks of ``(block_q, block_k)`` and never marks
  full a block holding padding keys; blocked operands are
  ``(M|1, R|1, G|1, L|1, S|1)``; returns ``(out (M, R, G, L, Ev), lse (M, R, G, L))``,
  ``out`` in q's dtype, ``lse`` (natural log, ``-inf`` for a query that sees no
  key, whose output row is 0) in the compute dtype. Differentiable in q, k, v,
  ``scale`` and the float operand leaves.

  Args:
    call: the call (its ``needs_max`` and ``chains`` are the xla backend's only), in table
      blocks of ``block_q`` by ``block_k`` (see :class:`BlockSizes` for the valid sizes). Its
      ``q_offset`` and ``k_offset`` (Python ints or traced int32 scalars: ring attention's chunk
      offsets) are the positions of row 0: the mods see ``q_offset + row``; the tables and the
      key bounds stay in this call's rows.
    interpret: run the kernels in Pallas interpret mode (on CPU): True, or
      ``pltpu.InterpretParams(...)`` for the TPU interpreter's checks.
    tiling: how the kernels tile the call within a TPU core's memories (:class:`Tiling`).

  Raises:
    ValueError: if the block sizes cannot tile the lengths on TPU, ``blocks`` has the wrong
      number of rows or query blocks, or the call cannot fit a TPU core's memories (the
      message names the limit and the fix).
  """
  q, k, v, blocks, operands, scale = call.q, call.k, call.v, call.blocks, call.operands, call.scale
  block_q, block_k, mods = call.block_q, call.block_k, call.mods
  table_rows, _, groups, length, _ = q.shape
  keys = k.shape[-2]
  BlockSizes(block_q, block_k).tiles(length, keys)
  n_q, n_k = pl.cdiv(length, block_q), pl.cdiv(keys, block_k)
  if blocks.num.shape != (table_rows, n_q):
    raise ValueError(
        f"{PREFIX}the table has shape {tuple(blocks.num.shape)}; q of shape {tuple(q.shape)} "
        f"with block_q={block_q} needs {(table_rows, n_q)} (M, query blocks)")
  geo = geometry(q.shape, k.shape, v.shape[-1], q.dtype, block_q, block_k, tiling, interpret)
  factors = (geo.block_q // block_q, geo.block_k // block_k)
  with jax.ensure_compile_time_eval():  # a table known while tracing stays known
    if factors != (1, 1):
      blocks = coarsen(blocks, n_k, *factors)
    longest = longest_lists(blocks, geo.n_k)
  if longest is None and (isinstance(call.blocks, BoundedKeyBlocks)
                         and call.blocks.bounds is not None):
    # A traced table (a BlockMask passed to a jitted function) with the static bounds its mask
    # recorded when built: those of the coarsening the kernel walks, if recorded.
    longest = call.blocks.bounds.at(*factors, n_q, n_k)
  if longest is not None:  # the grid walks the longest list, no more (splash's shrunk grid)
    geo = dataclasses.replace(geo, steps_q=longest[0], steps_k=longest[1] * geo.split)
  splits = tiling.splits(table_rows * q.shape[1] * geo.q_tiles, geo.q_tiles,
                         geo.steps_q or geo.n_k)
  geo = dataclasses.replace(geo, key_splits=splits)
  tile_q = geo.tile_q
  q_rows, k_rows = geo.padded_q, geo.padded_k
  e, ev = (pl.cdiv(x.shape[-1], LANES) * LANES for x in (q, v))
  dtype = osm.compute_dtype(q.dtype)
  whole, blocked = operands
  leaves, treedef = jax.tree.flatten(whole)
  leaves = [jnp.asarray(x) for x in leaves]
  blocked = tuple(pad(pad(jnp.asarray(x), -2, q_rows, True), -1, k_rows, True) for x in blocked)
  plan = _plan_of(mods, geo, leaves, treedef, blocked, dtype)
  if plan.narrow:
    blocked = tuple(x.astype(narrowed(x.dtype)) for x in blocked)
  offsets = jnp.stack([jnp.asarray(call.q_offset, jnp.int32),
                       jnp.asarray(call.k_offset, jnp.int32)])
  hoisted = [x for split in (plan.score, plan.mask) if split is not None
             for x in outside_values(split, leaves, geo, offsets, table_rows, q.shape[1],
                                      plan.narrow)]
  out, lse = cast(tuple[jax.Array, jax.Array], _attend(
      _group(pad(pad(q, -2, q_rows), -1, e), tile_q), pad(pad(k, -2, k_rows), -1, e),
      pad(pad(v, -2, k_rows), -1, ev), blocks, blocked, hoisted,
      jnp.asarray(scale).astype(dtype), offsets, plan, geo))
  out = _ungroup(out, groups)[..., :length, :v.shape[-1]]
  return out, _ungroup(jnp.swapaxes(lse, -1, -2), groups)[..., :length, 0]


def _plan_of(mods: Mods, geo: Geometry, leaves: Sequence[Any], treedef, blocked: Sequence[Any],
             dtype) -> Plan:
  """The :class:`Plan` of a call with whole leaves ``leaves`` and (padded) blocked operands
  ``blocked`` (arrays or their avals)."""
  narrow = jnp.dtype(dtype).itemsize < 8

  def aval(shape, dtype):
    return jax.ShapeDtypeStruct(tuple(shape), narrowed(dtype) if narrow else np.dtype(dtype))

  return make_plan(mods, geo.groups, geo.tile_q, geo.tile_k, treedef,
               tuple(jax.ShapeDtypeStruct(x.shape, x.dtype) for x in leaves),
               tuple(aval((1, *_blocked_block(x, geo)), x.dtype) for x in blocked),
               np.dtype(dtype), narrow)


def _aval(x) -> tuple[tuple[int, ...], str]:
  return tuple(jnp.shape(x)), str(jnp.result_type(x))


def unsupported(call: Call, *, probe: bool = True) -> str | None:
  """Why the TPU kernel cannot run this attention, or None if it can.

  Refuses block sizes the TPU cannot tile, float64 (Mosaic has none), mods
  that read a whole operand at an index depending on both the query and the
  key position (``table[h, kv_idx - q_idx + D]``: a gather the kernel cannot
  make, whose tiles would take O(L * S) memory outside it), and anything else
  the Mosaic compiler cannot lower: the forward pass and the gradient are
  lowered for TPU once per shape signature (well under a second, cached), for
  a v5e whatever the machine asking (see :data:`_PROBE_DEVICE`).
  Mods that read whole operands by one position, head or row
  (``ids[q_idx] == ids[kv_idx]``, ``ids[b, q_idx]``, ``slopes[h]``) run: what
  they read is computed outside the kernels (:mod:`jmat._src.kernels.mosaic_mods`).

  Args:
    call: the call of :func:`run` (its arrays, or anything with ``shape`` and ``dtype``;
      the tables and the scale are not read).
    probe: lower the kernels for TPU to find what Mosaic refuses (off in
      interpret mode, which lowers nothing for TPU).

  Raises:
    Exception: a lowering that fails for another reason than the kernel's
      limits (a jmat bug, a crash): see :func:`~jmat._src.block_sparse.lowering_limitation`.
  """
  q, k, v, block_q, block_k = call.q, call.k, call.v, call.block_q, call.block_k
  length, keys = q.shape[-2], k.shape[-2]
  problem = BlockSizes(block_q, block_k).problem(length, keys)
  if problem is not None:
    return problem
  if any(jnp.dtype(x.dtype) == jnp.float64 for x in (q, k, v)):
    return ("jmat block-sparse attention, mosaic (TPU) backend: TPUs have no float64 "
            "(use float32 inputs, or the xla backend)")
  if not probe:
    return None
  leaves, treedef = jax.tree.flatten(call.operands)
  return _lowering_problem(_aval(q), _aval(k), _aval(v), treedef,
                           tuple(_aval(x) for x in leaves), call.mods, block_q, block_k)


# The TPU the lowering probe of :func:`unsupported` lowers for (the chip of the tests and of
# ``tools/tpu-aot``), so its answer does not depend on the machine it is asked on.
_PROBE_DEVICE = jax.sharding.AbstractDevice(device_kind="TPU v5 lite", num_cores=1,
                                            platform="tpu")


@functools.lru_cache(maxsize=64)
def _lowering_problem(q, k, v, treedef, leaves, mods: Mods, block_q: int,
                      block_k: int) -> str | None:
  """What the TPU lowering of the forward pass and its gradient raises, or None."""

  def struct(aval):
    return jax.ShapeDtypeStruct(*aval)

  rows, _, groups, length, _ = q[0]
  keys = k[0][-2]
  n_q, n_k = pl.cdiv(length, block_q), pl.cdiv(keys, block_k)
  counts = jax.ShapeDtypeStruct((rows, n_q), jnp.int32)
  lists = jax.ShapeDtypeStruct((rows, n_q, n_k), jnp.int32)
  dtype = osm.compute_dtype(q[1])
  prefix = "jmat block-sparse attention, mosaic (TPU) backend: "
  whole, blocked = jax.tree.unflatten(treedef, [struct(x) for x in leaves])
  try:
    geo = geometry(q[0], k[0], v[0][-1], q[1], block_q, block_k, DEFAULT_TILING, False)
  except ValueError as error:  # the call cannot fit a TPU core's memories
    return str(error)
  try:
    problem = _plan_of(mods, geo, *jax.tree.flatten(whole), blocked, dtype).problem
  except Exception:  # a mod that cannot be traced at all: the lowering below says why
    problem = None
  if problem is not None:
    return prefix + problem

  def gradients(q, k, v, counts, lists, operands, scale):
    def attend(q, k, v, operands, scale):
      return run(Call(q, k, v, KeyBlocks(counts, lists, counts, lists), operands, scale,
                      mods=mods, block_q=block_q, block_k=block_k))

    (out, lse), vjp = jax.vjp(attend, q, k, v, operands, scale)
    return out, vjp((jnp.ones_like(out), jnp.zeros_like(lse)))

  args = (struct(q), struct(k), struct(v), counts, lists,
          jax.tree.unflatten(treedef, [struct(x) for x in leaves]),
          jax.ShapeDtypeStruct((), dtype))
  target = jax.sharding.get_abstract_mesh()
  if target.abstract_device is None or target.abstract_device.platform != "tpu":
    # The lowering reads the TPU generation from the default device (the host's cpu here):
    # probe for a fixed chip instead, unless the caller already targets a TPU. Inside a
    # shard_map (ring attention) the mesh in context keeps its axes: only its chip changes.
    if target.empty:
      target = jax.sharding.AbstractMesh((1,), ("_probe",), abstract_device=_PROBE_DEVICE)
    else:
      target = jax.sharding.AbstractMesh(target.axis_sizes, target.axis_names,
                                         axis_types=target.axis_types,
                                         abstract_device=_PROBE_DEVICE)
  try:
    with jax.sharding.use_abstract_mesh(target):
      jax.jit(gradients).trace(*args).lower(lowering_platforms=("tpu",))
  except Exception as error:
    if not lowering_limitation(error):
      raise
    summary = (str(error).strip().splitlines() or [""])[0]
    return (f"{prefix}the Mosaic lowering of these mods and operands failed "
            f"({type(error).__name__}: {summary})")
  return None
