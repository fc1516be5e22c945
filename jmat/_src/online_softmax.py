"""The online softmax: attention folded one block of keys at a time.

The one recurrence of jmat's attention (Milakov & Gimelshein 2018; Rabe &
Staats 2021; FlashAttention): :func:`online_softmax_init`,
:func:`online_softmax_fold` (or :func:`online_softmax_update`, which also
computes the scores) and :func:`online_softmax_finish` carry a running
``(acc, row_max, row_sum)`` over key/value blocks, so attention never needs
the whole ``(L, S)`` score matrix. The block-sparse kernel (SDPA, flex
attention) and ring attention over a device mesh are built on them.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike, DTypeLike

from jmat._src import checks
from jmat._src.products import accumulation_dtype

Carry = tuple[jax.Array, jax.Array, jax.Array]


def compute_dtype(dtype: DTypeLike) -> np.dtype:
  """The dtype scores and sums are computed in: float64 for float64 inputs, float32 otherwise.

  The products' accumulation dtype (float16/bfloat16 accumulate in float32, as
  torch's CPU kernels), for the floating dtypes attention accepts.
  """
  return accumulation_dtype(dtype)


def attention_scale(op: str, scale: ArrayLike | None, head_dim: int,
                    dtype: DTypeLike) -> jax.Array:
  """The factor of ``q @ k^T``: ``scale`` as a scalar array of ``dtype``, or the default.

  The one home of the default, ``1 / sqrt(E)`` (torch's), and ``1`` for ``E = 0``
  (the scores are all 0 then, whatever the factor: SDPA's convention). A given
  ``scale`` may be a traced array: every attention function differentiates it.

  Args:
    op: the public name of the operation, for the error messages.
    scale: a real scalar (Python number or 0-d array), or None for the default.
    head_dim: ``E``, the size of a query vector.
    dtype: the compute dtype of the scores.

  Raises:
    TypeError: a complex, boolean or non-numeric ``scale``.
    ShapeError: a ``scale`` that is not a scalar.

  Example:
    >>> from jmat._src.online_softmax import attention_scale
    >>> print(attention_scale("sdpa", None, 16, jnp.float32), attention_scale("sdpa", None, 0,
    ...                                                                     jnp.float32))
    0.25 1.0
  """
  if scale is None:
    return jnp.asarray(1.0 / np.sqrt(head_dim) if head_dim else 1.0, dtype)
  checks.check_attention_scale(op, scale)
  return jnp.asarray(scale).astype(dtype)


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


def online_softmax_fold(carry: Carry, scores: jax.Array, v: jax.Array) -> Carry:
  """Folds one block of finished scores and their values into the carry.

  The running maximum grows to ``m' = max(m, max_j s_j)``, the old sums are
  rescaled by ``exp(m - m')`` and the block adds ``p = exp(s - m')`` to
  ``row_sum`` and ``p @ v`` to ``acc``. Masked entries are ``-inf`` in
  ``scores``; a row whose entries are all ``-inf`` leaves its carry unchanged
  (no NaN: the shift is 0 while nothing was seen). The maximum is a numerical
  shift that cancels in the result, so it is held out of differentiation.

  Args:
    carry: ``(acc, row_max, row_sum)``.
    scores: ``(*lead, Lq, Sk)`` in the carry's dtype, masked entries ``-inf``.
    v: values of this block, ``(*lead, Sk, Ev)`` (leading dims broadcast
      against the scores').

  Returns:
    The updated carry.

  Example:
    >>> carry = jmat.attention.online_softmax_init((), 1, 1)
    >>> carry = jmat.attention.online_softmax_fold(carry, jnp.array([[0.0, -jnp.inf]]),
    ...                                            jnp.array([[3.0], [5.0]]))
    >>> print(jmat.attention.online_softmax_finish(carry, jnp.float32))
    [[3.]]
  """
  acc, row_max, row_sum = carry
  new_max, p, rescale = _shifted(row_max, scores, -1)
  weighted = jnp.einsum("...qk,...kv->...qv", p, v.astype(acc.dtype),
                        preferred_element_type=acc.dtype)
  return acc * rescale[..., None] + weighted, new_max, row_sum * rescale + jnp.sum(p, axis=-1)


def _shifted(row_max: jax.Array, scores: jax.Array, key_axis: int):
  """The folds' common step: ``(m', p = exp(s - m'), exp(m - m'))`` for the keys on ``key_axis``.

  The new maximum is held out of differentiation (a shift that cancels).
  """
  new_max = jax.lax.stop_gradient(jnp.maximum(row_max, jnp.max(scores, axis=key_axis)))
  # While a row has seen no key its maximum is -inf; shifting by 0 instead keeps
  # exp(-inf - shift) = 0 rather than exp(-inf + inf) = NaN.
  shift = jnp.where(jnp.isneginf(new_max), 0.0, new_max)
  p = jnp.exp(scores - jnp.expand_dims(shift, key_axis))
  return new_max, p, jnp.exp(row_max - shift)


def online_softmax_fold_keys_first(carry: Carry, scores: jax.Array, v: jax.Array) -> Carry:
  """:func:`online_softmax_fold` for a block laid out keys first, as a packed or paged cache.

  The same recurrence, but the keys are the leading axis of the scores and values
  and ``p @ v`` is a multiply-reduce over them: on XLA:CPU a block of a
  ``(tokens, heads, E)`` cache is used as it lies, where the matrix-product form
  (heads first) would transpose every block of keys and values (a decode step's
  cost is reading them). For the few query rows of decoding the product is a
  reduction over keys either way.

  Args:
    carry: ``(acc (*lead, Lq, Ev), row_max (*lead, Lq), row_sum)``.
    scores: ``(Sk, *lead, Lq)`` in the carry's dtype, masked entries ``-inf``.
    v: ``(Sk, *lead, Ev)`` this block's values.

  Returns:
    The updated carry.
  """
  acc, row_max, row_sum = carry
  new_max, p, rescale = _shifted(row_max, scores, 0)
  weighted = jnp.sum(p[..., None] * v[..., None, :].astype(acc.dtype), axis=0)
  return acc * rescale[..., None] + weighted, new_max, row_sum * rescale + jnp.sum(p, axis=0)


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

  Computes ``s = scale * q @ k^T + bias`` (masked entries at ``-inf``) in the
  carry's dtype (float32 unless the carry was made float64, whatever the input
  dtype) and folds it in with :func:`online_softmax_fold`. Plain JAX autodiff
  through the update is exact.

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
  dtype = carry[0].dtype
  s = jnp.einsum("...qe,...ke->...qk", q, k, preferred_element_type=dtype)
  s = s * jnp.asarray(scale, dtype)
  if bias is not None:
    s = s + bias.astype(dtype)
  if mask is not None:
    s = jnp.where(mask, s, -jnp.inf)
  return online_softmax_fold(carry, s, v)


def seen_a_key(row_sum: jax.Array) -> jax.Array:
  """Whether each query has seen a key: ``row_sum != 0``.

  The one test of "this row saw a key" for every backend. A row that saw a key
  has ``row_sum >= 1`` (its largest score adds ``exp(0)``); one that saw only
  masked (``-inf``) entries has exactly 0. A NaN score makes the sum NaN, and
  ``NaN != 0`` is True, so the NaN comes out, as torch's; ``row_sum > 0`` would
  be False and turn the NaN row into a silent 0. The running maximum cannot
  answer it either: XLA's vectorised max reductions may skip NaN, so a row of
  NaN scores can keep a maximum of ``-inf``.
  """
  return row_sum != 0


def online_softmax_merge(carries: Carry) -> Carry:
  """One carry from carries of disjoint sets of keys, stacked along axis 0 (split-KV).

  Flash-decoding's merge: every part's sums are rescaled to the largest running
  maximum, ``exp(m_p - m)``, and added. A part that saw no key (maximum
  ``-inf``) weighs 0; where no part saw one the result is the empty carry. The
  maximum is a numerical shift that cancels (held out of differentiation, as in
  :func:`online_softmax_fold`), so the gradient is finite everywhere.

  Args:
    carries: ``(acc (P, *lead, Lq, Ev), row_max (P, *lead, Lq), row_sum)``.

  Returns:
    The carry ``(acc, row_max, row_sum)`` of all ``P`` parts' keys.
  """
  acc, row_max, row_sum = carries
  top = jax.lax.stop_gradient(jnp.max(row_max, axis=0))
  weight = jnp.exp(row_max - jnp.where(jnp.isneginf(top), 0.0, top))
  return (jnp.sum(acc * weight[..., None], axis=0), top, jnp.sum(row_sum * weight, axis=0))


def merge_parts(out: jax.Array, lse: jax.Array, axis: int = 0) -> tuple[jax.Array, jax.Array]:
  """Merges attention over disjoint parts of the keys by their logsumexp (split-KV's merge).

  Args:
    out: ``(..., P, ..., Ev)`` each part's normalised output (0 where a part saw no key),
      the parts along ``axis``.
    lse: ``out``'s shape without ``Ev``: each part's natural-log logsumexp (``-inf``
      where it saw no key).
    axis: the parts' axis (of ``lse``; ``out``'s is the same).

  Returns:
    ``out`` and ``lse`` of all the keys, in ``lse``'s dtype and without ``axis``: 0 and
    ``-inf`` where no part saw a key; a NaN in any part comes out. The gradient is finite
    everywhere (no ``inf - inf``): each part is the carry ``(out, lse, 1)`` of
    :func:`online_softmax_merge` (0 for a part that saw nothing).
  """
  out, lse = jnp.moveaxis(out, axis, 0), jnp.moveaxis(lse, axis, 0)
  carry = (out.astype(lse.dtype), lse, (~jnp.isneginf(lse)).astype(lse.dtype))
  merged = online_softmax_merge(carry)
  return online_softmax_finish(merged, lse.dtype), online_softmax_logsumexp(merged)


def online_softmax_finish(carry: Carry, dtype: DTypeLike) -> jax.Array:
  """The attention output of a finished carry: ``acc / row_sum``, cast to ``dtype``.

  Args:
    carry: ``(acc, row_max, row_sum)`` after every key block was folded in.
    dtype: the output dtype (usually the query's).

  Returns:
    Array of shape ``(*lead, Lq, Ev)``; rows that saw no unmasked key are 0
    (torch's convention), not NaN; a row with a NaN score is NaN (torch's too).

  Example:
    >>> carry = jmat.attention.online_softmax_init((), 2, 3)
    >>> print(jmat.attention.online_softmax_finish(carry, jnp.float32))
    [[0. 0. 0.]
     [0. 0. 0.]]
  """
  acc, _, row_sum = carry
  seen = seen_a_key(row_sum)
  denominator = jnp.where(seen, row_sum, 1.0)
  return jnp.where(seen[..., None], acc / denominator[..., None], 0.0).astype(dtype)


def online_softmax_logsumexp(carry: Carry) -> jax.Array:
  """The natural-log ``logsumexp`` of every query's scores: ``row_max + log(row_sum)``.

  Args:
    carry: ``(acc, row_max, row_sum)`` after every key block was folded in.

  Returns:
    Array of shape ``(*lead, Lq)`` in the carry's dtype; ``-inf`` for a query
    that saw no unmasked key (torch's flex_attention convention), NaN for one
    with a NaN score.

  Example:
    >>> carry = jmat.attention.online_softmax_init((), 1, 1)
    >>> carry = jmat.attention.online_softmax_fold(carry, jnp.zeros((1, 4)), jnp.ones((4, 1)))
    >>> round(float(jmat.attention.online_softmax_logsumexp(carry)[0]), 4)  # log(4)
    1.3863
  """
  _, row_max, row_sum = carry
  seen = seen_a_key(row_sum)
  return jnp.where(seen, row_max + jnp.log(jnp.where(seen, row_sum, 1.0)), -jnp.inf)
