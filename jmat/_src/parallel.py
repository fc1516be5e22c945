"""Attention over a device mesh: ring attention with ``shard_map`` and ``lax.ppermute``.

The sequence is cut into ``n`` blocks, one per device along a mesh axis. Each
device keeps its query block and the key/value blocks travel around the ring:
at step ``t`` device ``i`` holds key/value block ``(i - t) mod n``, folds it into
its online-softmax carry (:func:`jmat.attention.online_softmax_update`, the one
recurrence that blockwise attention also uses) and passes it on to device
``i + 1``. A block is folded in tiles of at most ``TILE_Q`` queries by ``TILE_K``
keys, sliced in place, so a device holds its own blocks, one key/value block in
flight and two tiles of scores: per-device memory is ``O((L / n) * E)`` plus a
constant, however long the sequence grows.

The backward pass is a second trip around the ring (a ``jax.custom_vjp``): the
forward pass keeps only its inputs, its output and the per-query log-sum-exp,
and the key/value blocks travel again together with their gradient
accumulators, so the backward pass is ``O(L / n)`` per device as well (plain
autodiff through the ring would keep every block that passed by). The gradient
of one tile is the vector-Jacobian product of the same online-softmax update,
run from a carry whose maximum is the final log-sum-exp.

Causal blocks (and tiles) that no query of the device may see are skipped with
``lax.cond``: the device computes nothing for them but still forwards them, so
the ring keeps turning. (The causal work is unbalanced, device ``i`` computes
``i + 1`` blocks; a striped or zig-zag layout would even it out.)
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec
from jax.typing import ArrayLike

from jmat._src import attention, checks

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


# A device folds a key/value block into its carry in tiles of at most this many
# queries and keys (the blockwise kernel's block sizes): the scores it holds at once
# are (TILE_Q, TILE_K), not (L / n, S / n).
TILE_Q = attention.BLOCK_Q
TILE_K = attention.BLOCK_K


def _tile(n: int, limit: int) -> int:
  """The tile for ``n`` rows: ``n`` itself up to ``limit``, else its largest divisor up to it.

  A length with no divisor in ``(limit / 8, limit]`` (a large prime, say) is not
  tiled: tiny tiles would cost more than the scores they save.
  """
  if n <= limit:
    return n
  for size in range(limit, limit // 8, -1):
    if n % size == 0:
      return size
  return n


def _rows(x: jax.Array, start: jax.Array, size: int, axis: int = -2) -> jax.Array:
  """Rows ``start .. start + size`` of ``axis`` (a tile, sliced in place inside loops)."""
  return lax.dynamic_slice_in_dim(x, start, size, axis % x.ndim)


def _put_rows(x: jax.Array, rows: jax.Array, start: jax.Array, axis: int = -2) -> jax.Array:
  """``x`` with rows ``start ..`` of ``axis`` replaced by ``rows`` (in place inside loops)."""
  return lax.dynamic_update_slice_in_dim(x, rows, start, axis % x.ndim)


def _hidden(first_query: int | jax.Array, first_key: int | jax.Array, queries: int):
  """Whether the causal mask hides a whole tile: its first key comes after its last query."""
  return first_key > first_query + queries - 1


def _causal_mask(first_query: int | jax.Array, first_key: int | jax.Array, queries: int, keys: int):
  """The ``(queries, keys)`` causal mask of a tile whose corner is at the given positions."""
  rows = first_query + lax.broadcasted_iota(jnp.int32, (queries, keys), 0)
  cols = first_key + lax.broadcasted_iota(jnp.int32, (queries, keys), 1)
  return cols <= rows


def _ring(n: int, axis_name: str, is_causal: bool, scale: float, manual_axes: tuple[str, ...]):
  """The per-device ring attention of ``shard_map`` (``n`` devices along ``axis_name``).

  ``manual_axes`` are the mesh axes the ``shard_map`` is manual over: the
  operands vary over all of them, and so must the loop's carry.
  """
  to_next = [(i, (i + 1) % n) for i in range(n)]

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

  def unless_hidden(fold, state, first_query, first_key, queries, otherwise=None):
    """``fold(state)``, or (computing nothing) ``otherwise(state)`` if the mask hides the tile."""
    if not is_causal:
      return fold(state)
    hidden = _hidden(first_query, first_key, queries)
    return lax.cond(hidden, otherwise or (lambda s: s), fold, state)

  def tiles_of(q, k):
    """Tile sizes and counts of one (query block, key/value block) pair."""
    tq, tk = _tile(q.shape[-2], TILE_Q), _tile(k.shape[-2], TILE_K)
    return tq, tk, q.shape[-2] // tq, k.shape[-2] // tk

  def fold_block(carry, q, k, v, here, there):
    """Folds key/value block ``there`` into the carry of query block ``here``, tile by tile."""
    tq, tk, nq, nk = tiles_of(q, k)

    axes = (-2, -1, -1)  # of acc, row_max, row_sum

    def query_tile(a, carry):
      first_query = here * q.shape[-2] + a * tq
      q_tile = _rows(q, a * tq, tq)
      tile = tuple(_rows(x, a * tq, tq, axis) for x, axis in zip(carry, axes, strict=True))

      def key_tile(b, tile):
        first_key = there * k.shape[-2] + b * tk
        k_tile, v_tile = _rows(k, b * tk, tk), _rows(v, b * tk, tk)
        mask = _causal_mask(first_query, first_key, tq, tk) if is_causal else None

        def fold(tile):
          return attention.online_softmax_update(
              tile, q_tile, k_tile, v_tile, scale=scale, mask=mask
          )

        return unless_hidden(fold, tile, first_query, first_key, tq)

      tile = lax.fori_loop(0, nk, key_tile, tile)
      return tuple(
          _put_rows(x, t, a * tq, axis) for x, t, axis in zip(carry, tile, axes, strict=True)
      )

    return lax.fori_loop(0, nq, query_tile, carry)

  def forward(q, k, v):
    here = lax.axis_index(axis_name)
    q_len, k_len = q.shape[-2], k.shape[-2]

    def fold(carry, k, v, there):
      return fold_block(carry, q, k, v, here, there)

    empty = attention.online_softmax_init(
        q.shape[:-2], q_len, v.shape[-1], dtype=attention._compute_dtype(q.dtype)
    )
    # Typed like the carry the folds return: varying over the manual mesh axes.
    empty = lax.pcast(empty, manual_axes, to="varying")
    carry = unless_hidden(lambda c: fold(c, k, v, here), empty, here * q_len, here * k_len, q_len)

    def step(carry, kv, t):
      there = (here - t) % n
      first_query, first_key = here * q_len, there * k_len
      k, v = kv
      carry = unless_hidden(lambda c: fold(c, k, v, there), carry, first_query, first_key, q_len)
      return carry, kv

    carry, _ = scan_ring(step, carry, (k, v))
    _, row_max, row_sum = carry
    # Per query: the log of the softmax denominator, -inf where no key was visible.
    return attention.online_softmax_finish(carry, q.dtype), row_max + jnp.log(row_sum)

  @jax.custom_vjp
  def ring(q, k, v):
    return forward(q, k, v)[0]

  def ring_fwd(q, k, v):
    out, lse = forward(q, k, v)
    return out, (q, k, v, out, lse)

  def ring_bwd(residuals, d_out):
    q, k, v, out, lse = residuals
    here = lax.axis_index(axis_name)
    q_len, k_len = q.shape[-2], k.shape[-2]
    dtype = lse.dtype
    d_out = d_out.astype(dtype)
    # d loss / d lse, summed over the output row: the softmax's "delta" term.
    delta = jnp.sum(d_out * out.astype(dtype), axis=-1)

    def tile_grads(q, k, v, lse, d_out, delta, mask):
      # From (0, lse, 0) the update adds exactly P = exp(s - lse) @ v to acc and
      # sum(P) to row_sum; the cotangents (d_out, 0, -delta) give the gradient of
      # the whole softmax restricted to this tile.
      def contribution(q, k, v):
        start = (jnp.zeros_like(d_out), lse, jnp.zeros_like(lse))
        return attention.online_softmax_update(start, q, k, v, scale=scale, mask=mask)

      carry, vjp = jax.vjp(contribution, q, k, v)
      grads = vjp((d_out, jnp.zeros_like(carry[1]), -delta))
      return tuple(g.astype(dtype) for g in grads)

    def add_block_grads(grads, k, v, there):
      """Adds the gradients of key/value block ``there`` (query block ``here``), tile by tile."""
      tq, tk, nq, nk = tiles_of(q, k)

      def query_tile(a, grads):
        dq, dk, dv = grads
        first_query = here * q_len + a * tq
        q_tile, d_out_tile = _rows(q, a * tq, tq), _rows(d_out, a * tq, tq)
        lse_tile, delta_tile = _rows(lse, a * tq, tq, -1), _rows(delta, a * tq, tq, -1)

        def key_tile(b, state):
          dq_tile, dk, dv = state
          first_key = there * k_len + b * tk
          mask = _causal_mask(first_query, first_key, tq, tk) if is_causal else None
          operands = (q_tile, _rows(k, b * tk, tk), _rows(v, b * tk, tk))

          def tile(operands):
            q_tile, k_tile, v_tile = operands
            return tile_grads(q_tile, k_tile, v_tile, lse_tile, d_out_tile, delta_tile, mask)

          def nothing(operands):
            return tuple(jnp.zeros_like(x, dtype) for x in operands)

          gq, gk, gv = unless_hidden(tile, operands, first_query, first_key, tq, nothing)
          dk = _put_rows(dk, _rows(dk, b * tk, tk) + gk, b * tk)
          dv = _put_rows(dv, _rows(dv, b * tk, tk) + gv, b * tk)
          return dq_tile + gq, dk, dv

        dq_tile, dk, dv = lax.fori_loop(0, nk, key_tile, (_rows(dq, a * tq, tq), dk, dv))
        return _put_rows(dq, dq_tile, a * tq), dk, dv

      return lax.fori_loop(0, nq, query_tile, grads)

    def step(dq, blocks, t):
      k, v, dk, dv = blocks
      there = (here - t) % n

      def fold(grads):
        return add_block_grads(grads, k, v, there)

      dq, dk, dv = unless_hidden(fold, (dq, dk, dv), here * q_len, there * k_len, q_len)
      return dq, (k, v, dk, dv)

    zeros = tuple(jnp.zeros_like(x, dtype) for x in (q, k, v))
    dq, (_, _, dk, dv) = step(zeros[0], (k, v, *zeros[1:]), 0)
    # The key/value blocks travel together with their gradient accumulators; after
    # n - 1 moves each accumulator sits one device before its block's home.
    dq, (_, _, dk, dv) = scan_ring(step, dq, (k, v, dk, dv))
    dk, dv = rotate((dk, dv))
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)

  ring.defvjp(ring_fwd, ring_bwd)
  return ring


@functools.partial(jax.jit, static_argnames=("mesh", "axis_name", "is_causal", "scale"))
def ring_attention(
    query: ArrayLike,
    key: ArrayLike,
    value: ArrayLike,
    /,
    *,
    mesh: Mesh,
    axis_name: str,
    is_causal: bool = False,
    scale: float | None = None,
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
    scale: the factor of ``q @ k^T``; ``1 / sqrt(E)`` if ``None``.

  Returns:
    Array of shape ``(*lead, L, Ev)`` and the query's dtype, sharded like
    ``query`` (sequence over ``axis_name``).

  Raises:
    ShapeError: if the inputs are not attention operands of equal leading dims,
      or ``L`` or ``S`` is not divisible by the size of ``axis_name``.
    ValueError: if ``axis_name`` is not an axis of ``mesh``.
    TypeError: if the dtypes differ or are not floating point.

  Example:
    >>> mesh = jax.make_mesh((1,), ("seq",))
    >>> q = k = v = jnp.ones((2, 4, 3))
    >>> jmat.parallel.ring_attention(q, k, v, mesh=mesh, axis_name="seq", is_causal=True).shape
    (2, 4, 3)
  """
  query, key, value = _checked("parallel.ring_attention", query, key, value, mesh, axis_name)
  factor = query.shape[-1] ** -0.5 if scale is None else float(scale)
  ring = functools.partial(_ring, mesh.shape[axis_name], axis_name, is_causal, factor)
  return _shard_sequence(ring, query, key, value, mesh, axis_name)


@functools.partial(jax.jit, static_argnames=("mesh", "axis_name", "is_causal", "scale"))
def allgather_attention(
    query: ArrayLike,
    key: ArrayLike,
    value: ArrayLike,
    /,
    *,
    mesh: Mesh,
    axis_name: str,
    is_causal: bool = False,
    scale: float | None = None,
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
  query, key, value = _checked("parallel.allgather_attention", query, key, value, mesh, axis_name)
  factor = query.shape[-1] ** -0.5 if scale is None else float(scale)

  def local(q, k, v):
    k, v = (lax.all_gather(x, axis_name, axis=x.ndim - 2, tiled=True) for x in (k, v))
    here = lax.axis_index(axis_name)
    q_len = q.shape[-2]
    mask = _causal_mask(here * q_len, 0, q_len, k.shape[-2]) if is_causal else None
    empty = attention.online_softmax_init(
        q.shape[:-2], q_len, v.shape[-1], dtype=attention._compute_dtype(q.dtype)
    )
    carry = attention.online_softmax_update(empty, q, k, v, scale=factor, mask=mask)
    return attention.online_softmax_finish(carry, q.dtype)

  return _shard_sequence(lambda _: local, query, key, value, mesh, axis_name)


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


def _shard_sequence(make_local, query, key, value, mesh: Mesh, axis_name: str) -> jax.Array:
  """Runs ``make_local(manual_axes)(q, k, v)`` per device, dim -2 sharded over ``axis_name``."""
  lead = _explicit_lead_spec(query, axis_name)
  spec = PartitionSpec(*lead, axis_name, None)
  if dict(zip(mesh.axis_names, mesh.axis_types, strict=True))[axis_name] == AxisType.Explicit:
    # An Explicit mesh types the operands' sharding: place them as the shard_map expects.
    sharding = NamedSharding(mesh, spec)
    query, key, value = (jax.sharding.reshard(x, sharding) for x in (query, key, value))
  manual_axes = (axis_name, *sorted(_axis_names(lead)))
  return jax.shard_map(
      make_local(manual_axes),
      mesh=mesh,
      in_specs=(spec, spec, spec),
      out_specs=spec,
      axis_names=frozenset(manual_axes),
  )(query, key, value)


def _axis_names(spec: tuple) -> set[str]:
  """The mesh axes a partition spec shards over."""
  names: set[str] = set()
  for entry in spec:
    if entry is not None:
      names.update((entry,) if isinstance(entry, str) else entry)
  return names


def _explicit_lead_spec(query: jax.Array, axis_name: str) -> tuple:
  """How the leading dims of ``query`` are sharded over Explicit mesh axes (``None`` for Auto).

  Under an Auto mesh the shard_map is manual over ``axis_name`` only and jit's
  partitioner keeps the other axes' sharding of the leading dims. Under an
  Explicit mesh the sharding is part of the type and the shard_map is made
  manual over those axes too: left automatic, they would be gathered and sliced
  again around the ring.
  """
  sharding = jax.typeof(query).sharding
  explicit = {
      name
      for name, kind in zip(sharding.mesh.axis_names, sharding.mesh.axis_types, strict=True)
      if kind == AxisType.Explicit
  }
  spec = tuple(sharding.spec) + (None,) * (query.ndim - len(sharding.spec))
  lead = tuple(e if _axis_names((e,)) <= explicit else None for e in spec[:-2])
  checks.check_ring_lead_sharding("parallel.ring_attention", query.shape, lead, axis_name)
  return lead
