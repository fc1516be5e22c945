"""torch's ``PagedAttention``: one pool of key/value pages shared by many sequences, for flex.

A paged cache stores every sequence's keys and values in fixed-size pages of
one pool ``(1, H, n_pages * page_size, D)``; a page table maps each sequence's
logical blocks to physical pages, so a sequence holds pages for the length it
has, not for the longest. Flex attention reads the pool through a block mask
whose key blocks are pages (:meth:`PagedAttention.convert_logical_block_mask`)
and a mask_mod/score_mod that translate physical positions back to logical ones.

torch mutates its page table and caches in place. jmat's :class:`PagedAttention`
is an immutable pytree of arrays: :meth:`~PagedAttention.reserve` and
:meth:`~PagedAttention.erase` (host-side, they pick pages) return a new one,
and :meth:`~PagedAttention.assign` returns the new caches (a pure function,
jittable with donated caches).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from jmat._src import block_sparse, checks
from jmat._src.block_mask import BlockMask, MaskMod, ScoreMod, noop_mask

_OP = "attention.PagedAttention"


def _identity(score, b, h, q_idx, kv_idx):
  del b, h, q_idx, kv_idx
  return score


@jax.tree_util.register_pytree_node_class
class PagedAttention:
  """A page table for flex attention over a paged key/value cache (torch's ``PagedAttention``).

  Holds, for ``max_batch_size`` sequence slots, which physical page of the pool
  ``(1, H, n_pages * page_size, D)`` holds each logical block of ``page_size``
  positions. Same methods and meanings as torch's
  ``torch.nn.attention.experimental._paged_attention.PagedAttention``, but
  functional: it is an immutable pytree of arrays (``n_pages`` and
  ``page_size`` static) that you carry, as an optax state.

  * :meth:`reserve` and :meth:`erase` choose pages on the host between jitted
    steps, as torch's (which use Python lists) do, and return a new
    ``PagedAttention``; ``reserve`` beyond the free pages raises a ``ValueError``
    saying how many are free (torch asserts).
  * :meth:`assign` returns the new caches: ``k_cache, v_cache = paged.assign(...)``.
    Jit your step with the caches donated (``jax.jit(step, donate_argnums=...)``)
    and the write happens in place, as torch's.
  * :meth:`convert_logical_block_mask`, :meth:`get_mask_mod` and
    :meth:`get_score_mod` give what torch's give; call them inside your jitted
    step (pass the ``PagedAttention`` as an argument: its arrays are traced, and
    a new page table costs no recompilation).

  Unlike torch's, :meth:`erase` also clears the erased sequence's entries of
  ``physical_to_logical`` (torch 2.13 writes to a copy and leaves them stale),
  and the mask_mod of :meth:`convert_logical_block_mask` with ``batch_idx`` reads
  the page-table row ``batch_idx[b]`` of batch entry ``b`` (torch's reads row
  ``b``, which is right only when ``batch_idx`` is ``arange(B)``).

  Attributes:
    n_pages: pages in the pool.
    page_size: positions per page.
    page_table: ``(max_batch_size, n_pages)`` int32: the physical page of each
      logical block, -1 where none is reserved.
    capacity: ``(max_batch_size,)`` int32: the positions reserved per sequence.
    physical_to_logical: ``(max_batch_size, n_pages)`` int32: the logical block
      a physical page holds for a sequence, -1 where it holds none.

  Example:
    >>> paged = jmat.attention.PagedAttention(n_pages=8, page_size=4, max_batch_size=2)
    >>> paged = paged.reserve(0, 6).reserve(1, 3)
    >>> paged.page_table[:, :3].tolist(), paged.empty_pages
    ([[1, 0, -1], [2, -1, -1]], [7, 6, 5, 4, 3])
    >>> k_cache = v_cache = jnp.zeros((1, 2, 8 * 4, 16))
    >>> k_val = v_val = jnp.ones((2, 2, 1, 16))
    >>> k_cache, v_cache = paged.assign(jnp.array([0, 1]), jnp.array([[5], [2]]),
    ...                                 k_val, v_val, k_cache, v_cache)
    >>> [int(i) for i in jnp.flatnonzero(k_cache[0, 0, :, 0])]  # page 0, slot 1; page 2, slot 2
    [1, 10]
  """

  def __init__(self, n_pages: int, page_size: int, max_batch_size: int,
               device: Any = None) -> None:
    """An empty page table: every page free (torch's constructor; ``device`` is ignored)."""
    del device
    n_pages, page_size, max_batch_size = checks.check_paged_sizes(
        _OP, n_pages, page_size, max_batch_size)
    self.n_pages = n_pages
    self.page_size = page_size
    self.page_table = jnp.full((max_batch_size, n_pages), -1, jnp.int32)
    self.capacity = jnp.zeros((max_batch_size,), jnp.int32)
    self.physical_to_logical = jnp.full((max_batch_size, n_pages), -1, jnp.int32)
    # torch's empty_pages list, as a stack of fixed size: its first _n_free entries, the page
    # handed out next last (torch starts with [n_pages - 1, ..., 0]).
    self._free = jnp.arange(n_pages - 1, -1, -1, dtype=jnp.int32)
    self._n_free = jnp.asarray(n_pages, jnp.int32)

  # --- pytree -------------------------------------------------------------------------------

  def tree_flatten(self):
    children = (self.page_table, self.capacity, self.physical_to_logical, self._free,
                self._n_free)
    return children, (self.n_pages, self.page_size)

  @classmethod
  def tree_unflatten(cls, aux, children) -> PagedAttention:
    new = object.__new__(cls)
    new.n_pages, new.page_size = aux
    (new.page_table, new.capacity, new.physical_to_logical, new._free,
     new._n_free) = children
    return new

  @property
  def max_batch_size(self) -> int:
    """The number of sequence slots of the page table."""
    return int(self.page_table.shape[0])

  @property
  def empty_pages(self) -> list[int]:
    """The free pages, in torch's order: ``reserve`` hands out the last ones first."""
    return [int(p) for p in np.asarray(self._free)[: int(self._n_free)]]

  def __repr__(self) -> str:
    return (f"PagedAttention(n_pages={self.n_pages}, page_size={self.page_size}, "
            f"max_batch_size={self.max_batch_size})")

  # --- host-side page management -------------------------------------------------------------

  def _host(self, op: str) -> list[np.ndarray]:
    """Writable host copies of the arrays (refused when they are traced)."""
    try:
      return [np.array(x) for x in self.tree_flatten()[0]]
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
      raise checks.traced_paging_error(op, "the PagedAttention") from None

  def reserve(self, batch_idx: ArrayLike, seq_len: ArrayLike) -> PagedAttention:
    """Makes sequence ``batch_idx`` hold at least ``seq_len`` positions (torch's ``reserve``).

    Hands out free pages (as many as the missing positions need, the last free
    ones first, as torch) for the next logical blocks. Runs on the host, between
    jitted steps; nothing changes when the sequence already holds ``seq_len``.

    Args:
      batch_idx: the sequence slot, an int or a 1-element integer array.
      seq_len: the positions it must hold, an int or a 1-element integer array.

    Returns:
      The new PagedAttention (this one is unchanged).

    Raises:
      ValueError: more pages needed than are free (the message says how many are
        free), a slot outside ``0 .. max_batch_size - 1``, a negative length.
      TypeError: traced or non-integer arguments.

    Example:
      >>> paged = jmat.attention.PagedAttention(4, 16, 2).reserve(1, 40)
      >>> paged.capacity.tolist(), paged.page_table[1].tolist()
      ([0, 48], [2, 1, 0, -1])
    """
    op = _OP + ".reserve"
    b = checks.concrete_int(op, "batch_idx", batch_idx, self.max_batch_size)
    length = checks.concrete_int(op, "seq_len", seq_len)
    table, capacity, to_logical, free, n_free = self._host(op)
    if length <= capacity[b]:
      return self
    wanted = block_sparse.ceil_div(length - int(capacity[b]), self.page_size)
    checks.check_free_pages(op, wanted, int(n_free), b, length, int(capacity[b]), self.page_size)
    pages = free[n_free - wanted: n_free]
    start = int(capacity[b]) // self.page_size
    table[b, start: start + wanted] = pages
    to_logical[b, pages] = np.arange(start, start + wanted)
    capacity[b] += wanted * self.page_size
    return self._replaced(table, capacity, to_logical, free, n_free - wanted)

  def erase(self, batch_idx: ArrayLike) -> PagedAttention:
    """Frees every page of sequence ``batch_idx`` (torch's ``erase``).

    Its pages go back to the free list (in logical order, as torch), its
    capacity becomes 0 and its rows of ``page_table`` and
    ``physical_to_logical`` become -1. Runs on the host, between jitted steps.

    Args:
      batch_idx: the sequence slot, an int or a 1-element integer array.

    Returns:
      The new PagedAttention (this one is unchanged).

    Raises:
      ValueError: a slot outside ``0 .. max_batch_size - 1``.
      TypeError: a traced or non-integer argument.

    Example:
      >>> paged = jmat.attention.PagedAttention(4, 16, 2).reserve(0, 20).erase(0)
      >>> paged.empty_pages, paged.page_table[0].tolist()
      ([3, 2, 1, 0], [-1, -1, -1, -1])
    """
    op = _OP + ".erase"
    b = checks.concrete_int(op, "batch_idx", batch_idx, self.max_batch_size)
    table, capacity, to_logical, free, n_free = self._host(op)
    pages = table[b][table[b] != -1]
    free[n_free: n_free + len(pages)] = pages
    capacity[b] = 0
    to_logical[b] = -1
    table[b] = -1
    return self._replaced(table, capacity, to_logical, free, n_free + len(pages))

  def _replaced(self, *children: np.ndarray) -> PagedAttention:
    arrays = tuple(jnp.asarray(x, jnp.int32) for x in children)
    return self.tree_unflatten((self.n_pages, self.page_size), arrays)

  # --- jittable ------------------------------------------------------------------------------

  def assign(
      self,
      batch_idx: ArrayLike,
      input_pos: ArrayLike,
      k_val: ArrayLike,
      v_val: ArrayLike,
      k_cache: ArrayLike,
      v_cache: ArrayLike,
  ) -> tuple[jax.Array, jax.Array]:
    """The caches with ``k_val``/``v_val`` written at positions ``input_pos`` (torch's ``assign``).

    Position ``input_pos[i, s]`` of sequence ``batch_idx[i]`` goes to slot
    ``input_pos % page_size`` of the page its logical block
    ``input_pos // page_size`` maps to. torch writes into the caches; this
    returns new ones: jit the step that calls it with the caches donated
    (``jax.jit(step, donate_argnums=...)``) and XLA writes in place. A position
    whose block has no page (not reserved) is not written (torch would write
    through index -1, into the pool's last page). The values are cast to the
    caches' dtype, as torch's index assignment does.

    Args:
      batch_idx: ``(B,)`` integer sequence slots.
      input_pos: ``(B, S)`` integer logical positions.
      k_val: ``(B, H, S, D)`` keys.
      v_val: ``(B, H, S, Dv)`` values.
      k_cache: ``(1, H, n_pages * page_size, D)``.
      v_cache: ``(1, H, n_pages * page_size, Dv)``.

    Returns:
      ``(k_cache, v_cache)``, updated.

    Raises:
      ShapeError: shapes other than those above.

    Example:
      >>> paged = jmat.attention.PagedAttention(4, 2, 1).reserve(0, 3)
      >>> k_cache = v_cache = jnp.zeros((1, 1, 8, 1))
      >>> vals = jnp.array([[[[1.0], [2.0], [3.0]]]])
      >>> k_cache, _ = paged.assign(jnp.array([0]), jnp.array([[0, 1, 2]]), vals, vals,
      ...                           k_cache, v_cache)
      >>> k_cache[0, 0, :, 0].tolist()  # logical block 0 is page 1, block 1 page 0
      [3.0, 0.0, 1.0, 2.0, 0.0, 0.0, 0.0, 0.0]
    """
    op = _OP + ".assign"
    arrays = [jnp.asarray(x) for x in (batch_idx, input_pos, k_val, v_val, k_cache, v_cache)]
    checks.check_paged_assign(op, *(x.shape for x in arrays))
    checks.check_paged_cache_length(op, arrays[4].shape, self.n_pages, self.page_size)
    return _assign(self.page_table, *arrays, page_size=self.page_size)

  def convert_logical_block_mask(
      self,
      block_mask: BlockMask,
      batch_idx: ArrayLike | None = None,
      kv_len: ArrayLike | None = None,
  ) -> BlockMask:
    """The block mask over the paged pool of a ``block_mask`` over logical positions (torch's).

    Each listed logical key block becomes the physical page it maps to (blocks
    with no page are dropped); the tables get ``n_pages`` columns and the
    lengths ``(Q_LEN, n_pages * page_size)``, and the mask_mod is
    :meth:`get_mask_mod` of the logical one. Give ``flex_attention`` the query
    ``(B, Hq, Q_LEN, E)`` and the caches ``(1, Hkv, n_pages * page_size, E)``:
    the key/value batch of 1 is shared by every query (as torch). Jittable.

    Args:
      block_mask: the logical mask ``(B, H, Q_LEN, KV_LEN)`` whose key block is
        ``page_size`` (``create_block_mask(..., BLOCK_SIZE=(q_block, page_size))``).
      batch_idx: ``(B,)`` the page-table row of each batch entry; None:
        ``arange(B)``.
      kv_len: ``(B,)`` the valid logical length of each batch entry (positions
        at or past it are masked: full blocks reaching past it are made partial,
        where torch's kernel would skip the bound); None: no bound.

    Returns:
      The physical BlockMask.

    Raises:
      ValueError: a key block other than ``page_size``.
      ShapeError: ``batch_idx`` not ``(B,)``; a batch larger than the page table
        without ``batch_idx``.

    Example:
      >>> paged = jmat.attention.PagedAttention(8, 4, 2).reserve(0, 8).reserve(1, 5)
      >>> lengths = jnp.array([8, 5])
      >>> logical = jmat.create_block_mask(lambda b, h, q, kv: kv < lengths[b], 2, None, 1, 8,
      ...                                  BLOCK_SIZE=(1, 4))
      >>> physical = paged.convert_logical_block_mask(logical)
      >>> physical.shape, physical.full_kv_indices[:, 0, 0, :2].tolist()
      ((2, 1, 1, 32), [[1, 0], [3, 0]])
    """
    checks.check_paged_block_mask(
        _OP + ".convert_logical_block_mask", block_mask.BLOCK_SIZE, self.page_size,
        int(block_mask.kv_num_blocks.shape[0]),
        None if batch_idx is None else tuple(jnp.shape(batch_idx)), self.max_batch_size)
    batch = int(block_mask.kv_num_blocks.shape[0])
    rows = jnp.arange(batch) if batch_idx is None else jnp.asarray(batch_idx)
    table = self.page_table[rows]
    partial = (_listed(block_mask.kv_num_blocks, block_mask.kv_indices),
               block_mask.kv_indices)
    full_num = full_indices = None
    if block_mask.full_kv_num_blocks is not None:
      full = (_listed(block_mask.full_kv_num_blocks, block_mask.full_kv_indices),
              block_mask.full_kv_indices)
      if kv_len is not None:
        # A full block reaching past kv_len[b] is evaluated (made partial), so the bound holds
        # there too: torch's kernel skips the mask_mod, and with it the bound, in full blocks.
        past = (full[1] + 1) * self.page_size > jnp.reshape(jnp.asarray(kv_len), (-1, 1, 1, 1))
        partial = (jnp.concatenate([partial[0], full[0] & past], axis=-1),
                   jnp.concatenate([partial[1], full[1]], axis=-1))
        full = (full[0] & ~past, full[1])
      full_num, full_indices = _to_pages(table, *full, self.n_pages)
    num, indices = _to_pages(table, *partial, self.n_pages)
    mask_mod = _physical(self.physical_to_logical, self.page_size, block_mask.mask_mod,
                         kv_len, None if batch_idx is None else rows, with_score=False)
    kv_len_physical = self.n_pages * self.page_size
    # Pages are distinct and whole, so tables built by create_block_mask (each block listed
    # once, no full block past KV_LEN) stay fit for the kernel as they are.
    built = block_mask._built_for_kv_len == block_mask.seq_lengths[1]  # noqa: SLF001
    return BlockMask(num, indices, full_num, full_indices, BLOCK_SIZE=block_mask.BLOCK_SIZE,
                     mask_mod=mask_mod, seq_lengths=(block_mask.seq_lengths[0], kv_len_physical),
                     _built_for_kv_len=kv_len_physical if built else None)

  def get_mask_mod(self, mask_mod: MaskMod | None, kv_len: ArrayLike | None = None) -> MaskMod:
    """A mask_mod over physical pool positions from one over logical positions (torch's).

    The new mask_mod maps ``physical_kv_idx`` to its sequence's logical position
    through ``physical_to_logical[b]`` and applies ``mask_mod`` there; positions
    of pages the sequence does not hold, or at or past ``kv_len[b]``, are masked.

    Args:
      mask_mod: ``(b, h, q_idx, kv_idx) -> bool`` over logical positions; None: all allowed.
      kv_len: ``(B,)`` valid logical lengths, or None.

    Returns:
      The mask_mod over physical positions.

    Example:
      >>> paged = jmat.attention.PagedAttention(4, 2, 1).reserve(0, 3)  # pages 1, 0
      >>> causal = paged.get_mask_mod(lambda b, h, q, kv: kv <= q)
      >>> [bool(causal(0, 0, 1, kv)) for kv in range(8)]  # logical 0, 1 at physical 2, 3
      [False, False, True, True, False, False, False, False]
    """
    return _physical(self.physical_to_logical, self.page_size, mask_mod, kv_len, None,
                     with_score=False)

  def get_score_mod(self, score_mod: ScoreMod | None,
                    kv_len: ArrayLike | None = None) -> ScoreMod:
    """A score_mod over physical pool positions from one over logical positions (torch's).

    As :meth:`get_mask_mod`: ``score_mod`` sees the logical position, and the
    score of a position the sequence does not hold (or at or past ``kv_len[b]``)
    becomes ``-inf``.

    Args:
      score_mod: ``(score, b, h, q_idx, kv_idx) -> score`` over logical positions;
        None: the identity.
      kv_len: ``(B,)`` valid logical lengths, or None.

    Returns:
      The score_mod over physical positions.

    Example:
      >>> paged = jmat.attention.PagedAttention(4, 2, 1).reserve(0, 3)  # pages 1, 0
      >>> distance = paged.get_score_mod(lambda s, b, h, q, kv: s - (q - kv),
      ...                                kv_len=jnp.array([3]))
      >>> [float(distance(0.0, 0, 0, 2, kv)) for kv in range(4)]  # logical 2, 3, 0, 1
      [0.0, -inf, -2.0, -1.0]
    """
    return _physical(self.physical_to_logical, self.page_size, score_mod, kv_len, None,
                     with_score=True)


def _physical(to_logical: jax.Array, page_size: int, mod: Callable | None,
              kv_len: ArrayLike | None, rows: jax.Array | None, *, with_score: bool) -> Callable:
  """The mask_mod (or score_mod) over physical positions of ``mod`` over logical ones.

  Batch entry ``b`` reads the page-table row ``rows[b]`` (``b`` when ``rows`` is None).
  """
  mod = (_identity if with_score else noop_mask) if mod is None else mod
  lengths = None if kv_len is None else jnp.asarray(kv_len)

  def logical(b, physical_kv_idx):
    row = b if rows is None else rows[b]
    block = to_logical[row, physical_kv_idx // page_size]
    position = block * page_size + physical_kv_idx % page_size
    valid = (block >= 0) & (position >= 0)
    if lengths is not None:
      valid = valid & (position < lengths[b])
    return position, valid

  if with_score:
    def score_mod(score, b, h, q_idx, physical_kv_idx):
      position, valid = logical(b, physical_kv_idx)
      new = mod(score, b, h, q_idx, position)
      return jnp.where(valid, new, jnp.asarray(-jnp.inf, jnp.result_type(new)))

    return score_mod

  def mask_mod(b, h, q_idx, physical_kv_idx):
    position, valid = logical(b, physical_kv_idx)
    return valid & mod(b, h, q_idx, position)

  return mask_mod


def _listed(num: jax.Array, indices: jax.Array) -> jax.Array:
  """Which entries of a ``(B, H, n_q, W)`` index table its counts list (the rest is filler)."""
  return jnp.arange(indices.shape[-1]) < num[..., None]


def _to_pages(table: jax.Array, listed: jax.Array, indices: jax.Array,
              n_pages: int) -> tuple[jax.Array, jax.Array]:
  """A ``(counts, indices)`` table pair of physical pages from listed logical key blocks.

  The ``listed`` blocks that have a page come first, in their order; the indices get
  ``n_pages`` columns (as torch's), filled with zeros.
  """
  batch = indices.shape[0]
  inside = (indices >= 0) & (indices < table.shape[1])
  pages = table[jnp.arange(batch)[:, None, None, None], jnp.clip(indices, 0, table.shape[1] - 1)]
  listed = listed & inside & (pages >= 0)
  order = jnp.argsort(~listed, axis=-1, stable=True)
  pages = jnp.take_along_axis(jnp.where(listed, pages, 0), order, axis=-1)
  columns = min(indices.shape[-1], n_pages)
  pages = jnp.pad(pages[..., :columns], [(0, 0)] * 3 + [(0, n_pages - columns)])
  return jnp.sum(listed, axis=-1, dtype=jnp.int32), pages.astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("page_size",))
def _assign(page_table, batch_idx, input_pos, k_val, v_val, k_cache, v_cache, *,
            page_size: int):
  """:meth:`PagedAttention.assign` on checked shapes."""
  n_pages = page_table.shape[1]
  block = input_pos // page_size
  inside = (input_pos >= 0) & (block < n_pages)
  pages = jnp.take_along_axis(page_table[batch_idx], jnp.clip(block, 0, n_pages - 1), axis=1)
  # A position without a page points past the pool, and the write drops it.
  address = jnp.where(inside & (pages >= 0), pages * page_size + input_pos % page_size,
                      n_pages * page_size).reshape(-1)

  def write(cache, val):
    batch, heads, length, dim = val.shape
    rows = jnp.swapaxes(val, 0, 1).reshape(1, heads, batch * length, dim)
    return cache.at[:, :, address].set(rows.astype(cache.dtype), mode="drop")

  return write(k_cache, k_val), write(v_cache, v_val)
