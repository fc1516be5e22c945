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

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax.typing import DTypeLike

Carry = tuple[jax.Array, jax.Array, jax.Array]


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
