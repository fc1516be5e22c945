"""Attention: scores = q @ k^T, softmax, scaled dot-product attention and multi-head attention.

The online softmax (Milakov & Gimelshein 2018; Rabe & Staats 2021; FlashAttention)
is the one recurrence of the module: ``online_softmax_init``,
``online_softmax_update`` and ``online_softmax_finish`` fold key/value blocks one
at a time into a running ``(acc, row_max, row_sum)`` carry, so attention never
needs the whole ``(L, S)`` score matrix. The blockwise implementation of
:func:`scaled_dot_product_attention` is built on them, and so is ring attention
over a device mesh.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Literal, cast

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.typing import ArrayLike, DTypeLike

from jmat._src import checks
from jmat._src.family import linear
from jmat._src.products import matmul, operands

Carry = tuple[jax.Array, jax.Array, jax.Array]
Implementation = Literal["dense", "blockwise"] | None


def online_softmax_init(
    lead_shape: Sequence[int], q_len: int, v_dim: int, *, dtype: DTypeLike = jnp.float32
) -> Carry:
  """The empty carry of the online softmax: no key seen yet.

  Args:
    lead_shape: the leading (batch, head, ...) dims of the queries, ``*lead``.
    q_len: the number of queries ``Lq``.
    v_dim: the size of a value vector ``Ev``.
    dtype: the dtype the scores and sums are computed in: float32 (the
      default, also for float16/bfloat16 inputs) or float64 for float64 inputs.

  Returns:
    ``(acc, row_max, row_sum)``, all of ``dtype``: ``acc`` zeros of shape
    ``(*lead, q_len, v_dim)`` (the unnormalised weighted sum of values),
    ``row_max`` ``-inf`` of shape ``(*lead, q_len)`` (the largest score seen per
    query) and ``row_sum`` zeros of shape ``(*lead, q_len)`` (the sum of
    ``exp(score - row_max)`` per query).

  Example:
    >>> acc, row_max, row_sum = jmat.attention.online_softmax_init((2,), 3, 5)
    >>> acc.shape, row_max.shape, float(row_max[0, 0])
    ((2, 3, 5), (2, 3), -inf)
  """
  lead = tuple(int(d) for d in lead_shape)
  return (
      jnp.zeros(lead + (q_len, v_dim), dtype),
      jnp.full(lead + (q_len,), -jnp.inf, dtype),
      jnp.zeros(lead + (q_len,), dtype),
  )


def online_softmax_update(
    carry: Carry,
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    scale: float | jax.Array,
    mask: jax.Array | None = None,
    bias: jax.Array | None = None,
) -> Carry:
  """Folds one block of keys and values into the online-softmax carry.

  With ``s = scale * q @ k^T + bias`` (masked entries at ``-inf``), the carry
  after the update describes ``softmax`` over every key seen so far: the
  running maximum grows to ``m' = max(m, max_j s_j)``, the old sums are rescaled
  by ``exp(m - m')`` and the block adds ``p = exp(s - m')`` to ``row_sum`` and
  ``p @ v`` to ``acc``. Scores and sums are computed in the carry's dtype
  (float32 unless the carry was made float64), whatever the input dtype.

  A row whose keys in this block are all masked leaves its carry unchanged
  (no NaN: the maximum used for the exponentials is 0 while nothing was seen).
  The maximum is a numerical shift that cancels in the result, so it is held
  out of differentiation (``lax.stop_gradient``); plain JAX autodiff through
  the update is exact.

  Args:
    carry: ``(acc, row_max, row_sum)`` from :func:`online_softmax_init` or an
      earlier update.
    q: queries, ``(*lead, Lq, E)``.
    k: keys of this block, ``(*lead, Sk, E)`` (leading dims broadcast against
      ``q``'s, e.g. size 1 for grouped-query heads).
    v: values of this block, ``(*lead, Sk, Ev)``.
    scale: the factor applied to ``q @ k^T``.
    mask: optional boolean array broadcastable to ``(*lead, Lq, Sk)``;
      ``True`` means the query may attend to the key.
    bias: optional float array broadcastable to ``(*lead, Lq, Sk)``, added to
      the scaled scores (``-inf`` entries act as a mask).

  Returns:
    The updated carry.

  Example:
    >>> q, k, v = jnp.ones((1, 4)), jnp.ones((3, 4)), jnp.arange(6.0).reshape(3, 2)
    >>> carry = jmat.attention.online_softmax_init((), 1, 2)
    >>> carry = jmat.attention.online_softmax_update(carry, q, k[:2], v[:2], scale=0.5)
    >>> carry = jmat.attention.online_softmax_update(carry, q, k[2:], v[2:], scale=0.5)
    >>> print(jmat.attention.online_softmax_finish(carry, jnp.float32))
    [[2. 3.]]
  """
  acc, row_max, row_sum = carry
  s = _block_scores(q, k, scale, bias, acc.dtype)
  if mask is not None:
    s = jnp.where(mask, s, -jnp.inf)
  new_max = jax.lax.stop_gradient(jnp.maximum(row_max, jnp.max(s, axis=-1)))
  # While a row has seen no key its maximum is -inf; shifting by 0 instead keeps
  # exp(-inf - shift) = 0 rather than exp(-inf + inf) = NaN.
  shift = jnp.where(jnp.isneginf(new_max), 0.0, new_max)
  p = jnp.exp(s - shift[..., None])
  rescale = jnp.exp(row_max - shift)
  acc = acc * rescale[..., None] + _weighted_values(p, v, acc.dtype)
  row_sum = row_sum * rescale + jnp.sum(p, axis=-1)
  return acc, new_max, row_sum


def online_softmax_finish(carry: Carry, dtype: DTypeLike) -> jax.Array:
  """The attention output of a finished carry: ``acc / row_sum``, cast to ``dtype``.

  Args:
    carry: ``(acc, row_max, row_sum)`` after every key block was folded in.
    dtype: the output dtype (usually the query's).

  Returns:
    Array of shape ``(*lead, Lq, Ev)``; rows that saw no unmasked key are 0
    (torch's convention), not NaN.

  Example:
    >>> carry = jmat.attention.online_softmax_init((), 2, 3)
    >>> print(jmat.attention.online_softmax_finish(carry, jnp.float32))
    [[0. 0. 0.]
     [0. 0. 0.]]
  """
  acc, _, row_sum = carry
  seen = row_sum > 0
  denominator = jnp.where(seen, row_sum, 1.0)
  return jnp.where(seen[..., None], acc / denominator[..., None], 0.0).astype(dtype)


def _block_scores(
    q: jax.Array,
    k: jax.Array,
    scale: float | jax.Array,
    bias: jax.Array | None,
    dtype: DTypeLike,
) -> jax.Array:
  """``scale * q @ k^T (+ bias)`` in ``dtype`` (half inputs accumulate in float32)."""
  s = jnp.einsum("...qe,...ke->...qk", q, k, preferred_element_type=dtype)
  s = s * jnp.asarray(scale, dtype)
  if bias is not None:
    s = s + bias.astype(dtype)
  return s


def _weighted_values(p: jax.Array, v: jax.Array, dtype: DTypeLike) -> jax.Array:
  """``p @ v`` in ``dtype``: the softmax numerators times the values."""
  return jnp.einsum("...qk,...kv->...qv", p, v.astype(dtype), preferred_element_type=dtype)


# --- scores ---------------------------------------------------------------------------------

_NAMES = ("query", "key", "value")


def _compute_dtype(dtype: DTypeLike) -> DTypeLike:
  """Softmax arithmetic dtype: float64 for float64 inputs, float32 otherwise (as torch's CPU)."""
  return jnp.float64 if np.dtype(dtype) == np.dtype(jnp.float64) else jnp.float32


def _scores(query: jax.Array, key: jax.Array, scale: ArrayLike | None, dtype: DTypeLike):
  """``scale * query @ key^T``, the heart of attention: one jmat.matmul, in ``dtype``."""
  scores = matmul(query, jnp.swapaxes(key, -2, -1), preferred_element_type=dtype)
  return scores if scale is None else scores * jnp.asarray(scale, dtype)


@jax.jit
def attention_scores(
    query: ArrayLike, key: ArrayLike, /, *, scale: ArrayLike | None = None
) -> jax.Array:
  """The attention scores ``query @ key^T`` (times ``scale`` when given).

  Each query vector is compared with each key vector by a dot product: entry
  ``[..., i, j]`` is ``sum_e query[..., i, e] * key[..., j, e]``. Leading
  (batch, head) dims broadcast as in :func:`jmat.matmul`, which computes it.

  Args:
    query: array of shape ``(..., L, E)``.
    key: array of shape ``(..., S, E)``, of the same dtype.
    scale: optional factor applied to the product, e.g. ``1 / sqrt(E)``.

  Returns:
    Array of shape ``(..., L, S)`` and the inputs' dtype.

  Raises:
    ShapeError: if an input is not at least 2-D, the ``E`` differ or the leading
      dims do not broadcast.
    TypeError: if the dtypes differ or are not supported.

  Example:
    >>> q = jnp.array([[1.0, 0.0], [0.0, 2.0]])
    >>> k = jnp.array([[1.0, 1.0], [3.0, 0.0], [0.0, 1.0]])
    >>> print(jmat.attention_scores(q, k))
    [[1. 3. 0.]
     [2. 0. 2.]]
    >>> jmat.attention_scores(jnp.ones((2, 8, 5, 4)), jnp.ones((1, 8, 7, 4)), scale=0.5).shape
    (2, 8, 5, 7)
  """
  query, key = operands("attention_scores", query, key, names=_NAMES[:2])
  checks.check_scores_shapes("attention_scores", query.shape, key.shape)
  return _scores(query, key, scale, query.dtype)


# --- the two implementations, on one canonical layout -----------------------------------------
#
# q (*lead, G, L, E), k (*lead, S, E), v (*lead, S, Ev): G query heads share each key/value
# head (G = 1 without grouped-query attention). allowed (bool) and bias (float) have the rank
# of q's scores (*lead, G, L, S), with size-1 dims wherever they broadcast.


def _positions_allowed(
    q_start: ArrayLike, q_len: int, k_start: ArrayLike, k_len: int, keys: int, is_causal: bool
) -> jax.Array:
  """Which (query, key) pairs of a block exist and, if causal, are at or below the diagonal.

  Causal is torch's top-left-aligned ``tril(ones(L, S))``: query ``i`` sees keys ``j <= i``.
  """
  q_pos = q_start + lax.broadcasted_iota(jnp.int32, (q_len, k_len), 0)
  k_pos = k_start + lax.broadcasted_iota(jnp.int32, (q_len, k_len), 1)
  allowed = jnp.less(k_pos, keys)
  return jnp.logical_and(allowed, k_pos <= q_pos) if is_causal else allowed


def _softmax_weights(scores: jax.Array, allowed: jax.Array | None) -> jax.Array:
  """softmax over the last axis with masked entries at 0 and all-masked rows 0 (not NaN)."""
  if allowed is not None:
    scores = jnp.where(allowed, scores, -jnp.inf)
  row_max = lax.stop_gradient(jnp.max(scores, axis=-1, keepdims=True, initial=-jnp.inf))
  p = jnp.exp(scores - jnp.where(jnp.isneginf(row_max), 0.0, row_max))
  row_sum = jnp.sum(p, axis=-1, keepdims=True)
  return p / jnp.where(row_sum > 0, row_sum, 1.0)


def _dense(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    allowed: jax.Array | None,
    bias: jax.Array | None,
    scale: ArrayLike,
    is_causal: bool,
    dropout_p: float,
    dropout_rng: jax.Array | None,
) -> tuple[jax.Array, jax.Array]:
  """Attention with the whole ``(L, S)`` score matrix: returns (output, weights after dropout)."""
  dtype = _compute_dtype(q.dtype)
  length, keys = q.shape[-2], k.shape[-2]
  scores = _scores(q, k[..., None, :, :], scale, dtype)
  if bias is not None:
    scores = scores + bias.astype(dtype)
  if is_causal or allowed is not None:
    causal = _positions_allowed(0, length, 0, keys, keys, is_causal)
    allowed = causal if allowed is None else allowed & causal
  weights = _softmax_weights(scores, allowed)
  dropped = weights
  if dropout_p == 1.0:
    dropped = jnp.zeros_like(weights)
  elif dropout_p > 0.0:
    keep = jax.random.bernoulli(cast(jax.Array, dropout_rng), 1.0 - dropout_p, weights.shape)
    dropped = jnp.where(keep, weights / (1.0 - dropout_p), 0.0)
  out = matmul(dropped, v[..., None, :, :].astype(dtype))
  return out.astype(q.dtype), dropped


def _pad_to(x: jax.Array, axis: int, size: int, value: ArrayLike = 0) -> jax.Array:
  """Pads ``axis`` of ``x`` at the end to ``size``."""
  extra = size - x.shape[axis]
  if extra <= 0:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, extra)
  return jnp.pad(x, widths, constant_values=value)


def _pad_mask(x: jax.Array | None, rows: int, cols: int, value: ArrayLike) -> jax.Array | None:
  """Pads a mask's last two axes to ``(rows, cols)``; a broadcast size-1 axis stays 1."""
  if x is None:
    return None
  if x.shape[-2] != 1:
    x = _pad_to(x, -2, rows, value)
  return x if x.shape[-1] == 1 else _pad_to(x, -1, cols, value)


def _block(x: jax.Array | None, axis: int, start: ArrayLike, size: int) -> jax.Array | None:
  """The block ``[start, start + size)`` of ``axis``, unless that axis is a broadcast 1."""
  if x is None or x.shape[axis] == 1:
    return x
  return lax.dynamic_slice_in_dim(x, start, size, axis)


def _key_blocks(
    i: jax.Array, block_q: int, block_k: int, length: int, keys: int, is_causal: bool
) -> tuple[jax.Array, jax.Array]:
  """Key blocks query block ``i`` needs: ``[0, full)`` wholly visible, ``[full, end)`` partly.

  With ``is_causal`` the blocks above the diagonal are skipped: they are never computed.
  """
  if not is_causal:
    return jnp.int32(keys // block_k), jnp.int32(-(-keys // block_k))
  first_row = i * block_q
  last_row = jnp.minimum(length, first_row + block_q) - 1
  full = jnp.minimum((first_row + 1) // block_k, keys // block_k)
  end = jnp.minimum(-(-keys // block_k), last_row // block_k + 1)
  return full, end


def _group_axis(q: jax.Array, k: jax.Array):
  """For grouped queries ``(N, G, L, E)`` against ``(N, S, E)`` keys: (expand, reduce) of G.

  ``expand`` gives key/value blocks the G axis (size 1, broadcast), ``reduce`` sums a
  per-query-head gradient over G; both are the identity without a G axis.
  """
  if q.ndim == k.ndim:
    return (lambda x: x), (lambda x: x)
  return (lambda x: x[..., None, :, :]), (lambda x: jnp.sum(x, axis=-3))


def _blockwise_forward(q, k, v, allowed, bias, scale, is_causal, block_q, block_k):
  """Online-softmax attention over query blocks x key blocks; returns (output, logsumexp)."""
  expand, _ = _group_axis(q, k)
  length, keys, v_dim = q.shape[-2], k.shape[-2], v.shape[-1]
  n_q, n_k = -(-length // block_q), -(-keys // block_k)
  dtype = _compute_dtype(q.dtype)
  q_p = _pad_to(q, -2, n_q * block_q)
  if q.dtype == dtype:
    # Scaling the (L, E) queries once instead of every (L, S) score block saves a pass over
    # each block (as torch's math kernel, which scales q and k before the product).
    q_p, scale = q_p * scale.astype(dtype), 1.0
  k_p, v_p = _pad_to(k, -2, n_k * block_k), _pad_to(v, -2, n_k * block_k)
  allowed = _pad_mask(allowed, n_q * block_q, n_k * block_k, True)
  bias = _pad_mask(bias, n_q * block_q, n_k * block_k, 0)

  # The rows of a query block are split into independent chains of online-softmax updates:
  # XLA's CPU runtime can run independent ops concurrently, so the elementwise work of the
  # chains (max, exp, sums: single-threaded per op) can use both cores of a 2-core machine
  # (up to 1.3x faster forward, measured on one; the results do not depend on it).
  chains = _CHAINS if block_q % (8 * _CHAINS) == 0 else 1
  rows = block_q // chains

  def query_block(i):
    full, end = _key_blocks(i, block_q, block_k, length, keys, is_causal)
    starts = [i * block_q + c * rows for c in range(chains)]
    q_c = [lax.dynamic_slice_in_dim(q_p, start, rows, -2) for start in starts]
    allowed_c = [_block(allowed, -2, start, rows) for start in starts]
    bias_c = [_block(bias, -2, start, rows) for start in starts]

    def fold(positional, j, carries):
      k_j = expand(lax.dynamic_slice_in_dim(k_p, j * block_k, block_k, -2))
      v_j = expand(lax.dynamic_slice_in_dim(v_p, j * block_k, block_k, -2))
      updated = []
      for c, carry in enumerate(carries):
        mask = _block(allowed_c[c], -1, j * block_k, block_k)
        if positional:
          where = _positions_allowed(starts[c], rows, j * block_k, block_k, keys, is_causal)
          mask = where if mask is None else mask & where
        updated.append(online_softmax_update(
            carry, q_c[c], k_j, v_j, scale=scale, mask=mask,
            bias=_block(bias_c[c], -1, j * block_k, block_k)))
      return tuple(updated)

    carries = tuple(online_softmax_init(q.shape[:-2], rows, v_dim, dtype=dtype)
                    for _ in range(chains))
    carries = lax.fori_loop(0, full, functools.partial(fold, False), carries)
    carries = lax.fori_loop(full, end, functools.partial(fold, True), carries)
    out = jnp.concatenate([online_softmax_finish(c, q.dtype) for c in carries], axis=-2)
    row_max = jnp.concatenate([c[1] for c in carries], axis=-1)
    row_sum = jnp.concatenate([c[2] for c in carries], axis=-1)
    logsumexp = jnp.where(row_sum > 0, row_max + jnp.log(row_sum), jnp.inf)
    return out, logsumexp

  out, logsumexp = lax.map(query_block, jnp.arange(n_q, dtype=jnp.int32))
  out = jnp.moveaxis(out, 0, -3).reshape(q.shape[:-2] + (n_q * block_q, v_dim))
  logsumexp = jnp.moveaxis(logsumexp, 0, -2).reshape(q.shape[:-2] + (n_q * block_q,))
  return out[..., :length, :], logsumexp[..., :length]


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8))
def _blockwise(q, k, v, allowed, bias, scale, is_causal, block_q, block_k):
  """Blockwise attention, O(L * E) memory; its backward recomputes the score blocks."""
  return _blockwise_forward(q, k, v, allowed, bias, scale, is_causal, block_q, block_k)[0]


def _blockwise_fwd(q, k, v, allowed, bias, scale, is_causal, block_q, block_k):
  out, logsumexp = _blockwise_forward(q, k, v, allowed, bias, scale, is_causal, block_q, block_k)
  return out, (q, k, v, allowed, bias, scale, out, logsumexp)


def _reduce_to(x: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """Sums ``x`` over the axes where ``shape`` has a broadcast 1 (same rank)."""
  axes = tuple(a for a, (n, m) in enumerate(zip(shape, x.shape, strict=True)) if n == 1 != m)
  return jnp.sum(x, axis=axes, keepdims=True) if axes else x


def _blockwise_bwd(is_causal, block_q, block_k, residuals, d_out):
  """FlashAttention-2's backward: per key block, recompute p = exp(s - logsumexp) per query block.

  The score blocks are never stored: memory stays O(L * E) (plus the gradient of
  a float mask, which has the mask's own size).
  """
  q, k, v, allowed, bias, scale, out, logsumexp = residuals
  expand, reduce = _group_axis(q, k)
  length, keys, dim, v_dim = q.shape[-2], k.shape[-2], q.shape[-1], v.shape[-1]
  n_q, n_k = -(-length // block_q), -(-keys // block_k)
  dtype = _compute_dtype(q.dtype)
  scale = jnp.asarray(scale, dtype)
  delta = jnp.sum(d_out.astype(dtype) * out.astype(dtype), axis=-1)
  q_p, do_p = _pad_to(q, -2, n_q * block_q), _pad_to(d_out, -2, n_q * block_q)
  lse_p, delta_p = _pad_to(logsumexp, -1, n_q * block_q, jnp.inf), _pad_to(delta, -1,
                                                                             n_q * block_q)
  k_p, v_p = _pad_to(k, -2, n_k * block_k), _pad_to(v, -2, n_k * block_k)
  allowed_p = _pad_mask(allowed, n_q * block_q, n_k * block_k, True)
  bias_p = _pad_mask(bias, n_q * block_q, n_k * block_k, 0)

  def key_block(j, grads):
    d_q, d_k, d_v, d_bias = grads
    k_j = lax.dynamic_slice_in_dim(k_p, j * block_k, block_k, -2)
    v_j = lax.dynamic_slice_in_dim(v_p, j * block_k, block_k, -2)
    allowed_j, bias_j = _block(allowed_p, -1, j * block_k, block_k), _block(bias_p, -1,
                                                                           j * block_k, block_k)

    def query_block(i, acc):
      d_q, d_k_j, d_v_j, d_bias = acc
      rows = i * block_q
      q_i = lax.dynamic_slice_in_dim(q_p, rows, block_q, -2)
      do_i = lax.dynamic_slice_in_dim(do_p, rows, block_q, -2).astype(dtype)
      lse_i = lax.dynamic_slice_in_dim(lse_p, rows, block_q, -1)
      delta_i = lax.dynamic_slice_in_dim(delta_p, rows, block_q, -1)
      bias_ij = _block(bias_j, -2, rows, block_q)
      s = _block_scores(q_i, expand(k_j), scale, bias_ij, dtype)
      mask = _positions_allowed(rows, block_q, j * block_k, block_k, keys, is_causal)
      if allowed_j is not None:
        mask = jnp.logical_and(mask, cast(jax.Array, _block(allowed_j, -2, rows, block_q)))
      p = jnp.where(mask, jnp.exp(s - lse_i[..., None]), 0.0)
      d_v_j = d_v_j + reduce(jnp.einsum("...qk,...qv->...kv", p, do_i,
                                        preferred_element_type=dtype))
      d_p = jnp.einsum("...qv,...kv->...qk", do_i, expand(v_j).astype(dtype),
                       preferred_element_type=dtype)
      d_s = p * (d_p - delta_i[..., None])
      d_q_i = jnp.einsum("...qk,...ke->...qe", d_s, expand(k_j).astype(dtype),
                         preferred_element_type=dtype) * scale
      d_q = lax.dynamic_update_slice_in_dim(
          d_q, lax.dynamic_slice_in_dim(d_q, rows, block_q, -2) + d_q_i, rows, -2)
      d_k_j = d_k_j + reduce(jnp.einsum("...qk,...qe->...ke", d_s, q_i.astype(dtype),
                                        preferred_element_type=dtype)) * scale
      if d_bias is not None:
        d_b = _reduce_to(d_s, d_bias.shape[:-2] + (
            block_q if d_bias.shape[-2] > 1 else 1, block_k if d_bias.shape[-1] > 1 else 1))
        starts = [0] * (d_bias.ndim - 2) + [rows if d_bias.shape[-2] > 1 else 0,
                                            j * block_k if d_bias.shape[-1] > 1 else 0]
        d_bias = lax.dynamic_update_slice(
            d_bias, lax.dynamic_slice(d_bias, starts, d_b.shape) + d_b, starts)
      return d_q, d_k_j, d_v_j, d_bias

    first = (j * block_k) // block_q if is_causal else 0
    zeros_k = jnp.zeros(k.shape[:-2] + (block_k, dim), dtype)
    zeros_v = jnp.zeros(k.shape[:-2] + (block_k, v_dim), dtype)
    d_q, d_k_j, d_v_j, d_bias = lax.fori_loop(first, n_q, query_block,
                                              (d_q, zeros_k, zeros_v, d_bias))
    d_k = lax.dynamic_update_slice_in_dim(d_k, d_k_j, j * block_k, -2)
    d_v = lax.dynamic_update_slice_in_dim(d_v, d_v_j, j * block_k, -2)
    return d_q, d_k, d_v, d_bias

  grads = (
      jnp.zeros(q_p.shape, dtype),
      jnp.zeros(k_p.shape, dtype),
      jnp.zeros(v_p.shape, dtype),
      None if bias_p is None else jnp.zeros(bias_p.shape, dtype),
  )
  d_q, d_k, d_v, d_bias = lax.fori_loop(0, n_k, key_block, grads)
  if d_bias is not None and bias is not None:
    d_bias = d_bias[tuple(slice(0, n) for n in bias.shape)].astype(bias.dtype)
  return (d_q[..., :length, :].astype(q.dtype), d_k[..., :keys, :].astype(k.dtype),
          d_v[..., :keys, :].astype(v.dtype), None, d_bias, None)


_blockwise.defvjp(_blockwise_fwd, _blockwise_bwd)


# --- scaled_dot_product_attention -------------------------------------------------------------

# implementation=None switches to the blockwise kernel once the (L, S) scores of all batch and
# head dims would pass this many elements (1 MiB at float32). Measured on a 2-core CPU (H=8,
# D=64, causal): below it both take the same time and dense compiles in half the time; above
# it blockwise is faster, forward and backward (1.2x at L=256, 2-4x from L=1024 on, where the
# dense scores leave the caches), and its memory stays O(L * E). README: attention section.
DENSE_MAX_SCORES = 1 << 18
# Query and key block sizes of the blockwise kernel (tuned on a 2-core CPU, B=1, H=8, D=64).
BLOCK_Q = 512
BLOCK_K = 512
# Independent update chains per query block (see _blockwise_forward).
_CHAINS = 2


def _block_size(n: int, block: int) -> int:
  """The block for a sequence of ``n``: ``block``, or ``n`` rounded up to 8 when shorter."""
  return max(8, min(block, -(-n // 8) * 8))


def _canonical_mask(mask: jax.Array, lead: tuple[int, ...], enable_gqa: bool,
                    kv_heads: int) -> jax.Array:
  """Reshapes a mask broadcastable to ``(*lead, L, S)`` to the canonical ``(*lead', G', L, S)``."""
  mask = mask.reshape((1,) * (len(lead) + 2 - mask.ndim) + mask.shape)
  if not enable_gqa:
    return mask[..., None, :, :]
  heads = mask.shape[-3]
  split = (kv_heads, heads // kv_heads) if heads > 1 else (1, 1)
  return mask.reshape(mask.shape[:-3] + split + mask.shape[-2:])


def _flat_lead(x: jax.Array | None, lead: tuple[int, ...], grouped: bool) -> jax.Array | None:
  """``(*lead, G, A, B)`` -> ``(N, [G,] A, B)``: one batch dim (1 if ``x`` broadcasts over all
  of ``lead``), and no G axis unless queries are grouped."""
  if x is None:
    return None
  head, rest = x.shape[:len(lead)], x.shape[len(lead):]
  if all(d == 1 for d in head):
    x = x.reshape((1,) + rest)
  else:
    x = jnp.broadcast_to(x, lead + rest).reshape((math.prod(lead),) + rest)
  return x if grouped else x[:, 0]


def _attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    lead: tuple[int, ...],
    allowed: jax.Array | None,
    bias: jax.Array | None,
    scale: ArrayLike,
    is_causal: bool,
    enable_gqa: bool,
    dropout_p: float,
    dropout_rng: jax.Array | None,
    implementation: Implementation,
    need_weights: bool = False,
) -> tuple[jax.Array, jax.Array | None]:
  """Attention on checked inputs; masks broadcastable to ``(*lead, L, S)``.

  Returns:
    ``(output (*lead, L, Ev), weights (*lead, L, S) or None)``.
  """
  length, dim = query.shape[-2:]
  keys, v_dim = value.shape[-2:]
  if enable_gqa:
    batch, heads = lead[:-1], lead[-1]
    if key.shape[-3] != value.shape[-3]:
      # torch also accepts different key and value head counts: repeat both to query's.
      key = jnp.repeat(key, heads // key.shape[-3], axis=-3)
      value = jnp.repeat(value, heads // value.shape[-3], axis=-3)
    kv_heads = key.shape[-3]
    group = heads // kv_heads
    q = jnp.broadcast_to(query, batch + (heads, length, dim))
    q = q.reshape(batch + (kv_heads, group, length, dim))
    k = jnp.broadcast_to(key, batch + (kv_heads, keys, dim))
    v = jnp.broadcast_to(value, batch + (kv_heads, keys, v_dim))
  else:
    kv_heads = 1
    q = jnp.broadcast_to(query, lead + (length, dim))[..., None, :, :]
    k = jnp.broadcast_to(key, lead + (keys, dim))
    v = jnp.broadcast_to(value, lead + (keys, v_dim))
  if allowed is not None:
    allowed = _canonical_mask(allowed, lead, enable_gqa, kv_heads)
  if bias is not None:
    bias = _canonical_mask(bias, lead, enable_gqa, kv_heads)
  if implementation is None:
    scores = math.prod(lead) * length * keys
    dense = need_weights or dropout_p > 0.0 or scores <= DENSE_MAX_SCORES
    implementation = "dense" if dense else "blockwise"
  weights = None
  if implementation == "dense" or length == 0 or keys == 0:  # nothing to block when empty
    out, weights = _dense(q, k, v, allowed, bias, scale, is_causal, dropout_p, dropout_rng)
    weights = weights.reshape(lead + (length, keys)) if need_weights else None
  else:
    # One flat batch dim N and no size-1 G axis: unit dims cost XLA layout copies of
    # every score block.
    grouped, kv_lead = q.shape[-3] > 1, k.shape[:-2]
    flat = [_flat_lead(x, kv_lead, grouped) for x in (q, allowed, bias)]
    batch = math.prod(kv_lead)
    out = cast(jax.Array, _blockwise(
        flat[0], k.reshape((batch,) + k.shape[-2:]), v.reshape((batch,) + v.shape[-2:]),
        flat[1], flat[2], jnp.asarray(scale, _compute_dtype(q.dtype)), is_causal,
        _block_size(length, BLOCK_Q), _block_size(keys, BLOCK_K)))
  return out.reshape(lead + (length, v_dim)), weights


@functools.partial(
    jax.jit, static_argnames=("dropout_p", "is_causal", "enable_gqa", "implementation")
)
def scaled_dot_product_attention(
    query: ArrayLike,
    key: ArrayLike,
    value: ArrayLike,
    attn_mask: ArrayLike | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: ArrayLike | None = None,
    enable_gqa: bool = False,
    *,
    dropout_rng: jax.Array | None = None,
    implementation: Implementation = None,
) -> jax.Array:
  """``softmax(query @ key^T * scale + mask) @ value``, as ``torch.nn.functional``'s SDPA.

  torch 2.13's semantics: leading (batch, head) dims broadcast; ``Ev`` may differ
  from ``E``; a boolean ``attn_mask`` says which pairs may attend (True = may),
  a float one is added to the scaled scores; ``is_causal`` lets query ``i`` see
  keys ``j <= i`` (the top-left-aligned ``tril(ones(L, S))`` when ``L != S``);
  given together, ``attn_mask`` and ``is_causal`` both apply (torch's CPU flash
  kernel does the same; its math kernel refuses the pair). A query whose keys
  are all masked gets 0, not NaN, in the output and in the gradients.

  Args:
    query: ``(N..., L, E)``.
    key: ``(N..., S, E)``; with ``enable_gqa``, dim -3 (heads) may divide query's.
    value: ``(N..., S, Ev)``.
    attn_mask: bool, float32 or query-dtype array broadcastable to ``(N..., L, S)``,
      at least 2-D.
    dropout_p: probability of dropping an attention weight (the rest are scaled
      by ``1 / (1 - dropout_p)``); needs ``dropout_rng``.
    is_causal: apply the causal mask.
    scale: factor for the scores; default ``1 / sqrt(E)``.
    enable_gqa: grouped-query attention: query head ``h`` uses key/value head
      ``h // (query_heads // kv_heads)``, as torch's ``repeat_interleave``.
    dropout_rng: a ``jax.random.key``; the dropout pattern is a function of it.
    implementation: ``"dense"`` materialises the ``(L, S)`` scores;
      ``"blockwise"`` folds blocks of 512 keys into blocks of 512 queries with the
      online softmax, skips blocks a causal mask hides and recomputes blocks in
      its backward, so memory is O(L * E); ``None`` picks dense while all the
      scores hold at most ``DENSE_MAX_SCORES`` (2**18) elements, or when dropout
      is on, blockwise otherwise.

  Returns:
    Array of shape ``(N..., L, Ev)`` and the query's dtype.

  Raises:
    ShapeError: inputs below 2-D, ``E`` or ``S`` mismatches, leading dims or
      the mask that do not broadcast, heads that do not divide with ``enable_gqa``.
    TypeError: dtypes that differ or are not floating; a mask of another dtype.
    ValueError: ``dropout_p`` outside [0, 1], dropout without ``dropout_rng``,
      an unknown ``implementation``, dropout with ``"blockwise"``.

  Example:
    >>> q = k = v = jnp.ones((2, 8, 5, 4))
    >>> jmat.scaled_dot_product_attention(q, k, v, is_causal=True).shape
    (2, 8, 5, 4)
    >>> q = jnp.array([[1.0, 0.0]])
    >>> k = jnp.array([[1.0, 0.0], [0.0, 1.0]])
    >>> v = jnp.array([[10.0], [20.0]])
    >>> print(jmat.scaled_dot_product_attention(q, k, v, jnp.array([[False, True]])))
    [[20.]]
  """
  op = "scaled_dot_product_attention"
  query, key, value = operands(op, query, key, value, names=_NAMES)
  checks.check_attention_dtypes(op, [x.dtype for x in (query, key, value)], _NAMES)
  lead = checks.check_attention_shapes(op, query.shape, key.shape, value.shape, enable_gqa)
  checks.check_dropout(op, dropout_p, dropout_rng is not None)
  checks.check_attention_implementation(op, implementation, dropout_p)
  length, keys = query.shape[-2], key.shape[-2]
  allowed = bias = None
  if attn_mask is not None:
    attn_mask = jnp.asarray(attn_mask)
    checks.check_attention_mask(op, attn_mask.shape, attn_mask.dtype, query.dtype,
                                lead + (length, keys))
    if attn_mask.dtype == jnp.bool_:
      allowed = attn_mask
    else:
      bias = attn_mask
  if scale is None:
    scale = 1.0 / math.sqrt(query.shape[-1]) if query.shape[-1] else 1.0
  out, _ = _attention(query, key, value, lead, allowed, bias, scale, is_causal, enable_gqa,
                      dropout_p, dropout_rng, implementation)
  return out


# --- multi-head attention with torch.nn.MultiheadAttention's parameters -----------------------

_MHA_KEYS = ("in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias")


def init_multi_head_attention(
    rng: jax.Array, embed_dim: int, num_heads: int, /, *, dtype: DTypeLike = jnp.float32
) -> dict[str, jax.Array]:
  """Parameters of ``torch.nn.MultiheadAttention(embed_dim, num_heads)``, initialised as torch.

  ``in_proj_weight`` is Xavier-uniform over ``(3E, E)`` (bound
  ``sqrt(6 / (E + 3E))``), ``out_proj.weight`` uniform in ``±1 / sqrt(E)``
  (torch's Linear default), both biases zero.

  Args:
    rng: a ``jax.random.key``.
    embed_dim: ``E``, the model dimension.
    num_heads: the number of heads; must divide ``embed_dim``.
    dtype: the parameters' dtype.

  Returns:
    A dict with torch's state_dict keys and shapes: ``in_proj_weight (3E, E)``,
    ``in_proj_bias (3E,)``, ``out_proj.weight (E, E)``, ``out_proj.bias (E,)``.

  Raises:
    ValueError: if ``num_heads`` does not divide ``embed_dim``.

  Example:
    >>> params = jmat.init_multi_head_attention(jax.random.key(0), 16, 4)
    >>> {name: p.shape for name, p in params.items()}  # doctest: +NORMALIZE_WHITESPACE
    {'in_proj_weight': (48, 16), 'in_proj_bias': (48,), 'out_proj.weight': (16, 16),
     'out_proj.bias': (16,)}
  """
  if (isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1
      or embed_dim % num_heads):
    raise ValueError(
        f"jmat.init_multi_head_attention: num_heads={num_heads!r} must be a positive int "
        f"dividing embed_dim={embed_dim}"
    )
  in_key, out_key = jax.random.split(rng)
  in_bound = math.sqrt(6.0 / (embed_dim + 3 * embed_dim))
  out_bound = 1.0 / math.sqrt(embed_dim) if embed_dim else 0.0
  return {
      "in_proj_weight": jax.random.uniform(in_key, (3 * embed_dim, embed_dim), dtype,
                                           -in_bound, in_bound),
      "in_proj_bias": jnp.zeros((3 * embed_dim,), dtype),
      "out_proj.weight": jax.random.uniform(out_key, (embed_dim, embed_dim), dtype,
                                            -out_bound, out_bound),
      "out_proj.bias": jnp.zeros((embed_dim,), dtype),
  }


def _mha_mask(mask: jax.Array) -> tuple[jax.Array | None, jax.Array | None]:
  """torch's MHA mask convention (bool True = may NOT attend) as (allowed, bias)."""
  return (~mask, None) if mask.dtype == jnp.bool_ else (None, mask)


def _combine(first: jax.Array | None, second: jax.Array | None, join) -> jax.Array | None:
  if first is None:
    return second
  return first if second is None else join(first, second)


@functools.partial(
    jax.jit,
    static_argnames=("num_heads", "is_causal", "need_weights", "average_attn_weights",
                     "dropout_p"),
)
def multi_head_attention(
    params: dict[str, ArrayLike],
    query: ArrayLike,
    key: ArrayLike,
    value: ArrayLike,
    /,
    *,
    num_heads: int,
    key_padding_mask: ArrayLike | None = None,
    attn_mask: ArrayLike | None = None,
    is_causal: bool = False,
    need_weights: bool = False,
    average_attn_weights: bool = True,
    dropout_p: float = 0.0,
    dropout_rng: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array | None]:
  """``torch.nn.MultiheadAttention(E, num_heads, batch_first=True)`` as a pure function.

  ``params`` holds the module's state_dict, so torch weights load as they are:
  ``{k: jnp.asarray(v.numpy()) for k, v in module.state_dict().items()}``.
  Queries, keys and values are projected with the three ``(E, E)`` slices of
  ``in_proj_weight``, split into ``num_heads`` heads of ``E / num_heads``,
  attended with :func:`scaled_dot_product_attention` and recombined by
  ``out_proj``.

  Masks follow torch's MHA convention, the opposite of SDPA's for booleans:
  ``key_padding_mask`` True means *ignore that key*, a boolean ``attn_mask``
  True means *may not attend*; float masks are added to the scores.
  ``is_causal=True`` applies the causal mask (together with ``attn_mask`` if
  given; torch treats it as a hint that ``attn_mask`` is causal and refuses it
  alone). A query with every key masked gives 0 (torch's ``need_weights=True``
  path gives NaN there).

  Args:
    params: ``in_proj_weight (3E, E)``, ``in_proj_bias (3E,)``,
      ``out_proj.weight (E, E)``, ``out_proj.bias (E,)``.
    query: ``(N, L, E)`` (or unbatched ``(L, E)``).
    key: ``(N, S, E)`` (or ``(S, E)``).
    value: ``(N, S, E)`` (or ``(S, E)``).
    num_heads: the number of heads; divides ``E``.
    key_padding_mask: ``(N, S)`` (or ``(S,)``), bool (True = ignore) or float.
    attn_mask: ``(L, S)`` or ``(N * num_heads, L, S)``, bool (True = may not
      attend) or float.
    is_causal: apply the causal mask.
    need_weights: also return the attention weights (computed densely).
    average_attn_weights: average the returned weights over heads.
    dropout_p: dropout probability on the attention weights; needs ``dropout_rng``.
    dropout_rng: a ``jax.random.key``.

  Returns:
    ``(output (N, L, E), weights)``; weights are ``None`` unless ``need_weights``,
    then ``(N, L, S)`` averaged or ``(N, num_heads, L, S)``.

  Raises:
    ShapeError: inputs that are not all 3-D (or all 2-D), sizes that disagree with
      the parameters, masks of the wrong shape.
    ValueError: missing parameters, ``num_heads`` not dividing ``E``, dropout
      without ``dropout_rng``.
    TypeError: dtypes that differ or are not floating.

  Example:
    >>> params = jmat.init_multi_head_attention(jax.random.key(0), 8, 2)
    >>> x = jnp.ones((3, 5, 8), jnp.float32)
    >>> out, weights = jmat.multi_head_attention(params, x, x, x, num_heads=2, need_weights=True)
    >>> out.shape, weights.shape
    ((3, 5, 8), (3, 5, 5))
  """
  op = "multi_head_attention"
  query, key, value = operands(op, query, key, value, names=_NAMES)
  weights_in = {name: jnp.asarray(p) for name, p in params.items()}
  checks.check_multi_head_attention(op, {n: p.shape for n, p in weights_in.items()},
                                    query.shape, key.shape, value.shape, num_heads)
  dtypes = [query.dtype, key.dtype, value.dtype] + [weights_in[n].dtype for n in _MHA_KEYS]
  checks.check_attention_dtypes(op, dtypes, _NAMES + _MHA_KEYS)
  checks.check_dropout(op, dropout_p, dropout_rng is not None)
  batched = query.ndim == 3
  if not batched:
    query, key, value = query[None], key[None], value[None]
  batch, length, embed = query.shape
  keys = key.shape[1]
  head_dim = embed // num_heads
  w_q, w_k, w_v = jnp.split(weights_in["in_proj_weight"], 3)
  b_q, b_k, b_v = jnp.split(weights_in["in_proj_bias"], 3)

  def heads(x, w, b):  # (N, T, E) -> (N, H, T, E / H)
    x = linear(x, w, b)
    return jnp.swapaxes(x.reshape(x.shape[:2] + (num_heads, head_dim)), 1, 2)

  allowed = bias = None
  if key_padding_mask is not None:
    key_padding_mask = jnp.asarray(key_padding_mask)
    checks.check_key_padding_mask(op, key_padding_mask.shape, key_padding_mask.dtype,
                                  (batch, keys) if batched else (keys,))
    allowed, bias = _mha_mask(key_padding_mask.reshape(batch, 1, 1, keys))
  if attn_mask is not None:
    attn_mask = jnp.asarray(attn_mask)
    checks.check_attention_mask(op, attn_mask.shape, attn_mask.dtype, query.dtype,
                                (batch * num_heads, length, keys))
    if attn_mask.ndim == 3:
      attn_mask = attn_mask.reshape(batch, num_heads, length, keys)
    mask_allowed, mask_bias = _mha_mask(attn_mask)
    allowed = _combine(allowed, mask_allowed, jnp.logical_and)
    bias = _combine(bias, mask_bias, jnp.add)
  out, weights = _attention(
      heads(query, w_q, b_q), heads(key, w_k, b_k), heads(value, w_v, b_v),
      (batch, num_heads), allowed, bias, 1.0 / math.sqrt(head_dim) if head_dim else 1.0,
      is_causal, False, dropout_p, dropout_rng, None, need_weights)
  out = jnp.swapaxes(out, 1, 2).reshape(batch, length, embed)
  out = linear(out, weights_in["out_proj.weight"], weights_in["out_proj.bias"])
  if weights is not None and average_attn_weights:
    weights = jnp.mean(weights, axis=1)
  if not batched:
    out = out[0]
    weights = None if weights is None else weights[0]
  return out, weights
