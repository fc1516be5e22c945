"""The Pallas Mosaic (TPU) backend of the block-sparse attention kernel.

A drop-in for :func:`jmat._src.block_sparse.attend` (same tables in, same
``(out, lse)`` and gradients out), written as three Pallas TPU kernels after
splash attention (``jax/experimental/pallas/ops/tpu/splash_attention/``):

* the forward pass and the dq pass walk the table query-major: a grid
  ``(M, R, query block, step)`` whose steps are the listed key blocks (full
  ones, then partial ones) read from scalar-prefetched :class:`Steps` tables.
  The tables drive the BlockSpec index maps, so unlisted key blocks are never
  fetched; steps past a query block's list re-point at its last listed block
  (nothing new is fetched) and skip compute. The online-softmax carry
  ``(m, l, acc)`` lives in VMEM scratch, set at the first step and finished
  at the last;
* the dk/dv pass walks a key-major copy of the same table (per key block, its
  full and partial query blocks), so every gradient block is written by one
  program and nothing needs atomics.

One program handles a query block of all ``G`` query heads of a key/value head
(grouped-query attention): queries and everything per query row are grouped as
``(M, R, n_q, G * tile_q, D)`` outside the kernels, so the K/V tile fetched
once serves the ``G`` heads and every product is one 2-D matmul. The online
softmax statistics are kept lane-replicated (``(rows, 128)``), as splash does.

TPU tiling: the query tile is a multiple of 8 rows (sublanes), the key tile a
multiple of 128 (lanes), and head dims are padded to multiples of 128 lanes; a
length shorter than its block is one block, padded by the kernel. Compute
dtype: float32 for half and single precision inputs (float64 for float64,
which only interpret mode runs); ``p @ v`` is summed in it and the output kept
in it for the backward pass, whose ``delta = rowsum(dO * O)`` would otherwise
carry half precision's rounding into the scale's gradient (a sum that mostly
cancels). ``interpret=True`` runs the kernels on CPU.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, cast

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from jmat._src import online_softmax as osm
from jmat._src.block_sparse import KeyBlocks, Mods, Operands, pad, zero_cotangent

SUBLANES = 8  # rows of a TPU vreg: the query tile is a multiple of it
LANES = 128  # lanes of a TPU vreg: the key tile and the padded head dims are multiples of it
EMPTY, PARTIAL, FULL = 0, 1, 2  # what a (query block, key block) pair of a table is

Interpret = bool | pltpu.InterpretParams


# --- block sizes and tables (plain XLA, outside the kernels) ------------------------------


def _tile(block: int, length: int, unit: int) -> int | None:
  """The kernel tile of a table block: the block, or a one-block length rounded up to ``unit``."""
  if block < 1 or (block % unit and block < length):
    return None
  return pl.cdiv(max(min(block, length), 1), unit) * unit


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """The tiles of the Mosaic kernels: query rows and keys per block of the block tables.

  The forward, dq and dk/dv passes all walk tables of these blocks (the dk/dv
  pass a key-major copy of the same table), so they are the backward's tiles
  too. The defaults are splash attention's.

  Attributes:
    block_q: query rows per block: a multiple of 8 (TPU sublanes), or at least
      the query length (one block, which the kernel pads to a multiple of 8).
    block_k: keys per block: a multiple of 128 (TPU lanes), or at least the key
      length (one block, padded to a multiple of 128; its padding keys are then
      bounds-checked even if the table marks the block full).
  """

  block_q: int = 128
  block_k: int = 128

  def problem(self, q_len: int, kv_len: int) -> str | None:
    """Why these blocks cannot tile ``q_len`` queries and ``kv_len`` keys on TPU, or None."""
    problems = [
        f"block_{name}={block} does not tile {length} {what} (valid: a multiple of {unit}, "
        f"i.e. {unit}, {2 * unit}, {3 * unit}, ..., or any size >= {length}, one block)"
        for name, block, length, what, unit in (
            ("q", self.block_q, q_len, "queries", SUBLANES),
            ("k", self.block_k, kv_len, "keys", LANES))
        if _tile(block, length, unit) is None]
    if not problems:
      return None
    return "jmat block-sparse attention, mosaic (TPU) backend: " + "; ".join(problems)

  def tiles(self, q_len: int, kv_len: int) -> tuple[int, int]:
    """The kernel's ``(tile_q, tile_k)`` for these lengths.

    Raises:
      ValueError: if a block size cannot be tiled on TPU (the message names the valid sizes).

    Example:
      >>> from jmat._src.kernels.mosaic import BlockSizes
      >>> BlockSizes(block_q=16, block_k=256).tiles(1, 300)
      (8, 256)
    """
    problem = self.problem(q_len, kv_len)
    if problem is not None:
      raise ValueError(problem)
    return (cast(int, _tile(self.block_q, q_len, SUBLANES)),
            cast(int, _tile(self.block_k, kv_len, LANES)))


class Steps(NamedTuple):
  """A block table as a Pallas grid walks it: per outer block, one step per inner block.

  Scalar-prefetched (SMEM), these drive the kernels' BlockSpec index maps.

  Attributes:
    index: ``(M, n_outer, n_inner)`` int32, the inner block each step visits:
      the full blocks (ascending), then the partial ones, then the last listed
      block again (the step skips compute and its tile is not fetched anew);
      0 where nothing is listed.
    full: ``(M, n_outer)`` int32, how many steps visit full blocks.
    count: ``(M, n_outer)`` int32, how many steps visit listed blocks.
  """

  index: jax.Array
  full: jax.Array
  count: jax.Array


def block_kinds(blocks: KeyBlocks, n_k: int) -> jax.Array:
  """The ``(M, n_q, n_k)`` int32 map of a table: EMPTY, PARTIAL or FULL per block pair.

  Materialises the ranges of a table whose index lists are None.
  """
  rows, n_q = blocks.num.shape
  step = jnp.arange(n_k, dtype=jnp.int32)
  kinds = jnp.zeros((rows, n_q, n_k), jnp.int32)
  m = jnp.arange(rows)[:, None, None]
  i = jnp.arange(n_q)[None, :, None]
  for kind, num, indices, first in ((FULL, blocks.full_num, blocks.full_indices, 0),
                                    (PARTIAL, blocks.num, blocks.indices, blocks.full_num)):
    listed = (jnp.asarray(first)[..., None] + step) if indices is None else indices
    listed = jnp.clip(jnp.broadcast_to(listed, kinds.shape), 0, n_k - 1)
    kinds = kinds.at[m, i, listed].max(jnp.where(step < num[..., None], kind, EMPTY))
  return kinds


def block_steps(kinds: jax.Array) -> Steps:
  """The :class:`Steps` of a kinds map, its rows the outer blocks.

  ``block_steps(kinds)`` walks keys per query block; ``block_steps(kinds.swapaxes(1, 2))``
  is the key-major copy (queries per key block) of the dk/dv pass.
  """
  order = jnp.argsort(-kinds, axis=-1, stable=True)  # full, then partial, then empty
  full = jnp.sum(kinds == FULL, axis=-1, dtype=jnp.int32)
  count = jnp.sum(kinds != EMPTY, axis=-1, dtype=jnp.int32)
  last = jnp.maximum(count - 1, 0)[..., None]
  step = jnp.minimum(jnp.arange(kinds.shape[-1], dtype=jnp.int32), last)
  return Steps(jnp.take_along_axis(order, step, axis=-1).astype(jnp.int32), full, count)


@dataclasses.dataclass(frozen=True)
class _Geometry:
  """Static facts of one call: true lengths, table blocks, kernel tiles, heads per program, and
  whether (and how) the kernels are interpreted."""

  q_len: int
  kv_len: int
  block_q: int
  block_k: int
  tile_q: int
  tile_k: int
  groups: int
  interpret: Interpret

  @property
  def n_q(self) -> int:
    return pl.cdiv(self.q_len, self.block_q)

  @property
  def n_k(self) -> int:
    return pl.cdiv(self.kv_len, self.block_k)

  @property
  def rows(self) -> int:
    """Query rows of a program: a query block of every head of the group."""
    return self.groups * self.tile_q

  @property
  def padded_k(self) -> int:
    return self.n_k * self.tile_k

  @property
  def bounds(self) -> bool:
    """Whether some key tile holds padding keys (checked in partial blocks)."""
    return self.padded_k != self.kv_len

  @property
  def bounds_in_full(self) -> bool:
    """Whether full blocks need the bounds check too: the kernel padded past the table's block."""
    return self.bounds and self.tile_k != self.block_k


@dataclasses.dataclass(frozen=True)
class _Layout:
  """Static structure of the operands: the whole pytree and which leaves are float."""

  treedef: Any
  whole_shapes: tuple[tuple[int, ...], ...]
  whole_float: tuple[bool, ...]
  blocked_float: tuple[bool, ...]


def _is_float(x) -> bool:
  return bool(jnp.issubdtype(x.dtype, jnp.inexact))


def _layout(operands: Operands) -> _Layout:
  leaves, treedef = jax.tree.flatten(operands.whole)
  return _Layout(treedef, tuple(jnp.shape(x) for x in leaves),
                 tuple(_is_float(jnp.asarray(x)) for x in leaves),
                 tuple(_is_float(x) for x in operands.blocked))


def _vmem_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
  """The shape a whole leaf has in VMEM: at least 2-D (TPU blocks are), else as it is."""
  return shape if len(shape) >= 2 else (1, math.prod(shape))


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
  lane-replicated ``(..., 128)``.
  """

  scale: Any
  q: Any
  k: Any
  v: Any
  whole: list
  blocked: tuple
  d_out: Any = None
  lse: Any = None
  delta: Any = None
  zeros: list | None = None  # aliased to the blocked operands' gradients: unvisited tiles stay 0


class _Tile(NamedTuple):
  """What the mods get of a grid step: table row, batch row, heads, query and key positions."""

  m: jax.Array
  rows: jax.Array
  heads: jax.Array
  q_pos: jax.Array
  k_pos: jax.Array


def _tile_at(m, r, i, j, geo: _Geometry) -> _Tile:
  # Each index vector is made in the layout the mods broadcast it back to (queries down the
  # sublanes, keys along the lanes, heads on a leading dim), so the two reshapes cancel.
  def iota(shape, axis, start=0):
    return (start + lax.broadcasted_iota(jnp.int32, shape, axis)).reshape(-1)

  return _Tile(m, jnp.full((1, 1, 1, 1), r, jnp.int32).reshape(-1), iota((1, geo.groups, 1, 1), 1),
               iota((geo.tile_q, 1), 0, i * geo.tile_q), iota((1, geo.tile_k), 1, j * geo.tile_k))


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
  """A step's scores as a function of what they are differentiated in.

  ``score(qk, scale, whole_diff, blocked_diff)`` is ``Mods.score(scale * qk)`` with the float
  operand leaves in ``whole_diff`` and ``blocked_diff`` (empty if not differentiated).
  """

  score: Callable[..., jax.Array]
  scale: jax.Array
  whole_diff: list
  blocked_diff: list
  ops: Operands


def _scores_at(ins: _Inputs, at: _Tile, mods: Mods, layout: _Layout, wrt_operands: bool,
               dtype) -> _Scores:
  """The score function of a step, differentiable in the float operands if asked."""
  whole = [ref[...].reshape(shape) for ref, shape in zip(ins.whole, layout.whole_shapes,
                                                          strict=True)]
  blocked = [ref[...][None] for ref in ins.blocked]  # (R' = 1, G|1, bq|1, bk|1)
  whole_flags = layout.whole_float if wrt_operands else (False,) * len(whole)
  blocked_flags = layout.blocked_float if wrt_operands else (False,) * len(blocked)

  def ops_of(whole_diff, blocked_diff) -> Operands:
    return Operands(jax.tree.unflatten(layout.treedef, _merge(whole, whole_flags, whole_diff)),
                    tuple(_merge(blocked, blocked_flags, blocked_diff)))

  def score(qk, scale, whole_diff, blocked_diff):
    s = qk * scale
    if mods.score is None:
      return s
    ops = ops_of(whole_diff, blocked_diff)
    return mods.score(s, at.m, at.rows, at.heads, at.q_pos, at.k_pos, ops).astype(dtype)

  whole_diff = [x for x, f in zip(whole, whole_flags, strict=True) if f]
  blocked_diff = [x for x, f in zip(blocked, blocked_flags, strict=True) if f]
  return _Scores(score, ins.scale[...].reshape(()).astype(dtype), whole_diff, blocked_diff,
                 ops_of(whole_diff, blocked_diff))


def _products(ins: _Inputs, geo: _Geometry, dtype) -> jax.Array:
  """``q @ k^T`` of a step as ``(1, G, tile_q, tile_k)``, the mods' layout."""
  qk = _dot(ins.q[...], ins.k[...], (1, 1), dtype)
  return qk.reshape(1, geo.groups, geo.tile_q, geo.tile_k)


def _masked(s: jax.Array, at: _Tile, mods: Mods, geo: _Geometry, ops: Operands,
            mask: bool, bounds: bool) -> jax.Array:
  """``s`` at ``-inf`` where a key is padding (with ``bounds``) or ``Mods.mask`` refuses it."""
  allowed = None
  if bounds:
    allowed = (at.k_pos < geo.kv_len)[None, None, None, :]
  if mask and mods.mask is not None:
    by_mod = mods.mask(at.m, at.rows, at.heads, at.q_pos, at.k_pos, ops)
    allowed = by_mod if allowed is None else allowed & by_mod
  return s if allowed is None else jnp.where(allowed, s, -jnp.inf)


def _walk(step: Callable[[bool, bool], None], full, count, t, geo: _Geometry) -> None:
  """Runs ``step(mask, bounds)`` at a listed step: full blocks skip the mask, partial ones not."""
  pl.when(t < full)(lambda: step(False, geo.bounds_in_full))
  pl.when((t >= full) & (t < count))(lambda: step(True, geo.bounds))


def _blocks_of_step(index, m, outer, t, key_major: bool) -> tuple:
  """``(query block, key block)`` of a step: its grid's outer block and the block it lists."""
  listed = index[m, outer, t]
  return (listed, outer) if key_major else (outer, listed)


def _grid_position(tables, key_major: bool):
  """``(m, r, i, j, t, full, count)`` of the current grid step (inside a kernel)."""
  index, full, count = tables
  m, r, outer, t = (pl.program_id(axis) for axis in range(4))
  i, j = _blocks_of_step(index, m, outer, t, key_major)
  return m, r, i, j, t, full[m, outer], count[m, outer]


def _forward_kernel(index, full, count, ins: _Inputs, out, lse, row_max, row_sum, acc, *,
                    mods: Mods, geo: _Geometry, layout: _Layout):
  m, r, i, j, t, n_full, n_listed = _grid_position((index, full, count), key_major=False)
  dtype = acc.dtype

  @pl.when(t == 0)
  def _init():
    row_max[...] = jnp.full(row_max.shape, -jnp.inf, dtype)
    row_sum[...] = jnp.zeros(row_sum.shape, dtype)
    acc[...] = jnp.zeros(acc.shape, dtype)

  def step(mask: bool, bounds: bool):
    at = _tile_at(m, r, i, j, geo)
    scores = _scores_at(ins, at, mods, layout, False, dtype)
    s = scores.score(_products(ins, geo, dtype), scores.scale, [], [])
    s = _masked(s, at, mods, geo, scores.ops, mask, bounds).reshape(geo.rows, geo.tile_k)
    old_max = row_max[...]
    new_max = jnp.maximum(old_max, jnp.max(s, axis=-1, keepdims=True))
    # While a row has seen no key its maximum is -inf; shifting by 0 then keeps
    # exp(-inf - shift) = 0 rather than exp(-inf + inf) = NaN.
    shift = jnp.where(new_max == -jnp.inf, 0.0, new_max)
    p = jnp.exp(s - _lanes(shift, geo.tile_k))
    rescale = jnp.exp(old_max - shift)
    row_sum[...] = rescale * row_sum[...] + jnp.sum(p, axis=-1, keepdims=True)
    row_max[...] = new_max
    # p @ v in the compute dtype (as splash): the output, and the backward's delta = rowsum(dO * O)
    # from it, keep their precision (the scale's gradient is a sum that mostly cancels).
    weighted = _dot(p, ins.v[...].astype(dtype), (1, 0), dtype)
    acc[...] = _lanes(rescale, acc.shape[-1]) * acc[...] + weighted

  _walk(step, n_full, n_listed, t, geo)

  @pl.when(t == pl.num_programs(3) - 1)
  def _finish():
    total = row_sum[...]
    seen = total > 0
    safe = jnp.where(seen, total, 1.0)
    out[...] = (acc[...] / _lanes(safe, acc.shape[-1])).astype(out.dtype)
    lse[...] = jnp.where(seen, row_max[...] + jnp.log(safe), -jnp.inf)


class _BackwardTile(NamedTuple):
  """A step's probabilities and gradients of ``q @ k^T`` (``(rows, tile_k)``), and the
  gradients of the scale and the float operands (their tile's part)."""

  p: jax.Array
  d_qk: jax.Array
  d_scale: jax.Array
  d_whole: list
  d_blocked: list


def _backward_tile(ins: _Inputs, at: _Tile, mods: Mods, geo: _Geometry, layout: _Layout,
                   mask: bool, bounds: bool, wrt_operands: bool) -> _BackwardTile:
  """``p = exp(s - lse)``, ``dS = p * (dP - delta)`` and its vjp through the scale and mods.

  The scale's gradient is the vjp's too, ``sum(dS' * q @ k^T)`` summed in the compute dtype,
  so half-precision matmul inputs do not round it.
  """
  dtype = ins.lse.dtype
  scores = _scores_at(ins, at, mods, layout, wrt_operands, dtype)
  s, vjp = jax.vjp(scores.score, _products(ins, geo, dtype), scores.scale, scores.whole_diff,
                   scores.blocked_diff)
  # Masked before the exponent: exp(-inf - lse) is 0, so masked entries carry no gradient.
  s = _masked(s, at, mods, geo, scores.ops, mask, bounds).reshape(geo.rows, geo.tile_k)
  p = jnp.exp(s - _lanes(ins.lse[...], geo.tile_k))
  d_p = _dot(ins.d_out[...], ins.v[...], (1, 1), dtype)
  d_s = p * (d_p - _lanes(ins.delta[...], geo.tile_k))
  d_qk, d_scale, d_whole, d_blocked = vjp(d_s.reshape(1, geo.groups, geo.tile_q, geo.tile_k))
  return _BackwardTile(p, d_qk.reshape(geo.rows, geo.tile_k), d_scale, d_whole, d_blocked)


def _dq_kernel(index, full, count, ins: _Inputs, dq, d_sums, d_blocked, dq_acc, *,
               mods: Mods, geo: _Geometry, layout: _Layout):
  """dq, and per program the partial sums of the scale's and the whole float leaves' gradients
  (``d_sums``) and the blocked float operands' gradient tiles (``d_blocked``)."""
  m, r, i, j, t, n_full, n_listed = _grid_position((index, full, count), key_major=False)

  @pl.when(t == 0)
  def _init():
    # Also the gradient tile of a query block that lists nothing, written back as it is.
    for ref in (dq_acc, *d_sums, *d_blocked):
      ref[...] = jnp.zeros(ref.shape, ref.dtype)

  def step(mask: bool, bounds: bool):
    at = _tile_at(m, r, i, j, geo)
    tile = _backward_tile(ins, at, mods, geo, layout, mask, bounds, wrt_operands=True)
    dq_acc[...] += _dot(tile.d_qk, ins.k[...], (1, 0), dq_acc.dtype)
    for ref, grad in zip(d_sums, (tile.d_scale, *tile.d_whole), strict=True):
      ref[...] += grad.reshape(ref.shape).astype(ref.dtype)
    for ref, grad in zip(d_blocked, tile.d_blocked, strict=True):
      # A key-broadcast operand's tile is every step's; a per-key one is this step's alone.
      grad = grad[0].astype(ref.dtype)
      ref[...] = ref[...] + grad if ref.shape[-1] == 1 else grad

  _walk(step, n_full, n_listed, t, geo)

  @pl.when(t == pl.num_programs(3) - 1)
  def _finish():
    dq[...] = dq_acc[...].astype(dq.dtype)


def _dkv_kernel(index, full, count, ins: _Inputs, dk, dv, dk_acc, dv_acc, *,
                mods: Mods, geo: _Geometry, layout: _Layout):
  m, r, i, j, t, n_full, n_listed = _grid_position((index, full, count), key_major=True)

  @pl.when(t == 0)
  def _init():
    dk_acc[...] = jnp.zeros(dk_acc.shape, dk_acc.dtype)
    dv_acc[...] = jnp.zeros(dv_acc.shape, dv_acc.dtype)

  def step(mask: bool, bounds: bool):
    at = _tile_at(m, r, i, j, geo)
    tile = _backward_tile(ins, at, mods, geo, layout, mask, bounds, wrt_operands=False)
    dv_acc[...] += _dot(tile.p, ins.d_out[...], (0, 0), dv_acc.dtype)
    dk_acc[...] += _dot(tile.d_qk, ins.q[...], (0, 0), dk_acc.dtype)

  _walk(step, n_full, n_listed, t, geo)

  @pl.when(t == pl.num_programs(3) - 1)
  def _finish():
    dk[...] = dk_acc[...].astype(dk.dtype)
    dv[...] = dv_acc[...].astype(dv.dtype)


# --- the pallas_calls ---------------------------------------------------------------------


def _spec(block_shape, where: Callable[..., tuple], key_major: bool) -> pl.BlockSpec:
  """A BlockSpec whose index map ``where(m, r, i, j)`` sees the listed block of each step."""

  def index_map(m, r, outer, t, index, full, count):
    del full, count
    return where(m, r, *_blocks_of_step(index, m, outer, t, key_major))

  return pl.BlockSpec(block_shape, index_map)


def _query_spec(block: tuple[int, ...], key_major: bool) -> pl.BlockSpec:
  """The spec of ``(M, R, n_q, *block)`` arrays: one block per query block (grouped rows)."""
  return _spec((None, None, None, *block), lambda m, r, i, j: (m, r, i, 0, 0), key_major)


def _key_spec(geo: _Geometry, width: int, key_major: bool) -> pl.BlockSpec:
  """The spec of ``(M, R, S, width)`` arrays: one block per key block."""
  return _spec((None, None, geo.tile_k, width), lambda m, r, i, j: (m, r, j, 0), key_major)


def _blocked_block(x: jax.Array, geo: _Geometry) -> tuple[int, int, int]:
  """The ``(G|1, bq|1, bk|1)`` tile of a ``(M|1, R|1, G|1, L|1, S|1)`` blocked operand."""
  return (x.shape[2], geo.tile_q if x.shape[3] > 1 else 1, geo.tile_k if x.shape[4] > 1 else 1)


def _blocked_where(x: jax.Array) -> Callable[..., tuple]:
  """Its index map: broadcast dims stay at block 0."""
  return lambda m, r, i, j: (m if x.shape[0] > 1 else 0, r if x.shape[1] > 1 else 0, 0,
                             i if x.shape[3] > 1 else 0, j if x.shape[4] > 1 else 0)


def _in_specs(ins: _Inputs, geo: _Geometry, key_major: bool) -> _Inputs:
  """The BlockSpecs of a pass's inputs (None where the input is None)."""

  def rows_spec(x):
    return None if x is None else _query_spec((geo.rows, x.shape[-1]), key_major)

  def whole_spec(x):
    return _spec(x.shape, lambda m, r, i, j: (0,) * x.ndim, key_major)

  return _Inputs(
      scale=whole_spec(ins.scale), q=rows_spec(ins.q), k=_key_spec(geo, ins.k.shape[-1], key_major),
      v=_key_spec(geo, ins.v.shape[-1], key_major), whole=[whole_spec(x) for x in ins.whole],
      blocked=tuple(_spec((None, None, *_blocked_block(x, geo)), _blocked_where(x), key_major)
                    for x in ins.blocked),
      d_out=rows_spec(ins.d_out), lse=rows_spec(ins.lse), delta=rows_spec(ins.delta),
      zeros=None if ins.zeros is None else [pl.BlockSpec(memory_space=pl.ANY)
                                            for _ in ins.zeros])


def _call(kernel, name: str, steps: Steps, ins: _Inputs, out_shape, out_specs, scratch,
          geo: _Geometry, mods: Mods, layout: _Layout, key_major: bool,
          aliases: dict[int, int] | None = None):
  """One pallas_call on the grid ``(M, R, outer block, step)`` of ``steps``."""
  rows, outer, inner = steps.index.shape
  # Grid axes 0-2 write disjoint blocks: cores may split them; steps run in order.
  params = pltpu.CompilerParams(
      dimension_semantics=("parallel", "parallel", "parallel", "arbitrary"))
  return pl.pallas_call(
      functools.partial(kernel, mods=mods, geo=geo, layout=layout),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=3, grid=(rows, ins.q.shape[1], outer, inner),
          in_specs=[_in_specs(ins, geo, key_major)], out_specs=out_specs,
          scratch_shapes=scratch),
      out_shape=out_shape, compiler_params=params, interpret=geo.interpret,
      input_output_aliases=aliases or {}, name=name)(*steps, ins)


def _inputs(q, k, v, operands: Operands, scale, **backward) -> _Inputs:
  """The kernel inputs: whole leaves and the scale in their (at least 2-D) VMEM shapes."""
  leaves = [jnp.asarray(x) for x in jax.tree.leaves(operands.whole)]
  return _Inputs(scale.reshape(1, 1), q, k, v, [x.reshape(_vmem_shape(x.shape)) for x in leaves],
                 tuple(operands.blocked), **backward)


def _forward(q, k, v, blocks: KeyBlocks, operands: Operands, scale, mods: Mods, geo: _Geometry):
  dtype = osm.compute_dtype(q.dtype)
  rows = geo.rows
  steps = block_steps(block_kinds(blocks, geo.n_k))
  lead = q.shape[:3]  # (M, R, n_q)
  out, lse = _call(
      _forward_kernel, "jmat_block_sparse_fwd", steps, _inputs(q, k, v, operands, scale),
      (jax.ShapeDtypeStruct((*lead, rows, v.shape[-1]), dtype),
       jax.ShapeDtypeStruct((*lead, rows, LANES), dtype)),
      (_query_spec((rows, v.shape[-1]), False), _query_spec((rows, LANES), False)),
      [pltpu.VMEM((rows, LANES), dtype), pltpu.VMEM((rows, LANES), dtype),
       pltpu.VMEM((rows, v.shape[-1]), dtype)],
      geo, mods, _layout(operands), key_major=False)
  return out, lse[..., 0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def _attend(q, k, v, blocks, operands, scale, mods: Mods, geo: _Geometry):
  return _forward(q, k, v, blocks, operands, scale, mods, geo)


def _attend_fwd(q, k, v, blocks, operands, scale, mods, geo):
  out, lse = _forward(q, k, v, blocks, operands, scale, mods, geo)
  return (out, lse), (q, k, v, blocks, operands, scale, out, lse)


def _blocked_gradient(grad: jax.Array, x: jax.Array) -> jax.Array:
  """A blocked operand's gradient from the dq pass's ``(M, R, n_q, G|1, bq|1, S|1)`` tiles."""
  if x.shape[3] > 1:
    m, r, n, g, rows, keys = grad.shape
    grad = grad.transpose(0, 1, 3, 2, 4, 5).reshape(m, r, g, n * rows, keys)
  else:
    grad = jnp.sum(grad, axis=2)
  broadcast = tuple(axis for axis in (0, 1) if x.shape[axis] == 1)
  return jnp.sum(grad, axis=broadcast, keepdims=True).astype(x.dtype)


def _attend_bwd(mods: Mods, geo: _Geometry, residuals, cotangents):
  q, k, v, blocks, operands, scale, out, lse = residuals
  d_out, d_lse = cotangents
  dtype = lse.dtype
  layout = _layout(operands)
  whole, blocked = operands
  lead = q.shape[:3]  # (M, R, n_q): one partial sum or gradient tile per dq program

  def lanes(x):
    return jnp.broadcast_to(x[..., None], (*x.shape, LANES))

  delta = jnp.sum(d_out.astype(dtype) * out.astype(dtype), axis=-1) - d_lse.astype(dtype)
  # Rows that saw no key have lse = -inf: an lse of +inf makes their p exactly 0.
  lse = jnp.where(lse == -jnp.inf, jnp.inf, lse)
  kinds = block_kinds(blocks, geo.n_k)

  summed = [scale] + [jnp.asarray(x) for x, f in zip(jax.tree.leaves(whole), layout.whole_float,
                                                       strict=True) if f]
  tiled = [x for x, f in zip(blocked, layout.blocked_float, strict=True) if f]
  zeros = [jnp.zeros((*lead, *_blocked_block(x, geo)[:2], geo.padded_k if x.shape[4] > 1 else 1),
                     dtype) for x in tiled]
  # The cotangent of an output of q's dtype, back in it (losslessly) for the matmuls.
  ins = _inputs(q, k, v, operands, scale, d_out=d_out.astype(q.dtype), lse=lanes(lse),
                delta=lanes(delta), zeros=zeros)
  first_zero = 3 + len(jax.tree.leaves(ins)) - len(zeros)  # after the 3 scalar-prefetch tables

  dq, d_sums, d_tiles = _call(
      _dq_kernel, "jmat_block_sparse_dq", block_steps(kinds), ins,
      (jax.ShapeDtypeStruct(q.shape, q.dtype),
       [jax.ShapeDtypeStruct((*lead, *_vmem_shape(x.shape)), dtype) for x in summed],
       [jax.ShapeDtypeStruct(x.shape, dtype) for x in zeros]),
      (_query_spec((geo.rows, q.shape[-1]), False),
       [_query_spec(_vmem_shape(x.shape), False) for x in summed],
       [_spec((None, None, None, *_blocked_block(x, geo)),
              lambda m, r, i, j, keys=x.shape[4]: (m, r, i, 0, 0, j if keys > 1 else 0), False)
        for x in tiled]),
      [pltpu.VMEM((geo.rows, q.shape[-1]), dtype)], geo, mods, layout, key_major=False,
      aliases={first_zero + n: 1 + len(summed) + n for n in range(len(zeros))})

  dk, dv = _call(
      _dkv_kernel, "jmat_block_sparse_dkv", block_steps(kinds.swapaxes(1, 2)),
      ins._replace(zeros=None),
      (jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)),
      (_key_spec(geo, k.shape[-1], True), _key_spec(geo, v.shape[-1], True)),
      [pltpu.VMEM((geo.tile_k, k.shape[-1]), dtype), pltpu.VMEM((geo.tile_k, v.shape[-1]), dtype)],
      geo, mods, layout, key_major=True)

  d_sums = [jnp.sum(d, axis=(0, 1, 2)).reshape(x.shape).astype(x.dtype)
            for d, x in zip(d_sums, summed, strict=True)]
  d_whole = iter(d_sums[1:])
  d_tiles = iter(d_tiles)

  def whole_cotangent(x):
    return next(d_whole) if _is_float(jnp.asarray(x)) else zero_cotangent(x)

  def blocked_cotangent(x):
    return _blocked_gradient(next(d_tiles), x) if _is_float(x) else zero_cotangent(x)

  d_operands = Operands(jax.tree.map(whole_cotangent, whole),
                        tuple(blocked_cotangent(x) for x in blocked))
  return dq, dk, dv, jax.tree.map(zero_cotangent, blocks), d_operands, d_sums[0]


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
    interpret: Interpret = False,
) -> tuple[jax.Array, jax.Array]:
  """Block-sparse attention of ``q (M, R, G, L, E)`` over ``k, v (M, R, S, E|Ev)`` on TPU.

  The Mosaic backend of :func:`jmat._src.block_sparse.attend`, with its
  contract: ``blocks`` lists blocks of ``(block_q, block_k)`` and never marks
  full a block holding padding keys; blocked operands are
  ``(M|1, R|1, G|1, L|1, S|1)``; returns ``(out (M, R, G, L, Ev), lse (M, R, G, L))``,
  ``out`` in q's dtype, ``lse`` (natural log, ``-inf`` for a query that sees no
  key, whose output row is 0) in the compute dtype. Differentiable in q, k, v,
  ``scale`` and the float operand leaves.

  Args:
    q, k, v, blocks, operands, scale, mods: as :func:`jmat._src.block_sparse.attend`.
    block_q: query rows per table block (see :class:`BlockSizes` for the valid sizes).
    block_k: keys per table block.
    interpret: run the kernels in Pallas interpret mode (on CPU): True, or
      ``pltpu.InterpretParams(...)`` for the TPU interpreter's checks.

  Raises:
    ValueError: if the block sizes cannot tile the lengths on TPU, or ``blocks``
      has the wrong number of rows or query blocks.
  """
  table_rows, _, groups, length, _ = q.shape
  keys = k.shape[-2]
  tile_q, tile_k = BlockSizes(block_q, block_k).tiles(length, keys)
  geo = _Geometry(length, keys, block_q, block_k, tile_q, tile_k, groups, interpret)
  if blocks.num.shape != (table_rows, geo.n_q):
    raise ValueError(
        f"jmat block-sparse attention, mosaic (TPU) backend: the table has shape "
        f"{tuple(blocks.num.shape)}; q of shape {tuple(q.shape)} with block_q={block_q} "
        f"needs {(table_rows, geo.n_q)} (M, query blocks)")
  q_rows, k_rows = geo.n_q * tile_q, geo.padded_k
  e, ev = (pl.cdiv(x.shape[-1], LANES) * LANES for x in (q, v))
  whole, blocked = operands
  blocked = tuple(pad(pad(x, -2, q_rows, True), -1, k_rows, True) for x in blocked)
  out, lse = cast(tuple[jax.Array, jax.Array], _attend(
      _group(pad(pad(q, -2, q_rows), -1, e), tile_q), pad(pad(k, -2, k_rows), -1, e),
      pad(pad(v, -2, k_rows), -1, ev), blocks, Operands(whole, blocked),
      jnp.asarray(scale).astype(osm.compute_dtype(q.dtype)), mods, geo))
  out = _ungroup(out, groups)[..., :length, :v.shape[-1]].astype(q.dtype)
  return out, _ungroup(lse[..., None], groups)[..., :length, 0]


def _aval(x) -> tuple[tuple[int, ...], str]:
  return tuple(jnp.shape(x)), str(jnp.result_type(x))


def unsupported(q, k, v, operands: Operands, mods: Mods, block_q: int,
                block_k: int) -> str | None:
  """Why the TPU kernel cannot run this attention, or None if it can.

  Refuses block sizes the TPU cannot tile, float64 (Mosaic has none), and
  mods or operands the Mosaic compiler cannot lower: the forward pass and the
  gradient are lowered for TPU once per shape signature (well under a second,
  cached). Mods that index a whole operand with traced positions or heads
  (a gather, e.g. ``slopes[h]`` or ``document[b, q_pos]``) are the usual
  case: pass such tables as blocked operands, which the kernel slices.
  """
  length, keys = q.shape[-2], k.shape[-2]
  problem = BlockSizes(block_q, block_k).problem(length, keys)
  if problem is not None:
    return problem
  if any(jnp.dtype(x.dtype) == jnp.float64 for x in (q, k, v)):
    return ("jmat block-sparse attention, mosaic (TPU) backend: TPUs have no float64 "
            "(use float32 inputs, or the xla backend)")
  leaves, treedef = jax.tree.flatten(operands)
  return _lowering_problem(_aval(q), _aval(k), _aval(v), treedef,
                           tuple(_aval(x) for x in leaves), mods, block_q, block_k)


@functools.lru_cache(maxsize=64)
def _lowering_problem(q, k, v, treedef, leaves, mods: Mods, block_q: int,
                      block_k: int) -> str | None:
  """What the TPU lowering of the forward pass and its gradient raises, or None."""

  def struct(aval):
    return jax.ShapeDtypeStruct(*aval)

  rows, _, _, length, _ = q[0]
  n_q, n_k = pl.cdiv(length, block_q), pl.cdiv(k[0][-2], block_k)
  counts = jax.ShapeDtypeStruct((rows, n_q), jnp.int32)
  lists = jax.ShapeDtypeStruct((rows, n_q, n_k), jnp.int32)
  dtype = osm.compute_dtype(q[1])

  def gradients(q, k, v, counts, lists, operands, scale):
    def run(q, k, v, operands, scale):
      return attend(q, k, v, KeyBlocks(counts, lists, counts, lists), operands, scale,
                    mods=mods, block_q=block_q, block_k=block_k)

    (out, lse), vjp = jax.vjp(run, q, k, v, operands, scale)
    return out, vjp((jnp.ones_like(out), jnp.zeros_like(lse)))

  args = (struct(q), struct(k), struct(v), counts, lists,
          jax.tree.unflatten(treedef, [struct(x) for x in leaves]),
          jax.ShapeDtypeStruct((), dtype))
  try:
    jax.jit(gradients).trace(*args).lower(lowering_platforms=("tpu",))
  except Exception as error:  # whatever the lowering refuses, the dispatcher falls back on
    summary = (str(error).strip().splitlines() or [""])[0]
    return (f"jmat block-sparse attention, mosaic (TPU) backend: the Mosaic lowering of these "
            f"mods and operands failed ({type(error).__name__}: {summary}); mods that index a "
            f"whole operand by traced position or head (a gather) cannot run on TPU: pass such "
            f"tables as blocked operands")
  return None
