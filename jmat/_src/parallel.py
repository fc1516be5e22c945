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

Masks are the kernel's block tables of each (query chunk, key chunk) pair, with
global positions: the causal block map with the chunks' offsets, or the slice of
a global BlockMask's block map (flex's score_mod and mask_mod run in the kernel
as in ``jmat.flex_attention``). Blocks a mask hides are not listed, so a device
computes nothing for them but still forwards its chunks and the ring keeps
turning. With a contiguous layout causal work is unbalanced (device ``i``
computes ``i + 1`` chunks); ``layout="zigzag"`` (:mod:`jmat._src.layouts`) gives
every device two chunks from opposite ends and evens it out.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from jax.typing import ArrayLike

from jmat._src import backends, block_sparse, checks, layouts, online_softmax, sharding
from jmat._src.block_mask import BlockMask, ScoreMod, checked_mod
from jmat._src.flex_attention import Layout, flex_mods, from_kernel, to_kernel
from jmat._src.kernels import xla
from jmat._src.products import operands as as_operands

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


def _causal(m, r, g, q_pos, k_pos, operands):
  del m, r, g, operands
  return block_sparse.causal(q_pos[:, None], k_pos[None, :])


@dataclasses.dataclass(frozen=True)
class _Plan:
  """How one device runs its part of a sequence-sharded attention (static).

  Attributes:
    n: devices along ``axis_name``.
    axis_name: the mesh axis the sequence is sharded over.
    manual_axes: the mesh axes the ``shard_map`` is manual over.
    chunks: the global chunk ids each device holds, in local order (the layout).
    geo: one query chunk and one key chunk, and the kernel's blocks in them.
    mods: the kernel's score and mask functions (positions are global).
    tables: ``"map"`` (slices of the global block map), ``"causal"`` or ``"dense"``.
    gather: all-gather the keys and values instead of passing them around the ring.
    to_q: a local query (or output) shard in the public layout -> the kernel's ``(M, R, G, T, D)``.
    to_kv: a local key or value shard -> the kernel's ``(M, R, T, D)``.
    back: the kernel's ``(M, R, G, T, ...)`` -> the public layout of the local query shard.
  """

  n: int
  axis_name: str
  manual_axes: tuple[str, ...]
  chunks: tuple[tuple[int, ...], ...]
  geo: block_sparse.Geometry
  mods: block_sparse.Mods
  tables: str
  gather: bool
  to_q: Callable[[jax.Array], jax.Array]
  to_kv: Callable[[jax.Array], jax.Array]
  back: Callable[[jax.Array, jax.Array], jax.Array]

  def key_blocks(self, block_map, a, b) -> block_sparse.KeyBlocks:
    """The kernel's table of global query chunk ``a`` against global key chunk ``b``."""
    geo = self.geo
    if self.tables == "map":
      rows, cols = geo.q_len // geo.block_q, geo.kv_len // geo.block_k
      starts = [jnp.asarray(x, jnp.int32) for x in (0, a * rows, b * cols)]
      part = lax.dynamic_slice(block_map, starts, (block_map.shape[0], rows, cols))
      return block_sparse.key_blocks_from_dense(part == 1, part == 2)
    sizes = (geo.q_len, geo.kv_len, geo.block_q, geo.block_k)
    if self.tables == "causal":
      return block_sparse.causal_key_blocks(*sizes, q_offset=a * geo.q_len,
                                            k_offset=b * geo.kv_len)
    return block_sparse.dense_key_blocks(*sizes)

  def parts(self, x: jax.Array, length: int) -> list[jax.Array]:
    """A local shard's chunks along the sequence axis (-2 of the kernel's layout)."""
    return [x[..., c * length:(c + 1) * length, :] for c in range(len(self.chunks[0]))]


def _chunk_ids(plan: _Plan) -> jax.Array:
  """``(n, chunks per device)`` int32: the global chunk ids of every device.

  Made where it is used: a traced constant must not be closed over by a custom_vjp.
  """
  return jnp.asarray(plan.chunks, jnp.int32)


def _visit(plan: _Plan, state, kv, step, grads=()):
  """Runs ``state, grads = step(state, kv_j, grads_j, j)`` for every device ``j``'s shards.

  ``kv`` are this device's key/value shards, ``grads`` gradient accumulators
  shaped like them. On the ring, the shards move on to the next device with the
  transfer started before the compute on the current ones (at step ``t`` a device
  holds what device ``here - t`` started with) and the accumulators travel with
  them, home again after ``n`` moves. With ``gather`` every device gathers every
  shard first and keeps one accumulator per device's shard, summed where the shard
  lives at the end (a reduce-scatter).
  """
  n, axis_name = plan.n, plan.axis_name
  here = lax.axis_index(axis_name)
  if plan.gather:
    gathered = tuple(lax.all_gather(x, axis_name) for x in kv)
    grads = tuple(jnp.zeros((n,) + g.shape, g.dtype) for g in grads)

    def at(carry, j):
      state, grads = carry
      state, updated = step(state, tuple(x[j] for x in gathered),
                            tuple(g[j] for g in grads), j)
      return (state, tuple(g.at[j].set(u) for g, u in zip(grads, updated, strict=True))), None

    (state, grads), _ = lax.scan(at, (state, grads), jnp.arange(n))
    return state, tuple(lax.psum_scatter(g, axis_name) for g in grads)

  to_next = [(i, (i + 1) % n) for i in range(n)]

  def rotate(xs):
    return tuple(lax.ppermute(x, axis_name, to_next) for x in xs)

  def body(carry, t):
    state, kv, grads = carry
    following = rotate(kv)  # issued before the compute that needs only the current shards
    state, grads = step(state, kv, grads, (here - t) % n)
    return (state, following, rotate(grads)), None

  (state, _, grads), _ = lax.scan(body, (state, kv, grads), jnp.arange(n))
  return state, grads


def _chunks(plan: _Plan, kv, grads) -> tuple[list[jax.Array], ...]:
  """A visited device's key and value shards and their gradient accumulators, cut into the
  kernel's chunks: ``(k_parts, v_parts, dk_parts, dv_parts)``."""
  length = plan.geo.kv_len
  k_parts, v_parts = (plan.parts(plan.to_kv(x), length) for x in kv)
  dk_parts, dv_parts = (plan.parts(x, length) for x in grads)
  return k_parts, v_parts, dk_parts, dv_parts


def _context_parallel(plan: _Plan):
  """The per-device attention of ``shard_map``: ``f(q, k, v, scale, whole, block_map)``.

  ``q``, ``k``, ``v`` are the device's shards in the public layout (its chunks
  concatenated), ``whole`` what the mods read (replicated), ``block_map`` the
  global ``(M, n_q, n_k)`` block map (replicated; only with ``tables == "map"``).
  Returns ``(out, lse)``, each in the public layout. A (query chunk, key chunk)
  pair whose table lists no block costs nothing: the kernel's loops have no
  trip; the key/value chunks still move on around the ring.
  """
  axis_name = plan.axis_name
  visit = functools.partial(_visit, plan)
  chunk_ids = functools.partial(_chunk_ids, plan)
  cq, ck = plan.geo.q_len, plan.geo.kv_len

  def forward(q, k, v, scale, whole, block_map):
    here = lax.axis_index(axis_name)
    mine = chunk_ids()[here]
    q_k = plan.to_q(q)
    q_s, rest = xla.prescale(q_k, scale)
    q_parts = plan.parts(q_s, cq)
    dtype = _dtype(q)
    empty = online_softmax.online_softmax_init(q_k.shape[:3], cq, v.shape[-1], dtype=dtype)
    carries = [empty for _ in q_parts]
    operands = block_sparse.Operands(whole, ())

    def step(carries, kv, grads, j):
      theirs = chunk_ids()[j]
      k_parts, v_parts = (plan.parts(plan.to_kv(x), ck) for x in kv)
      carries = list(carries)
      for a, q_a in enumerate(q_parts):
        for b, (k_b, v_b) in enumerate(zip(k_parts, v_parts, strict=True)):
          carries[a] = xla.forward_blocks(
              carries[a], q_a, k_b, v_b, plan.key_blocks(block_map, mine[a], theirs[b]),
              operands, rest, mods=plan.mods, geo=plan.geo, q_offset=mine[a] * cq,
              k_offset=theirs[b] * ck)
      return carries, grads

    carries, _ = visit(carries, (k, v), step)
    out = jnp.concatenate([online_softmax.online_softmax_finish(c, dtype) for c in carries], -2)
    lse = jnp.concatenate([online_softmax.online_softmax_logsumexp(c) for c in carries], -1)
    return plan.back(out, q).astype(q.dtype), plan.back(lse[..., None], q)[..., 0], lse

  @jax.custom_vjp
  def attend(q, k, v, scale, whole, block_map):
    return forward(q, k, v, scale, whole, block_map)[:2]

  def attend_fwd(q, k, v, scale, whole, block_map):
    out, lse, lse_k = forward(q, k, v, scale, whole, block_map)
    return (out, lse), (q, k, v, scale, whole, block_map, out, lse_k)

  def attend_bwd(residuals, cotangents):
    q, k, v, scale, whole, block_map, out, lse = residuals
    d_out, d_lse = cotangents
    here = lax.axis_index(axis_name)
    mine = chunk_ids()[here]
    dtype = lse.dtype
    q_k = plan.to_q(q)
    q_s = block_sparse.backward_queries(q_k, scale)
    d_out_k = plan.to_q(d_out.astype(dtype))
    delta, lse = block_sparse.backward_statistics(
        plan.to_q(out), d_out_k, lse, plan.to_q(d_lse[..., None])[..., 0], dtype)
    rows = [plan.parts(x, cq) for x in (q_s, d_out_k)]
    rows += [[x[..., c * cq:(c + 1) * cq] for c in range(len(plan.chunks[0]))]
             for x in (lse, delta)]
    floats = [x for x in jax.tree.leaves(whole) if jnp.issubdtype(x.dtype, jnp.inexact)]

    transposed = functools.partial(_transposed, dtype=dtype)
    operands = block_sparse.Operands(whole, ())

    def step(state, kv, grads, j):
      dqs, d_ops = state
      theirs = chunk_ids()[j]
      k_parts, v_parts, dk_parts, dv_parts = _chunks(plan, kv, grads)
      dqs = list(dqs)
      for a in range(len(dqs)):
        for b in range(len(k_parts)):
          dqs[a], dk_parts[b], dv_parts[b], d_ops = xla.backward_blocks(
              (dqs[a], dk_parts[b], dv_parts[b], d_ops), rows[0][a], k_parts[b], v_parts[b],
              plan.key_blocks(block_map, mine[a], theirs[b]), operands, None, rows[1][a],
              rows[2][a], rows[3][a], mods=plan.mods, geo=plan.geo, q_offset=mine[a] * cq,
              k_offset=theirs[b] * ck)
      return (dqs, d_ops), tuple(jnp.concatenate(x, -2) for x in (dk_parts, dv_parts))

    state = ([jnp.zeros(r.shape, dtype) for r in rows[0]],
             [jnp.zeros(x.shape, dtype) for x in floats])
    zeros_kv = tuple(jnp.zeros(plan.to_kv(x).shape, dtype) for x in (k, v))
    (dqs, d_ops), (dk, dv) = visit(state, (k, v), step, zeros_kv)
    dq, d_scale = block_sparse.scale_gradients(jnp.concatenate(dqs, -2), q_k, scale)
    # scale and the captured arrays are the same on every device: their gradients are the sums
    # of every device's part, which shard_map's transpose adds up (see _shard_sequence).
    d_floats = iter(d_ops)
    d_whole = jax.tree.map(
        lambda x: next(d_floats).astype(x.dtype) if jnp.issubdtype(x.dtype, jnp.inexact)
        else block_sparse.zero_cotangent(x), whole)
    return (transposed(plan.to_q, q, dq).astype(q.dtype),
            transposed(plan.to_kv, k, dk).astype(k.dtype),
            transposed(plan.to_kv, v, dv).astype(v.dtype), d_scale, d_whole,
            block_sparse.zero_cotangent(block_map))

  attend.defvjp(attend_fwd, attend_bwd)
  return attend


def _per_device(op: str, plan: _Plan, options: backends.KernelOptions):
  """Each device's attention on the kernel ``options`` ask for.

  The XLA loops fold every pair into one online-softmax carry
  (:func:`_context_parallel`); a fused kernel (Triton, Mosaic) runs each pair as
  one kernel call and merges the pairs by lse (:func:`_fused_pairs`). Under
  ``AUTO`` the choice is made where the platform is known
  (:func:`jmat._src.backends.per_platform`): the fused kernel of an accelerator,
  the XLA loops elsewhere.
  """
  on_xla = _context_parallel(plan)
  if options.backend == "XLA":
    return on_xla
  fused = _fused_pairs(plan, lambda call: backends.attend(op, call, options))
  if options.backend != "AUTO":
    return fused
  return backends.per_platform(on_xla, {p: fused for p in backends.FUSED})


def _transposed(layout, x, grad, *, dtype):
  """The public layout's gradient: the layout's transpose (a reshape, or a sum over the query
  heads that share a key/value head where it repeated them), in the compute dtype."""
  return jax.linear_transpose(layout, x.astype(dtype))(grad)[0]


def _merge_weights(lse_part: jax.Array, lse: jax.Array) -> jax.Array:
  """``exp(lse_part - lse)``: the share of a part's softmax in the whole (0 where the part saw
  nothing, also where nothing was seen at all; NaN stays NaN)."""
  return jnp.where(jnp.isneginf(lse_part), 0.0, jnp.exp(lse_part - lse))


def _fused_pairs(plan: _Plan, run: Callable[[block_sparse.Call], tuple]):
  """:func:`_context_parallel`'s function on a fused kernel: ``run(call) -> (out, lse)``.

  Each (query chunk, key chunk) pair is one call of the block-sparse kernel's
  backend dispatch (the Triton or Mosaic kernel on an accelerator) with the
  chunks' global position offsets and their slice of the global block map; the
  pairs' normalised outputs are merged by their lse (``out = sum_j
  exp(lse_j - lse) out_j``, ``lse = logsumexp_j lse_j``), as ring flash attention
  does. A pair whose table lists no block is skipped (``lax.cond``). The backward
  pass is a second trip around the ring: each pair's kernel call is differentiated
  (its own fused backward) with the cotangents the merge gives it,
  ``exp(lse_j - lse) * d_out`` for ``out_j`` and
  ``exp(lse_j - lse) * (rowsum(d_out * (out_j - out)) + d_lse)`` for ``lse_j``.
  """
  axis_name = plan.axis_name
  visit = functools.partial(_visit, plan)
  chunk_ids = functools.partial(_chunk_ids, plan)
  cq, ck = plan.geo.q_len, plan.geo.kv_len

  def pair(q_a, k_b, v_b, scale, whole, block_map, a, b):
    """``(out, lse)`` of query chunk ``a`` against key chunk ``b`` (compute dtype)."""
    blocks = plan.key_blocks(block_map, a, b)
    call = block_sparse.Call(q_a, k_b, v_b, blocks, block_sparse.Operands(whole, ()), scale,
                             mods=plan.mods, block_q=plan.geo.block_q,
                             block_k=plan.geo.block_k, q_offset=a * cq, k_offset=b * ck)
    dtype = _dtype(q_a)

    def nothing(call):
      shape = call.q.shape[:-1]
      return (jnp.zeros(shape + call.v.shape[-1:], dtype), jnp.full(shape, -jnp.inf, dtype))

    def something(call):
      out, lse = run(call)[:2]
      return out.astype(dtype), lse.astype(dtype)

    listed = jnp.any(blocks.num > 0) | jnp.any(blocks.full_num > 0)
    return lax.cond(listed, something, nothing, call)

  def forward(q, k, v, scale, whole, block_map):
    mine = chunk_ids()[lax.axis_index(axis_name)]
    q_parts = plan.parts(plan.to_q(q), cq)
    dtype = _dtype(q)
    shape = q_parts[0].shape[:-1]
    state = [(jnp.zeros(shape + v.shape[-1:], dtype), jnp.full(shape, -jnp.inf, dtype))
             for _ in q_parts]

    def step(state, kv, grads, j):
      theirs = chunk_ids()[j]
      k_parts, v_parts = (plan.parts(plan.to_kv(x), ck) for x in kv)
      state = list(state)
      for a, q_a in enumerate(q_parts):
        for b, (k_b, v_b) in enumerate(zip(k_parts, v_parts, strict=True)):
          out_ab, lse_ab = pair(q_a, k_b, v_b, scale, whole, block_map, mine[a], theirs[b])
          out_a, lse_a = state[a]
          lse_new = jnp.logaddexp(lse_a, lse_ab)
          out_a = (_merge_weights(lse_a, lse_new)[..., None] * out_a
                   + _merge_weights(lse_ab, lse_new)[..., None] * out_ab)
          state[a] = (out_a, lse_new)
      return state, grads

    state, _ = visit(state, (k, v), step)
    out = jnp.concatenate([o for o, _ in state], -2)
    lse = jnp.concatenate([x for _, x in state], -1)
    return plan.back(out, q).astype(q.dtype), plan.back(lse[..., None], q)[..., 0], out, lse

  @jax.custom_vjp
  def attend(q, k, v, scale, whole, block_map):
    return forward(q, k, v, scale, whole, block_map)[:2]

  def attend_fwd(q, k, v, scale, whole, block_map):
    out, lse, out_k, lse_k = forward(q, k, v, scale, whole, block_map)
    return (out, lse), (q, k, v, scale, whole, block_map, out_k, lse_k)

  def attend_bwd(residuals, cotangents):
    q, k, v, scale, whole, block_map, out, lse = residuals
    d_out, d_lse = cotangents
    mine = chunk_ids()[lax.axis_index(axis_name)]
    dtype = lse.dtype
    q_k = plan.to_q(q)
    d_out_k = plan.to_q(d_out.astype(dtype))
    d_lse_k = plan.to_q(d_lse.astype(dtype)[..., None])[..., 0]
    rows = [plan.parts(x, cq) for x in (q_k, d_out_k, out)]
    rows += [[x[..., c * cq:(c + 1) * cq] for c in range(len(plan.chunks[0]))]
             for x in (lse, d_lse_k)]
    whole_leaves, whole_tree = jax.tree.flatten(whole)
    floats = [jnp.issubdtype(x.dtype, jnp.inexact) for x in whole_leaves]

    def pair_vjp(q_a, k_b, v_b, a, b, out_a, lse_a, d_out_a, d_lse_a):
      def f(q_a, k_b, v_b, scale, float_leaves):
        it = iter(float_leaves)
        leaves = [next(it) if f else x for x, f in zip(whole_leaves, floats, strict=True)]
        return pair(q_a, k_b, v_b, scale, jax.tree.unflatten(whole_tree, leaves), block_map,
                    a, b)

      float_leaves = [x for x, f in zip(whole_leaves, floats, strict=True) if f]
      (out_ab, lse_ab), vjp = jax.vjp(f, q_a, k_b, v_b, scale, float_leaves)
      w = _merge_weights(lse_ab, lse_a)
      g_out = w[..., None] * d_out_a
      g_lse = w * (jnp.sum(d_out_a * (out_ab - out_a), axis=-1) + d_lse_a)
      return vjp((g_out, g_lse))

    def step(state, kv, grads, j):
      dqs, d_scale, d_floats = state
      theirs = chunk_ids()[j]
      k_parts, v_parts, dk_parts, dv_parts = _chunks(plan, kv, grads)
      dqs = list(dqs)
      for a in range(len(dqs)):
        for b in range(len(k_parts)):
          dq, dk, dv, ds, df = pair_vjp(
              rows[0][a], k_parts[b], v_parts[b], mine[a], theirs[b], rows[2][a], rows[3][a],
              rows[1][a], rows[4][a])
          dqs[a] = dqs[a] + dq.astype(dtype)
          dk_parts[b] = dk_parts[b] + dk.astype(dtype)
          dv_parts[b] = dv_parts[b] + dv.astype(dtype)
          d_scale = d_scale + ds.astype(dtype)
          d_floats = [x + g.astype(x.dtype) for x, g in zip(d_floats, df, strict=True)]
      return (dqs, d_scale, d_floats), tuple(jnp.concatenate(x, -2) for x in (dk_parts, dv_parts))

    state = ([jnp.zeros(r.shape, dtype) for r in rows[0]], jnp.zeros((), dtype),
             [jnp.zeros(x.shape, dtype) for x, f in zip(whole_leaves, floats, strict=True) if f])
    zeros_kv = tuple(jnp.zeros(plan.to_kv(x).shape, dtype) for x in (k, v))
    (dqs, d_scale, d_floats), (dk, dv) = visit(state, (k, v), step, zeros_kv)
    transposed = functools.partial(_transposed, dtype=dtype)
    # scale and the captured arrays are the same on every device: shard_map's transpose sums
    # every device's part of their gradients (see _shard_sequence).
    d_floats = iter(d_floats)
    d_whole = jax.tree.unflatten(whole_tree, [
        next(d_floats).astype(x.dtype) if f else block_sparse.zero_cotangent(x)
        for x, f in zip(whole_leaves, floats, strict=True)])
    return (transposed(plan.to_q, q, jnp.concatenate(dqs, -2)).astype(q.dtype),
            transposed(plan.to_kv, k, dk).astype(k.dtype),
            transposed(plan.to_kv, v, dv).astype(v.dtype), d_scale.astype(scale.dtype),
            d_whole, block_sparse.zero_cotangent(block_map))

  attend.defvjp(attend_fwd, attend_bwd)
  return attend


def _dtype(x: jax.Array):
  return online_softmax.compute_dtype(x.dtype)


def _statics(op: str, mesh: Mesh, axis_name: str, is_causal: bool,
             block_size: int | tuple[int, int], enable_gqa: bool, return_lse: bool,
             layout: str) -> dict[str, Any]:
  """The static arguments, checked before the jitted call (where jit would hash ``mesh=None``
  or a list of devices with its own message) and normalised (bools, a block-size pair)."""
  checks.check_mesh(op, mesh)
  checks.check_mesh_axis(op, axis_name, dict(mesh.shape))
  checks.check_layout(op, layout, layouts.LAYOUTS)
  return {"mesh": mesh, "axis_name": axis_name, "layout": layout,
          "is_causal": checks.check_flag(op, "is_causal", is_causal),
          "block_size": checks.check_block_size(op, block_size),
          "enable_gqa": checks.check_flag(op, "enable_gqa", enable_gqa),
          "return_lse": checks.check_flag(op, "return_lse", return_lse)}


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
    score_mod: ScoreMod | None = None,
    block_mask: BlockMask | None = None,
    enable_gqa: bool = False,
    return_lse: bool = False,
    layout: str = "contiguous",
    kernel_options: dict[str, Any] | None = None,
) -> jax.Array | tuple[jax.Array, jax.Array]:
  """Attention with the sequence sharded over a mesh axis (ring attention), SDPA's or flex's.

  Computes what ``jmat.scaled_dot_product_attention(query, key, value,
  is_causal=is_causal, scale=scale)`` computes, or with ``score_mod``,
  ``block_mask`` or ``enable_gqa`` what ``jmat.flex_attention`` computes, but
  the sequence dimension (``-2``) of the inputs is sharded over the ``n =
  mesh.shape[axis_name]`` devices of a mesh axis. Each device keeps its query
  shard; the key/value shards are passed around the ring with ``lax.ppermute``
  (the next transfer started before the current step's compute) and folded into
  an online softmax with the block-sparse kernel, so no device holds more than two
  key/value shards. A (query shard, key shard) pair whose blocks the mask hides
  costs nothing: its kernel loops have no trip; the shards still move on.
  Gradients (a second ring pass) are exact, also those of ``scale`` and of the
  float arrays the mods capture.

  ``layout`` says how the arrays passed in lay the sequence over the devices:
  ``"contiguous"`` (device ``i`` holds the ``i``-th of ``n`` chunks) or
  ``"zigzag"`` (``2n`` chunks, device ``i`` holds chunks ``i`` and ``2n-1-i``:
  causal work is balanced). :func:`to_layout` puts a globally ordered array into
  a layout, :func:`from_layout` back; the BlockMask, the mods and ``is_causal``
  always speak of global positions, and the result comes in the layout of the
  inputs. :func:`work_per_device` counts each device's blocks.

  Other mesh axes are left to jit's partitioner: shard the batch or head dims
  of the inputs over them (data or head parallelism) and they stay sharded.

  Args:
    query: ``(*lead, L, E)``; ``(B, H, L, E)`` with score_mod, block_mask or enable_gqa.
    key: ``(*lead, S, E)``; ``(B, Hkv, S, E)`` with flex's arguments.
    value: ``(*lead, S, Ev)``; ``(B, Hkv, S, Ev)``.
    mesh: the device mesh.
    axis_name: the mesh axis the sequence dimension is sharded over.
    is_causal: torch's top-left causal mask (query ``l`` sees key ``s`` iff ``s <= l``).
    scale: the factor of ``q @ k^T`` (a number or a 0-d array, differentiable);
      ``1 / sqrt(E)`` if ``None``.
    block_size: the query and key block sizes (int or pair) each device's
      key/value shard is folded in, without a block_mask (with one, its
      ``BLOCK_SIZE``): the scores a device holds at once are one block.
    score_mod: flex's ``(score, b, h, q_idx, kv_idx) -> score`` (global positions).
    block_mask: a :class:`~jmat.attention.BlockMask` for the global sequence
      (:func:`jmat.create_block_mask` with the global lengths); a device's chunk
      must be a whole number of its blocks.
    enable_gqa: grouped-query attention (key/value heads divide query heads).
    return_lse: also return the natural-log logsumexp ``(*lead, L)``.
    layout: ``"contiguous"`` or ``"zigzag"``.
    kernel_options: flex's dict (``BACKEND``, ``INTERPRET``, the Triton tiles): the
      kernel each (query chunk, key chunk) pair runs on. ``AUTO`` (default) is the
      fused kernel of an accelerator (Triton on GPUs, Mosaic on TPUs: one kernel
      call per pair, merged by lse) and the XLA loops on a CPU (every pair folded
      into one online-softmax carry).

  Returns:
    Array of shape ``(*lead, L, Ev)`` and the query's dtype, sharded like
    ``query`` (sequence over ``axis_name``, in ``layout``); with ``return_lse``
    also the logsumexp.

  Raises:
    ShapeError: inputs that are not attention operands (of equal leading dims
      without flex's arguments), lengths the layout cannot split evenly over the
      axis, a block_mask built for another global length, or chunks that are not
      whole mask blocks.
    ValueError: ``axis_name`` not an axis of ``mesh``, an unknown layout, a
      ``block_size`` that is not a positive int or pair, is_causal with a
      block_mask (put the causal rule in the mask_mod).
    TypeError: dtypes that differ or are not floating point, a ``mesh`` that
      is no ``jax.sharding.Mesh``, a flag (is_causal, enable_gqa, return_lse)
      that is no bool.

  Example:
    >>> mesh = jax.make_mesh((1,), ("seq",))
    >>> q = k = v = jnp.ones((2, 4, 3))
    >>> jmat.parallel.ring_attention(q, k, v, mesh=mesh, axis_name="seq", is_causal=True).shape
    (2, 4, 3)
  """
  op = "parallel.ring_attention"
  return _sequence_parallel_jit(
      op, query, key, value, scale=scale, score_mod=score_mod, block_mask=block_mask,
      gather=False, options=backends.kernel_options(op, kernel_options),
      **_statics(op, mesh, axis_name, is_causal, block_size, enable_gqa,
                               return_lse, layout))


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
    block_size: int | tuple[int, int] = 512,
    score_mod: ScoreMod | None = None,
    block_mask: BlockMask | None = None,
    enable_gqa: bool = False,
    return_lse: bool = False,
    layout: str = "contiguous",
    kernel_options: dict[str, Any] | None = None,
) -> jax.Array | tuple[jax.Array, jax.Array]:
  """The simple alternative to :func:`ring_attention`: every device gathers all keys and values.

  Same arguments, result and sharding as :func:`ring_attention`; each device
  all-gathers the key/value shards once and folds them into its queries with the
  same block-sparse kernel (the backward pass sums every device's key/value
  gradients where the shard lives: a reduce-scatter). It moves as many bytes as
  the ring but holds the full keys and values on every device; it is the
  baseline of the memory comparison in ``docs/distributed.md`` and of
  ``benchmarks/ring_attention.py``.

  Example:
    >>> mesh = jax.make_mesh((1,), ("seq",))
    >>> q = k = v = jnp.ones((2, 4, 3))
    >>> jmat.parallel.allgather_attention(q, k, v, mesh=mesh, axis_name="seq").shape
    (2, 4, 3)
  """
  op = "parallel.allgather_attention"
  return _sequence_parallel_jit(
      op, query, key, value, scale=scale, score_mod=score_mod, block_mask=block_mask,
      gather=True, options=backends.kernel_options(op, kernel_options),
      **_statics(op, mesh, axis_name, is_causal, block_size, enable_gqa,
                              return_lse, layout))


def _sequence_parallel(op: str, query, key, value, mesh: Mesh, axis_name: str,
                       is_causal: bool, scale, block_size, score_mod, block_mask,
                       enable_gqa: bool, return_lse: bool, layout: str, *, gather: bool,
                       options: backends.KernelOptions = backends.DEFAULT):
  """Checks the inputs, plans each device's part and runs it under ``shard_map``."""
  flex = score_mod is not None or block_mask is not None or enable_gqa
  if flex:
    query, key, value = as_operands(op, query, key, value, names=("query", "key", "value"))
    checks.check_attention_dtypes(op, [x.dtype for x in (query, key, value)],
                                  ("query", "key", "value"))
    checks.check_flex_shapes(op, query.shape, key.shape, value.shape, enable_gqa)
    checks.check_mesh_axis(op, axis_name, dict(mesh.shape))
  else:
    query, key, value = _checked(op, query, key, value, mesh, axis_name)
  n = mesh.shape[axis_name]
  chunks = layouts.device_chunks(layout, n, op=op)
  count = len(chunks[0]) * n
  checks.check_sequence_split(op, query.shape, key.shape, value.shape, count, layout,
                              axis_name)
  length, keys, dim = query.shape[-2], key.shape[-2], query.shape[-1]
  chunk_q, chunk_k = length // count, keys // count
  dtype = _dtype(query)
  factor = online_softmax.attention_scale(op, scale, dim, dtype)
  whole: Any = ()
  block_map = jnp.zeros((1, 1, 1), jnp.int8)
  if block_mask is not None:
    checks.check_causal_with_block_mask(op, is_causal)
    checks.check_block_mask_fits(op, block_mask.shape, query.shape, key.shape)
    block_q, block_k = block_mask.BLOCK_SIZE
    checks.check_chunks_hold_blocks(op, (chunk_q, chunk_k), (block_q, block_k), layout, n)
    block_map = block_sparse.block_map(block_mask.key_blocks(op),
                                       block_sparse.ceil_div(keys, block_k)).astype(jnp.int8)
    tables = "map"
  else:
    block_q, block_k = checks.check_block_size(op, block_size)
    block_q = block_sparse.block_for(chunk_q, block_q, dividing=True)
    block_k = block_sparse.block_for(chunk_k, block_k, dividing=True)
    tables = "causal" if is_causal else "dense"
  if flex:
    batch, heads = query.shape[:2]
    kv_heads = key.shape[1]
    mask_batch, mask_heads = block_mask.shape[:2] if block_mask is not None else (1, 1)
    mask_mod = None
    if block_mask is not None:
      mask_mod = checked_mod(op, "mask_mod", block_mask.mask_mod)
    if score_mod is not None:
      checked_mod(op, "score_mod", score_mod, dtype)
    mods, whole = flex_mods(score_mod, mask_mod, dtype,
                            Layout(heads, kv_heads, mask_batch, mask_heads))
    if is_causal:
      mods = block_sparse.Mods(mods.score, _causal, "exact")
    group = heads // kv_heads
    to_q = functools.partial(to_kernel, mask_batch=mask_batch, mask_heads=mask_heads,
                             group=group, is_query=True)
    to_kv = functools.partial(to_kernel, mask_batch=mask_batch, mask_heads=mask_heads,
                              group=group, is_query=False)

    def back_flex(y, q):
      return from_kernel(y, batch=q.shape[0], heads=heads, mask_batch=mask_batch,
                         mask_heads=mask_heads)

    back = back_flex
  else:
    mods = block_sparse.Mods(mask=_causal if is_causal else None,
                             causal="exact" if is_causal else None)

    def to_q(x):
      return x.reshape((1, math.prod(x.shape[:-2]), 1) + x.shape[-2:])

    def to_kv(x):
      return x.reshape((1, math.prod(x.shape[:-2])) + x.shape[-2:])

    def back_plain(y, q):
      return y.reshape(q.shape[:-2] + y.shape[3:])

    back = back_plain

  def make_local(manual_axes):
    plan = _Plan(n, axis_name, manual_axes, chunks,
                 block_sparse.Geometry(chunk_q, chunk_k, block_q, block_k), mods, tables,
                 gather, to_q, to_kv, back)
    return _per_device(op, plan, options)

  out, lse = _shard_sequence(op, make_local, query, key, value, (factor, whole, block_map),
                             mesh, axis_name)
  return (out, lse) if return_lse else out


_sequence_parallel_jit = jax.jit(
    _sequence_parallel,
    static_argnames=("op", "mesh", "axis_name", "is_causal", "block_size", "score_mod",
                     "enable_gqa", "return_lse", "layout", "gather", "options"))


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


def _shard_sequence(op: str, make_local, query, key, value, replicated, mesh: Mesh,
                    axis_name: str):
  """Runs ``make_local(manual_axes)(q, k, v, *replicated)`` per device: dim -2 of q, k, v
  sharded over ``axis_name``, ``replicated`` on every device; returns ``(out, lse)``."""
  lead = _explicit_lead_spec(op, query, axis_name)
  spec = PartitionSpec(*lead, axis_name, None)
  everywhere = jax.tree.map(lambda _: PartitionSpec(), replicated)
  if axis_name in sharding.explicit_axes(mesh):
    # An Explicit mesh types the operands' sharding: place them as the shard_map expects.
    placed = NamedSharding(mesh, spec)
    query, key, value = (jax.sharding.reshard(x, placed) for x in (query, key, value))
    replicated = jax.tree.map(
        lambda x: jax.sharding.reshard(x, NamedSharding(mesh, PartitionSpec())), replicated)
  manual_axes = (axis_name, *sorted(sharding.spec_axes(lead)))
  return jax.shard_map(
      make_local(manual_axes),
      mesh=mesh,
      in_specs=(spec, spec, spec, *everywhere),
      out_specs=(spec, PartitionSpec(*lead, axis_name)),
      axis_names=frozenset(manual_axes),
      # Unchecked: the mods run as jaxprs whose primitives are bound as they are, device-varying
      # positions beside constants that are not (a checked shard_map would refuse the mix).
      # The transpose then sums the cotangents of the replicated inputs (the scale, captured
      # arrays) over the devices, which the backward pass leaves to it.
      check_vma=False,
  )(query, key, value, *replicated)


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
