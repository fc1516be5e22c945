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

import functools
import inspect
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jmat._src import block_sparse, checks

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


@jax.tree_util.register_pytree_node_class
class BlockMask:
  """Which (query block, key block) pairs flex attention computes: torch's ``BlockMask``.

  Built by :func:`create_block_mask`. Per ``(b, h, query block)`` it holds the
  *partial* key blocks (the mask is evaluated inside them) and the *full* ones
  (every pair allowed: no mask evaluated); every other block is skipped. A
  ``BlockMask`` is a pytree: pass it to a jitted function as an argument. Its
  ``mask_mod``, block size and lengths are static (part of the jit cache key).

  Attributes:
    kv_num_blocks: ``(B, H, n_q)`` int32, partial key blocks per query block.
    kv_indices: ``(B, H, n_q, n_k)`` int32, their indices (first ``kv_num_blocks``).
    full_kv_num_blocks: ``(B, H, n_q)`` int32, full key blocks per query block.
    full_kv_indices: ``(B, H, n_q, n_k)`` int32, their indices.
    BLOCK_SIZE: ``(query block, key block)`` sizes.
    mask_mod: the mask_mod the partial blocks evaluate.
    seq_lengths: ``(Q_LEN, KV_LEN)``.
  """

  def __init__(self, kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices,
               BLOCK_SIZE: tuple[int, int], mask_mod: MaskMod,  # noqa: N803
               seq_lengths: tuple[int, int]):
    self.kv_num_blocks = kv_num_blocks
    self.kv_indices = kv_indices
    self.full_kv_num_blocks = full_kv_num_blocks
    self.full_kv_indices = full_kv_indices
    self.BLOCK_SIZE = BLOCK_SIZE  # noqa: N815 (torch's attribute name)
    self.mask_mod = mask_mod
    self.seq_lengths = seq_lengths

  def tree_flatten(self):
    children = (self.kv_num_blocks, self.kv_indices, self.full_kv_num_blocks,
                self.full_kv_indices)
    return children, (self.BLOCK_SIZE, self.mask_mod, self.seq_lengths)

  @classmethod
  def tree_unflatten(cls, aux, children):
    return cls(*children, *aux)

  @property
  def shape(self) -> tuple[int, int, int, int]:
    """``(B, H, Q_LEN, KV_LEN)``, with 1 where the mask broadcasts."""
    b, h = self.kv_num_blocks.shape[:2]
    return (int(b), int(h), *self.seq_lengths)

  def key_blocks(self) -> block_sparse.KeyBlocks:
    """The kernel's table: ``(B * H, n_q, ...)`` rows, batch-major."""
    rows = self.kv_num_blocks.shape[0] * self.kv_num_blocks.shape[1]
    flat = [x.reshape((rows,) + x.shape[2:]) for x in self.tree_flatten()[0]]
    return block_sparse.KeyBlocks(*flat)

  def to_dense(self) -> jax.Array:
    """The block map ``(B, H, n_q, n_k)`` int32: 0 skipped, 1 partial, 2 full."""
    n_k = self.kv_indices.shape[-1]

    def marked(num, indices):
      listed = (jnp.arange(n_k) < num[..., None]).astype(jnp.int32)
      return jnp.put_along_axis(jnp.zeros(indices.shape, jnp.int32), indices, listed, axis=-1,
                                inplace=False)

    return (marked(self.kv_num_blocks, self.kv_indices)
            + 2 * marked(self.full_kv_num_blocks, self.full_kv_indices))

  def sparsity(self) -> float:
    """Percent of (query block, key block) pairs with no allowed entry (never computed).

    Example:
      >>> causal = jmat.create_block_mask(lambda b, h, q, kv: q >= kv, None, None, 512, 512)
      >>> causal.sparsity()  # 6 of the 16 blocks of a 4 x 4 grid lie above the diagonal
      37.5
    """
    computed = np.asarray(self.kv_num_blocks) + np.asarray(self.full_kv_num_blocks)
    total = computed.size * self.kv_indices.shape[-1]
    return float(100.0 * (1.0 - computed.sum() / total)) if total else 0.0

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
                   seq_lengths=(q_len, kv_len))


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4, 5, 6))
def _block_maps(mask_mod: MaskMod, b: int, h: int, q_len: int, kv_len: int, block_q: int,
                block_k: int) -> block_sparse.KeyBlocks:
  """The partial and full key blocks of every ``(b, h, query block)``, one query block at a time."""
  n_q, n_k = -(-q_len // block_q), -(-kv_len // block_k)
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
