"""Shared test tables: shape pairs for every rank pair, dtypes, tolerances and random operands.

Sizes are odd and distinct (3, 5, 7, 13) so that a transposed axis cannot hide;
size-0 and size-1 dims and broadcasting patterns are included.
"""

from __future__ import annotations

import itertools

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


# dtype -> (rtol, atol) against a float64 (or complex128) numpy oracle of the same inputs.
TOLERANCES = {
    jnp.float16: (2e-2, 2e-2),
    jnp.bfloat16: (3e-2, 3e-2),
    jnp.float32: (1e-5, 1e-5),
    jnp.float64: (1e-12, 1e-12),
    jnp.complex64: (1e-5, 1e-5),
    jnp.complex128: (1e-12, 1e-12),
    jnp.int8: (0, 0),
    jnp.int16: (0, 0),
    jnp.int32: (0, 0),
    jnp.int64: (0, 0),
    jnp.uint8: (0, 0),
}
DTYPES = list(TOLERANCES)


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
