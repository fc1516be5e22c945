"""Shared test tables and oracles: shape pairs for every rank pair, dtypes, the one tolerance
table, random operands and the one numpy attention oracle.

Sizes are odd and distinct (3, 5, 7, 13) so that a transposed axis cannot hide;
size-0 and size-1 dims and broadcasting patterns are included.
"""

from __future__ import annotations

import itertools
import math

import jax.numpy as jnp
import numpy as np

N, K, P = 3, 5, 7

# Batch shapes that pairwise broadcast or are chosen to clash; combined below.
_BATCHES = [(), (13,), (1,), (0,), (2, 13), (2, 1), (1, 13)]


def _broadcasts(x: tuple[int, ...], y: tuple[int, ...]) -> bool:
  try:
    np.broadcast_shapes(x, y)
  except ValueError:
    return False
  return True


def matmul_pairs() -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
  """Valid ``matmul`` shape pairs over every rank pair 1..4, with 0/1 dims and broadcasting."""
  pairs = []
  mats = [(N, K, P), (1, K, 1), (N, 0, P), (0, K, P), (N, K, 0)]
  for ra, rb in itertools.product(range(1, 5), repeat=2):
    for (n, k, p), ba, bb in itertools.product(mats, _BATCHES, _BATCHES):
      if len(ba) != max(ra - 2, 0) or len(bb) != max(rb - 2, 0) or not _broadcasts(ba, bb):
        continue
      a = (k,) if ra == 1 else ba + (n, k)
      b = (k,) if rb == 1 else bb + (k, p)
      if (a, b) not in pairs:
        pairs.append((a, b))
  return pairs


def invalid_matmul_pairs() -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
  """Pairs torch.matmul refuses: 0-D, contraction mismatch, batch clash, at several ranks."""
  return [
      ((), (K,)),
      ((K,), ()),
      ((), ()),
      ((K,), (K + 1,)),
      ((N, K), (K + 1, P)),
      ((K,), (K + 1, P)),
      ((N, K), (K + 1,)),
      ((2, N, K), (2, K + 1, P)),
      ((2, N, K), (3, K, P)),
      ((5, 1, N, K), (3, 2, K, P)),
      ((2, 13, N, K), (13, K + 2, P)),
      ((0, N, K), (2, K, P)),
  ]


# The one tolerance table of the tests: dtype -> (rtol, atol) of a result computed in that
# dtype against a float64 (complex128) oracle of the same inputs: numpy, or torch in float64.
# float32 covers a softmax too (attention), whose exp and sum add to the products' rounding.
TOLERANCES = {
    jnp.float16: (2e-2, 2e-2),
    jnp.bfloat16: (3e-2, 3e-2),
    jnp.float32: (2e-5, 2e-5),
    jnp.float64: (1e-12, 1e-12),
    jnp.complex64: (2e-5, 2e-5),
    jnp.complex128: (1e-12, 1e-12),
    jnp.int8: (0, 0),
    jnp.int16: (0, 0),
    jnp.int32: (0, 0),
    jnp.int64: (0, 0),
    jnp.uint8: (0, 0),
}
DTYPES = list(TOLERANCES)


def tolerance(dtype) -> dict[str, float]:
  """``TOLERANCES`` of ``dtype`` (a jnp/np type, a dtype or its name) as ``assert_allclose`` kwargs.

  Example: ``np.testing.assert_allclose(got, want, **tolerance(got.dtype))``.
  """
  rtol, atol = _BY_DTYPE[np.dtype(dtype)]
  return {"rtol": rtol, "atol": atol}


_BY_DTYPE = {np.dtype(d): tol for d, tol in TOLERANCES.items()}


def random_operand(rng: np.random.Generator, shape, dtype) -> np.ndarray:
  """Random values that are exact in ``dtype``: small ints for integer dtypes (no overflow)."""
  dtype = np.dtype(dtype)
  if dtype.kind in "iu":
    return rng.integers(0 if dtype.kind == "u" else -3, 4, size=shape).astype(dtype)
  values = rng.standard_normal(shape)
  if dtype.kind == "c":
    values = values + 1j * rng.standard_normal(shape)
  return values.astype(dtype)


def oracle_dtype(dtype) -> np.dtype:
  """The numpy dtype an oracle computes in: float64, complex128 or int64."""
  kind = np.dtype(dtype).kind
  return np.dtype({"c": np.complex128, "i": np.int64, "u": np.int64}.get(kind, np.float64))


def attention_weights(
    q, k, *, allowed=None, bias=None, score_fn=None, scale=None, is_causal=False,
    enable_gqa=False,
) -> tuple[np.ndarray, np.ndarray]:
  """The softmax weights of attention in float64, and the per-query logsumexp of the scores.

  ``softmax(score_fn(scale * q @ k^T + bias))`` over the keys a query may see: those ``allowed``
  (a bool mask, True = may attend), not after the query under ``is_causal`` (torch's
  top-left ``tril(ones(L, S))``) and not at a ``-inf`` score. A query that may see no
  key gets all-zero weights and logsumexp ``-inf``.

  Args:
    q: ``(..., L, E)``.
    k: ``(..., S, E)``; with ``enable_gqa`` its heads (dim -3) divide q's and are repeated.
    allowed: ``None`` or a bool array broadcastable to ``(..., L, S)``.
    bias: ``None`` or a float array broadcastable to ``(..., L, S)``, added to the scores.
    score_fn: ``None`` or a numpy function ``score_fn(s, *index)`` returning new scores from
      the scaled (and biased) float64 scores ``s`` and one broadcastable index array per dim
      of ``s`` (for 4-D scores ``b, h, q_idx, kv_idx``: a torch-style ``score_mod`` written
      for whole arrays); a ``-inf`` it returns masks that entry.
    scale: the factor of the scores; ``None`` is ``1 / sqrt(E)``.
    is_causal: apply the top-left causal mask.
    enable_gqa: grouped-query attention (key heads shared by groups of query heads).

  Returns:
    ``(weights (..., L, S), logsumexp (..., L))``, float64, the natural-log logsumexp.
  """
  q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
  if enable_gqa:
    k = np.repeat(k, q.shape[-3] // k.shape[-3], axis=-3)
  length, keys = q.shape[-2], k.shape[-2]
  scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
  s = np.matmul(q, np.swapaxes(k, -1, -2)) * scale
  if bias is not None:
    s = s + np.asarray(bias, np.float64)
  if score_fn is not None:
    s = np.broadcast_to(score_fn(s, *np.ix_(*(np.arange(n) for n in s.shape))), s.shape)
  ok = np.broadcast_to(s != -np.inf, s.shape)
  if allowed is not None:
    ok = ok & np.asarray(allowed, bool)
  if is_causal:
    ok = ok & np.tril(np.ones((length, keys), bool))
  s = np.where(ok, s, -np.inf)
  row_max = s.max(axis=-1, keepdims=True, initial=-np.inf)
  p = np.where(ok, np.exp(s - np.where(np.isfinite(row_max), row_max, 0.0)), 0.0)
  total = p.sum(axis=-1, keepdims=True)
  with np.errstate(divide="ignore"):
    lse = np.where(total > 0, row_max + np.log(np.where(total > 0, total, 1.0)), -np.inf)
  return p / np.where(total > 0, total, 1.0), lse[..., 0]


def attention_reference(
    q, k, v, *, allowed=None, bias=None, score_fn=None, scale=None, is_causal=False,
    enable_gqa=False, return_lse=False,
):
  """The numpy float64 attention oracle: ``softmax(scale * q @ k^T + bias, masked) @ v``.

  The masks, ``score_fn``, scale and grouped-query rules are those of :func:`attention_weights`; a
  query that may see no key gets output 0 (as torch's SDPA and flex attention give).

  Args:
    q: ``(..., L, E)``.
    k: ``(..., S, E)``.
    v: ``(..., S, Ev)``; with ``enable_gqa`` it has k's heads.
    allowed: ``None`` or a bool mask broadcastable to ``(..., L, S)``, True = may attend.
    bias: ``None`` or a float mask broadcastable to ``(..., L, S)``.
    score_fn: ``None`` or a numpy score function, see :func:`attention_weights`.
    scale: ``None`` is ``1 / sqrt(E)``.
    is_causal: torch's top-left causal mask.
    enable_gqa: grouped-query attention.
    return_lse: also return the per-query logsumexp of the scores (``-inf`` for no key).

  Returns:
    The output ``(..., L, Ev)`` in float64, or ``(output, lse (..., L))``.
  """
  w, lse = attention_weights(
      q, k, allowed=allowed, bias=bias, score_fn=score_fn, scale=scale, is_causal=is_causal,
      enable_gqa=enable_gqa,
  )
  v = np.asarray(v, np.float64)
  if enable_gqa:
    v = np.repeat(v, w.shape[-3] // v.shape[-3], axis=-3)
  out = np.matmul(w, v)
  return (out, lse) if return_lse else out


def sum_to_shape(x: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
  """Sums ``x`` down to ``shape``, which broadcasts to ``x.shape``: the gradient of a broadcast."""
  x = x.sum(axis=tuple(range(x.ndim - len(shape))))
  return x.sum(axis=tuple(i for i, n in enumerate(shape) if n == 1 and x.shape[i] != 1),
               keepdims=True)


def attention_reference_vjp(
    q, k, v, d_out, *, allowed=None, bias=None, scale=None, is_causal=False
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """The gradients of ``sum(d_out * attention_reference(q, k, v, ...))``, float64.

  Analytic: ``dS = W * (dW - rowsum(dW * W))`` with ``dW = d_out @ v^T``; masked
  entries have zero weight, so they get no gradient. No grouped-query heads.

  Returns:
    ``(d_q, d_k, d_v, d_scores)``; ``d_scores`` ``(..., L, S)`` is the gradient of a
    float ``bias`` broadcast to the scores' shape (sum it down to the bias's shape).
  """
  q, k, v, d_out = (np.asarray(x, np.float64) for x in (q, k, v, d_out))
  scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
  w, _ = attention_weights(q, k, allowed=allowed, bias=bias, scale=scale, is_causal=is_causal)
  d_v = np.matmul(np.swapaxes(w, -1, -2), d_out)
  d_w = np.matmul(d_out, np.swapaxes(v, -1, -2))
  d_s = w * (d_w - np.sum(d_w * w, axis=-1, keepdims=True))
  d_q = np.matmul(d_s, k) * scale
  return d_q, np.matmul(np.swapaxes(d_s, -1, -2), q) * scale, d_v, d_s
