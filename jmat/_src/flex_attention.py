"""torch's ``flex_attention`` on jmat's block-sparse kernel.

The user's scalar ``score_mod`` and the block mask's ``mask_mod`` are lifted to
score blocks with ``jax.vmap``; the arrays they capture (a bias table, document
ids, ALiBi slopes) are hoisted out of their closures into explicit operands of
the kernel's ``custom_vjp`` (a ``jax.closure_convert`` that hoists every
captured array), which is how their gradients come out.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.extend
import jax.numpy as jnp
from jax.typing import ArrayLike

from jmat._src import backends, block_sparse, checks, online_softmax
from jmat._src.block_mask import BlockMask, ScoreMod, checked_mod, lift
from jmat._src.products import operands as as_operands

_OP = "flex_attention"
_NAMES = ("query", "key", "value")
# The kernel's blocks when no block_mask is given (torch's default BLOCK_SIZE).
_DEFAULT_BLOCK = 128


def _hoist(fn: Callable, *examples) -> tuple[Callable, list[jax.Array]]:
  """``fn`` with every array it captures made an explicit trailing argument.

  Like ``jax.closure_convert``, which hoists only values that may carry a
  tangent; here integer arrays (document ids) and concrete arrays are hoisted
  too, so nothing traced is closed over inside the kernel's custom_vjp.
  """
  closed = jax.make_jaxpr(fn)(*examples)
  n_args = len(examples)

  def pure(*args):
    # The same jaxpr closed over the values passed in place of its constants.
    with_consts = jax.extend.core.ClosedJaxpr(closed.jaxpr, list(args[n_args:]))
    return jax.extend.core.jaxpr_as_fun(with_consts)(*args[:n_args])[0]

  return pure, list(closed.consts)


@dataclasses.dataclass(frozen=True)
class Layout:
  """How ``(b, h)`` maps onto the kernel's ``(M, R, G)`` table rows, shared rows and groups.

  A mask shared by the heads (``mask_heads == 1``) computes all heads of a
  key/value head in one row: ``(M, R, G) = (1, B * Hkv, group)``, or
  ``(B, Hkv, group)`` for a mask per batch entry. A mask per query head gives
  each head a table row of its own (key/value heads repeated):
  ``(H, B, 1)``, or ``(B * H, 1, 1)`` for a mask per batch entry and head.
  """

  heads: int
  kv_heads: int
  mask_batch: int
  mask_heads: int

  def batch_and_head(self, m, r, g) -> tuple[jax.Array, jax.Array]:
    """The ``(R', G')`` batch and query head of a tile's rows ``r (R',)`` and heads ``g (G',)``.

    Integer arithmetic on the tile's indices, no table to gather from: a Pallas
    kernel evaluates it as it is.
    """
    r, g = r[:, None], g[None, :]
    group = self.heads // self.kv_heads
    if self.mask_heads == 1:
      b = r // self.kv_heads if self.mask_batch == 1 else m
      h = (r % self.kv_heads if self.mask_batch == 1 else r) * group + g
    elif self.mask_batch == 1:
      b, h = r, m
    else:
      b, h = m // self.heads, m % self.heads
    shape = (r.shape[0], g.shape[1])
    return jnp.broadcast_to(b, shape), jnp.broadcast_to(h, shape)


class Captured(NamedTuple):
  """The arrays flex's mods captured: the kernel's whole operands, every one an explicit input.

  Attributes:
    score_consts: the arrays the score_mod captured, in the order its jaxpr takes them.
    mask_consts: the arrays the mask_mod captured.
  """

  score_consts: tuple[jax.Array, ...]
  mask_consts: tuple[jax.Array, ...]


def to_kernel(x: jax.Array, mask_batch: int, mask_heads: int, group: int, is_query: bool):
  """``(B, H, T, D)`` -> the kernel's ``(M, R, [G,] T, D)`` for the :class:`Layout`."""
  batch, heads, length, dim = x.shape
  if mask_heads == 1:
    if is_query:
      x = x.reshape(batch, heads // group, group, length, dim)
    return x.reshape((1, x.shape[0] * x.shape[1]) + x.shape[2:]) if mask_batch == 1 else x
  if not is_query:
    x = jnp.repeat(x, group, axis=1)
  if mask_batch == 1:
    x = jnp.swapaxes(x, 0, 1)
  else:
    x = x.reshape((x.shape[0] * x.shape[1], 1) + x.shape[2:])
  return x[:, :, None] if is_query else x


def from_kernel(x: jax.Array, batch: int, heads: int, mask_batch: int, mask_heads: int):
  """The kernel's ``(M, R, G, L, ...)`` output back to ``(B, H, L, ...)``."""
  if mask_heads != 1 and mask_batch == 1:
    return jnp.swapaxes(x[:, :, 0], 0, 1)
  return x.reshape((batch, heads) + x.shape[3:])


class _AuxFields(NamedTuple):
  lse: bool = False
  max_scores: bool = False


class AuxRequest(_AuxFields):
  """Which auxiliary outputs :func:`flex_attention` returns (torch 2.13's ``AuxRequest``).

  A named tuple of two bools, checked when made: ``AuxRequest(lse="no")`` is a
  TypeError, not a request for the lse.

  Attributes:
    lse: the natural-log logsumexp of every query's scores.
    max_scores: every query's largest score (after score_mod and the mask;
      ``-inf`` where it sees no key). Like torch's, it carries no gradient.

  Raises:
    TypeError: a field that is not a bool.
  """

  __slots__ = ()

  def __new__(cls, lse: bool = False, max_scores: bool = False):
    return super().__new__(cls, checks.check_flag("attention.AuxRequest", "lse", lse),
                           checks.check_flag("attention.AuxRequest", "max_scores", max_scores))


class AuxOutput(NamedTuple):
  """The auxiliary outputs of :func:`flex_attention`: a field is None when not requested."""

  lse: jax.Array | None = None
  max_scores: jax.Array | None = None


def flex_attention(
    query: ArrayLike,
    key: ArrayLike,
    value: ArrayLike,
    score_mod: ScoreMod | None = None,
    block_mask: BlockMask | None = None,
    scale: ArrayLike | None = None,
    enable_gqa: bool = False,
    return_lse: bool = False,
    kernel_options: dict[str, Any] | None = None,
    *,
    return_aux: AuxRequest | None = None,
) -> jax.Array | tuple[jax.Array, jax.Array] | tuple[jax.Array, AuxOutput]:
  """Attention with a user-defined score_mod and block-sparse mask, as torch's ``flex_attention``.

  For every query ``l`` and key ``s`` of batch ``b`` and head ``h``::

    score = scale * query[b, h, l] @ key[b, h_kv, s]
    score = score_mod(score, b, h, l, s)                  # if given
    score = -inf where not block_mask.mask_mod(b, h, l, s)  # if given
    out[b, h, l] = softmax over s of score, @ value[b, h_kv]

  Only the (query block, key block) pairs the ``block_mask`` lists are
  computed, and its full blocks skip the mask: a sliding window or a packed
  batch of documents costs what its allowed blocks cost. ``score_mod`` is a
  scalar function written with ``jnp`` (as torch users write it with torch
  ops); it may capture arrays (bias tables, slopes, document ids), and
  gradients reach the float ones. The backward pass recomputes blocks, so
  memory is O(L * E) for forward and backward.

  Args:
    query: ``(B, Hq, L, E)``.
    key: ``(B, Hkv, S, E)``, or ``(1, Hkv, S, E)`` shared by every batch entry
      when ``block_mask`` is built for the query's batch ``B`` (as torch: one pool
      of keys, e.g. a :class:`PagedAttention` cache, that each entry's mask picks
      from; the XLA kernel reads the one pool, the Pallas kernels get it
      repeated per entry, and so does a mask per head).
    value: ``(B, Hkv, S, Ev)``, or ``(1, Hkv, S, Ev)`` with such a key.
    score_mod: ``(score, b, h, q_idx, kv_idx) -> score`` on scalars (score in
      float32, float64 for float64 inputs; indices int32).
    block_mask: a :class:`BlockMask` from :func:`create_block_mask` for
      ``(B or None, Hq or None, L, S)``; None attends to every key.
    scale: factor of ``query @ key^T`` (a number or a 0-d array, differentiable);
      default ``1 / sqrt(E)``.
    enable_gqa: grouped-query attention: query head ``h`` uses key/value head
      ``h // (Hq // Hkv)``.
    return_lse: also return the natural-log logsumexp of the scores (torch
      deprecates it for ``return_aux``).
    kernel_options: torch's dict. ``"BACKEND"``: ``"AUTO"`` (default: the fused
      Pallas kernel of a GPU or TPU when everything the call needs runs in it,
      the XLA loops otherwise and on CPU), ``"XLA"``, ``"TRITON"`` (the Pallas
      GPU kernel) or ``"MOSAIC"`` (the Pallas TPU kernel); ``"INTERPRET": True``
      runs a Pallas kernel in Pallas interpret mode on any platform; torch's
      block-size keys (``BLOCK_M``, ``BLOCK_N``, ``BLOCK_M1`` ... ``BLOCK_N2``,
      with ``fwd_``/``bwd_`` prefixes) and ``num_warps``/``num_stages`` tune the
      Pallas kernels; torch's ``SPLIT_KV`` cuts the key blocks of a short query
      (one query block, e.g. decoding with L=1) into that many parts on the XLA
      loops, merged by logsumexp (default: per platform, none on a CPU).
      :func:`flex_attention_backend` says which backend a call gets on a
      platform, and why.
    return_aux: an :class:`AuxRequest`: also return an :class:`AuxOutput`.

  Returns:
    ``(B, Hq, L, Ev)`` in the query's dtype; with ``return_lse`` also
    ``(B, Hq, L)`` in float32 (float64 for float64 inputs); with ``return_aux``
    ``(out, AuxOutput(lse, max_scores))``. A query that sees no key gets output
    0 and logsumexp ``-inf``, as torch.

  Raises:
    ShapeError: inputs that are not 4-D, sizes that disagree, head counts that
      differ without ``enable_gqa``, a block_mask built for other sizes.
    TypeError: dtypes that differ or are not floating; a score_mod or mask_mod
      without torch's signature or not returning a scalar of the right kind;
      kernel_options that is no dict; a flag (enable_gqa, return_lse,
      INTERPRET) that is no bool.
    ValueError: an unknown kernel_options key or value (the valid ones are
      listed), a Pallas backend that cannot run the call (the reason is named),
      ``"TRITON"`` or ``"MOSAIC"`` without ``"INTERPRET": True`` in a program
      lowered for a platform that kernel does not compile for (a CPU), both
      return_lse and return_aux.

  Example:
    >>> q = k = v = jnp.ones((1, 2, 300, 16))
    >>> window = jmat.create_block_mask(jmat.mods.generate_sliding_window(64), None, None,
    ...                                 300, 300)
    >>> softcap = jmat.mods.generate_tanh_softcap(30.0)
    >>> jmat.flex_attention(q, k, v, softcap, window).shape
    (1, 2, 300, 16)
  """
  options = backends.kernel_options(_OP, kernel_options)
  aux = _aux_request(return_lse, return_aux)
  out, lse, max_scores = _flex_attention(query, key, value, score_mod, block_mask, scale,
                                         checks.check_flag(_OP, "enable_gqa", enable_gqa),
                                         options, aux)
  if return_aux is not None:
    return out, AuxOutput(lse if aux.lse else None, max_scores if aux.max_scores else None)
  return (out, lse) if return_lse else out


def _aux_request(return_lse: bool, return_aux: AuxRequest | None) -> AuxRequest:
  """The auxiliary outputs asked for, by ``return_lse`` (torch's deprecated way) or
  ``return_aux``."""
  checks.check_flex_aux(_OP, return_lse, return_aux, AuxRequest)
  return AuxRequest(lse=bool(return_lse)) if return_aux is None else return_aux


@functools.partial(jax.jit, static_argnames=("score_mod", "enable_gqa", "options", "aux"))
def _flex_attention(query, key, value, score_mod, block_mask, scale, enable_gqa: bool,
                    options: backends.KernelOptions, aux: AuxRequest):
  """:func:`flex_attention` on checked options: ``(out, lse, max_scores or None)``."""
  call, back = _flex_call(query, key, value, score_mod, block_mask, scale, enable_gqa,
                          aux.max_scores)
  if call is None:  # no query or no key: nothing to compute
    shape, dtype = back
    out = jnp.zeros(shape, dtype)
    lse = jnp.full(shape[:-1], -jnp.inf, online_softmax.compute_dtype(dtype))
    return out, lse, (lse if aux.max_scores else None)
  # A key/value pool shared by every table row (M = 1, a paged cache) goes in as it is: every
  # backend reads its one row for each table row.
  results = [back(x) for x in backends.attend(_OP, call, options)]
  return results[0], results[1], (results[2] if aux.max_scores else None)


def _batched(shape: tuple[int, ...], batch: int) -> tuple[int, ...]:
  """``shape`` with its batch (dim 0) set to ``batch`` (4-D shapes; others are left as they are)."""
  return (batch,) + tuple(shape[1:]) if len(shape) == 4 else tuple(shape)


def _flex_call(query, key, value, score_mod, block_mask, scale, enable_gqa: bool,
               needs_max: bool) -> tuple[Any, Any]:
  """Checks flex's inputs and builds the kernel's call.

  Returns:
    ``(call, back)``: ``back`` maps a kernel output ``(M, R, G, L, ...)`` to
    ``(B, H, L, ...)``; or ``(None, (output shape, output dtype))`` when a
    length is 0.
  """
  query, key, value = as_operands(_OP, query, key, value, names=_NAMES)
  checks.check_attention_dtypes(_OP, [x.dtype for x in (query, key, value)], _NAMES)
  shared_kv = checks.check_flex_kv_batch(
      _OP, query.shape, key.shape, value.shape,
      None if block_mask is None else block_mask.shape[0])
  # The other checks see the key/value batch as the query's: it broadcasts.
  checks.check_flex_shapes(_OP, query.shape, _batched(key.shape, query.shape[0]),
                           _batched(value.shape, query.shape[0]), enable_gqa)
  batch, heads, length, dim = query.shape
  kv_heads, keys, v_dim = key.shape[1], key.shape[2], value.shape[3]
  dtype = online_softmax.compute_dtype(query.dtype)
  if block_mask is None:
    block_q, block_k = (block_sparse.block_for(n, _DEFAULT_BLOCK) for n in (length, keys))
    blocks = block_sparse.dense_key_blocks(length, keys, block_q, block_k)
    mask_batch = mask_heads = 1
    if length <= block_q and not shared_kv:
      # A decode step (one query block): a table row per batch entry, so that a step of the
      # loops reads one entry's key block, not the whole batch's (the tables are B x n_k).
      mask_batch = batch
      blocks = jax.tree.map(lambda x: jnp.broadcast_to(x, (batch,) + x.shape[1:]), blocks)
    mask_mod = None
  else:
    checks.check_block_mask_fits(_OP, block_mask.shape, query.shape, key.shape)
    block_q, block_k = (block_sparse.block_for(n, b)
                        for n, b in zip((length, keys), block_mask.BLOCK_SIZE, strict=True))
    blocks = block_mask.key_blocks()
    mask_batch, mask_heads = block_mask.shape[:2]
    mask_mod = checked_mod(_OP, "mask_mod", block_mask.mask_mod)
  if score_mod is not None:
    checked_mod(_OP, "score_mod", score_mod, dtype)
  scale = online_softmax.attention_scale(_OP, scale, dim, dtype)
  if length == 0 or keys == 0:
    return None, ((batch, heads, length, v_dim), query.dtype)

  group = heads // kv_heads
  mods, whole = flex_mods(score_mod, mask_mod, dtype,
                          Layout(heads, kv_heads, mask_batch, mask_heads))
  if shared_kv and mask_heads != 1:
    # A mask per head gives every (batch entry, head) a table row of its own: the rows of one
    # key/value pool cannot be shared, so the pool is repeated per batch entry (a copy).
    key, value = (jnp.broadcast_to(x, (batch,) + x.shape[1:]) for x in (key, value))
  q = to_kernel(query, mask_batch, mask_heads, group, is_query=True)
  k = to_kernel(key, mask_batch, mask_heads, group, is_query=False)
  v = to_kernel(value, mask_batch, mask_heads, group, is_query=False)
  call = block_sparse.Call(q, k, v, blocks, block_sparse.Operands(whole), scale, mods=mods,
                           block_q=block_q, block_k=block_k, needs_max=needs_max)
  return call, functools.partial(from_kernel, batch=batch, heads=heads, mask_batch=mask_batch,
                                 mask_heads=mask_heads)


def flex_mods(score_mod: ScoreMod | None, mask_mod: Callable | None, dtype,
              layout: Layout) -> tuple[block_sparse.Mods, Captured]:
  """torch-style scalar mods as the kernel's :class:`~jmat._src.block_sparse.Mods`.

  The arrays they capture are hoisted into the returned :class:`Captured` (the
  kernel's whole operands); the mods read them from there, lift the scalar
  functions to score tiles with ``jax.vmap`` and find a tile's batch and head
  from ``(m, r, g)`` by ``layout``.
  """
  index = jax.ShapeDtypeStruct((), jnp.int32)
  score_fn: Callable[..., jax.Array] | None = None
  mask_fn: Callable[..., jax.Array] | None = None
  score_consts: list[jax.Array] = []
  mask_consts: list[jax.Array] = []
  if score_mod is not None:
    pure_score, score_consts = _hoist(score_mod, jax.ShapeDtypeStruct((), dtype),
                                      index, index, index, index)

    def lifted_score(s, m, r, g, q_pos, k_pos, ops):
      consts = ops.whole.score_consts
      lifted = lift(lambda *args: pure_score(*args, *consts), with_score=True)
      return lifted(s, *layout.batch_and_head(m, r, g), q_pos, k_pos)

    score_fn = lifted_score

  if mask_mod is not None:
    pure_mask, mask_consts = _hoist(mask_mod, index, index, index, index)

    def lifted_mask(m, r, g, q_pos, k_pos, ops):
      consts = ops.whole.mask_consts
      lifted = lift(lambda *args: pure_mask(*args, *consts), with_score=False)
      return lifted(*layout.batch_and_head(m, r, g), q_pos, k_pos)

    mask_fn = lifted_mask

  return block_sparse.Mods(score_fn, mask_fn), Captured(tuple(score_consts), tuple(mask_consts))


def flex_attention_backend(
    query: ArrayLike,
    key: ArrayLike,
    value: ArrayLike,
    score_mod: ScoreMod | None = None,
    block_mask: BlockMask | None = None,
    scale: ArrayLike | None = None,
    enable_gqa: bool = False,
    kernel_options: dict[str, Any] | None = None,
    *,
    platform: str,
    return_aux: AuxRequest | None = None,
) -> backends.Choice:
  """Which kernel backend :func:`flex_attention` runs a call on for ``platform``, and why.

  Takes :func:`flex_attention`'s arguments (arrays or ``jax.ShapeDtypeStruct``;
  nothing is computed) and a platform as jax names it: ``"cpu"``, ``"cuda"``,
  ``"rocm"`` or ``"tpu"``. With ``BACKEND`` ``"AUTO"`` a GPU or TPU gets its
  fused Pallas kernel when everything the call needs runs inside it, XLA
  otherwise (the reason says what kept it out); every other platform gets XLA.

  Returns:
    ``Choice(backend, reason)``: ``backend`` is ``"XLA"``, ``"TRITON"`` or
    ``"MOSAIC"``; for a backend asked for by name that cannot run the call the
    reason starts with ``"refused"`` (:func:`flex_attention` raises then).

  Example:
    >>> q = jax.ShapeDtypeStruct((1, 8, 4096, 128), jnp.bfloat16)
    >>> causal = jmat.create_block_mask(jmat.mods.causal_mask, None, None, 4096, 4096)
    >>> jmat.attention.flex_attention_backend(q, q, q, block_mask=causal, platform="cpu")
    Choice(backend='XLA', reason='cpu: the XLA loops are the kernel for this platform')
    >>> jmat.attention.flex_attention_backend(q, q, q, block_mask=causal,
    ...                                       platform="cuda").backend
    'TRITON'
  """
  checks.check_platform(_OP, platform, backends.PLATFORMS)
  options = backends.kernel_options(_OP, kernel_options)
  aux = _aux_request(False, return_aux)
  enable_gqa = checks.check_flag(_OP, "enable_gqa", enable_gqa)
  found: list[backends.Choice] = []

  def trace(query, key, value, block_mask, scale):
    call, _ = _flex_call(query, key, value, score_mod, block_mask, scale, enable_gqa,
                         aux.max_scores)
    found.append(backends.Choice("XLA", "nothing to compute: a length is 0") if call is None
                 else backends.choose(call, platform, options))

  jax.eval_shape(trace, query, key, value, block_mask, scale)
  return found[0]
