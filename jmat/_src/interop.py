"""jmat's attention behind other JAX libraries' hooks: flax's ``attention_fn``.

flax lays attention inputs out as ``(batch..., length, heads, head_dim)`` (BTNH,
as ``jax.nn.dot_product_attention``); torch and jmat as ``(batch..., heads,
length, head_dim)`` (BNTH). The adapter swaps the two middle axes on the way in
and out, turns flax's mask (nonzero = may attend) and bias into an
``attn_mask``, and calls :func:`jmat.scaled_dot_product_attention`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.typing import ArrayLike, DTypeLike

from jmat._src import checks
from jmat._src.attention import scaled_dot_product_attention
from jmat._src.products import operands

_OP = "attention.flax_attention_fn"
_NAMES = ("query", "key", "value")
_SCORES = "the scores (batch..., heads, q_length, kv_length)"


def _matmul_precision(precision: Any) -> str | None:
  """flax's ``precision`` as a ``jax.default_matmul_precision`` name."""
  if isinstance(precision, tuple | list) and len(set(precision)) == 1:
    precision = precision[0]
  if precision is None or isinstance(precision, str):
    return precision
  if isinstance(precision, lax.Precision):
    return precision.name.lower()
  raise TypeError(
      f"jmat.{_OP}: precision must be None, a string or a jax.lax.Precision (one for both "
      f"products), got {precision!r}")


@functools.partial(jax.jit, static_argnames=("dropout_rate", "is_causal"))
def _btnh_attention(query, key, value, attn_mask, dropout_rng, *, dropout_rate, is_causal):
  q, k, v = (jnp.swapaxes(x, -3, -2) for x in (query, key, value))
  out = scaled_dot_product_attention(
      q, k, v, attn_mask, dropout_rate, is_causal,
      enable_gqa=k.shape[-3] != q.shape[-3] or v.shape[-3] != q.shape[-3],
      dropout_rng=dropout_rng)
  return jnp.swapaxes(out, -3, -2)


def _at_least_2d(x: jax.Array) -> jax.Array:
  return x.reshape((1,) * (2 - x.ndim) + x.shape) if x.ndim < 2 else x


def flax_attention_fn(
    query: ArrayLike,
    key: ArrayLike,
    value: ArrayLike,
    bias: ArrayLike | None = None,
    mask: ArrayLike | None = None,
    broadcast_dropout: bool = True,
    dropout_rng: jax.Array | None = None,
    dropout_rate: float = 0.0,
    deterministic: bool = False,
    dtype: DTypeLike | None = None,
    precision: Any = None,
    module: Any = None,
    promote_dtype: Callable[..., Any] | None = None,
    is_causal: bool = False,
    **kwargs: Any,
) -> jax.Array:
  """:func:`jmat.scaled_dot_product_attention` with flax's ``attention_fn`` call convention.

  A drop-in for ``flax.nnx.dot_product_attention`` (and ``flax.linen``'s): pass it
  as ``nnx.MultiHeadAttention(..., attention_fn=jmat.attention.flax_attention_fn)``.
  Inputs are in flax's layout, ``(batch..., length, heads, head_dim)``; they are
  swapped to torch's ``(batch..., heads, length, head_dim)`` and back. The scale
  is ``1 / sqrt(head_dim)`` in both libraries. ``mask`` may be bool or, as flax
  makes it, float 0/1: nonzero means may attend. ``bias`` is added to the scaled
  scores. Key and value may have fewer heads than query (grouped-query attention).

  Where it differs from flax's own attention:

  - A query whose keys are all masked gets **0**, as in torch and jmat; flax fills
    masked scores with the dtype's most negative number, so such a row gets
    uniform weights (the mean of the values), or NaN if ``bias`` is ``-inf``.
  - Mixed dtypes are refused unless ``dtype`` (or ``promote_dtype``) says which
    to compute in; flax promotes silently.
  - Dropout draws its own pattern for every batch and head (as torch's), so
    ``broadcast_dropout=True`` with dropout on is refused: build the module with
    ``broadcast_dropout=False``. The patterns differ from flax's for the same key.
  - ``module`` (flax's ``sow_weights=True``) is refused: the weights are never
    materialised by the blockwise kernel, so there is nothing to sow.

  Args:
    query: ``(batch..., q_length, heads, head_dim)``.
    key: ``(batch..., kv_length, kv_heads, head_dim)``; ``kv_heads`` divides ``heads``.
    value: ``(batch..., kv_length, kv_heads, v_head_dim)``.
    bias: added to the scores; broadcastable to ``(batch..., heads, q_length, kv_length)``.
    mask: bool or numeric, nonzero = may attend; broadcastable like ``bias``.
    broadcast_dropout: flax's option to share one dropout pattern across batch and
      heads; must be False when dropout is on.
    dropout_rng: a ``jax.random`` key, needed when dropout is on.
    dropout_rate: probability of dropping an attention weight.
    deterministic: True turns dropout off.
    dtype: cast query, key and value to this dtype first (flax's computation dtype).
    precision: ``None``, a ``jax.lax.Precision`` or its name, for both products.
    module: must be None (see above).
    promote_dtype: flax's hook ``promote_dtype((query, key, value), dtype=dtype)``;
      by default the three are cast to ``dtype`` when it is given.
    is_causal: query ``i`` sees keys ``j <= i`` (top-left aligned when the
      lengths differ, as flax and torch).
    **kwargs: further keywords a newer flax may pass; accepted when None or False
      (the feature unused), refused otherwise.

  Returns:
    Array of shape ``(batch..., q_length, heads, v_head_dim)`` and the (cast) query's dtype.

  Raises:
    ShapeError: inputs below 3-D, head_dim or length mismatches, heads that do not
      divide, batch dims, ``mask`` or ``bias`` that do not broadcast.
    TypeError: dtypes that differ or are not floating; an unknown keyword in use;
      a ``precision`` that is not one setting.
    ValueError: dropout without ``dropout_rng``, with ``broadcast_dropout=True``,
      or outside [0, 1]; a ``module`` to sow weights into.

  Example:
    >>> from jmat.attention import flax_attention_fn
    >>> q = k = v = jnp.ones((2, 5, 4, 8))  # (batch, length, heads, head_dim)
    >>> flax_attention_fn(q, k, v, is_causal=True).shape
    (2, 5, 4, 8)
    >>> v = jnp.arange(3.0).reshape(1, 3, 1, 1)
    >>> mask = jnp.array([[[[1.0, 0.0, 1.0]], [[0.0, 0.0, 0.0]]]])  # (1, 1, 2, 3)
    >>> print(flax_attention_fn(jnp.ones((1, 2, 1, 1)), jnp.ones((1, 3, 1, 1)), v,
    ...                         mask=jnp.swapaxes(mask, 1, 2)).ravel())
    [1. 0.]
  """
  used = sorted(name for name, option in kwargs.items()
                if option is not None and option is not False)
  if used:
    raise TypeError(
        f"jmat.{_OP}: unsupported keyword arguments {used}; jmat implements flax's "
        f"dot_product_attention arguments (bias, mask, dropout, dtype, precision, is_causal)")
  if module is not None:
    raise ValueError(
        f"jmat.{_OP}: module={type(module).__name__} asks to sow the attention weights "
        f"(sow_weights=True), which jmat does not materialise; call without sow_weights, "
        f"or use flax.nnx.dot_product_attention to inspect the weights")
  if promote_dtype is not None:
    query, key, value = promote_dtype((query, key, value), dtype=dtype)
  elif dtype is not None:
    query, key, value = (jnp.asarray(x, dtype) for x in (query, key, value))
  query, key, value = operands(_OP, query, key, value, names=_NAMES)
  checks.check_attention_dtypes(_OP, [x.dtype for x in (query, key, value)], _NAMES)
  target = checks.check_flax_attention_shapes(_OP, query.shape, key.shape, value.shape)
  dropout_on = not deterministic and dropout_rate != 0.0
  if dropout_on:
    checks.check_probability(_OP, "dropout_rate", dropout_rate)
    if dropout_rng is None:
      raise ValueError(
          f"jmat.{_OP}: dropout_rate={dropout_rate} with deterministic=False needs "
          f"dropout_rng (nnx.MultiHeadAttention passes it when called with rngs=); for "
          f"evaluation pass deterministic=True")
    if broadcast_dropout:
      raise ValueError(
          f"jmat.{_OP}: broadcast_dropout=True (one dropout pattern shared by every batch "
          f"and head) is not supported; jmat draws one pattern per batch and head, as torch: "
          f"pass broadcast_dropout=False (nnx.MultiHeadAttention(..., broadcast_dropout=False))")
  attn_mask = None
  if mask is not None:
    mask = jnp.asarray(mask)
    checks.check_expand(_OP, "mask", mask.shape, target, what=_SCORES)
    attn_mask = _at_least_2d(mask if mask.dtype == jnp.bool_ else mask != 0)
  if bias is not None:
    bias = jnp.asarray(bias)
    checks.check_expand(_OP, "bias", bias.shape, target, what=_SCORES)
    bias = _at_least_2d(bias.astype(query.dtype))
    # A masked pair gets -inf: jmat's softmax then gives an all-masked row 0, as for bool masks.
    attn_mask = bias if attn_mask is None else jnp.where(attn_mask, bias, -jnp.inf)
  matmul_precision = _matmul_precision(precision)
  call = functools.partial(
      _btnh_attention, query, key, value, attn_mask, dropout_rng if dropout_on else None,
      dropout_rate=float(dropout_rate) if dropout_on else 0.0, is_causal=bool(is_causal))
  if matmul_precision is None:
    return call()
  with jax.default_matmul_precision(matmul_precision):
    return call()
