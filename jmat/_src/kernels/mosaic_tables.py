"""The block tables and tiles of the Mosaic (TPU) kernels (:mod:`jmat._src.kernels.mosaic`).

What the kernels walk, decided outside them in plain XLA and Python: the TPU tiles of a table's
blocks (:class:`BlockSizes`), how a call is tiled within a TPU core's memories (:class:`Tiling`:
tables coarsened to tiles of up to 512 and until they fit scalar memory, a query tile that fits
VMEM), and the scalar-prefetched step tables the grids walk (:class:`Steps`: int8/int16 where
the counts allow, one step per listed block of the longest list when the table is known while
tracing), as splash attention's ``MaskInfo``.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple, cast

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from jmat._src.block_sparse import FULL, NEVER, KeyBlocks, block_map

SUBLANES = 8  # rows of a TPU vreg: the query tile is a multiple of it
LANES = 128  # lanes of a TPU vreg: the key tile and the padded head dims are multiples of it

Interpret = bool | pltpu.InterpretParams


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
      >>> from jmat._src.kernels.mosaic_tables import BlockSizes
      >>> BlockSizes(block_q=16, block_k=256).tiles(1, 300)
      (8, 256)
    """
    problem = self.problem(q_len, kv_len)
    if problem is not None:
      raise ValueError(problem)
    return (cast(int, _tile(self.block_q, q_len, SUBLANES)),
            cast(int, _tile(self.block_k, kv_len, LANES)))


@dataclasses.dataclass(frozen=True)
class Tiling:
  """How the Mosaic kernels tile a call within a TPU core's memories (the defaults fit v5e/v6e).

  The kernels walk a coarser table than the mask's when the mask's blocks are small: blocks of up
  to ``largest_q`` query rows by ``largest_k`` keys, each made of whole mask blocks
  (:func:`jmat._src.block_sparse.coarsen`: a block is full only if all of its mask blocks are),
  so a TPU step does enough work to pay its fixed cost; coarser still when the tables of a pass
  would overflow ``table_bytes`` of scalar memory (SMEM). A program's query rows (``G`` heads
  times the query tile) are then capped so its score tiles stay within ``score_elements`` and
  its VMEM within ``vmem_bytes``: the query tile is cut below the table's block, never the
  heads.

  Attributes:
    largest_q: coarsen the table's query blocks up to this many rows.
    largest_k: coarsen the table's key blocks up to this many keys.
    score_elements: at most this many entries in a program's ``(rows, keys)`` score tile.
    table_bytes: at most this much SMEM for the block tables of one pass.
    vmem_bytes: the VMEM limit the kernels compile with, when the default scoped limit (16 MiB on
      v5e) is too small; a call that cannot fit it is refused before compiling.
    key_splits: the forward's key split (flash-decoding): each query tile's list of key blocks
      is cut into this many shares, walked by programs of their own (a parallel grid axis) and
      merged by their lse outside the kernel. None: split where the programs would leave
      TensorCores idle, i.e. decoding (one query tile per row) with fewer programs than
      ``cores``; the backward never splits.
    cores: TensorCores a chip shares its parallel grid axes among (2 on v4, v5p and v7x's
      megacore; v5e and v6e have 1, where a split buys nothing and costs a merge).
  """

  largest_q: int = 512
  largest_k: int = 512
  score_elements: int = 512 * 1024
  table_bytes: int = 256 * 1024
  vmem_bytes: int = 32 * 2**20
  key_splits: int | None = None
  cores: int = 2

  def splits(self, programs: int, q_tiles: int, steps: int) -> int:
    """The forward's key splits for ``programs`` programs (table rows x batch rows x query
    tiles) of ``q_tiles`` query tiles per row walking ``steps`` steps each."""
    if self.key_splits is not None:
      return max(1, min(self.key_splits, steps))
    if q_tiles > 1 or programs >= self.cores:
      return 1
    return max(1, min(steps, pl.cdiv(self.cores, programs)))


DEFAULT_TILING = Tiling()
DEFAULT_VMEM = 16 * 2**20  # the smallest default scoped VMEM limit (v5e)
PREFIX = "jmat block-sparse attention, mosaic (TPU) backend: "


def narrow_int(largest: int) -> np.dtype:
  """The narrowest integer type holding ``0 .. largest`` (splash's MaskInfo narrows so too)."""
  return np.dtype(next(t for t in (np.int8, np.int16, np.int32) if largest <= np.iinfo(t).max))


class Steps(NamedTuple):
  """A block table as a Pallas grid walks it: per outer block, one step per inner block.

  Scalar-prefetched (SMEM), these drive the kernels' BlockSpec index maps. Integer tables are
  int8 or int16 where their values allow.

  Attributes:
    index: ``(M, n_outer, steps)``, the inner block each step visits: the full blocks
      (ascending), then the partial ones, then the last listed block again (the step skips
      compute and its tile is not fetched anew); 0 where nothing is listed. ``steps`` is the
      longest list when the table is known while tracing (the grid walks no more), else
      ``n_inner``.
    full: ``(M, n_outer)``, how many steps visit full blocks.
    count: ``(M, n_outer)``, how many steps visit listed blocks.
    offsets: ``(2,)`` int32, the positions of query row 0 and key row 0 (what the mods see).
  """

  index: jax.Array
  full: jax.Array
  count: jax.Array
  offsets: jax.Array


def block_steps(kinds: jax.Array, offsets: jax.Array, steps: int | None = None) -> Steps:
  """The :class:`Steps` of a kinds map ``(M, n_outer, n_inner)``, its rows the outer blocks,
  with ``steps`` steps per outer block (default ``n_inner``; at least the longest list).

  ``block_steps(kinds, offsets)`` walks keys per query block;
  ``block_steps(kinds.swapaxes(1, 2), offsets)`` is the key-major copy (queries per key block)
  of the dk/dv pass.
  """
  n_inner = kinds.shape[-1]
  steps = n_inner if steps is None else steps
  dtype = narrow_int(max(n_inner - 1, steps))
  order = jnp.argsort(-kinds, axis=-1, stable=True)  # full, then partial, then empty
  full = jnp.sum(kinds == FULL, axis=-1, dtype=jnp.int32)
  count = jnp.sum(kinds != NEVER, axis=-1, dtype=jnp.int32)
  last = jnp.maximum(count - 1, 0)[..., None]
  step = jnp.minimum(jnp.arange(steps, dtype=jnp.int32), last)
  index = jnp.take_along_axis(order[..., :n_inner], step, axis=-1)
  return Steps(index.astype(dtype), full.astype(dtype), count.astype(dtype), offsets)


def longest_lists(blocks: KeyBlocks, n_k: int) -> tuple[int, int] | None:
  """The longest list of listed blocks per query block and per key block, if the table is known
  while tracing (a constant), else None."""
  try:
    with jax.ensure_compile_time_eval():
      listed = np.asarray(block_map(blocks, n_k)) != NEVER
  except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
    return None
  return (max(int(listed.sum(axis=2).max(initial=0)), 1),
          max(int(listed.sum(axis=1).max(initial=0)), 1))


@dataclasses.dataclass(frozen=True)
class Geometry:
  """Static facts of one call: true lengths, table blocks (the kernels' coarsened ones), kernel
  tiles, query tiles per table block, heads per program, steps per grid row of each walk,
  VMEM limit, and whether (and how) the kernels are interpreted."""

  q_len: int
  kv_len: int
  block_q: int
  block_k: int
  tile_q: int
  tile_k: int
  groups: int
  interpret: Interpret
  split: int = 1
  key_splits: int = 1  # the forward's key split (Tiling.key_splits)
  steps_q: int | None = None  # steps per query tile (forward, dq): None is n_k
  steps_k: int | None = None  # listed query blocks per key block (dk/dv): None is n_q
  vmem_limit: int | None = None

  @property
  def n_q(self) -> int:
    return pl.cdiv(self.q_len, self.block_q)

  @property
  def n_k(self) -> int:
    return pl.cdiv(self.kv_len, self.block_k)

  @property
  def q_tiles(self) -> int:
    """Query tiles (the forward and dq grids' outer blocks): ``split`` per table block."""
    return self.n_q * self.split

  @property
  def rows(self) -> int:
    """Query rows of a program: a query tile of every head of the group."""
    return self.groups * self.tile_q

  @property
  def padded_q(self) -> int:
    return self.q_tiles * self.tile_q

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


def _factor(block: int, length: int, unit: int, largest: int) -> int:
  """How many table blocks of ``block`` one coarse block holds: the most whose size is at most
  ``largest`` (or covers the length) and tiles on TPU."""
  best = 1
  for factor in range(2, pl.cdiv(length, block) + 1):
    size = block * factor
    if size > largest:
      break
    if _tile(size, length, unit) is not None:
      best = factor
  return best


def _vmem_bytes(rows: int, tile_k: int, e: int, ev: int, itemsize: int) -> int:
  """A bound on a pass's VMEM: double-buffered query-side and key-side blocks (q, dO, out or dq;
  k, v, dk, dv), float32 accumulators and statistics, and the score tiles (s, p, dP, dS and the
  mods' temporaries)."""
  blocks = 2 * itemsize * (2 * rows * (e + ev) + 2 * tile_k * (e + ev))
  accumulators = 4 * (rows * (e + ev) + tile_k * (e + ev) + 3 * rows * LANES)
  return blocks + accumulators + 4 * 6 * rows * tile_k


def geometry(q_shape: tuple[int, ...], k_shape: tuple[int, ...], v_dim: int, dtype,
              block_q: int, block_k: int, tiling: Tiling, interpret: Interpret) -> Geometry:
  """The kernels' tiles of a call (before its tables are known): coarsened table blocks that fit
  SMEM, the query tile that fits VMEM.

  Raises:
    ValueError: if the block sizes cannot tile the lengths on TPU, the tables cannot fit SMEM at
      any coarsening, or one query row per head cannot fit VMEM (naming the limit and the fix).
  """
  table_rows, _, groups, length, e = q_shape
  keys = k_shape[-2]
  BlockSizes(block_q, block_k).tiles(length, keys)
  e, ev = (pl.cdiv(d, LANES) * LANES for d in (e, v_dim))
  itemsize = jnp.dtype(dtype).itemsize
  largest_q, largest_k = tiling.largest_q, tiling.largest_k
  while True:
    coarse_q = block_q * _factor(block_q, length, SUBLANES, max(largest_q, block_q))
    coarse_k = block_k * _factor(block_k, keys, LANES, max(largest_k, block_k))
    n_q, n_k = pl.cdiv(length, coarse_q), pl.cdiv(keys, coarse_k)
    # The larger of the two passes' tables: index (M, n_outer, n_inner), two counts per row.
    table = max(table_rows * (outer * inner * narrow_int(inner).itemsize
                              + 2 * outer * narrow_int(inner).itemsize)
                for outer, inner in ((n_q, n_k), (n_k, n_q)))
    if table <= tiling.table_bytes:
      break
    if coarse_q >= length and coarse_k >= keys:
      break  # one block: the smallest table there is
    largest_q, largest_k = 2 * max(largest_q, block_q), 2 * max(largest_k, block_k)
  if table > tiling.table_bytes:
    raise ValueError(
        f"{PREFIX}the block tables of {table_rows} masks of {n_q} x {n_k} blocks need {table} "
        f"bytes of scalar memory, more than the limit of {tiling.table_bytes} (use a larger "
        f"BLOCK_SIZE, or fewer distinct masks per call)")
  tile_q, tile_k = BlockSizes(coarse_q, coarse_k).tiles(length, keys)
  split = 1
  while (groups * tile_q // split * tile_k > tiling.score_elements
         or _vmem_bytes(groups * tile_q // split, tile_k, e, ev, itemsize) > tiling.vmem_bytes):
    finer = next((n for n in range(split + 1, tile_q // SUBLANES + 1)
                  if (tile_q // SUBLANES) % n == 0), None)
    if finer is None:
      break
    split = finer
  rows = groups * tile_q // split
  need = _vmem_bytes(rows, tile_k, e, ev, itemsize)
  if need > tiling.vmem_bytes:
    raise ValueError(
        f"{PREFIX}a program of {groups} query heads x {tile_q // split} query rows by {tile_k} "
        f"keys (head dims {q_shape[-1]}, {v_dim}) needs about {need / 2**20:.1f} MiB of VMEM, "
        f"more than the limit of {tiling.vmem_bytes / 2**20:.0f} MiB (use a smaller BLOCK_SIZE "
        f"for the keys, or fewer query heads per key/value head)")
  return Geometry(length, keys, coarse_q, coarse_k, tile_q // split, tile_k, groups, interpret,
                   split=split, vmem_limit=tiling.vmem_bytes if need > DEFAULT_VMEM else None)


def tile_kinds(blocks: KeyBlocks, geo: Geometry) -> jax.Array:
  """The ``(M, query tiles, n_k)`` kinds map the kernels walk: a table block's row for each of
  its ``split`` query tiles."""
  kinds = block_map(blocks, geo.n_k)
  return kinds if geo.split == 1 else jnp.repeat(kinds, geo.split, axis=1)
