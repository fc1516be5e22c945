"""torch's FlexAttention masks: ``mask_mod`` functions, :class:`BlockMask` and its builders.

A ``mask_mod(b, h, q_idx, kv_idx) -> bool`` says whether query ``q_idx`` of
batch ``b`` and head ``h`` may attend to key ``kv_idx``. It is written for
scalars, with ``jnp`` operations, exactly as a torch user writes it with torch
operations, and jmat lifts it to whole blocks with ``jax.vmap``.

:func:`create_block_mask` evaluates a ``mask_mod`` once per ``(query block,
key block)`` pair and records which blocks are *full* (every pair allowed: the
kernel skips the mask there), *partial* (the kernel evaluates the mask) or
*empty* (never computed): the block-sparse kernel's work is proportional to the
non-empty blocks.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.core import Tracer  # pyright: ignore[reportAttributeAccessIssue]
from jax.typing import ArrayLike

from jmat._src import backends, block_sparse, checks

MaskMod = Callable[[jax.Array, jax.Array, jax.Array, jax.Array], jax.Array]
ScoreMod = Callable[[jax.Array, jax.Array, jax.Array, jax.Array, jax.Array], jax.Array]


def noop_mask(b: jax.Array, h: jax.Array, q_idx: jax.Array, kv_idx: jax.Array) -> jax.Array:
  """The mask_mod that allows every pair (torch's ``noop_mask``).

  Example:
    >>> bool(jmat.attention.noop_mask(0, 0, 3, 5))
    True
  """
  del b, h, q_idx, kv_idx
  return jnp.ones((), jnp.bool_)


def and_masks(*mask_mods: MaskMod) -> MaskMod:
  """The mask_mod allowing a pair when every one of ``mask_mods`` allows it (torch's).

  Example:
    >>> causal = lambda b, h, q, kv: q >= kv
    >>> near = lambda b, h, q, kv: q - kv < 2
    >>> both = jmat.attention.and_masks(causal, near)
    >>> [bool(both(0, 0, 3, kv)) for kv in range(5)]
    [False, False, True, True, False]
  """
  checks.check_mask_mods("attention.and_masks", mask_mods)

  def mask_mod(b, h, q_idx, kv_idx):
    allowed = jnp.ones((), jnp.bool_)
    for mod in mask_mods:
      allowed = allowed & mod(b, h, q_idx, kv_idx)
    return allowed

  return mask_mod


def or_masks(*mask_mods: MaskMod) -> MaskMod:
  """The mask_mod allowing a pair when any of ``mask_mods`` allows it (torch's).

  Example:
    >>> first = lambda b, h, q, kv: kv == 0
    >>> causal = lambda b, h, q, kv: q >= kv
    >>> either = jmat.attention.or_masks(first, causal)
    >>> [bool(either(0, 0, 1, kv)) for kv in range(3)]
    [True, True, False]
  """
  checks.check_mask_mods("attention.or_masks", mask_mods)

  def mask_mod(b, h, q_idx, kv_idx):
    allowed = jnp.zeros((), jnp.bool_)
    for mod in mask_mods:
      allowed = allowed | mod(b, h, q_idx, kv_idx)
    return allowed

  return mask_mod


def _index(n: int) -> jax.ShapeDtypeStruct:
  del n
  return jax.ShapeDtypeStruct((), jnp.int32)


def checked_mod(op: str, kind: str, mod: Callable, score_dtype: Any = None) -> Callable:
  """Checks a score_mod (``score_dtype`` given) or mask_mod on scalars; returns it.

  Refuses, with a message naming ``op``, a function that does not take the
  torch signature or does not return a scalar of the right kind.
  """
  names = ("score", "b", "h", "q_idx", "kv_idx") if score_dtype is not None else (
      "b", "h", "q_idx", "kv_idx")
  try:
    inspect.signature(mod).bind(*names)
    signature_ok = True
  except TypeError:
    signature_ok = False
  except ValueError:  # builtins without a signature: let the call decide
    signature_ok = True
  args = [_index(0)] * 4
  if score_dtype is not None:
    args = [jax.ShapeDtypeStruct((), score_dtype)] + args
  result = None
  if signature_ok:
    result = jax.eval_shape(mod, *args)
  checks.check_mod_result(op, kind, names, signature_ok, result)
  return mod


def lift(mod: Callable, with_score: bool) -> Callable:
  """Lifts a scalar score_mod/mask_mod to blocks with ``jax.vmap``.

  The lifted function takes ``(score (R, G, bq, bk),) b (R, G), h (R, G),
  q_idx (bq,), kv_idx (bk,)`` and returns ``(R, G, bq, bk)``.
  """
  if with_score:
    f = jax.vmap(mod, in_axes=(0, None, None, None, 0))
    f = jax.vmap(f, in_axes=(0, None, None, 0, None))
    f = jax.vmap(f, in_axes=(0, 0, 0, None, None))
    return jax.vmap(f, in_axes=(0, 0, 0, None, None))
  f = jax.vmap(mod, in_axes=(None, None, None, 0))
  f = jax.vmap(f, in_axes=(None, None, 0, None))
  f = jax.vmap(f, in_axes=(0, 0, None, None))
  return jax.vmap(f, in_axes=(0, 0, None, None))


def _dense_mask(mask_mod: MaskMod, b: jax.Array, h: jax.Array, q: jax.Array,
                kv: jax.Array) -> jax.Array:
  """``mask_mod`` over the grid ``b (B,) x h (H,) x q (L,) x kv (S,)``: bool ``(B, H, L, S)``."""
  f = jax.vmap(mask_mod, in_axes=(None, None, None, 0))
  f = jax.vmap(f, in_axes=(None, None, 0, None))
  f = jax.vmap(f, in_axes=(None, 0, None, None))
  f = jax.vmap(f, in_axes=(0, None, None, None))
  return jnp.broadcast_to(f(b, h, q, kv), (len(b), len(h), len(q), len(kv)))


def create_mask(
    mask_mod: MaskMod,
    B: int | None,  # noqa: N803 (torch's argument names)
    H: int | None,  # noqa: N803
    Q_LEN: int,  # noqa: N803
    KV_LEN: int,  # noqa: N803
    device: Any = None,
) -> jax.Array:
  """The dense boolean mask of ``mask_mod``, shape ``(B, H, Q_LEN, KV_LEN)`` (torch's).

  ``B`` or ``H`` of ``None`` gives a size-1 dim that broadcasts. ``device`` is
  accepted for porting and ignored (JAX places arrays itself).

  Example:
    >>> mask = jmat.attention.create_mask(lambda b, h, q, kv: q >= kv, None, None, 3, 3)
    >>> mask.shape
    (1, 1, 3, 3)
    >>> print(mask[0, 0].astype(int))
    [[1 0 0]
     [1 1 0]
     [1 1 1]]
  """
  del device
  op = "attention.create_mask"
  sizes = checks.check_mask_sizes(op, B, H, Q_LEN, KV_LEN)
  checked_mod(op, "mask_mod", mask_mod)
  return _create_mask(mask_mod, *sizes)


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4))
def _create_mask(mask_mod: MaskMod, b: int, h: int, q_len: int, kv_len: int) -> jax.Array:
  return _dense_mask(mask_mod, *(jnp.arange(n, dtype=jnp.int32) for n in (b, h, q_len, kv_len)))


def _sliced_mask_mod_error(b: jax.Array, h: jax.Array, q_idx: jax.Array,
                           kv_idx: jax.Array) -> jax.Array:
  """The mask_mod of a sliced :class:`BlockMask`: it refuses to run, as torch's.

  A slice renumbers batch entries, heads or query blocks, so the original
  mask_mod would be evaluated at the wrong positions.
  """
  del b, h, q_idx, kv_idx
  raise checks.sliced_mask_mod_error()


@jax.jit
def _marked(num: jax.Array, indices: jax.Array) -> jax.Array:
  """The 0/1 int32 block map ``(..., n_q, n_k)`` of one ``(counts, indices)`` table pair.

  Entries past a row's count (filler) and indices outside ``0 .. n_k - 1`` mark nothing.
  """
  n_k = indices.shape[-1]
  listed = (jnp.arange(n_k) < num[..., None]) & (indices >= 0) & (indices < n_k)
  # Unlisted entries write into a spare column that is cut off, so every write to a kept
  # position writes 1: repeated indices (filler of zeros, as torch users write) are harmless.
  at = jnp.where(listed, indices, n_k)
  dense = jnp.zeros(indices.shape[:-1] + (n_k + 1,), jnp.int32)
  return jnp.put_along_axis(dense, at, 1, axis=-1, inplace=False)[..., :n_k]


def _axis_index(op: str, axis: int, item: Any, table_shape: tuple[int, ...]) -> Any:
  """One entry of ``block_mask[...]`` as a slice or a 1-D index array: the dim is always kept."""
  if isinstance(item, slice):
    return item
  if isinstance(item, int | np.integer):
    checks.check_block_positions(op, axis, np.asarray([item]), table_shape)
    start = int(item) % table_shape[axis]
    return slice(start, start + 1)
  if isinstance(item, list | tuple):
    item = np.asarray(item) if len(item) else np.zeros((0,), np.int32)
  dtype = getattr(item, "dtype", None)
  traced = isinstance(item, Tracer)
  if dtype is None or np.ndim(item) > 1 or (traced and dtype == np.bool_):
    raise checks.block_mask_index_type_error(op, axis, item)
  if dtype == np.bool_:
    checks.check_boolean_index(op, axis, int(np.size(item)), table_shape)
    return np.flatnonzero(np.asarray(item))
  if not jnp.issubdtype(dtype, jnp.integer):
    raise checks.block_mask_index_type_error(op, axis, item)
  if not traced:
    checks.check_block_positions(op, axis, np.asarray(item).reshape(-1), table_shape)
  return jnp.reshape(item, (-1,))


@jax.jit
def _key_major(num, indices, full_num, full_indices) -> tuple:
  """torch's key-major ``(q_num_blocks, q_indices, full_q_num_blocks, full_q_indices)``.

  The query blocks of each key block, listed ascending, then the others (torch's
  ``_transpose_ordered``); the full pair is None where ``full_num`` is.
  """
  partial = jnp.swapaxes(_marked(num, indices), -1, -2) > 0
  full = jnp.zeros_like(partial) if full_num is None else (
      jnp.swapaxes(_marked(full_num, full_indices), -1, -2) > 0)
  tables = block_sparse.key_blocks_from_dense(partial, full)
  return tuple(tables) if full_num is not None else (tables.num, tables.indices, None, None)


def _halved(listed: np.ndarray, axis: int) -> np.ndarray:
  """``listed`` with each pair of blocks along ``axis`` merged (listed if either is)."""
  n = listed.shape[axis]
  if n % 2:
    pad = [(0, 0)] * listed.ndim
    pad[axis] = (0, 1)
    listed = np.pad(listed, pad)
  shape = list(listed.shape)
  shape[axis:axis + 1] = [shape[axis] // 2, 2]
  return np.asarray(listed.reshape(shape).any(axis=axis + 1))


def _level(factor: int, n: int) -> int | None:
  """The power-of-two coarsening level of a coarse block of ``factor`` blocks out of ``n``:
  ``log2(factor)``, the top level (one block) for ``factor >= n``, None otherwise."""
  if factor >= n:
    return (n - 1).bit_length()
  return factor.bit_length() - 1 if factor & (factor - 1) == 0 else None


@dataclasses.dataclass(frozen=True)
class ListBounds:
  """Static upper bounds on a block table's lists (a grid that walks them can stop there).

  For every coarsening of the table by powers of two (``2**a`` query blocks by ``2**b`` key
  blocks per coarse block, up to one block per side, as :func:`block_sparse.coarsen` merges
  them: a coarse block is listed when one of its blocks is), the longest list of listed key
  blocks of a coarse query block and of listed query blocks of a coarse key block, over every
  table row. Each is rounded up to one of 1, 2, 3, 4, 6, 8, 12, 16, 24, ... (at most the number
  of coarse blocks), so masks whose lists differ a little (document masks of different
  batches) share a compiled kernel: the bounds are part of the jit cache key.

  Attributes:
    lengths: ``lengths[a][b]`` is ``(longest per query block, longest per key block)``.
  """

  lengths: tuple[tuple[tuple[int, int], ...], ...]

  @classmethod
  def of(cls, listed: np.ndarray) -> ListBounds | None:
    """The bounds of a boolean ``(..., n_q, n_k)`` map of listed blocks; None if it is empty."""
    if listed.size == 0:
      return None
    listed = listed.reshape((-1,) + listed.shape[-2:])

    def rounded(count: int, n: int) -> int:  # up to 1, 2, 3, 4, 6, 8, 12, 16, 24, ...
      power = 1 << max(count - 1, 0).bit_length()
      return min(3 * power // 4 if power >= 4 and 3 * power // 4 >= count else power, n)

    rows, levels = listed, []
    while True:
      cols, level = rows, []
      while True:
        n_q, n_k = cols.shape[1:]
        level.append((rounded(int(cols.sum(axis=2).max()), n_k),
                      rounded(int(cols.sum(axis=1).max()), n_q)))
        if n_k == 1:
          break
        cols = _halved(cols, 2)
      levels.append(tuple(level))
      if rows.shape[1] == 1:
        break
      rows = _halved(rows, 1)
    return cls(tuple(levels))

  def at(self, factor_q: int, factor_k: int, n_q: int, n_k: int) -> tuple[int, int] | None:
    """The bounds of the table of ``n_q x n_k`` blocks coarsened ``factor_q x factor_k`` times,
    in coarse blocks; None where the factors are not those of a recorded level."""
    a, b = _level(factor_q, n_q), _level(factor_k, n_k)
    if a is None or b is None or a >= len(self.lengths) or b >= len(self.lengths[a]):
      return None
    return self.lengths[a][b]


class BoundedKeyBlocks(block_sparse.KeyBlocks):
  """A :class:`~jmat._src.block_sparse.KeyBlocks` table with static :class:`ListBounds` (its
  pytree aux data, so kept through jit, ``lax.platform_dependent`` and ``custom_vjp``). A table
  made from it anew (``_replace``, :func:`block_sparse.coarsen`) is a plain one, without."""

  bounds: ListBounds | None = None


def _bounded(tables: Iterable[Any], bounds: ListBounds | None) -> BoundedKeyBlocks:
  """The four tables of a :class:`~jmat._src.block_sparse.KeyBlocks` with ``bounds``."""
  table = BoundedKeyBlocks(*tables)
  table.bounds = bounds
  return table


jax.tree_util.register_pytree_node(BoundedKeyBlocks, lambda t: (tuple(t), t.bounds),
                                   lambda bounds, children: _bounded(children, bounds))


def _list_bounds(num, indices, full_num, full_indices) -> ListBounds | None:
  """The :class:`ListBounds` of concrete tables, None for traced ones (built under jit).

  Only the TPU kernel uses them, so they are recorded only where a TPU program is traced (a
  TPU host, or inside ``jmat.attention.kernel_platforms("tpu", ...)`` for export): elsewhere
  masks of one shape whose lists differ (a document mask per batch) never retrace a jitted
  function.
  """
  if "tpu" not in backends.traced_platforms():
    return None
  if any(isinstance(x, Tracer) for x in (num, indices, full_num, full_indices)):
    return None
  listed = _marked(num, indices) > 0
  if full_num is not None:
    listed = listed | (_marked(full_num, full_indices) > 0)
  return ListBounds.of(np.asarray(listed))


@jax.tree_util.register_pytree_node_class
class BlockMask:
  """Which (query block, key block) pairs flex attention computes: torch's ``BlockMask``.

  Built by :func:`create_block_mask` or, from tables of block indices, by
  :meth:`from_kv_blocks`; sliced by batch entry, head or query block with
  ``block_mask[b, h, q_blocks]``. Per ``(b, h, query block)`` it holds the
  *partial* key blocks (the mask is evaluated inside them) and the *full* ones
  (every pair allowed: no mask evaluated); every other block is skipped. A
  ``BlockMask`` is a pytree: pass it to a jitted function as an argument. Its
  ``mask_mod``, block size and lengths are static (part of the jit cache key).

  jmat keeps only torch's query-major tables (the kernel's backward pass needs no
  key-major copy); :meth:`as_tuple` computes torch's key-major ``q_*`` tables.

  Attributes:
    kv_num_blocks: ``(B, H, n_q)`` int32, partial key blocks per query block.
    kv_indices: ``(B, H, n_q, n_k)`` int32, their indices (first ``kv_num_blocks``).
    full_kv_num_blocks: ``(B, H, n_q)`` int32, full key blocks per query block;
      None for a mask from :meth:`from_kv_blocks` without full blocks (as torch).
    full_kv_indices: ``(B, H, n_q, n_k)`` int32, their indices; or None.
    BLOCK_SIZE: ``(query block, key block)`` sizes.
    mask_mod: the mask_mod the partial blocks evaluate.
    seq_lengths: ``(Q_LEN, KV_LEN)``.

  A mask built from concrete tables (:func:`create_block_mask` or :meth:`from_kv_blocks`
  outside jit) where a TPU program is traced (a TPU host, or inside
  ``jmat.attention.kernel_platforms("tpu")``) also records, statically, how long its longest
  lists are (:class:`ListBounds`, part of the jit cache key, as splash attention's mask info
  is): the TPU kernel's grid walks that many key blocks per query block, not all of them. Set
  the tables of a mask only through these builders (a mask whose tables were replaced by hand
  could list more).
  """

  def __init__(self, kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices,
               BLOCK_SIZE: tuple[int, int], mask_mod: MaskMod,  # noqa: N803
               seq_lengths: tuple[int, int], *, _built_for_kv_len: int | None = None,
               _bounds: ListBounds | None = None):
    self.kv_num_blocks = kv_num_blocks
    self.kv_indices = kv_indices
    self.full_kv_num_blocks = full_kv_num_blocks
    self.full_kv_indices = full_kv_indices
    self.BLOCK_SIZE = BLOCK_SIZE  # noqa: N815 (torch's attribute name)
    self.mask_mod = mask_mod
    self.seq_lengths = seq_lengths
    # The KV_LEN create_block_mask built the tables for: each block listed once, no full block
    # holding keys past KV_LEN. None (from_kv_blocks): the kernel's tables are rebuilt.
    self._built_for_kv_len = _built_for_kv_len
    # Upper bounds on the lists (static): None where the tables were traced when built.
    self._bounds = _bounds

  def tree_flatten(self):
    children = (self.kv_num_blocks, self.kv_indices, self.full_kv_num_blocks,
                self.full_kv_indices)
    return children, (self.BLOCK_SIZE, self.mask_mod, self.seq_lengths, self._built_for_kv_len,
                      self._bounds)

  @classmethod
  def tree_unflatten(cls, aux, children):
    block_size, mask_mod, seq_lengths, built_for_kv_len, bounds = aux
    num, indices, full_num, full_indices = children
    return cls(num, indices, full_num, full_indices, block_size, mask_mod, seq_lengths,
               _built_for_kv_len=built_for_kv_len, _bounds=bounds)

  @classmethod
  def from_kv_blocks(
      cls,
      kv_num_blocks: ArrayLike,
      kv_indices: ArrayLike,
      full_kv_num_blocks: ArrayLike | None = None,
      full_kv_indices: ArrayLike | None = None,
      BLOCK_SIZE: int | tuple[int, int] = 128,  # noqa: N803 (torch's argument names)
      mask_mod: MaskMod | None = None,
      seq_lengths: tuple[int, int] | None = None,
  ) -> BlockMask:
    """A BlockMask straight from block tables (torch's ``BlockMask.from_kv_blocks``).

    For every ``(b, h, query block i)`` the first ``kv_num_blocks[b, h, i]``
    entries of ``kv_indices[b, h, i]`` are the partial key blocks (``mask_mod``
    is evaluated there) and the first ``full_kv_num_blocks[b, h, i]`` of
    ``full_kv_indices[b, h, i]`` the full ones (every pair allowed); the entries
    after them are filler (any values). Indices are key blocks ``0 .. n_k - 1``,
    in any order; the tables are kept as given (int32). As in torch, a full block
    should be one where ``mask_mod`` allows every pair: jmat's kernel checks key
    bounds only where it evaluates ``mask_mod``, so in a full block that holds
    keys past ``KV_LEN`` it evaluates ``mask_mod`` too. Works under ``jax.jit``
    (shapes are static; the tables may be traced).

    Args:
      kv_num_blocks: ``(B, H, n_q)`` integer counts of partial key blocks.
      kv_indices: ``(B, H, n_q, n_k)`` integer indices of the partial key blocks.
      full_kv_num_blocks: ``(B, H, n_q)`` counts of full key blocks, or None
        (no full blocks; given together with ``full_kv_indices``).
      full_kv_indices: ``(B, H, n_q, n_k)`` indices of the full key blocks, or None.
      BLOCK_SIZE: block size, or ``(query block, key block)``.
      mask_mod: the mask_mod of the partial blocks; None: torch's ``noop_mask``
        (every pair of a listed block allowed).
      seq_lengths: ``(Q_LEN, KV_LEN)``; None: the lengths the tables cover,
        ``(n_q * BLOCK_SIZE[0], n_k * BLOCK_SIZE[1])`` (torch's default).

    Returns:
      The BlockMask.

    Raises:
      ShapeError: tables that are not ``(B, H, n_q)`` counts and ``(B, H, n_q,
        n_k)`` indices, or full tables of other shapes.
      TypeError: tables of a non-integer dtype; a ``mask_mod`` without torch's
        signature or not returning a bool scalar.
      ValueError: only one of the full tables; a bad ``BLOCK_SIZE`` or ``seq_lengths``.

    Example:
      >>> causal = jmat.attention.BlockMask.from_kv_blocks(
      ...     jnp.array([[[1, 1]]]), jnp.array([[[[0, 1], [1, 0]]]]),
      ...     jnp.array([[[0, 1]]]), jnp.array([[[[0, 1], [0, 1]]]]),
      ...     BLOCK_SIZE=64, mask_mod=lambda b, h, q, kv: q >= kv)
      >>> causal.shape
      (1, 1, 128, 128)
      >>> print(causal.to_string())
      ░·
      █░
    """
    op = "BlockMask.from_kv_blocks"
    tables = [None if x is None else jnp.asarray(x) for x in (
        kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices)]
    checks.check_block_tables(op, [None if x is None else x.shape for x in tables],
                              [None if x is None else x.dtype for x in tables])
    block_q, block_k = checks.check_block_size(op, BLOCK_SIZE)
    n_q, n_k = tables[1].shape[2:]  # pyright: ignore[reportOptionalMemberAccess] (checked)
    lengths = ((n_q * block_q, n_k * block_k) if seq_lengths is None
               else checks.check_seq_lengths(op, seq_lengths))
    mask_mod = noop_mask if mask_mod is None else checked_mod(op, "mask_mod", mask_mod)
    num, indices, full_num, full_indices = (None if x is None else x.astype(jnp.int32)
                                            for x in tables)
    return cls(num, indices, full_num, full_indices, BLOCK_SIZE=(block_q, block_k),
               mask_mod=mask_mod, seq_lengths=lengths,
               _bounds=_list_bounds(num, indices, full_num, full_indices))

  @property
  def shape(self) -> tuple[int, int, int, int]:
    """``(B, H, Q_LEN, KV_LEN)``, with 1 where the mask broadcasts."""
    b, h = self.kv_num_blocks.shape[:2]
    return (int(b), int(h), *self.seq_lengths)

  def numel(self) -> int:
    """The number of ``(b, h, query, key)`` entries of :attr:`shape` (torch's ``numel``).

    Example:
      >>> jmat.create_block_mask(lambda b, h, q, kv: q >= kv, 2, None, 300, 77).numel()
      46200
    """
    return math.prod(self.shape)

  def __getitem__(self, index: Any) -> BlockMask:
    """The mask of some batch entries, heads or query blocks: torch's ``block_mask[b, h, q]``.

    Indexes the tables' first three dims (batch, head, query block). An int
    keeps its dim, as in torch (``block_mask[0]`` has batch size 1); so does a
    0-D array, which may be traced: a jitted decoding step slices
    ``block_mask[:, :, i // BLOCK_SIZE[0]]`` at its traced position ``i``.
    ``BLOCK_SIZE`` and ``seq_lengths`` are kept and, as in torch, ``mask_mod``
    is reset to one that refuses to run (so does :func:`flex_attention` with
    it): the slice renumbers batch entries, heads or query blocks, so give it
    the original ``mask_mod`` shifted to them, and for query blocks the lengths
    they cover, with :meth:`from_kv_blocks` (or, as torch users do, by setting
    ``mask_mod`` and ``seq_lengths`` of the new slice).

    Args:
      index: up to three entries, for batch, head and query block: ints,
        slices, 0-D or 1-D integer arrays, (concrete) boolean arrays.

    Returns:
      The sliced BlockMask.

    Raises:
      IndexError: more than three entries, a position out of range, two 1-D
        index arrays (torch pairs them up into one dim, which a BlockMask cannot
        hold).
      TypeError: ``None``, ``...``, a bool, a float index or a traced boolean array.

    Example:
      >>> causal = jmat.create_block_mask(lambda b, h, q, kv: q >= kv, 2, None, 300, 300)
      >>> causal[1].shape, causal[:, :, 2].kv_num_blocks.shape
      ((1, 1, 300, 300), (2, 1, 1))
      >>> print(causal[:, :, 1:].to_string())
      █░·
      ██░
    """
    op = "BlockMask.__getitem__"
    table_shape = tuple(int(d) for d in self.kv_indices.shape)
    items = checks.check_block_mask_index(op, index, table_shape)
    tables = list(self.tree_flatten()[0])
    for axis, item in enumerate(items):
      where = (slice(None),) * axis + (_axis_index(op, axis, item, table_shape),)
      tables = [None if x is None else x[where] for x in tables]
    # Any choice of rows (batch entries, heads) lists no more than the longest row. Query blocks
    # chosen otherwise than all of them regroup the coarse blocks the bounds were taken over.
    keeps_rows = len(items) < 3 or (isinstance(items[2], slice) and items[2] == slice(None))
    return BlockMask(*tables, BLOCK_SIZE=self.BLOCK_SIZE, mask_mod=_sliced_mask_mod_error,
                     seq_lengths=self.seq_lengths, _built_for_kv_len=self._built_for_kv_len,
                     _bounds=self._bounds if keeps_rows else None)

  def as_tuple(self, flatten: bool = True) -> tuple[Any, ...]:
    """torch's ``BlockMask.as_tuple``: lengths, every table, block sizes and ``mask_mod``.

    In torch's order: ``Q_LEN, KV_LEN, kv_num_blocks, kv_indices,
    full_kv_num_blocks, full_kv_indices, q_num_blocks, q_indices,
    full_q_num_blocks, full_q_indices, dq_write_order, dq_write_order_full,
    dq_kv_order, dq_kv_order_spt, Q_BLOCK_SIZE, KV_BLOCK_SIZE, mask_mod``; with
    ``flatten=False`` the lengths and the block sizes are one pair each. jmat
    stores no key-major tables: the ``q_*`` ones (``(B, H, n_k)`` counts and
    ``(B, H, n_k, n_q)`` query-block indices, listed ascending, then the others)
    are computed here from the kv tables, as torch computes them; the full ones
    are None where ``full_kv_*`` are. The ``dq_*`` entries (metadata of torch's
    optional deterministic backward) are None: jmat's backward needs none.

    Args:
      flatten: whether the lengths and block sizes are given as two entries each.

    Returns:
      A tuple of 17 entries (15 without ``flatten``).

    Example:
      >>> mask = jmat.create_block_mask(lambda b, h, q, kv: q >= kv, None, None, 256, 256)
      >>> fields = mask.as_tuple()
      >>> len(fields), fields[:2], fields[14:16]
      (17, (256, 256), (128, 128))
      >>> fields[7][0, 0].tolist(), fields[8][0, 0].tolist()  # q_indices, full_q_num_blocks
      ([[0, 1], [1, 0]], [1, 0])
    """
    kv_major = _key_major(self.kv_num_blocks, self.kv_indices, self.full_kv_num_blocks,
                          self.full_kv_indices)
    lengths = tuple(self.seq_lengths) if flatten else (tuple(self.seq_lengths),)
    block_size = tuple(self.BLOCK_SIZE) if flatten else (tuple(self.BLOCK_SIZE),)
    return (*lengths, self.kv_num_blocks, self.kv_indices, self.full_kv_num_blocks,
            self.full_kv_indices, *kv_major, None, None, None, None, *block_size, self.mask_mod)

  def to(self, device: Any) -> BlockMask:
    """The mask on ``device`` (torch's ``BlockMask.to``), accepted for porting.

    A ``jax.Device`` or ``jax.sharding.Sharding`` moves the tables there with
    ``jax.device_put``; anything else (torch's ``"cpu"``, ``"cuda:0"``) returns
    the mask itself, as :func:`create_block_mask` ignores its ``device``: JAX
    places arrays itself.

    Args:
      device: a ``jax.Device``, a ``jax.sharding.Sharding`` or a torch device name.

    Returns:
      The mask, with its tables on ``device`` where that is a JAX device or sharding.

    Example:
      >>> mask = jmat.create_block_mask(lambda b, h, q, kv: q >= kv, None, None, 256, 256)
      >>> mask.to("cuda") is mask
      True
      >>> mask.to(jax.devices("cpu")[0]).kv_indices.devices() == {jax.devices("cpu")[0]}
      True
    """
    if not isinstance(device, jax.Device | jax.sharding.Sharding):
      return self
    children, aux = self.tree_flatten()
    return self.tree_unflatten(aux, jax.device_put(children, device))

  def key_blocks(self, op: str = "flex_attention") -> block_sparse.KeyBlocks:
    """The kernel's table for ``seq_lengths``: ``(B * H, n_q, ...)`` rows, batch-major.

    create_block_mask's tables (and slices of them) are used as built. Others
    (:meth:`from_kv_blocks`, changed ``seq_lengths``) are rebuilt from the block
    map cropped or padded to the blocks ``seq_lengths`` spans: each block listed
    once, and a full block holding keys past ``KV_LEN`` made partial, since the
    kernel checks key bounds in partial blocks only (torch's kernel masks keys
    past ``KV_LEN`` in every block). A mask with :class:`ListBounds` gives a
    :class:`BoundedKeyBlocks` holding them (cropping or padding with unlisted
    blocks keeps every coarse block within one of the map's, so they still bound).
    """
    checks.check_block_mask_rows(op, self.kv_indices.shape, self.seq_lengths, self.BLOCK_SIZE)
    (q_len, kv_len), (block_q, block_k) = self.seq_lengths, self.BLOCK_SIZE
    n_q, n_k = block_sparse.ceil_div(q_len, block_q), block_sparse.ceil_div(kv_len, block_k)
    batch, heads = self.kv_num_blocks.shape[:2]
    rows = batch * heads
    if (self.kv_indices.shape[2:] == (n_q, n_k) and self._built_for_kv_len == kv_len
        and self.full_kv_num_blocks is not None):
      blocks = block_sparse.KeyBlocks(*(x.reshape((rows,) + x.shape[2:])
                                        for x in self.tree_flatten()[0]))
    else:
      dense = self.to_dense()[:, :, :n_q, :n_k]
      dense = jnp.pad(dense, [(0, 0)] * 3 + [(0, n_k - dense.shape[-1])])
      full = dense == 2
      if kv_len and kv_len % min(block_k, kv_len):  # the last key block holds padding keys
        full = full.at[..., -1].set(False)
      partial = (dense > 0) & ~full
      blocks = block_sparse.key_blocks_from_dense(partial.reshape(rows, n_q, n_k),
                                                  full.reshape(rows, n_q, n_k))
    return blocks if self._bounds is None else _bounded(blocks, self._bounds)

  def to_dense(self) -> jax.Array:
    """The block map ``(B, H, n_q, n_k)`` int32: 0 skipped, 1 partial, 2 full."""
    dense = _marked(self.kv_num_blocks, self.kv_indices)
    if self.full_kv_num_blocks is None:
      return dense
    return jnp.maximum(dense, 2 * _marked(self.full_kv_num_blocks, self.full_kv_indices))

  def sparsity(self) -> float:
    """Percent of (query block, key block) pairs with no allowed entry (never computed).

    Example:
      >>> causal = jmat.create_block_mask(lambda b, h, q, kv: q >= kv, None, None, 512, 512)
      >>> causal.sparsity()  # 6 of the 16 blocks of a 4 x 4 grid lie above the diagonal
      37.5
    """
    dense = np.asarray(self.to_dense())
    return float(100.0 * (1.0 - np.count_nonzero(dense) / dense.size)) if dense.size else 0.0

  def to_string(self, grid: int = 32) -> str:
    """A picture of the block map of ``(b, h) = (0, 0)``: ``█`` full, ``░`` partial, ``·`` skipped.

    At most ``grid`` rows and columns are drawn (larger maps are shown in part).

    Example:
      >>> causal = jmat.create_block_mask(lambda b, h, q, kv: q >= kv, None, None, 512, 512)
      >>> print(causal.to_string())
      ░···
      █░··
      ██░·
      ███░
    """
    dense = np.asarray(self.to_dense()[0, 0])[:grid, :grid]
    return "\n".join("".join("·░█"[x] for x in row) for row in dense)

  def __repr__(self) -> str:
    return (f"BlockMask(shape={self.shape}, BLOCK_SIZE={self.BLOCK_SIZE}, "
            f"sparsity={self.sparsity():.2f}%, mask_mod={getattr(self.mask_mod, '__name__', '?')})")


def create_block_mask(
    mask_mod: MaskMod,
    B: int | None,  # noqa: N803 (torch's argument names)
    H: int | None,  # noqa: N803
    Q_LEN: int,  # noqa: N803
    KV_LEN: int,  # noqa: N803
    device: Any = None,
    BLOCK_SIZE: int | tuple[int, int] = 128,  # noqa: N803
) -> BlockMask:
  """The :class:`BlockMask` of ``mask_mod`` for ``(B, H, Q_LEN, KV_LEN)`` (torch's).

  ``mask_mod(b, h, q_idx, kv_idx)`` is evaluated block by block (never the
  whole ``(Q_LEN, KV_LEN)`` grid at once). ``B`` or ``H`` of ``None`` builds
  one mask for every batch entry or head (it broadcasts). A block that holds
  positions past the lengths is never full, so those are masked.

  With ``B`` or ``H`` None the block map is built for ``b = 0`` or ``h = 0``
  while partial blocks evaluate ``mask_mod`` at the real ``b`` and ``h`` (as
  torch's compiled kernel does): give ``B`` / ``H`` when the mask depends on them.

  It runs as a compiled function keyed on ``mask_mod``; a mask that depends on
  per-step data (document ids of a packed batch, a cache position) is best
  built inside your jitted step, where it is traced like any other code.

  Args:
    mask_mod: ``(b, h, q_idx, kv_idx) -> bool`` on int32 scalars.
    B: batch size, or None to broadcast.
    H: number of query heads, or None to broadcast.
    Q_LEN: number of queries.
    KV_LEN: number of keys.
    device: accepted for porting from torch and ignored.
    BLOCK_SIZE: block size, or ``(query block, key block)``.

  Returns:
    The BlockMask.

  Raises:
    TypeError: ``mask_mod`` without torch's signature or not returning a bool scalar.
    ValueError: sizes that are not non-negative ints, block sizes below 1.

  Example:
    >>> mask = jmat.create_block_mask(lambda b, h, q, kv: q >= kv, None, None, 1000, 1000)
    >>> mask.shape, mask.BLOCK_SIZE, mask.kv_num_blocks.shape
    ((1, 1, 1000, 1000), (128, 128), (1, 1, 8))
  """
  del device
  op = "create_block_mask"
  b, h, q_len, kv_len = checks.check_mask_sizes(op, B, H, Q_LEN, KV_LEN)
  block_q, block_k = checks.check_block_size(op, BLOCK_SIZE)
  checked_mod(op, "mask_mod", mask_mod)
  arrays = _block_maps(mask_mod, b, h, q_len, kv_len, block_q, block_k)
  return BlockMask(*arrays, BLOCK_SIZE=(block_q, block_k), mask_mod=mask_mod,
                   seq_lengths=(q_len, kv_len), _built_for_kv_len=kv_len,
                   _bounds=_list_bounds(*arrays))


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4, 5, 6))
def _block_maps(mask_mod: MaskMod, b: int, h: int, q_len: int, kv_len: int, block_q: int,
                block_k: int) -> block_sparse.KeyBlocks:
  """The partial and full key blocks of every ``(b, h, query block)``, one query block at a time."""
  n_q, n_k = block_sparse.ceil_div(q_len, block_q), block_sparse.ceil_div(kv_len, block_k)
  b_idx, h_idx = jnp.arange(b, dtype=jnp.int32), jnp.arange(h, dtype=jnp.int32)
  kv = jnp.arange(n_k * block_k, dtype=jnp.int32)
  real_k = kv < kv_len

  def query_block(i):
    q = i * block_q + jnp.arange(block_q, dtype=jnp.int32)
    real_q = (q < q_len)[:, None]
    allowed = _dense_mask(mask_mod, b_idx, h_idx, q, kv) & real_k
    blocks = (b, h, block_q, n_k, block_k)
    some = jnp.any((allowed & real_q).reshape(blocks), axis=(2, 4))
    every = jnp.all((allowed | ~real_q).reshape(blocks), axis=(2, 4))
    return some, every

  some, every = jax.lax.map(query_block, jnp.arange(n_q, dtype=jnp.int32))
  some, every = (jnp.moveaxis(x, 0, 2) for x in (some, every))  # (b, h, n_q, n_k)
  partial = some & ~every
  tables = block_sparse.key_blocks_from_dense(partial.reshape(b * h, n_q, n_k),
                                              every.reshape(b * h, n_q, n_k))
  return block_sparse.KeyBlocks(*(x.reshape((b, h) + x.shape[1:]) for x in tables))
