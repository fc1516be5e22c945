"""Attention over a device mesh: ring attention with ``shard_map`` and ``lax.ppermute``.

The sequence is cut into ``n`` blocks, one per device along a mesh axis. Each
device keeps its query block and the key/value blocks travel around the ring:
at step ``t`` device ``i`` holds key/value block ``(i - t) mod n``, folds it into
its online-softmax carry with the block-sparse kernel's forward loop (the one
SDPA and flex attention use) and passes it on to device ``i + 1``. The kernel
folds a block in tiles of ``block_size`` queries by keys, sliced in place, so a
device holds its own blocks, one key/value block in flight and a tile of
scores: per-device memory is ``O((L / n) * E)`` plus a constant, however long
the sequence grows.

The backward pass is a second trip around the ring (a ``jax.custom_vjp``) with
the kernel's backward loop: the forward pass keeps only its inputs, its output
and the per-query log-sum-exp, and the key/value blocks travel again together
with their gradient accumulators, so the backward pass is ``O(L / n)`` per
device as well (plain autodiff through the ring would keep every block that
passed by).

Causality is the kernel's block map of each (query block, key/value block)
pair, with the blocks' sequence offsets: tiles the mask hides are not listed,
so a device computes nothing for them but still forwards its blocks and the
ring keeps turning. (The causal work is unbalanced, device ``i`` computes
``i + 1`` blocks; a striped or zig-zag layout would even it out.)
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from jax.typing import ArrayLike

from jmat._src import block_sparse, checks, online_softmax, sharding
from jmat._src.kernels import xla

_Blocks = tuple[jax.Array, ...]


def block_is_masked(
    query_block: int | jax.Array, key_block: int | jax.Array, q_len: int, k_len: int
) -> bool | jax.Array:
  """Whether the causal mask hides every entry of one (query block, key block) pair.

  With torch's top-left causal mask (query ``l`` sees key ``s`` iff ``s <= l``),
  the block is hidden iff its first key comes after its last query.

  Args:
    query_block: index of the query block (its queries are ``q_len * index + 0..q_len-1``).
    key_block: index of the key block.
    q_len: queries per block.
    k_len: keys per block.

  Returns:
    A bool (an array under tracing).

  Example:
    >>> jmat.parallel.block_is_masked(0, 1, 4, 4), jmat.parallel.block_is_masked(1, 0, 4, 4)
    (True, False)
  """
  return _hidden(query_block * q_len, key_block * k_len, q_len)


def _hidden(first_query: int | jax.Array, first_key: int | jax.Array, queries: int):
  """Whether the causal mask hides a whole tile: its last query sees not even its first key."""
  visible = block_sparse.causal(first_query + queries - 1, first_key)
  return not visible if isinstance(visible, bool) else jnp.logical_not(visible)


def _causal_mask(first_query: int | jax.Array, first_key: int | jax.Array, queries: int, keys: int):
  """The ``(queries, keys)`` causal mask of a tile whose corner is at the given positions."""
  rows = first_query + lax.broadcasted_iota(jnp.int32, (queries, keys), 0)
  cols = first_key + lax.broadcasted_iota(jnp.int32, (queries, keys), 1)
  return block_sparse.causal(rows, cols)


def _causal(m, r, g, q_pos, k_pos, operands):
  del m, r, g, operands
  return block_sparse.causal(q_pos[:, None], k_pos[None, :])


def _ring(n: int, axis_name: str, is_causal: bool, block_size: tuple[int, int],
          manual_axes: tuple[str, ...]):
  """The per-device ring attention of ``shard_map`` (``n`` devices along ``axis_name``).

  ``manual_axes`` are the mesh axes the ``shard_map`` is manual over: the
  operands vary over all of them, and so must the loop's carry. Each step is
  one call of the block-sparse kernel's forward (or backward) loop on the
  device's query block and the visiting key/value block, with the causal block
  map of that pair: a pair the mask hides lists no block and costs nothing.
  """
  to_next = [(i, (i + 1) % n) for i in range(n)]
  mods = block_sparse.Mods(mask=_causal if is_causal else None)

  def rotate(blocks: _Blocks) -> _Blocks:
    return tuple(lax.ppermute(x, axis_name, to_next) for x in blocks)

  def scan_ring(step, state, blocks: _Blocks):
    """Runs ``state, blocks = step(state, blocks, t)`` for ``t = 1 .. n-1``.

    ``blocks`` are rotated to the next device before each step, so at step ``t``
    device ``i`` holds the blocks that started on device ``(i - t) mod n``.
    """

    def body(carry, t):
      state, blocks = carry
      return step(state, rotate(blocks), t), None

    (state, blocks), _ = lax.scan(body, (state, blocks), jnp.arange(1, n))
    return state, blocks

  def as_kernel(x, grouped):
    """A local ``(*lead, T, D)`` block as the kernel's ``(1, N, [1,] T, D)``."""
    x = x.reshape((1, math.prod(x.shape[:-2])) + x.shape[-2:])
    return x[:, :, None] if grouped else x

  def layout(q, k):
    # Tiles divide the local lengths, so the blocks that travel need no padding.
    q_len, k_len = q.shape[-2], k.shape[-2]
    geo = block_sparse.Geometry(q_len, k_len,
                                block_sparse.block_for(q_len, block_size[0], dividing=True),
                                block_sparse.block_for(k_len, block_size[1], dividing=True))
    return as_kernel(q, True), geo

  def key_blocks(geo, here, there):
    offsets = {"q_offset": here * geo.q_len, "k_offset": there * geo.kv_len}
    sizes = (geo.q_len, geo.kv_len, geo.block_q, geo.block_k)
    if is_causal:
      return block_sparse.causal_key_blocks(*sizes, **offsets), offsets
    return block_sparse.dense_key_blocks(*sizes), offsets

  def forward(q, k, v, scale):
    here = lax.axis_index(axis_name)
    q_k, geo = layout(q, k)
    q_s, rest = xla.prescale(q_k, scale)

    def fold(carry, k, v, there):
      blocks, offsets = key_blocks(geo, here, there)
      return xla.forward_blocks(carry, q_s, as_kernel(k, False), as_kernel(v, False), blocks,
                                block_sparse.Operands(), rest, mods=mods, geo=geo, **offsets)

    empty = online_softmax.online_softmax_init(q_k.shape[:3], q_k.shape[3], v.shape[-1],
                                               dtype=_dtype(q))
    # Typed like the carry the folds return: varying over the manual mesh axes.
    empty = lax.pcast(empty, manual_axes, to="varying")

    def step(carry, kv, t):
      k, v = kv
      return fold(carry, k, v, (here - t) % n), kv

    # The blocks travel in their own (*lead, S / n, E) shape: only they cross devices.
    carry, _ = scan_ring(step, fold(empty, k, v, here), (k, v))
    out = online_softmax.online_softmax_finish(carry, q.dtype)[0, :, 0]
    lse = online_softmax.online_softmax_logsumexp(carry)
    return out.reshape(q.shape[:-1] + (v.shape[-1],)), lse

  @jax.custom_vjp
  def ring(q, k, v, scale):
    return forward(q, k, v, scale)[0]

  def ring_fwd(q, k, v, scale):
    out, lse = forward(q, k, v, scale)
    return out, (q, k, v, scale, out, lse)

  def ring_bwd(residuals, d_out):
    q, k, v, scale, out, lse = residuals
    here = lax.axis_index(axis_name)
    dtype = lse.dtype
    q_k, geo = layout(q, k)
    q_s = block_sparse.backward_queries(q_k, scale)
    d_out_k, out_k = (as_kernel(x.astype(dtype), True) for x in (d_out, out))
    # d loss / d lse, summed over the output row: the softmax's "delta" term.
    delta = jnp.sum(d_out_k * out_k, axis=-1)

    def step(dq, blocks, t):
      k, v, dk, dv = blocks
      key_table, offsets = key_blocks(geo, here, (here - t) % n)
      dq, dk_k, dv_k, _ = xla.backward_blocks(
          (dq, as_kernel(dk, False), as_kernel(dv, False), []), q_s, as_kernel(k, False),
          as_kernel(v, False), key_table, block_sparse.Operands(), None, d_out_k, lse, delta,
          mods=mods, geo=geo, **offsets)
      return dq, (k, v, dk_k.reshape(dk.shape), dv_k.reshape(dv.shape))

    zeros = tuple(jnp.zeros_like(x, dtype=dtype) for x in (q_k, k, v))
    dq, (_, _, dk, dv) = step(zeros[0], (k, v, *zeros[1:]), 0)
    # The key/value blocks travel together with their gradient accumulators; after
    # n - 1 moves each accumulator sits one device before its block's home.
    dq, (_, _, dk, dv) = scan_ring(step, dq, (k, v, dk, dv))
    dk, dv = rotate((dk, dv))
    dq, d_scale = block_sparse.scale_gradients(dq, q_k, scale)
    # scale is the same on every device: its gradient is the sum of every device's part.
    d_scale = lax.psum(d_scale, manual_axes)
    return (dq.reshape(q.shape).astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype),
            d_scale)

  ring.defvjp(ring_fwd, ring_bwd)
  return ring


def _dtype(x: jax.Array):
  return online_softmax.compute_dtype(x.dtype)


@functools.partial(
    jax.jit, static_argnames=("mesh", "axis_name", "is_causal", "block_size")
)
def ring_attention(
    query: ArrayLike,
    key: ArrayLike,
    value: ArrayLike,
    /,
    *,
    mesh: Mesh,
    axis_name: str,
    is_causal: bool = False,
    scale: ArrayLike | None = None,
    block_size: int | tuple[int, int] = 512,
) -> jax.Array:
  """Scaled dot-product attention with the sequence sharded over a mesh axis (ring attention).

  Computes what ``jmat.scaled_dot_product_attention(query, key, value,
  is_causal=is_causal, scale=scale)`` computes, but the sequence dimension
  (``-2``) of all three inputs is split into ``n = mesh.shape[axis_name]`` blocks,
  one per device. Each device keeps its query block; the key/value blocks are
  passed around the ring with ``lax.ppermute`` and folded into an online softmax,
  so no device holds more than two key/value blocks. Causal blocks that are
  entirely masked are skipped. Gradients (a second ring pass) are exact.

  Other mesh axes are left to jit's partitioner: shard the batch or head dims
  of the inputs over them (data or head parallelism) and they stay sharded.

  Args:
    query: ``(*lead, L, E)``.
    key: ``(*lead, S, E)``.
    value: ``(*lead, S, Ev)``.
    mesh: the device mesh.
    axis_name: the mesh axis the sequence dimension is sharded over.
    is_causal: torch's top-left causal mask (query ``l`` sees key ``s`` iff ``s <= l``).
    scale: the factor of ``q @ k^T`` (a number or a 0-d array, differentiable);
      ``1 / sqrt(E)`` if ``None``.
    block_size: the query and key block sizes (int or pair) each device's
      key/value block is folded in: the scores a device holds at once are
      ``block_size`` blocks, not ``(L / n, S / n)``.

  Returns:
    Array of shape ``(*lead, L, Ev)`` and the query's dtype, sharded like
    ``query`` (sequence over ``axis_name``).

  Raises:
    ShapeError: if the inputs are not attention operands of equal leading dims,
      or ``L`` or ``S`` is not divisible by the size of ``axis_name``.
    ValueError: if ``axis_name`` is not an axis of ``mesh``, or ``block_size``
      is not a positive int or pair.
    TypeError: if the dtypes differ or are not floating point.

  Example:
    >>> mesh = jax.make_mesh((1,), ("seq",))
    >>> q = k = v = jnp.ones((2, 4, 3))
    >>> jmat.parallel.ring_attention(q, k, v, mesh=mesh, axis_name="seq", is_causal=True).shape
    (2, 4, 3)
  """
  op = "parallel.ring_attention"
  query, key, value = _checked(op, query, key, value, mesh, axis_name)
  blocks = checks.check_block_size(op, block_size)
  factor = online_softmax.attention_scale(op, scale, query.shape[-1], _dtype(query))
  ring = functools.partial(_ring, mesh.shape[axis_name], axis_name, is_causal, blocks)
  return _shard_sequence(op, ring, query, key, value, factor, mesh, axis_name)


@functools.partial(jax.jit, static_argnames=("mesh", "axis_name", "is_causal"))
def allgather_attention(
    query: ArrayLike,
    key: ArrayLike,
    value: ArrayLike,
    /,
    *,
    mesh: Mesh,
    axis_name: str,
    is_causal: bool = False,
    scale: ArrayLike | None = None,
) -> jax.Array:
  """The simple alternative to :func:`ring_attention`: every device gathers all keys and values.

  Same arguments, result and sharding as :func:`ring_attention`; each device
  all-gathers the key/value blocks and attends its query block to the whole
  sequence in one online-softmax step. It moves as many bytes as the ring but
  holds the full keys and values (and an ``(L / n, S)`` score block) on every
  device; it is here as the baseline of the memory comparison in
  ``docs/distributed.md`` and of ``benchmarks/ring_attention.py``.

  Example:
    >>> mesh = jax.make_mesh((1,), ("seq",))
    >>> q = k = v = jnp.ones((2, 4, 3))
    >>> jmat.parallel.allgather_attention(q, k, v, mesh=mesh, axis_name="seq").shape
    (2, 4, 3)
  """
  op = "parallel.allgather_attention"
  query, key, value = _checked(op, query, key, value, mesh, axis_name)
  factor = online_softmax.attention_scale(op, scale, query.shape[-1], _dtype(query))

  def local(q, k, v, scale):
    k, v = (lax.all_gather(x, axis_name, axis=x.ndim - 2, tiled=True) for x in (k, v))
    here = lax.axis_index(axis_name)
    q_len = q.shape[-2]
    mask = _causal_mask(here * q_len, 0, q_len, k.shape[-2]) if is_causal else None
    empty = online_softmax.online_softmax_init(
        q.shape[:-2], q_len, v.shape[-1], dtype=_dtype(q)
    )
    carry = online_softmax.online_softmax_update(empty, q, k, v, scale=scale, mask=mask)
    return online_softmax.online_softmax_finish(carry, q.dtype)

  return _shard_sequence(op, lambda _: local, query, key, value, factor, mesh, axis_name)


def _checked(
    op: str, query: ArrayLike, key: ArrayLike, value: ArrayLike, mesh: Mesh, axis_name: str
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The operands as arrays, after the checks of a sequence-sharded attention."""
  query, key, value = (jnp.asarray(x) for x in (query, key, value))
  checks.check_ring_attention(
      op,
      query.shape,
      key.shape,
      value.shape,
      [query.dtype, key.dtype, value.dtype],
      axis_name,
      dict(mesh.shape),
  )
  return query, key, value


def _shard_sequence(
    op: str, make_local, query, key, value, scale, mesh: Mesh, axis_name: str
) -> jax.Array:
  """Runs ``make_local(manual_axes)(q, k, v, scale)`` per device, dim -2 sharded over
  ``axis_name`` and ``scale`` replicated."""
  lead = _explicit_lead_spec(op, query, axis_name)
  spec = PartitionSpec(*lead, axis_name, None)
  if axis_name in sharding.explicit_axes(mesh):
    # An Explicit mesh types the operands' sharding: place them as the shard_map expects.
    placed = NamedSharding(mesh, spec)
    query, key, value = (jax.sharding.reshard(x, placed) for x in (query, key, value))
    scale = jax.sharding.reshard(scale, NamedSharding(mesh, PartitionSpec()))
  manual_axes = (axis_name, *sorted(sharding.spec_axes(lead)))
  return jax.shard_map(
      make_local(manual_axes),
      mesh=mesh,
      in_specs=(spec, spec, spec, PartitionSpec()),
      out_specs=spec,
      axis_names=frozenset(manual_axes),
  )(query, key, value, scale)


def _explicit_lead_spec(op: str, query: jax.Array, axis_name: str) -> tuple:
  """How the leading dims of ``query`` are sharded over Explicit mesh axes (``None`` for Auto).

  Under an Auto mesh the shard_map is manual over ``axis_name`` only and jit's
  partitioner keeps the other axes' sharding of the leading dims. Under an
  Explicit mesh the sharding is part of the type and the shard_map is made
  manual over those axes too: left automatic, they would be gathered and sliced
  again around the ring.
  """
  lead = sharding.explicit_spec(query)[:-2]
  checks.check_ring_lead_sharding(op, query.shape, lead, axis_name)
  return lead
