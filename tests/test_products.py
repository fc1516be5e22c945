"""jmat's matmul family: values against numpy in float64, structure of the compiled code."""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

import jmat
from tests.cases import (
    DTYPES,
    TOLERANCES,
    matmul_pairs,
    oracle_dtype,
    random_operand,
)

RNG = np.random.default_rng(20261123)


def _operands(shape_a, shape_b, dtype=jnp.float64, seed=0):
  rng = np.random.default_rng(seed)
  return random_operand(rng, shape_a, dtype), random_operand(rng, shape_b, dtype)


def _oracle(fn, *arrays: np.ndarray) -> np.ndarray:
  """``fn`` on the operands cast to float64/complex128/int64: numpy's exact-enough answer."""
  return fn(*(x.astype(oracle_dtype(x.dtype)) for x in arrays))


def _assert_close(actual, expected, dtype):
  rtol, atol = TOLERANCES[dtype]
  np.testing.assert_allclose(
      np.asarray(actual).astype(expected.dtype), expected, rtol=rtol, atol=atol
  )


# ---------------------------------------------------------------------------
# The source documents' examples, every one.


def test_document_dot_example():
  vec1, vec2 = jnp.array([1, 2, 3]), jnp.array([4, 5, 6])
  for fn in (jmat.matmul, jmat.dot):
    result = fn(vec1, vec2)
    assert result.shape == ()
    assert int(result) == 1 * 4 + 2 * 5 + 3 * 6


def test_document_matrix_example():
  mat1, mat2 = jnp.array([[1, 2], [3, 4]]), jnp.array([[5, 6], [7, 8]])
  expected = np.array([[1 * 5 + 2 * 7, 1 * 6 + 2 * 8], [3 * 5 + 4 * 7, 3 * 6 + 4 * 8]])
  for fn in (jmat.matmul, jmat.mm):
    np.testing.assert_array_equal(fn(mat1, mat2), expected)


@pytest.mark.parametrize(
    "fn, shape_a, shape_b, expected_shape",
    [
        (jmat.matmul, (3, 4, 5), (3, 5, 6), (3, 4, 6)),
        (jmat.matmul, (5, 1, 4, 2), (3, 2, 1), (5, 3, 4, 1)),
        (jmat.bmm, (2, 1, 10), (2, 10, 4), (2, 1, 4)),
        (jmat.matmul, (2, 1, 10), (2, 10, 4), (2, 1, 4)),
        # the bmm document's "batched linear transform": (batch, points, in) @ (batch, in, out)
        (jmat.bmm, (2, 7, 3), (2, 3, 5), (2, 7, 5)),
    ],
)
def test_document_batched_examples(fn, shape_a, shape_b, expected_shape):
  a, b = _operands(shape_a, shape_b)
  with jax.default_matmul_precision("highest"):
    result = fn(a, b)
  chex.assert_shape(result, expected_shape)
  _assert_close(result, np.matmul(a, b), jnp.float64)


@pytest.mark.parametrize("op", [jmat.matmul, jmat.bmm])
def test_document_attention_scores(op):
  """scores = matmul(query, key.transpose(-2, -1)): (batch, seq_q, d_k), (batch, seq_k, d_k)."""
  batch, seq_q, seq_k, d_k = 2, 5, 7, 3
  query, key = _operands((batch, seq_q, d_k), (batch, seq_k, d_k))
  with jax.default_matmul_precision("highest"):
    scores = op(query, jnp.swapaxes(key, -2, -1))
  chex.assert_shape(scores, (batch, seq_q, seq_k))
  expected = np.einsum("bqd,bkd->bqk", query, key)
  _assert_close(scores, expected, jnp.float64)


# ---------------------------------------------------------------------------
# Tables: every rank pair, size-0 and size-1 dims, broadcasting; eager and jit.


class MatmulValuesTest(parameterized.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(*matmul_pairs())
  def test_matches_numpy_float64(self, shape_a, shape_b):
    a, b = _operands(shape_a, shape_b, seed=len(shape_a) * 7 + len(shape_b))
    fn = self.variant(jmat.matmul)
    with jax.default_matmul_precision("highest"):
      result = fn(a, b)
    expected = np.matmul(a, b)
    chex.assert_shape(result, expected.shape)
    _assert_close(result, expected, jnp.float64)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize(
    "fn, shape_a, shape_b",
    [
        (jmat.matmul, (2, 3, 5), (5, 7)),
        (jmat.mm, (3, 5), (5, 7)),
        (jmat.bmm, (2, 3, 5), (2, 5, 7)),
        (jmat.dot, (13,), (13,)),
        (jmat.mv, (3, 13), (13,)),
    ],
    ids=["matmul", "mm", "bmm", "dot", "mv"],
)
def test_every_dtype_keeps_its_dtype_and_value(fn, shape_a, shape_b, dtype):
  a, b = _operands(shape_a, shape_b, dtype)
  with jax.default_matmul_precision("highest"):
    result = fn(jnp.asarray(a), jnp.asarray(b))
  assert result.dtype == np.dtype(dtype)
  _assert_close(result, _oracle(np.matmul, a, b), dtype)


@pytest.mark.parametrize("dtype", [jnp.int8, jnp.uint8])
def test_integer_overflow_wraps_like_torch(dtype):
  """torch int8/uint8 products wrap modulo 256 (two's complement), as numpy's astype does."""
  a = np.full((2, 3), 100, dtype=dtype)
  b = np.full((3, 2), 100, dtype=dtype)
  expected = (a.astype(np.int64) @ b.astype(np.int64)).astype(dtype)
  np.testing.assert_array_equal(jmat.mm(a, b), expected)


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_half_precision_accumulates_in_float32(dtype):
  """A long sum of small terms: float16 accumulation would stall, float32 accumulation does not."""
  k = 4096
  a = jnp.full((1, k), 0.1, dtype)
  b = jnp.ones((k, 1), dtype)
  exact = float(jnp.asarray(0.1, dtype).astype(jnp.float32)) * k
  result = jmat.mm(a, b)
  assert result.dtype == dtype
  np.testing.assert_allclose(float(result[0, 0]), exact, rtol=1e-2)


def test_preferred_element_type_sets_the_result_dtype():
  a, b = _operands((3, 5), (5, 7), jnp.int8)
  result = jmat.matmul(a, b, preferred_element_type=jnp.int32)
  assert result.dtype == jnp.int32
  np.testing.assert_array_equal(result, a.astype(np.int64) @ b.astype(np.int64))


def test_contracted_size_zero_gives_zeros():
  result = jmat.mm(jnp.ones((2, 0)), jnp.ones((0, 3)))
  chex.assert_shape(result, (2, 3))
  assert not np.any(np.asarray(result))


def test_numpy_operands_are_accepted():
  a, b = _operands((3, 5), (5, 7))
  with jax.default_matmul_precision("highest"):
    _assert_close(jmat.matmul(a, b), a @ b, jnp.float64)


def test_works_without_x64():
  """With jax_enable_x64 off, float64 numpy input is canonicalised to float32, like jnp."""
  a, b = _operands((3, 5), (5, 7))
  with jax.enable_x64(False):
    result = jmat.matmul(a, b)
    assert result.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(result), a @ b, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------
# Transformations: grad, vmap, jit.


@pytest.mark.parametrize("shape_a, shape_b", [((5, 1, 3, 5), (2, 5, 7)), ((5,), (2, 5, 7))])
def test_grad_matches_numpy(shape_a, shape_b):
  a, b = _operands(shape_a, shape_b)
  weight = np.random.default_rng(1).standard_normal(np.matmul(a, b).shape)

  def loss(x, y):
    return jnp.sum(jmat.matmul(x, y) * weight)

  with jax.default_matmul_precision("highest"):
    grad_a, grad_b = jax.grad(loss, argnums=(0, 1))(a, b)
  # d/dA sum(W * (A @ B)) = W @ B^T, summed over the broadcast dims of A (and likewise for B).
  a2 = a[None, :] if a.ndim == 1 else a
  w2 = weight[..., None, :] if a.ndim == 1 else weight
  full_a = np.matmul(w2, np.swapaxes(b, -1, -2))
  full_b = np.matmul(np.swapaxes(a2, -1, -2), w2)
  expected_a = _sum_to(full_a, a2.shape).reshape(a.shape)
  expected_b = _sum_to(full_b, b.shape)
  _assert_close(grad_a, expected_a, jnp.float64)
  _assert_close(grad_b, expected_b, jnp.float64)


def _sum_to(x: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
  """Reduces a broadcast gradient back to ``shape`` (sum over the stretched and added dims)."""
  x = x.sum(axis=tuple(range(x.ndim - len(shape))))
  return x.sum(axis=tuple(i for i, d in enumerate(shape) if d == 1), keepdims=True)


def test_vmap_over_matmul():
  a, b = _operands((4, 3, 5), (4, 5, 7))
  with jax.default_matmul_precision("highest"):
    result = jax.vmap(jmat.mm)(a, b)
  _assert_close(result, np.matmul(a, b), jnp.float64)


def test_no_retrace_on_repeated_calls():
  a, b = _operands((3, 5), (5, 7))
  jmat.matmul(a, b)
  before = jmat.matmul._cache_size()
  for _ in range(3):
    jmat.matmul(a, b)
  assert jmat.matmul._cache_size() == before

  @jax.jit
  @functools.partial(chex.assert_max_traces, n=1)
  def scores(q, k):
    return jmat.matmul(q, jnp.swapaxes(k, -2, -1))

  for seed in range(3):
    scores(*_operands((2, 3, 5), (2, 7, 5), seed=seed))


# ---------------------------------------------------------------------------
# Structure: one dot_general, no materialised broadcast.


@pytest.mark.parametrize(
    "fn, shape_a, shape_b",
    [
        (jmat.matmul, (5, 1, 40, 20), (3, 20, 10)),
        (jmat.matmul, (8, 12, 16, 8), (8, 12, 8, 16)),
        (jmat.matmul, (8, 16, 32), (32, 32)),
        (jmat.matmul, (7,), (2, 3, 7, 5)),
        (jmat.bmm, (6, 16, 32), (6, 32, 8)),
    ],
)
def test_batched_product_lowers_to_one_dot_general(fn, shape_a, shape_b):
  args = (jnp.ones(shape_a), jnp.ones(shape_b))
  lowered = jax.jit(fn).lower(*args)
  assert lowered.as_text().count("dot_general") == 1
  compiled = lowered.compile().as_text()
  assert compiled.count(" dot(") == 1
  # A stretched size-1 dim stays a free dim of the dot: nothing is broadcast in memory.
  assert "broadcast(" not in compiled


def test_compiled_matmul_matches_jnp_structure():
  """jmat and jnp.matmul compile to the same number of dots, copies and transposes."""
  args = (jnp.ones((5, 1, 40, 20)), jnp.ones((3, 20, 10)))
  ours = jax.jit(jmat.matmul).lower(*args).compile().as_text()
  theirs = jax.jit(jnp.matmul).lower(*args).compile().as_text()
  for op in (" dot(", " copy(", " transpose("):
    assert ours.count(op) == theirs.count(op), op


def test_out_sharding_on_a_one_device_explicit_mesh():
  """out_sharding works as for jnp.matmul (the 8-device tests are in tests/distributed/)."""
  mesh = jax.make_mesh((1,), ("x",), axis_types=(jax.sharding.AxisType.Explicit,))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("x"))
  a, b = _operands((2, 3, 5), (5, 7))
  with jax.default_matmul_precision("highest"):
    result = jmat.matmul(a, b, out_sharding=sharding)
  assert result.sharding.mesh == mesh
  assert result.sharding.spec == jax.sharding.PartitionSpec("x", None, None)
  _assert_close(result, np.matmul(a, b), jnp.float64)
