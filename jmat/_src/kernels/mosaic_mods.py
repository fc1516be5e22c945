"""The mods (score and mask functions) of the Mosaic (TPU) kernels, cut for a TPU.

Mosaic lowers no gather, so a mod reading a captured array by position cannot run in a kernel
as written: :func:`make_plan` traces each mod at the kernels' tile shapes and splits it
(:class:`Split`) into the values computed outside the kernels, O(L + S) (:func:`outside_values`),
and the equations the kernels run (:func:`in_kernel`).
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
from jax.extend import core as jax_core
from jax.extend.core import primitives as jax_primitives

from jmat._src.block_sparse import Mods, Operands
from jmat._src.kernels.mosaic_tables import Geometry


def narrowed(dtype) -> np.dtype:
  """``dtype`` in 32 bits if it has 64 (TPUs compute no 64-bit types), else itself."""
  dtype = np.dtype(dtype)
  return np.dtype(f"{dtype.kind}4") if dtype.itemsize == 8 and dtype.kind in "iuf" else dtype


# --- the mods: what they read of the whole operands is computed outside the kernels -------
#
# Mosaic lowers no gather, so a mod reading a captured array by position (document ids
# ``ids[q_idx]``, per-batch ids ``ids[b, q_idx]``, ALiBi slopes ``slopes[h]``) cannot run in a
# kernel as written. Each mod is traced once at the kernel's tile shapes and cut along its data
# flow: every value that depends on the whole operands and on at most one of the query block
# and the key block (besides the table row m and the batch row r) is computed outside the
# kernels, in XLA, for every tile at once; the kernels read it through a BlockSpec, one tile
# per grid step, as they read blocked operands. The rest of the mod (what joins the two sides,
# the scores, the blocked operands) runs in the kernel. ``ids[q_idx] == ids[kv_idx]`` so reads
# an O(L) and an O(S) array, and the gradients of float values computed outside flow back
# through XLA's autodiff of that computation. A value depending on a whole operand and on both
# positions (``table[h, kv_idx - q_idx + D]``) would need a tile per (query block, key block)
# pair, O(L * S) memory: it stays in the kernel, where TPUs cannot lower its gather.

_CALLS = (jax_primitives.jit_p, jax_primitives.closed_call_p)


def _bind(eqn, ins: Sequence[Any], narrow: bool = False) -> list:
  """Applies ``eqn``'s primitive to ``ins`` (with ``narrow``, its 64-bit dtype params in 32)."""
  params = eqn.params
  if narrow:
    params = {k: narrowed(v) if isinstance(v, np.dtype) else v for k, v in params.items()}
  bound = eqn.primitive.get_bind_params(params)  # (subfuns, params) in older jax versions
  subfuns, params = bound if isinstance(bound, tuple) else ((), bound)
  out = eqn.primitive.bind(*subfuns, *ins, **params)
  return list(out) if eqn.primitive.multiple_results else [out]


def _read(env: dict, atom, narrow: bool = False):
  if not isinstance(atom, jax_core.Literal):
    return env[atom]
  value = atom.val
  return np.asarray(value, narrowed(np.result_type(value))) if narrow else value


def _inlined(jaxpr, consts: Sequence[Any], args: Sequence[Any]) -> list:
  """Evaluates ``jaxpr`` with its jit calls inlined (so a gather inside one can be cut out)."""
  env = dict(zip(jaxpr.constvars, consts, strict=True))
  env.update(zip(jaxpr.invars, args, strict=True))
  for eqn in jaxpr.eqns:
    ins = [_read(env, x) for x in eqn.invars]
    if eqn.primitive in _CALLS:
      inner = eqn.params.get("jaxpr", eqn.params.get("call_jaxpr"))
      outs = _inlined(inner.jaxpr, inner.consts, ins)
    else:
      outs = _bind(eqn, ins)
    env.update(zip(eqn.outvars, outs, strict=True))
  return [_read(env, x) for x in jaxpr.outvars]


class Hoisted(NamedTuple):
  """A value of a mod computed outside the kernels: one tile per grid position it varies with.

  Attributes:
    var: the mod's jaxpr variable it is.
    side: ``"q"`` (a tile per query block), ``"k"`` (per key block) or None (one for all).
    per_m: whether it varies with the table row ``m``.
    per_r: whether it varies with the batch row ``r``.
    shape: its shape in the mod (a tile's).
    is_float: whether it is differentiable.
    needs: the equations of the mod that compute it, in order.
  """

  var: Any
  side: str | None
  per_m: bool
  per_r: bool
  shape: tuple[int, ...]
  is_float: bool
  needs: tuple

  @property
  def block(self) -> tuple[int, ...]:
    """Its tile as the kernels read it: at least 2-D (TPU blocks are); a query-side vector a
    column (queries run down the sublanes, as the mods broadcast them), another vector a row."""
    if len(self.shape) >= 2:
      return self.shape
    size = math.prod(self.shape)
    return (size, 1) if self.side == "q" and self.shape else (1, size)


def _outside(deps: frozenset) -> bool:
  """Whether a value with these dependencies is computed outside the kernels."""
  return "whole" in deps and "kernel" not in deps and not {"q", "k"} <= deps


@dataclasses.dataclass(frozen=True, eq=False)
class Split:
  """A mod's jaxpr at the kernel's tile shapes, cut into what runs outside and in the kernels.

  Attributes:
    name: ``"score_mod"`` or ``"mask_mod"`` (for messages).
    jaxpr: the mod's jaxpr (jit calls inlined). Inputs: ``s`` for a score mod, then
      ``m, r, g, q_pos, k_pos``, the whole leaves, the blocked tiles.
    consts: its constants.
    hoisted: the values computed outside, which the kernels read.
    kernel: the equations the kernels run.
    problem: why the kernel part cannot run on TPU, or None.
  """

  name: str
  jaxpr: Any
  consts: tuple
  hoisted: tuple[Hoisted, ...]
  kernel: tuple
  problem: str | None

  @property
  def scores(self) -> int:
    """How many inputs precede the positions: 1 (the scores) for a score mod, else 0."""
    return int(self.name == "score_mod")


def _split(fn: Callable, name: str, scores: Sequence[jax.ShapeDtypeStruct],
           index: Sequence[jax.ShapeDtypeStruct], whole: Sequence[jax.ShapeDtypeStruct], treedef,
           blocked: Sequence[jax.ShapeDtypeStruct]) -> Split:
  """Traces the mod ``fn`` at its tile's input shapes (see :class:`Split`) and cuts it."""
  n_args = len(scores) + len(index)

  def mod(*args):
    leaves, tiles = args[n_args:n_args + len(whole)], args[n_args + len(whole):]
    return fn(*args[:n_args], Operands(jax.tree.unflatten(treedef, leaves), tuple(tiles)))

  avals = [*scores, *index, *whole, *blocked]
  traced = jax.make_jaxpr(mod)(*avals)
  flat = jax.make_jaxpr(lambda *args: _inlined(traced.jaxpr, traced.consts, args))(*avals)
  jaxpr = flat.jaxpr
  # What each value depends on: the table row, batch row, query and key block of the grid
  # step ("m", "r", "q", "k"; the heads g are the same in every step), the whole operands
  # ("whole", captured constants too, and any gather: a read by index, which XLA makes), and
  # what only the kernel has ("kernel").
  tags = ([{"kernel"}] * len(scores) + [{"m"}, {"r"}, set(), {"q"}, {"k"}]
          + [{"whole"}] * len(whole) + [{"kernel"}] * len(blocked))
  deps = {v: frozenset(t) for v, t in zip(jaxpr.invars, tags, strict=True)}
  deps.update((v, frozenset({"whole"})) for v in jaxpr.constvars)

  def of(atom) -> frozenset:
    return frozenset() if isinstance(atom, jax_core.Literal) else deps[atom]

  for eqn in jaxpr.eqns:
    joint = frozenset().union(*(of(x) for x in eqn.invars))
    if eqn.primitive is jax_primitives.gather_p:
      joint |= {"whole"}
    deps.update((v, joint) for v in eqn.outvars)

  def needs(wanted: set, eqns: Sequence) -> tuple:
    """The equations of ``eqns`` that compute ``wanted``, in order."""
    wanted, needed = set(wanted), []
    for eqn in reversed(eqns):
      if any(v in wanted for v in eqn.outvars):
        needed.append(eqn)
        wanted.update(x for x in eqn.invars if not isinstance(x, jax_core.Literal))
    return tuple(reversed(needed))

  outputs = {x for x in jaxpr.outvars if not isinstance(x, jax_core.Literal)}
  # What the kernel computes of the result (not what only feeds the values computed outside).
  kernel = needs(outputs, [e for e in jaxpr.eqns
                           if e.outvars and not _outside(deps[e.outvars[0]])])
  # The values computed outside that the kernel part reads (or that the mod returns).
  frontier: list = []
  for atom in [x for eqn in kernel for x in eqn.invars] + list(jaxpr.outvars):
    if not isinstance(atom, jax_core.Literal) and _outside(deps[atom]) and atom not in frontier:
      frontier.append(atom)

  hoisted = tuple(
      Hoisted(var, "q" if "q" in deps[var] else "k" if "k" in deps[var] else None,
               "m" in deps[var], "r" in deps[var], tuple(var.aval.shape),
               bool(jnp.issubdtype(var.aval.dtype, jnp.inexact)), needs({var}, jaxpr.eqns))
      for var in frontier)
  problem = None
  gathers = [e for e in kernel if e.primitive is jax_primitives.gather_p]
  if gathers:
    operand, index = gathers[0].invars[:2]
    by = ("an index computed from the scores or a blocked operand" if "kernel" in of(index)
          else "an index that depends on both the query and the key position")
    problem = (f"the {name} gathers from an array of shape {tuple(operand.aval.shape)} by {by} "
               f"(as table[h, kv_idx - q_idx + D] does): the TPU kernel lowers no gather, and "
               f"reading it from outside the kernel would take a tile per (query block, key "
               f"block) pair, O(L * S) memory")
  return Split(name, jaxpr, tuple(flat.consts), hoisted, kernel, problem)


def in_kernel(split: Split, args: Sequence[Any], tiles: Sequence[Any], hoisted: Sequence[Any],
               narrow: bool) -> jax.Array:
  """The kernel part of a mod: ``args`` are ``(s,) m, r, g, q_pos, k_pos``, ``tiles`` the
  blocked tiles, ``hoisted`` the tiles of its values computed outside (with ``narrow``, in
  32 bits: the kernel part's 64-bit types are computed in 32)."""
  jaxpr = split.jaxpr
  env = dict(zip(jaxpr.invars[:len(args)], args, strict=True))
  env.update(zip(jaxpr.invars[len(jaxpr.invars) - len(tiles):], tiles, strict=True))
  env.update(zip((h.var for h in split.hoisted), hoisted, strict=True))
  for eqn in split.kernel:
    ins = [_read(env, x, narrow) for x in eqn.invars]
    if eqn.primitive is lax.sign_p and not jnp.issubdtype(jnp.result_type(ins[0]), jnp.inexact):
      # An integer sign (jnp's floor division of an index, b = r // H): Mosaic's lowering of
      # sign asks the chip it compiles for, which a compile-only host cannot answer.
      x = jnp.asarray(ins[0])
      outs = [(x > 0).astype(x.dtype) - (x < 0).astype(x.dtype)]
    else:
      outs = _bind(eqn, ins, narrow)
    env.update(zip(eqn.outvars, outs, strict=True))
  return jnp.asarray(_read(env, jaxpr.outvars[0], narrow))


def _outside_value(split: Split, h: Hoisted, leaves: Sequence[jax.Array], geo: Geometry,
                   offsets: jax.Array, m, r, n) -> jax.Array:
  """The tile of a hoisted value at table row ``m``, batch row ``r`` and block ``n`` of its side
  (the positions the kernel's :func:`_tile_at` gives that grid step)."""
  jaxpr, i32 = split.jaxpr, jnp.int32
  first_q = offsets[0] + (n * geo.tile_q if h.side == "q" else 0)
  first_k = offsets[1] + (n * geo.tile_k if h.side == "k" else 0)
  index = (m, jnp.reshape(r, (1,)), lax.iota(i32, geo.groups),
           first_q + lax.iota(i32, geo.tile_q), first_k + lax.iota(i32, geo.tile_k))
  env = dict(zip(jaxpr.constvars, split.consts, strict=True))
  inputs = jaxpr.invars[split.scores:split.scores + len(index) + len(leaves)]
  env.update(zip(inputs, (*index, *leaves), strict=True))
  for eqn in h.needs:
    env.update(zip(eqn.outvars, _bind(eqn, [_read(env, x) for x in eqn.invars]), strict=True))
  return jnp.asarray(env[h.var])


def outside_values(split: Split, leaves: Sequence[jax.Array], geo: Geometry,
                    offsets: jax.Array, table_rows: int, rows: int,
                    narrow: bool) -> list[jax.Array]:
  """Every hoisted value of a mod, for every tile: ``(M|1, R|1, n|1, *block)`` arrays (``n``
  the query or key blocks of its side), in 32 bits with ``narrow``."""
  arrays = []
  for h in split.hoisted:
    varying = (h.per_m, h.per_r, h.side is not None)
    sizes = (table_rows if h.per_m else 1, rows if h.per_r else 1,
             {"q": geo.q_tiles, "k": geo.n_k}.get(cast(str, h.side), 1))
    fn = functools.partial(_outside_value, split, h, leaves, geo, offsets)
    for axis in (2, 1, 0):  # innermost first: the result's axes come out as (m, r, n)
      if varying[axis]:
        fn = jax.vmap(fn, in_axes=tuple(0 if a == axis else None for a in range(3)))
    x = fn(*(jnp.arange(size, dtype=jnp.int32) if vary else jnp.int32(0)
             for size, vary in zip(sizes, varying, strict=True)))
    x = x.reshape(sizes + h.block)
    arrays.append(x.astype(narrowed(x.dtype)) if narrow else x)
  return arrays


@dataclasses.dataclass(frozen=True, eq=False)
class Plan:
  """The mods of one call as the kernels run them (static; one per shape signature).

  Attributes:
    score: the score mod's split, or None.
    mask: the mask mod's split, or None.
    blocked_float: which blocked operands are float (differentiable).
    narrow: the kernels compute 64-bit types in 32 bits (all but float64 calls, which only
      interpret mode runs).
  """

  score: Split | None
  mask: Split | None
  blocked_float: tuple[bool, ...]
  narrow: bool

  @property
  def score_hoisted(self) -> tuple[Hoisted, ...]:
    return () if self.score is None else self.score.hoisted

  @property
  def hoisted(self) -> tuple[Hoisted, ...]:
    """The values computed outside, the score mod's first: the kernels' hoisted inputs."""
    return self.score_hoisted + (() if self.mask is None else self.mask.hoisted)

  @property
  def problem(self) -> str | None:
    return next((s.problem for s in (self.score, self.mask) if s is not None and s.problem),
                None)


@functools.lru_cache(maxsize=64)
def make_plan(mods: Mods, groups: int, tile_q: int, tile_k: int, treedef,
          whole: tuple[jax.ShapeDtypeStruct, ...], blocked: tuple[jax.ShapeDtypeStruct, ...],
          dtype, narrow: bool) -> Plan:
  """The :class:`Plan` of ``mods`` for tiles of ``groups`` heads, ``tile_q`` queries and
  ``tile_k`` keys, whole leaves ``whole`` and blocked tiles ``blocked`` (their avals)."""
  i32 = jnp.int32
  index = [jax.ShapeDtypeStruct(shape, i32)
           for shape in ((), (1,), (groups,), (tile_q,), (tile_k,))]
  scores = [jax.ShapeDtypeStruct((1, groups, tile_q, tile_k), dtype)]
  score = None if mods.score is None else _split(mods.score, "score_mod", scores, index, whole,
                                                 treedef, blocked)
  mask = None if mods.mask is None else _split(mods.mask, "mask_mod", [], index, whole,
                                               treedef, blocked)
  return Plan(score, mask, tuple(bool(jnp.issubdtype(x.dtype, jnp.inexact)) for x in blocked),
               narrow)
