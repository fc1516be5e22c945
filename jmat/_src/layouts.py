"""How a sequence is laid out over the devices of a mesh axis: the one home of the layout rule.

Context parallelism (:func:`jmat.parallel.ring_attention`) gives each of the
``n`` devices of a mesh axis an equal share of the sequence. Which share is
the *layout*:

* ``"contiguous"``: the sequence is cut into ``n`` chunks and device ``i``
  holds chunk ``i``. Under a causal mask the device holding the last chunk
  attends to every key and the first to one chunk of keys: the busiest device
  does about twice the mean work.
* ``"zigzag"``: the sequence is cut into ``2n`` chunks and device ``i`` holds
  chunks ``i`` and ``2n - 1 - i``, concatenated in that order. An early and a
  late chunk pair up, so every device does the same causal work.

:func:`to_layout` permutes a globally ordered array so that sharding its
sequence axis contiguously gives each device its chunks, and places it so;
:func:`from_layout` undoes it. Masks (a :class:`jmat.BlockMask`) always speak
of *global* positions, whatever the layout: :func:`device_positions` maps a
device's local entries (tokens or query blocks) to them, and
:func:`work_per_device` counts the blocks of a mask each device computes.

Measured with :func:`work_per_device`: ``max / mean`` of the blocks each of 8
devices computes (BLOCK_SIZE 128; 1.00 is perfect balance), contiguous then
zigzag:

* causal, L = 8192: 1.86, 1.00; L = 32768: 1.87, 1.00.
* prefix-LM (prefix 2048), L = 8192: 1.76, 1.14.
* sliding window 1024, L = 32768: 1.02, 1.02; window 4096, L = 8192: 1.33, 1.28.
* no mask: 1.00, 1.00.
* packed documents, causal within each (:func:`jmat.mods.generate_doc_mask_mod`),
  L = 32768: documents of equal length up to 4096 (a device's share): 1.00,
  1.00; of 8192: 1.49, 1.00; of 16384: 1.74, 1.00.
* packed documents of log-normal lengths (median m, sigma s, the last one cut
  to fit), mean over 50 packs (worst pack): m = 512, s = 0.8: 1.68 (2.97),
  1.64 (2.74); m = 2048, s = 1: 2.16 (2.95), 1.78 (3.00); m = 8192, s = 1:
  2.05 (2.58), 1.42 (2.26).

So zigzag balances causal attention exactly and, on average, is at least as
good as contiguous for every mask measured. Neither balances a realistic mix
of packed documents: the work of a document grows with the square of its
length and falls on the one to three devices that hold it. Zigzag helps as
far as the documents are long (it is at least as good in 64%, 80% and 96%
of the packs above, and in a single pack of short documents it can be the
worse one); balancing the rest needs a layout that follows the documents
(e.g. zigzag inside each document), which no fixed permutation of the
sequence is.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from jax.typing import ArrayLike

from jmat._src import block_sparse, checks, sharding
from jmat._src.block_mask import BlockMask

LAYOUTS: tuple[str, ...] = ("contiguous", "zigzag")

_Chunks = tuple[tuple[int, ...], ...]


def num_chunks(layout: str, num_devices: int, *, op: str = "parallel.layouts") -> int:
  """How many equal chunks ``layout`` cuts a sequence into for ``num_devices`` devices.

  Args:
    layout: one of :data:`LAYOUTS`.
    num_devices: the size of the mesh axis the sequence is laid out over.
    op: the operation named in error messages.

  Returns:
    ``num_devices`` for ``"contiguous"``, ``2 * num_devices`` for ``"zigzag"``.

  Raises:
    ValueError: an unknown layout or a ``num_devices`` that is not a positive int.

  Example:
    >>> from jmat._src import layouts
    >>> layouts.num_chunks("contiguous", 4), layouts.num_chunks("zigzag", 4)
    (4, 8)
  """
  checks.check_layout(op, layout, LAYOUTS)
  n = checks.check_num_devices(op, num_devices)
  return 2 * n if layout == "zigzag" else n


def device_chunks(layout: str, num_devices: int, *, op: str = "parallel.layouts") -> _Chunks:
  """The global chunk ids each device holds, in the order they are concatenated locally.

  Chunks are the :func:`num_chunks` equal pieces of the globally ordered
  sequence, numbered from its start.

  Args:
    layout: one of :data:`LAYOUTS`.
    num_devices: the size of the mesh axis the sequence is laid out over.
    op: the operation named in error messages.

  Returns:
    One tuple of chunk ids per device: ``(i,)`` for ``"contiguous"``,
    ``(i, 2n - 1 - i)`` for ``"zigzag"``.

  Raises:
    ValueError: an unknown layout or a ``num_devices`` that is not a positive int.

  Example:
    >>> from jmat._src import layouts
    >>> layouts.device_chunks("zigzag", 4)
    ((0, 7), (1, 6), (2, 5), (3, 4))
    >>> layouts.device_chunks("contiguous", 2)
    ((0,), (1,))
  """
  chunks = num_chunks(layout, num_devices, op=op)
  if layout == "zigzag":
    return tuple((i, chunks - 1 - i) for i in range(num_devices))
  return tuple((i,) for i in range(num_devices))


def device_positions(
    layout: str, num_devices: int, length: int, *, op: str = "parallel.layouts"
) -> np.ndarray:
  """The global position of every local entry of every device: ``(num_devices, length / n)``.

  Row ``i`` lists, in local order, the global positions of the entries device
  ``i`` holds. The unit is whatever ``length`` counts: tokens for the
  sequence, query blocks for a block mask's rows (when a chunk is a whole
  number of blocks). ``device_positions(...).reshape(-1)`` is the permutation
  :func:`to_layout` applies: ``to_layout(x)[j] == x[positions.reshape(-1)[j]]``.

  Args:
    layout: one of :data:`LAYOUTS`.
    num_devices: the size of the mesh axis the sequence is laid out over.
    length: the global length, a multiple of :func:`num_chunks`.
    op: the operation named in error messages.

  Returns:
    An int64 numpy array of shape ``(num_devices, length // num_devices)``.

  Raises:
    ShapeError: ``length`` not divisible by the number of chunks.
    ValueError: an unknown layout or a ``num_devices`` that is not a positive int.

  Example:
    >>> from jmat._src import layouts
    >>> layouts.device_positions("zigzag", 2, 8)
    array([[0, 1, 6, 7],
           [2, 3, 4, 5]])
  """
  chunks = device_chunks(layout, num_devices, op=op)
  count = num_chunks(layout, num_devices, op=op)
  checks.check_layout_length(op, (length,), 0, layout, count, num_devices)
  size = length // count
  return np.asarray([np.concatenate([np.arange(c * size, (c + 1) * size) for c in held])
                     for held in chunks], dtype=np.int64)


def _in_order(count: int, num_devices: int) -> _Chunks:
  """``count`` chunks held in global order: device ``i`` holds the ``i``-th run of them."""
  per = count // num_devices
  return tuple(tuple(range(i * per, (i + 1) * per)) for i in range(num_devices))


def _exchange(source: _Chunks, target: _Chunks, axis_name: str, axis: int):
  """The per-device function of ``shard_map`` moving chunks from ``source`` to ``target``.

  Each device holds ``k`` chunks (slots) before and after. Chunks moving from
  slot ``s`` to slot ``t`` travel in one ``lax.ppermute``, so a device sends
  and receives only its own share (``L / n`` entries), never the sequence.
  Where a target slot is filled from different source slots on different
  devices, ``lax.select_n`` picks, per device, the one that arrived there.
  """
  home = {chunk: (device, slot) for device, held in enumerate(source)
          for slot, chunk in enumerate(held)}
  slots = len(source[0])
  moves: dict[tuple[int, int], list[tuple[int, int]]] = {}
  from_slot = np.zeros((len(target), slots), np.int32)
  for device, held in enumerate(target):
    for t, chunk in enumerate(held):
      sender, s = home[chunk]
      moves.setdefault((s, t), []).append((sender, device))
      from_slot[device, t] = s

  def local(x: jax.Array) -> jax.Array:
    size = x.shape[axis] // slots
    pieces = [lax.slice_in_dim(x, s * size, (s + 1) * size, axis=axis) for s in range(slots)]
    here = lax.axis_index(axis_name)
    out = []
    for t in range(slots):
      arrived = {s: pieces[s] if all(a == b for a, b in pairs)
                 else lax.ppermute(pieces[s], axis_name, pairs)
                 for (s, u), pairs in sorted(moves.items()) if u == t}
      order = sorted(arrived)
      if len(order) == 1:
        out.append(arrived[order[0]])
      else:
        which = jnp.asarray(np.searchsorted(order, from_slot[:, t]), jnp.int32)[here]
        out.append(lax.select_n(which, *(arrived[s] for s in order)))
    return jnp.concatenate(out, axis=axis)

  return local


def _relaid(op: str, x: ArrayLike, mesh: Mesh, axis_name: str, layout: str, axis: int,
            inverse: bool) -> jax.Array:
  """``x`` moved from global order to ``layout`` (or back), ``axis`` sharded over ``axis_name``."""
  array = jnp.asarray(x)
  devices = checks.check_mesh_axis(op, axis_name, dict(mesh.shape))
  checks.check_layout(op, layout, LAYOUTS)
  axis = checks.check_layout_axis(op, array.shape, axis)
  count = num_chunks(layout, devices, op=op)
  checks.check_layout_length(op, array.shape, axis, layout, count, devices, axis_name)
  laid, plain = device_chunks(layout, devices, op=op), _in_order(count, devices)
  source, target = (laid, plain) if inverse else (plain, laid)
  # Other dims keep their sharding over Explicit mesh axes (Auto ones are the partitioner's).
  entries = list(sharding.explicit_spec(array))
  checks.check_layout_sharding(op, array.shape, entries, axis, axis_name)
  entries[axis] = axis_name
  spec = PartitionSpec(*entries)
  if axis_name in sharding.explicit_axes(mesh):
    array = jax.sharding.reshard(array, NamedSharding(mesh, spec))
  manual = frozenset({axis_name} | sharding.spec_axes(entries))
  return jax.shard_map(_exchange(source, target, axis_name, axis), mesh=mesh, in_specs=spec,
                       out_specs=spec, axis_names=manual)(array)


@functools.partial(jax.jit, static_argnames=("op", "mesh", "axis_name", "layout", "axis",
                                             "inverse"))
def _relaid_jit(op: str, x: ArrayLike, mesh: Mesh, axis_name: str, layout: str, axis: int,
                inverse: bool) -> jax.Array:
  return _relaid(op, x, mesh, axis_name, layout, axis, inverse)


def _statics(op: str, mesh: Mesh, axis_name: str, layout: str, axis: int) -> int:
  """Checks the static arguments before the jitted call, where jit would fail to hash some with
  its own message (``mesh=None``, a list of devices, an ``axis_name`` list); returns ``axis``."""
  checks.check_mesh(op, mesh)
  checks.check_mesh_axis(op, axis_name, dict(mesh.shape))
  checks.check_layout(op, layout, LAYOUTS)
  return checks.check_int(op, "axis", axis)


def to_layout(x: ArrayLike, /, mesh: Mesh, axis_name: str, layout: str, *,
              axis: int = -2) -> jax.Array:
  """A globally ordered array permuted and sharded so that each device holds its chunks.

  Cuts ``axis`` into the layout's equal chunks and reorders them so that
  splitting ``axis`` contiguously over the ``n`` devices of mesh axis
  ``axis_name`` gives device ``i`` its chunks (``(i,)`` contiguous, ``(i, 2n
  - 1 - i)`` zigzag), and returns it sharded that way. ``"contiguous"`` is the
  identity permutation (only the placement changes).

  Placement: ``axis`` is sharded over ``axis_name`` with a ``NamedSharding``
  of ``mesh``. Other dims keep their sharding over Explicit mesh axes; on Auto
  axes jit's partitioner places them (as it would any array). The chunks move
  between devices with ``lax.ppermute`` inside ``jax.shard_map`` (at most
  four, none for ``"contiguous"``): a device sends and receives at most its
  own ``L / n`` share and never holds the whole sequence, whether ``x`` comes
  replicated or already sharded over ``axis_name``.

  Args:
    x: an array in global order.
    mesh: the device mesh.
    axis_name: the mesh axis to lay ``axis`` out over (static).
    layout: one of ``"contiguous"``, ``"zigzag"`` (static).
    axis: the dim to permute and shard (static), the sequence of attention's
      ``(..., L, E)`` by default.

  Returns:
    An array of ``x``'s shape and dtype, permuted along ``axis`` and sharded.

  Raises:
    ShapeError: ``axis`` out of range, or its length not divisible by the
      number of chunks (``n`` contiguous, ``2n`` zigzag).
    ValueError: ``axis_name`` not an axis of ``mesh``, an unknown layout,
      another dim of ``x`` already sharded over ``axis_name``.
    TypeError: a ``mesh`` that is no ``jax.sharding.Mesh``, an ``axis`` that is not an int.

  Example:
    >>> mesh = jax.make_mesh((1,), ("seq",))
    >>> x = jnp.arange(8.0).reshape(2, 4)
    >>> laid = jmat.parallel.to_layout(x, mesh, "seq", "zigzag", axis=-1)
    >>> laid.sharding.spec
    P(None, 'seq')
    >>> print(jmat.parallel.from_layout(laid, mesh, "seq", "zigzag", axis=-1))
    [[0. 1. 2. 3.]
     [4. 5. 6. 7.]]
  """
  axis = _statics("parallel.to_layout", mesh, axis_name, layout, axis)
  return _relaid_jit("parallel.to_layout", x, mesh, axis_name, layout, axis, inverse=False)


def from_layout(x: ArrayLike, /, mesh: Mesh, axis_name: str, layout: str, *,
                axis: int = -2) -> jax.Array:
  """The inverse of :func:`to_layout`: an array laid out over ``axis_name`` back in global order.

  Returns ``axis`` in global order, sharded contiguously over ``axis_name``
  (device ``i`` holds the ``i``-th ``L / n`` run of it); other dims as in
  :func:`to_layout`. ``from_layout(to_layout(x, ...), ...)`` equals ``x``.
  Each device sends and receives at most its ``L / n`` share.

  Args:
    x: an array laid out by ``layout`` along ``axis``, e.g. ring attention's output.
    mesh: the device mesh.
    axis_name: the mesh axis ``axis`` is laid out over (static).
    layout: one of ``"contiguous"``, ``"zigzag"`` (static).
    axis: the laid-out dim (static).

  Returns:
    An array of ``x``'s shape and dtype in global order along ``axis``.

  Raises:
    ShapeError, ValueError, TypeError: as :func:`to_layout`.

  Example:
    >>> mesh = jax.make_mesh((1,), ("seq",))
    >>> jmat.parallel.from_layout(jnp.ones((3, 4, 2)), mesh, "seq", "contiguous").shape
    (3, 4, 2)
  """
  axis = _statics("parallel.from_layout", mesh, axis_name, layout, axis)
  return _relaid_jit("parallel.from_layout", x, mesh, axis_name, layout, axis, inverse=True)


def work_per_device(block_mask: BlockMask, /, num_devices: int, layout: str) -> tuple[int, ...]:
  """The (query block, key block) pairs of ``block_mask`` each device computes under ``layout``.

  A device computes, for every query block it holds, every full or partial key
  block of the (global) mask over all keys, wherever those keys are: a ring
  brings every key block by. The count is summed over the mask's batch and
  head rows (a mask built with ``B`` or ``H`` None counts one row). ``max /
  mean`` of the result is the slowdown of the busiest device against perfect
  balance (the module docstring lists measured figures: causal attention on 8
  devices is 1.86 contiguous, 1.00 zigzag). Computed with numpy from the
  mask's tables; not for use under ``jax.jit``.

  Args:
    block_mask: a :class:`jmat.BlockMask` over the global sequence.
    num_devices: the size of the mesh axis the queries are laid out over.
    layout: one of ``"contiguous"``, ``"zigzag"``.

  Returns:
    One int per device.

  Raises:
    ShapeError: ``Q_LEN`` not divisible into the layout's chunks, or a chunk
      not a whole number of query blocks (``BLOCK_SIZE[0]``).
    ValueError: an unknown layout or a ``num_devices`` that is not a positive int.
    TypeError: ``block_mask`` is not a :class:`jmat.BlockMask`.

  Example:
    >>> causal = jmat.create_block_mask(jmat.mods.causal_mask, None, None, 1024, 1024)
    >>> jmat.parallel.work_per_device(causal, 2, "contiguous")
    (10, 26)
    >>> jmat.parallel.work_per_device(causal, 2, "zigzag")
    (18, 18)
  """
  op = "parallel.work_per_device"
  if not isinstance(block_mask, BlockMask):
    raise checks.not_a_block_mask_error(op, block_mask)
  count = num_chunks(layout, num_devices, op=op)
  checks.check_layout_blocks(op, block_mask.seq_lengths, block_mask.BLOCK_SIZE, layout, count,
                             num_devices)
  checks.check_block_mask_rows(op, block_mask.kv_indices.shape, block_mask.seq_lengths,
                               block_mask.BLOCK_SIZE)
  (q_len, kv_len), (block_q, block_k) = block_mask.seq_lengths, block_mask.BLOCK_SIZE
  n_q, n_k = q_len // block_q, block_sparse.ceil_div(kv_len, block_k)
  # The blocks seq_lengths spans: tables may list more (from_kv_blocks, a changed seq_lengths).
  kinds = np.asarray(block_mask.to_dense())[:, :, :n_q, :n_k]
  per_query_block = np.count_nonzero(kinds, axis=(0, 1, 3))
  rows = device_positions(layout, num_devices, n_q, op=op)
  return tuple(int(per_query_block[held].sum()) for held in rows)
