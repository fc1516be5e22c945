"""The Pallas Triton (GPU) backend of the block-sparse attention kernel.

A drop-in for :func:`jmat._src.kernels.xla.run`: the same block tables,
mods and operands in, the same ``(out, lse)`` and gradients out, computed by
three Pallas kernels that lower to Triton (``pl.pallas_call`` with
``plgpu.CompilerParams``):

* forward: one program per (query tile, table row ``m``, row ``r``). It holds
  the queries of all ``G`` heads that share a key/value head, stacked into one
  ``(G * tq, E)`` tile, so every key/value tile it loads serves all of them;
  it reads its block lists from the table refs and folds the listed key blocks
  into an online softmax (:mod:`jmat._src.online_softmax`) with dynamic trip
  counts, so the work is proportional to the listed blocks.
* dq pass: the same programs recompute each block (FlashAttention-2's
  backward). They also give the gradient of ``scale`` (per-program partial
  sums, added outside) and of the float operands (added in place with
  ``jax.ref.addupdate``, atomic on the GPU: a broadcast blocked operand or a
  gathered table entry receives from many programs).
* dk/dv pass: one program per (key tile, ``m``, ``r``) over a key-major copy
  of the table (:func:`jmat._src.block_sparse.key_major_blocks`), so dk and dv
  need no atomics.

Triton tiles are powers of two: a table block is covered by a power of two,
E and Ev by powers of two of at least 16 (the smallest ``tl.dot``), G by a
power of two. The tiles are padded, the arrays are not: Q, K, V, dO, lse and
delta are read and out, dq, dk and dv written with masked loads and stores, so
a query past L, a key past S, a head past G or a column past E or Ev reads
zeros and is never written (the extra heads show the mods the last real
head's index). The mods' blocked operands (SDPA's dense masks) are read the
same way; their gradients are added into buffers padded to whole tiles, cut
to size after the pass. A table block may be longer than
a tile (it is then cut into tiles, each inheriting the block's full/partial
kind); see :class:`BlockSizes`.

The mods run inside the kernel on ``(1, G, tq, tk)`` score tiles. Whole
operands stay in memory: a gather a mod makes from one (``slopes[h]``,
``document_id[q_idx]``, ``table[h, kv_idx - q_idx + D]``: what a vmapped
torch-style mod does with a captured array) becomes a load of just the
gathered entries (Triton has no gather, but its loads take tensors of
pointers); see :class:`_ModRunner`. What Triton cannot lower is reported by
:func:`unsupported`, which lowers the kernels for CUDA to find out.
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
from jax.experimental.pallas import triton as plgpu
from jax.extend import core as jax_core
from jax.extend.core import primitives as jax_primitives
from jax.ref import addupdate

from jmat._src import online_softmax as osm
from jmat._src.block_sparse import (
  Call,
  KeyBlocks,
  Mods,
  Operands,
  backward_statistics,
  causal_key_blocks,
  ceil_div,
  key_major_blocks,
  lowering_limitation,
  zero_cotangent,
)

_NAME = "jmat block-sparse attention (triton)"
# Every dimension of a Triton dot is at least 16, and every tile a power of two.
_MIN_DOT = 16
# A padded head dim past this makes tiles that overflow a streaming multiprocessor's registers
# and shared memory (FlashAttention's limit too).
_MAX_HEAD_DIM = 256
_TILES = ("block_q", "block_k", "block_q_dq", "block_k_dq", "block_q_dkv", "block_k_dkv")
# Programs that keep a GPU busy (an H100 has 132 streaming multiprocessors).
_BUSY = 128
# A program has at most 1024 threads: 32 warps of 32.
_MAX_WARPS = 32


def _next_pow2(n: int) -> int:
  return 1 << max(n - 1, 0).bit_length()


def _is_pow2(n: int) -> bool:
  return n > 0 and n & (n - 1) == 0


class Launch(NamedTuple):
  """One kernel's tile ``(rows, keys)`` and launch parameters, as resolved for a call."""

  rows: int
  keys: int
  num_warps: int
  num_stages: int


# The anchor of the default tiles: torch's flex attention defaults for an H100
# (torch/_inductor/template_heuristics/triton.py, CUDAConfigHeuristic), by whether the inputs are
# half precision (bfloat16/float16) and the head dim, where the sm90 compile check
# (`python -m benchmarks.compile_check --target sm90`) finds no spill in jmat's kernels. Forward:
# (BLOCK_M, BLOCK_N, num_warps, num_stages); other head dims get (64, 64, 4, 3). Head dim 64 in
# half precision takes 8 warps where torch's takes 4 (4 spill 300 bytes here).
_FORWARD = {(True, 64): (128, 128, 8, 3), (True, 128): (128, 64, 8, 3),
            (True, 256): (64, 32, 4, 3), (False, 64): (128, 32, 4, 3),
            (False, 128): (32, 64, 4, 3), (False, 256): (32, 32, 4, 3)}


def _backward_defaults(half: bool, head: int) -> tuple[Launch, Launch]:
  """The ``(dq, dkv)`` launches: torch's sm90 backward, cut where jmat's kernels would spill.

  torch's are ``(BLOCK_M1, BLOCK_N1, BLOCK_M2, BLOCK_N2, num_stages, num_warps)`` =
  ``(64, 128, 128, 64, 3, 8)`` for head dims 64-128 (``M1``/``N1``: the dk/dv pass' query step
  and keys; ``M2``/``N2``: the dq pass' queries and key step), ``(64, 64, 64, 64, 3, 4)``
  below, ``(64, 64, 64, 64, 2, 4)`` above, and 16s for float32. jmat's dk/dv program holds its
  tiles of K and V and the mods' loads in registers beside the two ``(BLOCK_N1, E)``
  accumulators: at 128 keys it spills 4 KiB, at 64 keys stepping 64 query rows 200-280
  bytes (documents), so it steps 32 query rows over 64 keys with 2 stages; its dq pass runs
  64 queries (128 spill 50-60 bytes with documents).
  """
  if not half:
    return Launch(16, 16, 4, 1), Launch(16, 16, 4, 1)
  if head < 64:
    return Launch(64, 64, 4, 3), Launch(64, 64, 4, 3)
  if head <= 128:
    return Launch(64, 64, 8, 3), Launch(32, 64, 8, 2)
  return Launch(64, 64, 4, 2), Launch(64, 64, 4, 2)


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """The tiles and launch parameters of the Triton kernels; None picks them by head dim and dtype.

  The defaults follow torch's flex attention defaults for an H100 (its
  ``CUDAConfigHeuristic``) where jmat's kernels compile without spills for
  sm_90a: bfloat16/float16 with head dim 128 runs the forward on 128 x 64
  tiles with 8 warps and 3 stages (torch's), the dq pass on 64 queries by 64
  keys, the dk/dv pass on 64 keys stepping 32 query rows (torch's take 128
  queries and 128 keys: those spill here); float32 gets torch's smaller
  tiles (TF32 operands take twice the registers). A tile is at most one
  table block: a longer table block is cut into tiles (so callers may build
  tables with any power-of-two blocks). Query tiles count the rows of all
  ``G`` stacked heads: ``block_q=128`` with ``G = 4`` is 32 query positions
  per head (torch's ``BLOCK_M`` counts positions of one head; at least
  ``16 // G`` here, so decoding with GQA wastes no rows).

  Attributes:
    block_q: query rows of a forward program (all heads of a group together).
    block_k: keys per step of the forward pass.
    block_q_dq: query rows of a dq-pass program.
    block_k_dq: keys per step of the dq pass.
    block_q_dkv: query rows per step of the dk/dv pass.
    block_k_dkv: keys of a dk/dv-pass program.
    num_warps: warps per program of every pass (None: each pass' default).
    num_stages: software-pipelining stages of the loops over tiles (None: each pass' default).
    num_splits: forward programs sharing the key tiles of one query tile, merged by their
      lse (flash-decoding); None splits where there is one query tile per row and fewer
      programs than a GPU has streaming multiprocessors (decoding), 1 never.

  Raises:
    ValueError: a tile that is not a power of two of at least 16, ``num_warps``
      that is not a power of two up to 32, ``num_stages`` below 1.
  """

  block_q: int | None = None
  block_k: int | None = None
  block_q_dq: int | None = None
  block_k_dq: int | None = None
  block_q_dkv: int | None = None
  block_k_dkv: int | None = None
  num_warps: int | None = None
  num_stages: int | None = None
  num_splits: int | None = None

  def __post_init__(self):
    for field in dataclasses.fields(self):
      value = getattr(self, field.name)
      rule = BlockSizes.rule(field.name, value)
      if rule is not None:
        raise ValueError(f"{_NAME}: BlockSizes.{field.name}={value!r} is not valid: it must be "
                         f"{rule}")

  @staticmethod
  def rule(name: str, value: object) -> str | None:
    """What field ``name`` must be, in words, when ``value`` breaks the rule; None when valid."""
    size = value if isinstance(value, int) and not isinstance(value, bool) else None
    if value is None:  # every field: None chooses by head dim and dtype
      return None
    if name in _TILES:
      if size is not None and _is_pow2(size) and size >= _MIN_DOT:
        return None
      return f"a power of two from {_MIN_DOT} (a Triton tile): 16, 32, 64, 128, 256, ..."
    if name == "num_warps":
      if size is not None and _is_pow2(size) and size <= _MAX_WARPS:
        return None
      return (f"a power of two from 1 to {_MAX_WARPS} (warps per program; Triton takes powers "
              f"of two): 1, 2, 4, 8, 16, 32")
    if size is not None and size >= 1:  # num_stages, num_splits
      return None
    if name == "num_splits":
      return "a positive int (forward programs sharing a query tile's keys), or None to choose"
    return "a positive int (software-pipelining stages)"

  def launches(self, head: int, dtype: Any) -> dict[str, Launch]:
    """The ``forward``, ``dq`` and ``dkv`` kernels' launches for head dim ``head`` and ``dtype``.

    Example:
      >>> BlockSizes().launches(128, jnp.bfloat16)["forward"]
      Launch(rows=128, keys=64, num_warps=8, num_stages=3)
    """
    half = jnp.dtype(dtype).itemsize == 2
    padded = max(_next_pow2(head), 64)
    forward = Launch(*_FORWARD.get((half, padded), (64, 64, 4, 3)))
    dq, dkv = _backward_defaults(half, head)

    def given(launch: Launch, rows: int | None, keys: int | None) -> Launch:
      return Launch(rows or launch.rows, keys or launch.keys,
                    self.num_warps or launch.num_warps, self.num_stages or launch.num_stages)

    return {"forward": given(forward, self.block_q, self.block_k),
            "dq": given(dq, self.block_q_dq, self.block_k_dq),
            "dkv": given(dkv, self.block_q_dkv, self.block_k_dkv)}


@dataclasses.dataclass(frozen=True)
class _Geometry:
  """Static sizes of a call: true lengths, groups, head dims (true and padded), table blocks as
  tiled.

  ``block_q``/``block_k`` are the table's blocks as the kernel covers them (a
  power of two; a single block covering a whole axis may be shortened to the
  power of two above that axis' length). ``bound_full``: the kernel's key
  block outgrew the caller's, so full blocks may hold padding keys and check
  key bounds too.
  """

  q_len: int
  kv_len: int
  groups: int
  groups_p: int
  head: int
  v_head: int
  head_p: int
  v_head_p: int
  block_q: int
  block_k: int
  n_q: int
  n_k: int
  bound_full: bool

  @property
  def q_pad(self) -> int:
    return self.n_q * self.block_q

  @property
  def kv_pad(self) -> int:
    return self.n_k * self.block_k

  @property
  def q_exact(self) -> bool:
    """Whether a query tile's rows are all real: no padding head, no position past L."""
    return self.groups == self.groups_p and self.q_pad == self.q_len

  def tiles(self, rows: int, keys: int) -> tuple[int, int]:
    """``(query positions per head, keys)`` of a tile of ``rows`` stacked rows and ``keys`` keys."""
    return min(max(rows // self.groups_p, 1), self.block_q), min(keys, self.block_k)


def _kernel_block(name: str, block: int, length: int, least: int) -> int | str:
  """The power-of-two block covering a table block of ``block``, or why there is none."""
  if block >= length:  # one block covers the axis: any tile as long as the axis will do
    return _next_pow2(max(length, least))
  if _is_pow2(block) and block >= _MIN_DOT:
    return block
  return (f"{_NAME}: {name}={block} cannot be tiled for a length of {length}: Triton tiles are "
          f"powers of two, so a table block must be 16, 32, 64, 128, ... or cover the whole "
          f"length (>= {length})")


def _geometry(q_shape, k_shape, v_shape, block_q: int, block_k: int) -> _Geometry | str:
  """The geometry of a call, or the reason the kernel cannot tile it."""
  groups, q_len, head = q_shape[-3:]
  kv_len, v_head = k_shape[-2], v_shape[-1]
  groups_p = _next_pow2(groups)
  head_p, v_head_p = (max(_next_pow2(d), _MIN_DOT) for d in (head, v_head))
  if max(head_p, v_head_p) > _MAX_HEAD_DIM:
    return (f"{_NAME}: head dims E={head}, Ev={v_head} pad to {head_p}, {v_head_p}; the kernel's "
            f"tiles hold at most {_MAX_HEAD_DIM}")
  kernel_q = _kernel_block("block_q", block_q, q_len, max(_MIN_DOT // groups_p, 1))
  kernel_k = _kernel_block("block_k", block_k, kv_len, _MIN_DOT)
  if isinstance(kernel_q, str):
    return kernel_q
  if isinstance(kernel_k, str):
    return kernel_k
  return _Geometry(q_len, kv_len, groups, groups_p, head, v_head, head_p, v_head_p, kernel_q,
                   kernel_k,
                   -(-q_len // block_q), -(-kv_len // block_k),
                   bound_full=kernel_k != block_k and kernel_k > kv_len)


# --- the mods inside a kernel ----------------------------------------------------------------


class _Leaf(NamedTuple):
  """A whole operand leaf that a mod reads, still in its ref."""

  index: int


class _Columns(NamedTuple):
  """Index columns a ``concatenate`` would join, kept apart for the gather that reads them.

  jnp indexing with several index arrays concatenates them into one index
  array; Triton joins two tensors at most, and the load needs them apart anyway.
  """

  columns: tuple[jax.Array, ...]


class _Gather(NamedTuple):
  """A gather from a float whole leaf: the entries read (``where``) and the values read."""

  leaf: int
  where: tuple[jax.Array, ...]
  inside: jax.Array | None  # fill-mode gathers: which entries were in bounds
  value: jax.Array


_CALLS = (jax_primitives.jit_p, jax_primitives.closed_call_p, jax_primitives.custom_jvp_call_p,
          jax_primitives.custom_vjp_call_p)


def _fill_value(dtype: np.dtype, fill: Any) -> Any:
  """What an out-of-bounds entry of a fill-mode gather reads (``lax.gather``'s defaults)."""
  if fill is not None:
    return fill
  if jnp.issubdtype(dtype, jnp.inexact):
    return np.nan
  if dtype == np.bool_:
    return True
  info = jnp.iinfo(dtype)
  return info.min if jnp.issubdtype(dtype, jnp.signedinteger) else info.max


class _ModRunner:
  """Evaluates a mod inside a kernel with the whole operands left in their refs.

  The mod is traced to a jaxpr and replayed equation by equation: a gather
  from a whole leaf becomes a load of the gathered entries; any other use of a
  whole leaf loads it whole (a Triton load of a power-of-two size). Gathers
  from and whole loads of ``trainable`` leaves are recorded (``gathers``,
  ``loaded``); a runner made with ``replay=(gathered values, loaded values)``
  takes those values from there instead of memory, so that they can be inputs
  of a ``jax.vjp`` whose cotangents are added to the leaves' gradients.

  A runner holds values of the trace it ran in: make one per loop body.
  """

  def __init__(self, refs: Sequence[Any], trainable: Sequence[bool] | None = None,
               replay: tuple[Sequence[jax.Array], dict[int, jax.Array]] | None = None):
    self.refs = refs
    self.trainable = [False] * len(refs) if trainable is None else list(trainable)
    self.gathers: list[_Gather] = []
    self.loaded: dict[int, jax.Array] = {}
    self._replay = None if replay is None else (iter(replay[0]), replay[1])

  def __call__(self, fn: Callable[..., Any], args: tuple, whole_tree: Any,
               blocked: tuple[jax.Array, ...]) -> jax.Array:
    """``fn(*args, (whole, blocked))`` with ``whole`` the leaves of ``whole_tree`` in their refs."""
    avals = [jax.ShapeDtypeStruct(ref.shape, ref.dtype) for ref in self.refs]
    whole = jax.tree.unflatten(whole_tree, avals)

    def pure(args, whole, blocked):
      return fn(*args, Operands(whole, blocked))

    closed = jax.make_jaxpr(pure)(args, whole, blocked)
    leaves = [_Leaf(i) for i in range(len(self.refs))]
    (out,) = self._eval(closed.jaxpr, closed.consts, jax.tree.leaves(args) + leaves + list(blocked))
    return self._value(out)

  def _eval(self, jaxpr, consts, args) -> list[Any]:
    env: dict[Any, Any] = {}

    def read(atom):
      return atom.val if isinstance(atom, jax_core.Literal) else env[atom]

    env.update(zip(jaxpr.constvars, consts, strict=True))
    env.update(zip(jaxpr.invars, args, strict=True))
    for eqn in jaxpr.eqns:
      env.update(zip(eqn.outvars, self._eqn(eqn, [read(x) for x in eqn.invars]), strict=True))
    return [read(x) for x in jaxpr.outvars]

  def _eqn(self, eqn, ins: list[Any]) -> list[Any]:
    prim = eqn.primitive
    if prim is jax_primitives.gather_p and isinstance(ins[0], _Leaf):
      return [self._gather(ins[0].index, self._columns(ins[1]), eqn.params,
                           eqn.outvars[0].aval.shape)]
    rank = len(eqn.outvars[0].aval.shape) if eqn.outvars else 0
    if (prim is jax_primitives.concatenate_p and eqn.params["dimension"] == rank - 1
        and all(isinstance(x, jax.Array) and x.ndim == rank and x.shape[-1] == 1 for x in ins)):
      return [_Columns(tuple(ins))]
    if prim in _CALLS and any(isinstance(x, _Leaf | _Columns) for x in ins):
      inner = eqn.params.get("jaxpr", eqn.params.get("call_jaxpr"))
      return self._eval(inner.jaxpr, inner.consts, ins)
    bound = prim.get_bind_params(eqn.params)  # (subfuns, params) in older jax versions
    subfuns, params = bound if isinstance(bound, tuple) else ((), bound)
    out = prim.bind(*subfuns, *(self._value(x) for x in ins), **params)
    return out if prim.multiple_results else [out]

  def _value(self, x: Any) -> Any:
    if isinstance(x, _Columns):
      return lax.concatenate(x.columns, x.columns[0].ndim - 1)
    if isinstance(x, _Leaf):
      if x.index not in self.loaded:
        replayed = self._replay is not None and self.trainable[x.index]
        self.loaded[x.index] = (cast(Any, self._replay)[1][x.index] if replayed
                                else self.refs[x.index][...])
      return self.loaded[x.index]
    return x

  def _columns(self, indices: Any) -> list[jax.Array]:
    if isinstance(indices, _Columns):
      return [c.reshape(c.shape[:-1]) for c in indices.columns]
    indices = self._value(indices)
    if indices.shape[-1] == 1:
      return [indices.reshape(indices.shape[:-1])]
    return [lax.index_in_dim(indices, p, -1, keepdims=False) for p in range(indices.shape[-1])]

  def _gather(self, leaf: int, columns: list[jax.Array], params: dict[str, Any],
              out_shape: tuple[int, ...]) -> jax.Array:
    """``lax.gather(whole leaf, indices)`` as a load of one entry per output element."""
    dims, sizes, ref = params["dimension_numbers"], params["slice_sizes"], self.refs[leaf]
    batch = [d for d in range(len(out_shape)) if d not in dims.offset_dims]
    offsets = iter(dims.offset_dims)
    fill = params["mode"] == lax.GatherScatterMode.FILL_OR_DROP
    where, inside = [], None
    for d, size in enumerate(ref.shape):
      if d in dims.operand_batching_dims:
        axis = batch[dims.start_indices_batching_dims[dims.operand_batching_dims.index(d)]]
        where.append(lax.broadcasted_iota(jnp.int32, out_shape, axis))
        continue
      start = jnp.zeros(out_shape, jnp.int32)
      if d in dims.start_index_map:
        column = columns[dims.start_index_map.index(d)].astype(jnp.int32)
        column = lax.broadcast_in_dim(column, out_shape, batch)
        last = size - sizes[d]
        if fill:
          ok = (column >= 0) & (column <= last)
          inside = ok if inside is None else inside & ok
        start = jnp.minimum(jnp.maximum(column, 0), last)  # clip mode; fill mode masks below
      if d not in dims.collapsed_slice_dims:
        start = start + lax.broadcasted_iota(jnp.int32, out_shape, next(offsets))
      where.append(start)
    if self._replay is not None and self.trainable[leaf]:
      return next(self._replay[0])
    value = ref[tuple(where)]
    if inside is not None:
      value = jnp.where(inside, value, jnp.asarray(_fill_value(value.dtype, params["fill_value"]),
                                                   value.dtype))
    if self.trainable[leaf]:
      self.gathers.append(_Gather(leaf, tuple(where), inside, value))
    return value


# --- tiles -------------------------------------------------------------------------------------

# Scores are folded in base 2 (exp2 is one instruction on a GPU): log2(e) goes into the scale.
_LOG2E = math.log2(math.e)
_LN2 = math.log(2.0)


class _At(NamedTuple):
  """Where a tile is: table row, batch/head row, first query row and first key (int32 scalars).

  ``q0``/``k0`` are the positions of the call's query and key row 0 (ring
  attention's chunk offsets): the mods see ``q0 + row + i``, the bounds checks
  the rows themselves.
  """

  m: jax.Array
  r: jax.Array
  row: jax.Array
  col: jax.Array
  q0: jax.Array
  k0: jax.Array


@dataclasses.dataclass(frozen=True)
class _Tiling:
  """What a kernel knows statically: the geometry, its tile ``(tq, tk)`` and the mods."""

  geo: _Geometry
  tq: int
  tk: int
  mods: Mods

  @property
  def rows(self) -> int:
    return self.geo.groups_p * self.tq

  def positions(self, at: _At) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """``(r (1,), g (Gp,), q_pos (tq,), k_pos (tk,))`` as the mods receive them."""
    geo = self.geo
    # The padding heads read the mods' tables as the last real head (in bounds on the device).
    g = jnp.minimum(lax.iota(jnp.int32, geo.groups_p), geo.groups - 1)
    return (jnp.full((1,), at.r, jnp.int32), g, at.q0 + at.row + lax.iota(jnp.int32, self.tq),
            at.k0 + at.col + lax.iota(jnp.int32, self.tk))

  def blocked_index(self, shape: tuple[int, ...], at: _At) -> tuple[Any, ...]:
    """The indexer of a blocked operand ``(M|1, R|1, Gp|1, Lp|1, Sp|1)`` at a tile."""
    # An int32 scalar, not a Python 0, for M: masked loads of the tile index with arrays only.
    return (at.m if shape[0] > 1 else jnp.int32(0), pl.ds(at.r if shape[1] > 1 else 0, 1),
            pl.ds(0, shape[2]), pl.ds(at.row, self.tq) if shape[3] > 1 else pl.ds(0, 1),
            pl.ds(at.col, self.tk) if shape[4] > 1 else pl.ds(0, 1))

  def blocked_mask(self, shape: tuple[int, ...], at: _At) -> jax.Array | None:
    """``(1, Gp|1, tq|1, tk|1)``: which entries of a blocked operand's tile exist; None if all.

    The operand keeps its true shape ``(M|1, R|1, G|1, L|1, S|1)``; its ref is
    the padded block ``(M|1, R|1, Gp|1, Lp|1, Sp|1)`` of ``shape``.
    """
    geo, mask = self.geo, None
    axes = ((geo.groups_p, geo.groups, 0), (self.tq, geo.q_len, at.row),
            (self.tk, geo.kv_len, at.col))
    padded = (geo.groups_p, geo.q_pad, geo.kv_pad)
    for axis, (tile, true, start) in enumerate(axes):
      if shape[2 + axis] == 1 or padded[axis] == true:  # broadcast, or every tile is inside
        continue
      inside = _below(start, tile, true).reshape([tile if a == axis else 1 for a in range(3)])
      mask = inside if mask is None else mask & inside
    return None if mask is None else mask[None]

  def blocked(self, refs: Sequence[Any], at: _At) -> tuple[jax.Array, ...]:
    """The blocked operands' tiles ``(1, Gp|1, tq|1, tk|1)`` (0 past the operand's end)."""
    return tuple(_load(ref.at[self.blocked_index(ref.shape, at)],
                       self.blocked_mask(ref.shape, at)) for ref in refs)

  def scored(self, s: jax.Array, at: _At, whole_tree: Any, blocked: tuple[jax.Array, ...],
             runner: _ModRunner) -> jax.Array:
    """``Mods.score`` of the scaled scores ``s (Gp * tq, tk)``, in the same layout."""
    if self.mods.score is None:
      return s
    s4 = s.reshape(1, self.geo.groups_p, self.tq, self.tk)
    r, g, q_pos, k_pos = self.positions(at)
    out = runner(self.mods.score, (s4, at.m, r, g, q_pos, k_pos), whole_tree, blocked)
    return jnp.broadcast_to(out.astype(s.dtype), s4.shape).reshape(s.shape)

  def allowed(self, masked: bool, at: _At, whole_tree: Any, blocked: tuple[jax.Array, ...],
              runner: _ModRunner) -> jax.Array | None:
    """Which entries of a tile ``(Gp * tq, tk)`` may attend; None for all of them.

    Partial blocks check key bounds and ``Mods.mask``; full blocks check
    nothing unless the kernel's key block outgrew the caller's.
    """
    if not (masked or self.geo.bound_full):
      return None
    r, g, q_pos, k_pos = self.positions(at)
    keys = at.col + lax.iota(jnp.int32, self.tk)  # bounds: the call's own rows, not positions
    ok = jnp.broadcast_to((keys < self.geo.kv_len)[None, :], (self.rows, self.tk))
    if masked and self.mods.mask is not None:
      mask = runner(self.mods.mask, (at.m, r, g, q_pos, k_pos), whole_tree, blocked)
      shape = (1, self.geo.groups_p, self.tq, self.tk)
      ok = ok & jnp.broadcast_to(mask, shape).reshape(ok.shape)
    return ok

  def kept(self, ok: jax.Array | None, at: _At) -> jax.Array:
    """``ok`` on the real rows only: padding heads and queries get no gradient (nor NaN)."""
    rows = at.row + lax.iota(jnp.int32, self.tq)
    real = (lax.iota(jnp.int32, self.geo.groups_p) < self.geo.groups)[:, None] & (
        rows < self.geo.q_len)[None, :]
    real = jnp.broadcast_to(real.reshape(self.rows, 1), (self.rows, self.tk))
    return real if ok is None else real & ok

  def logits(self, q: jax.Array, k: jax.Array, scale: jax.Array, at: _At, whole_tree: Any,
             blocked: tuple[jax.Array, ...], runner: _ModRunner) -> jax.Array:
    """The scores of a tile in base 2: ``log2(e) * Mods.score(scale * q @ k^T)``."""
    qk = _mma(q, k, (1, 1), scale.dtype)
    if self.mods.score is None:
      return qk * (scale * _LOG2E)
    return self.scored(qk * scale, at, whole_tree, blocked, runner) * _LOG2E


def _mma(a: jax.Array, b: jax.Array, contract: tuple[int, int], out: Any) -> jax.Array:
  """A tensor-core product: operands in ``b``'s dtype (the input dtype), accumulated in ``out``.

  ``a`` is cast to ``b``'s dtype (P to V's, dS to K's or Q's, as FlashAttention
  and torch do): bfloat16/float16 operands run at the half-precision rate;
  float32 ones follow ``jax.default_matmul_precision`` as ``jnp.matmul`` does
  (TF32 under the default, full float32 under ``"highest"``).
  """
  return lax.dot_general(a.astype(b.dtype), b, (((contract[0],), (contract[1],)), ((), ())),
                         preferred_element_type=out)


def _visit(blocks: KeyBlocks, m: jax.Array, i: jax.Array, per_block: int,
           body: Callable[[bool, jax.Array, Any], Any], carry: Any,
           split: tuple[jax.Array, int] | None = None) -> Any:
  """Runs ``carry = body(masked, tile, carry)`` over the tiles of block ``i``'s listed blocks.

  ``blocks`` holds refs; the full blocks come first, then the partial ones
  (``masked``); each listed block is ``per_block`` tiles (``tile`` counts
  tiles). One flat loop per kind over all their tiles, so that Triton can
  software-pipeline the loads of the next tile behind this one's products.
  ``split = (s, n)``: only the ``s``-th of ``n`` equal shares of each kind's tiles.
  """

  def listed(masked, num, indices, first, carry):
    def step(t, carry):
      # lax's div/rem (the counts are not negative): jnp's floor division does not lower.
      per = jnp.asarray(per_block, t.dtype)
      b, u = (t, 0) if per_block == 1 else (lax.div(t, per), lax.rem(t, per))
      j = first + b if indices is None else indices[m, i, b]
      return body(masked, j * per_block + u, carry)

    tiles = num[m, i] * per_block
    if split is None:
      return lax.fori_loop(0, tiles, step, carry)
    s, n = split
    s = s.astype(tiles.dtype)
    return lax.fori_loop(lax.div(s * tiles, jnp.asarray(n, tiles.dtype)),
                         lax.div((s + 1) * tiles, jnp.asarray(n, tiles.dtype)), step, carry)

  carry = listed(False, blocks.full_num, blocks.full_indices, 0, carry)
  return listed(True, blocks.num, blocks.indices, blocks.full_num[m, i], carry)


def _inexact(x) -> bool:
  return bool(jnp.issubdtype(x.dtype, jnp.inexact))


def _operand_refs(operands) -> tuple[list[Any], Any, Sequence[Any]]:
  """``(whole leaves' refs, whole's tree structure, blocked refs)`` of a kernel's operands."""
  whole, blocked = operands
  return *jax.tree.flatten(whole), blocked


def _program() -> tuple[jax.Array, jax.Array, jax.Array]:
  """``(tile, m, r)``: the tile axis first, so programs sharing keys and values run together."""
  return pl.program_id(0), pl.program_id(1), pl.program_id(2)


def _split_program(t: Any, splits: int) -> tuple[Any, Any]:
  """``(query tile, key split)`` of a forward program whose grid axis 0 is ``tiles * splits``."""
  if splits == 1:
    return t, 0
  n = jnp.asarray(splits, jnp.int32)
  return lax.div(t, n), lax.rem(t, n)


def _offsets(offsets_ref) -> tuple[jax.Array, jax.Array]:
  return offsets_ref[0], offsets_ref[1]


def _below(start: Any, size: int, bound: int) -> jax.Array:
  """``(size,)``: which of ``start .. start + size - 1`` are below ``bound``."""
  return start + lax.iota(jnp.int32, size) < bound


def _columns(size: int, padded: int) -> jax.Array | None:
  """``(1, padded)``: which columns of a head dim padded to ``padded`` exist; None if all do."""
  return None if size == padded else _below(0, padded, size)[None, :]


def _joined(rows: jax.Array | None, columns: jax.Array | None) -> jax.Array | None:
  """The load mask of a tile whose ``rows`` (leading dims) and ``columns`` (last dim) exist."""
  if rows is None:
    return columns
  rows = rows[..., None]
  return rows if columns is None else rows & columns


def _query_rows(geo: _Geometry, row: Any, tq: int) -> jax.Array | None:
  """``(Gp, tq)``: which stacked rows of the query tile at ``row`` exist; None if all may."""
  if geo.q_exact:
    return None
  return (_below(0, geo.groups_p, geo.groups)[:, None]
          & _below(row, tq, geo.q_len)[None, :])


def _key_rows(geo: _Geometry, col: Any, tk: int) -> jax.Array | None:
  """``(tk,)``: which of keys ``col .. col + tk - 1`` exist; None if all may."""
  return None if geo.kv_pad == geo.kv_len else _below(col, tk, geo.kv_len)


def _load(ref, mask: jax.Array | None) -> jax.Array:
  """``ref[...]``, reading 0 (False) where ``mask`` (broadcast to the ref) is False: past the
  array."""
  if mask is None:
    return ref[...]
  other = False if ref.dtype == jnp.bool_ else 0
  return plgpu.load(ref, mask=jnp.broadcast_to(mask, ref.shape), other=other)


def _store(ref, value: jax.Array, mask: jax.Array | None) -> None:
  """``ref[...] = value`` (reshaped to the ref), written only where ``mask`` is True."""
  value = value.reshape(ref.shape).astype(ref.dtype)
  if mask is None:
    ref[...] = value
  else:
    plgpu.store(ref, value, mask=jnp.broadcast_to(mask, ref.shape))


def _load_keys(ref, geo: _Geometry, col: jax.Array, tk: int, head: int) -> jax.Array:
  """Keys (or values) ``col .. col + tk`` of a row's ``(S, head)`` ref as a ``(tk, head
  padded)`` tile: keys past S and columns past ``head`` read 0."""
  view = ref.at[pl.ds(col, tk), :]
  return _load(view, _joined(_key_rows(geo, col, tk), _columns(head, view.shape[-1])))


def _query_tile(ref, geo: _Geometry, row: Any, tq: int, head: int) -> jax.Array:
  """A ``(Gp, tq, head padded)`` query-side tile (q, dO) as ``(Gp * tq, head padded)``."""
  padded = ref.shape[-1]
  return _load(ref, _joined(_query_rows(geo, row, tq), _columns(head, padded))).reshape(
      geo.groups_p * tq, padded)


def _row_stats(ref, geo: _Geometry, row: Any, tq: int) -> jax.Array:
  """A ``(Gp, tq)`` per-row tile (lse, delta) as ``(Gp * tq, 1)``."""
  return _load(ref, _query_rows(geo, row, tq)).reshape(geo.groups_p * tq, 1)


# --- kernels -----------------------------------------------------------------------------------


def _fold(carry: osm.Carry, s: jax.Array, v: jax.Array) -> osm.Carry:
  """:func:`online_softmax_fold` in base 2 with ``P`` in ``v``'s dtype for ``P @ V``.

  ``s`` are base-2 scores (``-inf`` masked); the running maximum is in base 2
  too. The kernel's custom vjp differentiates it, so nothing is held out here.
  """
  acc, row_max, row_sum = carry
  new_max = jnp.maximum(row_max, jnp.max(s, axis=-1))
  # While a row has seen no key its maximum is -inf: shift by 0, not by -inf (no NaN).
  shift = jnp.where(jnp.isneginf(new_max), 0.0, new_max)
  p = jnp.exp2(s - shift[:, None])
  rescale = jnp.exp2(row_max - shift)
  return (acc * rescale[:, None] + _mma(p, v, (1, 0), acc.dtype), new_max,
          row_sum * rescale + jnp.sum(p, axis=-1))


def _forward_kernel(tiling: _Tiling, splits: int, blocks, scale_ref, offsets_ref, q_ref, k_ref,
                    v_ref, operands, out_ref, lse_ref):
  geo, tq, tk = tiling.geo, tiling.tq, tiling.tk
  tile, m, r = _program()
  tile, split = _split_program(tile, splits)
  q0, k0 = _offsets(offsets_ref)
  whole_refs, whole_tree, blocked_refs = _operand_refs(operands)
  scale = scale_ref[...]
  row = pl.multiple_of(tile * tq, tq)
  q = _query_tile(q_ref, geo, row, tq, geo.head)

  def fold(masked, key_tile, carry):
    col = pl.multiple_of(key_tile * tk, tk)
    at = _At(m, r, row, col, q0, k0)
    runner = _ModRunner(whole_refs)
    blocked = tiling.blocked(blocked_refs, at)
    s = tiling.logits(q, _load_keys(k_ref, geo, col, tk, geo.head), scale, at, whole_tree,
                      blocked, runner)
    ok = tiling.allowed(masked, at, whole_tree, blocked, runner)
    if ok is not None:
      s = jnp.where(ok, s, -jnp.inf)
    return _fold(carry, s, _load_keys(v_ref, geo, col, tk, geo.v_head))

  carry = osm.online_softmax_init((), tiling.rows, geo.v_head_p, dtype=scale.dtype)
  carry = _visit(blocks, m, tile // (geo.block_q // tq), geo.block_k // tk, fold, carry,
                 None if splits == 1 else (split, splits))
  rows = _query_rows(geo, row, tq)
  _store(out_ref, osm.online_softmax_finish(carry, out_ref.dtype),
         _joined(rows, _columns(geo.v_head, geo.v_head_p)))
  _, row_max, row_sum = carry
  seen = osm.seen_a_key(row_max)
  lse = jnp.where(seen, (row_max + jnp.log2(jnp.where(seen, row_sum, 1.0))) * _LN2, -jnp.inf)
  _store(lse_ref, lse, rows)


class _TileGrads(NamedTuple):
  """One tile of the backward pass: probabilities, score cotangents, operand cotangents."""

  p: jax.Array  # softmax probabilities, 0 where masked or padding
  d_s1: jax.Array  # cotangent of the scaled scores (before Mods.score)
  d_blocked: list[jax.Array]  # of the float blocked tiles
  gathers: list[_Gather]  # what the mods gathered from float whole leaves
  d_gathered: list[jax.Array]
  d_loaded: dict[int, jax.Array]  # of the float whole leaves the mods read whole


def _tile_grads(tiling: _Tiling, masked: bool, at: _At, q, k, v, scale, d_out, lse2, delta,
                operands, operand_grads: bool) -> _TileGrads:
  """FlashAttention-2's backward of one tile: ``p = 2^(s - lse)``, ``ds = p * (dp - delta)``.

  ``lse2`` is the log-sum-exp in base 2. ``ds`` goes back through
  ``Mods.score`` with ``jax.vjp``; with ``operand_grads``, what the mods read
  from the float operands (blocked tiles, gathered or whole-read whole leaves)
  is a vjp input too, so their cotangents come out.
  """
  whole_refs, whole_tree, blocked_refs = operands
  blocked = tiling.blocked(blocked_refs, at)
  trainable = [operand_grads and _inexact(ref) for ref in whole_refs]
  is_float = [operand_grads and _inexact(x) for x in blocked]
  keep = tiling.kept(tiling.allowed(masked, at, whole_tree, blocked, _ModRunner(whole_refs)), at)
  dp = _mma(d_out, v, (1, 1), scale.dtype)
  if tiling.mods.score is None and not any(is_float):
    p = jnp.where(keep, jnp.exp2(tiling.logits(q, k, scale, at, whole_tree, blocked,
                                               _ModRunner(whole_refs)) - lse2), 0.0)
    return _TileGrads(p, jnp.where(keep, p * (dp - delta), 0.0), [], [], [], {})
  s1 = _mma(q, k, (1, 1), scale.dtype) * scale
  # A first run records what the mods read from the float whole leaves; the vjp replays it.
  record = _ModRunner(whole_refs, trainable)
  if any(trainable):
    tiling.scored(s1, at, whole_tree, blocked, record)
  floats = [x for x, f in zip(blocked, is_float, strict=True) if f]
  loaded = {i: x for i, x in record.loaded.items() if trainable[i]}

  def scores(s1, floats, gathered, loaded):
    merged = iter(floats)
    tiles = tuple(next(merged) if f else x for x, f in zip(blocked, is_float, strict=True))
    runner = _ModRunner(whole_refs, trainable, replay=(gathered, loaded))
    return tiling.scored(s1, at, whole_tree, tiles, runner)

  s2, vjp = jax.vjp(scores, s1, floats, [g.value for g in record.gathers], loaded)
  p = jnp.where(keep, jnp.exp2(s2 * _LOG2E - lse2), 0.0)
  # Padding rows may hold NaN (an inf score of a padding head): only the kept entries go back.
  d_s1, d_blocked, d_gathered, d_loaded = vjp(jnp.where(keep, p * (dp - delta), 0.0))
  return _TileGrads(p, jnp.where(keep, d_s1, 0.0), d_blocked, record.gathers, d_gathered,
                    d_loaded)


def _dq_kernel(tiling: _Tiling, blocks, scale_ref, offsets_ref, q_ref, k_ref, v_ref, do_ref,
               lse_ref, delta_ref, operands, _zeros, dq_ref, d_scale_ref, d_whole_refs,
               d_blocked_refs):
  geo, tq, tk = tiling.geo, tiling.tq, tiling.tk
  tile, m, r = _program()
  q0, k0 = _offsets(offsets_ref)
  operands = _operand_refs(operands)
  d_whole = dict(zip([i for i, ref in enumerate(operands[0]) if _inexact(ref)], d_whole_refs,
                     strict=True))
  scale = scale_ref[...]
  row = pl.multiple_of(tile * tq, tq)
  q = _query_tile(q_ref, geo, row, tq, geo.head)
  d_out = _query_tile(do_ref, geo, row, tq, geo.v_head)
  lse2, delta = (_row_stats(x, geo, row, tq) for x in (lse_ref, delta_ref))

  def step(masked, key_tile, dq):
    col = pl.multiple_of(key_tile * tk, tk)
    at = _At(m, r, row, col, q0, k0)
    k = _load_keys(k_ref, geo, col, tk, geo.head)
    grads = _tile_grads(tiling, masked, at, q, k, _load_keys(v_ref, geo, col, tk, geo.v_head),
                        scale, d_out, lse2, delta, operands, operand_grads=True)
    # Tiles of other programs add into the same entries (broadcast dims, shared table entries).
    for ref, d in zip(d_blocked_refs, grads.d_blocked, strict=True):
      addupdate(ref, tiling.blocked_index(ref.shape, at), d.astype(ref.dtype))
    for g, d in zip(grads.gathers, grads.d_gathered, strict=True):
      d = d if g.inside is None else jnp.where(g.inside, d, 0)
      addupdate(d_whole[g.leaf], g.where, d.astype(scale.dtype))
    for i, d in grads.d_loaded.items():
      ref = d_whole[i]
      addupdate(ref, tuple(slice(None) for _ in ref.shape), d.reshape(ref.shape).astype(ref.dtype))
    return dq + _mma(grads.d_s1, k, (1, 0), scale.dtype)

  dq = _visit(blocks, m, tile // (geo.block_q // tq), geo.block_k // tk, step,
              jnp.zeros((tiling.rows, geo.head_p), scale.dtype))
  _store(dq_ref, dq * scale, _joined(_query_rows(geo, row, tq), _columns(geo.head, geo.head_p)))
  # d scale = sum(d s1 * q @ k^T) = sum(q * (d s1 @ k)): one reduction after the pass.
  d_scale_ref[...] = jnp.sum(dq * q.astype(scale.dtype))


def _dkv_kernel(tiling: _Tiling, blocks, scale_ref, offsets_ref, q_ref, k_ref, v_ref, do_ref,
                lse_ref, delta_ref, operands, dk_ref, dv_ref):
  geo, tq, tk = tiling.geo, tiling.tq, tiling.tk
  tile, m, r = _program()
  q0, k0 = _offsets(offsets_ref)
  operands = _operand_refs(operands)
  scale = scale_ref[...]
  col = pl.multiple_of(tile * tk, tk)
  keys = _key_rows(geo, col, tk)
  k_mask, v_mask = (_joined(keys, _columns(n, p)) for n, p in ((geo.head, geo.head_p),
                                                              (geo.v_head, geo.v_head_p)))
  k, v = _load(k_ref, k_mask), _load(v_ref, v_mask)

  def step(masked, query_tile, carry):
    dk, dv = carry
    row = pl.multiple_of(query_tile * tq, tq)
    rows = pl.ds(row, tq)
    q = _query_tile(q_ref.at[:, rows, :], geo, row, tq, geo.head)
    d_out = _query_tile(do_ref.at[:, rows, :], geo, row, tq, geo.v_head)
    lse2, delta = (_row_stats(x.at[:, rows], geo, row, tq) for x in (lse_ref, delta_ref))
    grads = _tile_grads(tiling, masked, _At(m, r, row, col, q0, k0), q, k, v, scale, d_out,
                        lse2, delta, operands, operand_grads=False)  # the dq pass gives those
    return (dk + _mma(grads.d_s1, q, (0, 0), scale.dtype),
            dv + _mma(grads.p, d_out, (0, 0), scale.dtype))

  carry = (jnp.zeros((tk, geo.head_p), scale.dtype), jnp.zeros((tk, geo.v_head_p), scale.dtype))
  dk, dv = _visit(blocks, m, tile // (geo.block_k // tk), geo.block_q // tq, step, carry)
  _store(dk_ref, dk * scale, k_mask)
  _store(dv_ref, dv, v_mask)


# --- calls -------------------------------------------------------------------------------------


def causal_rule(mods: Mods) -> str | None:
  """The causal rule ``mods`` declares (``Mods.causal``: "exact", "within"), or None.

  A caller whose mask is causal (SDPA's ``is_causal``) declares it so that the
  kernels list causal tiles at their own tile, not at the table's blocks: a
  table block of 512 on the diagonal is 8 x 8 tiles of 64, of which 28 lie
  wholly above the diagonal (computed and masked if inherited from the block).
  """
  return mods.causal if mods.mask is not None else None


@dataclasses.dataclass(frozen=True)
class _Config:
  """The static part of a call (a ``custom_vjp`` non-differentiable argument)."""

  geo: _Geometry
  sizes: BlockSizes
  mods: Mods
  interpret: bool
  dtype: Any  # the inputs'

  def tables(self, kind: str, blocks: KeyBlocks, offsets: jax.Array) -> tuple[_Tiling, KeyBlocks]:
    """The tiling and block table of pass ``kind``.

    The call's own table, cut into tiles by the kernel; or, for a mask that
    declares the causal rule (:func:`causal_rule`), the causal table at the
    pass' tile (the table's blocks become the tiles): no tile wholly above the
    diagonal is listed, the diagonal tiles are partial and, for the exact
    rule, the tiles below it full.
    """
    tiling = self.tiling(kind)
    rule = causal_rule(self.mods)
    if rule is None:
      return tiling, blocks
    geo, tq, tk = self.geo, tiling.tq, tiling.tk
    geo = dataclasses.replace(geo, block_q=tq, block_k=tk, n_q=ceil_div(geo.q_len, tq),
                              n_k=ceil_div(geo.kv_len, tk), bound_full=False)
    table = causal_key_blocks(geo.q_len, geo.kv_len, tq, tk, q_offset=offsets[0],
                              k_offset=offsets[1])
    if rule == "within":  # the rest of the mask applies in every listed tile
      table = table._replace(num=table.num + table.full_num,
                             full_num=jnp.zeros_like(table.full_num))
    rows = (blocks.num.shape[0], geo.n_q)  # one copy per table row M the kernel indexes
    table = table._replace(num=jnp.broadcast_to(table.num, rows),
                           full_num=jnp.broadcast_to(table.full_num, rows))
    return dataclasses.replace(tiling, geo=geo), table

  def launch(self, kind: str) -> Launch:
    return self.sizes.launches(max(self.geo.head_p, self.geo.v_head_p), self.dtype)[kind]

  def tiling(self, kind: str) -> _Tiling:
    launch = self.launch(kind)
    return _Tiling(self.geo, *self.geo.tiles(launch.rows, launch.keys), self.mods)

  def params(self, kind: str) -> plgpu.CompilerParams:
    launch = self.launch(kind)
    return plgpu.CompilerParams(num_warps=launch.num_warps, num_stages=launch.num_stages)

  def cost(self, kind: str, lead: tuple[int, ...], tiles: int) -> pl.CostEstimate:
    """An upper bound of the work of a pass (every table block listed) for XLA's scheduler.

    ``tiles``: how many programs per ``(m, r)`` re-read the other side.
    """
    geo, size = self.geo, jnp.dtype(self.dtype).itemsize
    heads = math.prod(lead)
    pairs = heads * geo.groups_p * geo.q_pad * geo.kv_pad
    queries = heads * geo.groups_p * geo.q_pad  # rows of q, out, dO, lse
    e, ev = geo.head_p, geo.v_head_p
    keys = heads * geo.kv_pad * (e + ev) * size
    rows = queries * (e + ev) * size
    if kind == "forward":
      return pl.CostEstimate(flops=2 * pairs * (e + ev), transcendentals=pairs,
                             bytes_accessed=rows + 4 * queries + tiles * keys)
    if kind == "dq":  # reads q, dO, lse, delta and keys/values per tile; writes dq
      return pl.CostEstimate(flops=2 * pairs * (2 * e + ev), transcendentals=pairs,
                             bytes_accessed=rows + queries * e * size + 8 * queries
                             + tiles * keys)
    return pl.CostEstimate(flops=2 * pairs * (2 * e + 2 * ev), transcendentals=pairs,
                           bytes_accessed=2 * keys + tiles * (rows + 8 * queries))


def _whole_spec(tree):
  """Block specs giving the kernel whole arrays (tables, scale, operands)."""
  return jax.tree.map(lambda _: pl.no_block_spec, tree)


def _padded(shape: tuple[int, ...], geo: _Geometry) -> tuple[int, ...]:
  """The block of a blocked operand ``(M|1, R|1, G|1, L|1, S|1)``: G, L, S padded to whole tiles."""
  return tuple(shape[:2]) + tuple(1 if n == 1 else p for n, p in zip(
      shape[2:], (geo.groups_p, geo.q_pad, geo.kv_pad), strict=True))


def _operand_specs(operands, geo: _Geometry) -> Operands:
  """Whole leaves as they are; each blocked operand as one padded block over the unpadded array
  (the kernels load its tiles with masks: nothing reads past its end)."""
  whole, blocked = operands
  return Operands(_whole_spec(whole), tuple(
      pl.BlockSpec(_padded(x.shape, geo), lambda t, m, r: (0,) * 5) for x in blocked))


def _per_row(*tail: int | None, shared: bool = False) -> pl.BlockSpec:
  """All of one ``(m, r)`` row: ``(..., *tail)`` with ``None`` (squeezed) for ``M`` and ``R``.

  ``shared``: the array has one table row (``M = 1``) that every ``m`` reads.
  """
  return pl.BlockSpec((None, None, *tail),
                      lambda t, m, r: (0 if shared else m, r) + (0,) * len(tail))


def _pool(k, v, q, geo: _Geometry) -> tuple[pl.BlockSpec, pl.BlockSpec]:
  """Specs of a row's whole keys and values; one pool (``M = 1``) serves every table row."""
  shared = k.shape[0] != q.shape[0]
  return (_per_row(geo.kv_len, geo.head_p, shared=shared),
          _per_row(geo.kv_len, geo.v_head_p, shared=shared))


def _query_tiles(geo: _Geometry, tq: int,
                 splits: int = 1) -> tuple[pl.BlockSpec, pl.BlockSpec, pl.BlockSpec]:
  """Specs of program ``(t, m, r)``'s query tile: ``(q (Gp, tq, Ep), out (Gp, tq, Evp), rows)``.

  With ``splits``, ``t`` is ``tile * splits + split`` and the outputs have a
  leading split axis.
  """
  gp = geo.groups_p
  q = pl.BlockSpec((None, None, gp, tq, geo.head_p),
                   lambda t, m, r: (m, r, 0, _split_program(t, splits)[0], 0))
  if splits == 1:
    return (q, pl.BlockSpec((None, None, gp, tq, geo.v_head_p), lambda t, m, r: (m, r, 0, t, 0)),
            pl.BlockSpec((None, None, gp, tq), lambda t, m, r: (m, r, 0, t)))

  def at(t, m, r, *tail):
    tile, split = _split_program(t, splits)
    return (split, m, r, 0, tile, *tail)

  return (q, pl.BlockSpec((None, None, None, gp, tq, geo.v_head_p), lambda t, m, r: at(t, m, r, 0)),
          pl.BlockSpec((None, None, None, gp, tq), at))


def _splits(cfg: _Config, tiling: _Tiling, programs: int) -> int:
  """Key splits of the forward: flash-decoding's, where the query tiles leave the GPU idle.

  One query tile per row (decoding: L = 1..16 queries per sequence) makes as
  few programs as rows; the listed key tiles are then shared out among up to
  16 programs per row (at most one per key tile), merged by their lse.
  """
  if cfg.sizes.num_splits is not None:
    return cfg.sizes.num_splits
  geo = tiling.geo
  if ceil_div(geo.q_len, tiling.tq) > 1 or programs >= _BUSY:
    return 1
  return max(1, min(16, geo.n_k * (geo.block_k // tiling.tk), _BUSY // programs))


def _forward(q, k, v, blocks: KeyBlocks, operands: Operands, scale, offsets, cfg: _Config):
  tiling, blocks = cfg.tables("forward", blocks, offsets)
  geo = tiling.geo
  lead = q.shape[:2]
  tq, dtype = tiling.tq, scale.dtype
  tiles = ceil_div(geo.q_len, tq)  # the query tiles holding a real row: no program past L
  splits = _splits(cfg, tiling, tiles * math.prod(lead))
  q_tile, out_tile, lse_tile = _query_tiles(geo, tq, splits)
  out_shape = lead + (geo.groups, geo.q_len)
  out, lse = pl.pallas_call(
      functools.partial(_forward_kernel, tiling, splits),
      grid=(tiles * splits,) + lead,
      in_specs=[_whole_spec(blocks), pl.no_block_spec, pl.no_block_spec, q_tile,
                *_pool(k, v, q, geo), _operand_specs(operands, cfg.geo)],
      out_specs=[out_tile, lse_tile],
      # Split programs write float32 partial results for the merge below.
      out_shape=[jax.ShapeDtypeStruct((splits,) * (splits > 1) + out_shape + (geo.v_head,),
                                      q.dtype if splits == 1 else dtype),
                 jax.ShapeDtypeStruct((splits,) * (splits > 1) + out_shape, dtype)],
      compiler_params=cfg.params("forward"),
      cost_estimate=cfg.cost("forward", lead, tiles),
      interpret=cfg.interpret,
      name="jmat_block_sparse_forward",
  )(blocks, scale, offsets, q, k, v, operands)
  if splits == 1:
    return out, lse
  merged, lse = osm.merge_parts(out, lse)  # flash-decoding's merge of the splits
  return merged.astype(q.dtype), lse


def _backward(cfg: _Config, q, k, v, blocks, operands, scale, offsets, d_out, lse2, delta):
  """``(dq, dk, dv, d_scale, d_whole (float leaves), d_blocked (float operands))``."""
  geo = cfg.geo
  lead, gp, dtype = q.shape[:2], geo.groups_p, scale.dtype
  whole, blocked = operands
  # A scalar leaf's gradient is (1,): Triton adds to a ref through an index. A blocked operand's
  # is padded to whole tiles (added to without masks) and cut to its shape after the pass.
  zeros = ([jnp.zeros(x.shape or (1,), dtype) for x in jax.tree.leaves(whole) if _inexact(x)],
           [jnp.zeros(_padded(x.shape, cfg.geo), dtype) for x in blocked if _inexact(x)])
  tiling, dq_blocks = cfg.tables("dq", blocks, offsets)
  tables = [_whole_spec(dq_blocks), pl.no_block_spec, pl.no_block_spec]
  ins = (dq_blocks, scale, offsets, q, k, v, d_out, lse2, delta, operands)
  q_tile, do_tile, row_tile = _query_tiles(geo, tiling.tq)
  n_tiles = ceil_div(geo.q_len, tiling.tq)
  n_zeros = len(zeros[0]) + len(zeros[1])
  dq, d_scale, d_whole, d_blocked = pl.pallas_call(
      functools.partial(_dq_kernel, tiling),
      grid=(n_tiles,) + lead,
      in_specs=tables + [q_tile, *_pool(k, v, q, geo), do_tile, row_tile, row_tile,
                         _operand_specs(operands, cfg.geo), _whole_spec(zeros)],
      out_specs=[q_tile, pl.BlockSpec((None, None, None), lambda t, m, r: (t, m, r)),
                 _whole_spec(zeros[0]), _whole_spec(zeros[1])],
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct((n_tiles,) + lead, dtype),
                 [jax.ShapeDtypeStruct(x.shape, dtype) for x in zeros[0]],
                 [jax.ShapeDtypeStruct(x.shape, dtype) for x in zeros[1]]],
      # The operands' gradients start at zero and are added to in place.
      input_output_aliases={len(jax.tree.leaves(ins)) + n: 2 + n for n in range(n_zeros)},
      compiler_params=cfg.params("dq"),
      cost_estimate=cfg.cost("dq", lead, n_tiles),
      interpret=cfg.interpret,
      name="jmat_block_sparse_dq",
  )(*ins, zeros)

  tiling, dkv_blocks = cfg.tables("dkv", blocks, offsets)
  geo, tk = tiling.geo, tiling.tk
  shared = k.shape[0] != q.shape[0]
  dk_tile, dv_tile = (pl.BlockSpec((None, None, tk, e), lambda t, m, r: (m, r, t, 0))
                      for e in (geo.head_p, geo.v_head_p))
  k_tile, v_tile = (pl.BlockSpec((None, None, tk, e), lambda t, m, r: (0 if shared else m, r, t, 0))
                    for e in (geo.head_p, geo.v_head_p))
  # A shared pool's gradients: one per table row m (no two programs write one tile), summed below.
  grads = [jax.ShapeDtypeStruct(q.shape[:1] + x.shape[1:], dtype if shared else x.dtype)
           for x in (k, v)]
  by_key = key_major_blocks(dkv_blocks, geo.n_k)
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, tiling),
      grid=(ceil_div(geo.kv_len, tk),) + lead,
      in_specs=[_whole_spec(by_key), pl.no_block_spec, pl.no_block_spec,
                _per_row(gp, geo.q_pad, geo.head_p), k_tile, v_tile,
                _per_row(gp, geo.q_pad, geo.v_head_p), _per_row(gp, geo.q_pad),
                _per_row(gp, geo.q_pad), _operand_specs(operands, cfg.geo)],
      out_specs=[dk_tile, dv_tile],
      out_shape=grads,
      compiler_params=cfg.params("dkv"),
      cost_estimate=cfg.cost("dkv", lead, ceil_div(geo.kv_len, tk)),
      interpret=cfg.interpret,
      name="jmat_block_sparse_dkv",
  )(by_key, *ins[1:])
  if shared:
    dk, dv = (jnp.sum(d, axis=0, keepdims=True).astype(x.dtype) for d, x in ((dk, k), (dv, v)))
  d_blocked = [d[tuple(slice(0, n) for n in x.shape)]
               for d, x in zip(d_blocked, [x for x in blocked if _inexact(x)], strict=True)]
  return dq, dk, dv, jnp.sum(d_scale), d_whole, d_blocked


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _attend(q, k, v, blocks, operands, scale, offsets, cfg: _Config):
  return _forward(q, k, v, blocks, operands, scale, offsets, cfg)


def _attend_fwd(q, k, v, blocks, operands, scale, offsets, cfg: _Config):
  out, lse = _forward(q, k, v, blocks, operands, scale, offsets, cfg)
  return (out, lse), (q, k, v, blocks, operands, scale, offsets, out, lse)


def _attend_bwd(cfg: _Config, residuals, cotangents):
  q, k, v, blocks, operands, scale, offsets, out, lse = residuals
  d_out, d_lse = cotangents
  dtype = lse.dtype
  # dO stays in the input dtype (a tensor-core operand); delta is a float32 (or float64) sum.
  d_out = d_out.astype(q.dtype)
  delta, lse = backward_statistics(out, d_out, lse, d_lse, dtype)
  lse2 = lse * _LOG2E  # the kernels' scores are in base 2 (+inf stays +inf)
  dq, dk, dv, d_scale, d_whole, d_blocked = _backward(
      cfg, q, k, v, blocks, operands, scale, offsets, d_out, lse2, delta)
  d_whole, d_blocked = iter(d_whole), iter(d_blocked)

  def cotangent(x, grads):
    if jnp.issubdtype(x.dtype, jnp.inexact):
      return next(grads).reshape(x.shape).astype(x.dtype)
    return zero_cotangent(x)

  whole, blocked = operands
  d_operands = Operands(jax.tree.map(lambda x: cotangent(x, d_whole), whole),
                        tuple(cotangent(x, d_blocked) for x in blocked))
  return (dq, dk, dv, jax.tree.map(zero_cotangent, blocks), d_operands,
          d_scale.astype(scale.dtype), zero_cotangent(offsets))


_attend.defvjp(_attend_fwd, _attend_bwd)


def run(call: Call, *, interpret: bool = False,
        block_sizes: BlockSizes = BlockSizes()) -> tuple[jax.Array, jax.Array]:
  """Block-sparse attention of ``call``: ``q (M, R, G, L, E)`` over ``k, v (M|1, R, S, E|Ev)``.

  Keys and values of one table row (``M = 1``: a batch-broadcast pool, a paged
  cache) serve every table row in place, without a copy per row; their
  gradients are summed over the rows.

  The interface of :func:`jmat._src.kernels.xla.run`: ``call.blocks`` lists
  blocks of ``(block_q, block_k)`` and never marks full a block holding
  padding keys; ``mods`` and ``operands = (whole, blocked)`` as there, blocked
  operands ``(M|1, R|1, G|1, L|1, S|1)``. Differentiable in ``q``, ``k``,
  ``v``, ``scale`` and the float operand leaves. The products take their
  operands in the input dtype and accumulate in float32 (float64 for float64
  inputs); ``out`` and the gradients of q, k, v come out in the inputs' dtypes.

  Args:
    call: the call (its ``needs_max`` and ``chains`` are the xla backend's only);
      its ``q_offset`` and ``k_offset`` (Python ints or int32 scalars, traced or
      not: ring attention's chunk offsets) are the positions of row 0 as the
      mods see them; the tables and the bounds stay the call's own.
    interpret: run the kernels in Pallas' interpreter (on any platform; tests).
    block_sizes: the kernels' tiles and launch parameters.

  Returns:
    ``(out (M, R, G, L, Ev), lse (M, R, G, L))``: ``out`` in q's dtype, ``lse``
    (natural log, ``-inf`` for a query that sees no key; its output row is 0)
    in the compute dtype (float32, float64 for float64 inputs).

  Raises:
    ValueError: a block size the kernel cannot tile, or a head dim it cannot hold.
  """
  q, k, v, blocks, operands, scale = call.q, call.k, call.v, call.blocks, call.operands, call.scale
  mods = call.mods
  geo = _geometry(q.shape, k.shape, v.shape, call.block_q, call.block_k)
  if isinstance(geo, str):
    raise ValueError(geo)
  dtype = osm.compute_dtype(q.dtype)
  if q.shape[-2] == 0 or k.shape[-2] == 0:  # no program to run: nothing seen
    return (jnp.zeros(q.shape[:-1] + v.shape[-1:], q.dtype),
            jnp.full(q.shape[:-1], -jnp.inf, dtype))
  whole, blocked = operands
  whole = jax.tree.map(jnp.asarray, whole)
  blocked = tuple(jnp.asarray(x) for x in blocked)
  offsets = _offsets_of(call)
  cfg = _Config(geo, block_sizes, mods, interpret, jnp.dtype(q.dtype))
  return cast(tuple[jax.Array, jax.Array], _attend(
      q, k, v, blocks, Operands(whole, blocked), jnp.asarray(scale).astype(dtype), offsets, cfg))


def _offsets_of(call: Call) -> jax.Array:
  """``[q_offset, k_offset]`` as an int32 array (a kernel input)."""
  return jnp.stack([jnp.asarray(call.q_offset, jnp.int32), jnp.asarray(call.k_offset, jnp.int32)])


def pass_tables(call: Call, *, block_sizes: BlockSizes = BlockSizes()
                ) -> dict[str, tuple[tuple[int, int], KeyBlocks]]:
  """What each pass walks for ``call``: its tile ``(query positions, keys)`` and block table.

  Keyed by pass (``"forward"``, ``"dq"``, ``"dkv"``; the dk/dv pass reads the
  key-major copy of its table). The table lists blocks of the call's
  ``(block_q, block_k)``, each cut into tiles, or, for a mask that declares
  the causal rule (:func:`causal_rule`), tiles themselves.

  Raises:
    ValueError: a block size the kernel cannot tile, or a head dim it cannot hold.
  """
  geo = _geometry(call.q.shape, call.k.shape, call.v.shape, call.block_q, call.block_k)
  if isinstance(geo, str):
    raise ValueError(geo)
  cfg = _Config(geo, block_sizes, call.mods, False, jnp.dtype(call.q.dtype))
  passes = {kind: cfg.tables(kind, call.blocks, _offsets_of(call))
            for kind in ("forward", "dq", "dkv")}
  return {kind: ((tiling.tq, tiling.tk), blocks) for kind, (tiling, blocks) in passes.items()}


def unsupported(call: Call, *, block_sizes: BlockSizes = BlockSizes(),
                probe: bool = True) -> str | None:
  """Why the Triton kernels cannot run this call, or None when they can.

  The tiling rules are checked first (block sizes, head dims); then the
  forward and backward kernels are lowered for CUDA with these shapes, dtypes,
  operands and mods (cached per call signature): a mod Triton cannot lower (a
  gather from a computed array, an op without a Triton lowering, a whole
  operand read whole whose size is not a power of two) is reported with the
  lowering's error.

  Args:
    call: the call of :func:`run` (its arrays, or anything with ``shape`` and ``dtype``;
      the tables and the scale are not read).
    block_sizes: the tiles.
    probe: lower the kernels for CUDA to find what Triton refuses (off in interpret mode).

  Returns:
    The reason, naming the rule or the lowering error; None when supported.

  Raises:
    Exception: a lowering that fails for another reason than the kernels' limits (a jmat
      bug, a crash): see :func:`~jmat._src.block_sparse.lowering_limitation`.
  """
  q, k, v = call.q, call.k, call.v
  geo = _geometry(q.shape, k.shape, v.shape, call.block_q, call.block_k)
  if isinstance(geo, str):
    return geo
  if not probe:  # interpret mode runs anywhere: no lowering for CUDA to try
    return None
  leaves, tree = jax.tree.flatten(call.operands)
  signature = tuple(jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (q, k, v, *leaves))
  return _lowering_failure(signature, tree, call.mods, call.block_q, call.block_k, block_sizes)


@functools.lru_cache(maxsize=64)
def _lowering_failure(signature: tuple[jax.ShapeDtypeStruct, ...], tree, mods: Mods,
                      block_q: int, block_k: int, block_sizes: BlockSizes) -> str | None:
  """The error of lowering the forward and backward kernels for CUDA, or None."""
  q, k, v, *leaves = signature
  floats = [jnp.issubdtype(x.dtype, jnp.inexact) for x in leaves]
  n_q = -(-q.shape[-2] // block_q)

  def loss(q, k, v, scale, float_leaves, other_leaves):
    float_leaves, other_leaves = iter(float_leaves), iter(other_leaves)
    merged = [next(float_leaves) if f else next(other_leaves) for f in floats]
    ones = jnp.ones((q.shape[0], n_q), jnp.int32)
    blocks = KeyBlocks(ones, None, ones, None)  # any counts: the kernels trace both kinds
    out, _ = run(Call(q, k, v, blocks, jax.tree.unflatten(tree, merged), scale, mods=mods,
                      block_q=block_q, block_k=block_k), block_sizes=block_sizes)
    return jnp.sum(out.astype(jnp.float32))

  scale = jax.ShapeDtypeStruct((), osm.compute_dtype(q.dtype))
  args = (q, k, v, scale, [x for x, f in zip(leaves, floats, strict=True) if f],
          [x for x, f in zip(leaves, floats, strict=True) if not f])
  try:
    jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4))).trace(*args).lower(
        lowering_platforms=("cuda",))
  except Exception as error:  # the lowering's own message is the reason
    if not lowering_limitation(error):
      raise
    first = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return f"{_NAME}: the kernels do not lower to Triton: {type(error).__name__}: {first}"
  return None
