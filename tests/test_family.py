"""The rest of the product family: values against numpy in float64, the beta/alpha rules,
multi_dot's order, explain, and the structure of the compiled code."""

from __future__ import annotations

import functools
import itertools

import chex
import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

import jmat
from jmat._src import shapes
from tests.cases import DTYPES, TOLERANCES, oracle_dtype, random_operand


def _arrays(*shape_list, dtype=jnp.float64, seed=0):
  rng = np.random.default_rng(seed)
  return [random_operand(rng, s, dtype) for s in shape_list]


def _assert_close(actual, expected, dtype):
  rtol, atol = TOLERANCES[dtype]
  expected = np.asarray(expected)
  np.testing.assert_allclose(
      np.asarray(actual).astype(expected.dtype), expected, rtol=rtol, atol=atol
  )


def _np_vecdot(x, y, dim=-1):
  if x.ndim == 1 and y.ndim == 1:
    return np.vdot(x, y)
  products = np.conj(x) * y
  return products if products.ndim == 0 else products.sum(axis=dim)


def _np_linear(x, w, b=None):
  out = np.matmul(x, w.T)
  return out if b is None else out + b


# id -> (jmat function of the arrays, numpy float64 oracle, operand shapes). The add* ops
# use beta=0.5 (or 2 for integers), alpha=-1.5 (or 3) so both scales are exercised.
def _scaled(jfn, product):
  def jmat_fn(i, x, y, beta=0.5, alpha=-1.5):
    return jfn(i, x, y, beta=beta, alpha=alpha)

  def oracle(i, x, y, beta=0.5, alpha=-1.5):
    return beta * i + alpha * product(x, y)

  return jmat_fn, oracle


ADDMM = _scaled(jmat.addmm, np.matmul)
ADDMV = _scaled(jmat.addmv, np.matmul)
ADDR = _scaled(jmat.addr, np.outer)
BADDBMM = _scaled(jmat.baddbmm, np.matmul)
ADDBMM = _scaled(jmat.addbmm, lambda x, y: np.einsum("bnk,bkp->np", x, y))

VALUE_CASES = [
    ("addmm", *ADDMM, [(3, 7), (3, 5), (5, 7)]),
    ("addmm_row_input", *ADDMM, [(7,), (3, 5), (5, 7)]),
    ("addmm_column_input", *ADDMM, [(3, 1), (3, 5), (5, 7)]),
    ("addmm_scalar_input", *ADDMM, [(), (3, 5), (5, 7)]),
    ("addmm_k0", *ADDMM, [(3, 7), (3, 0), (0, 7)]),
    ("addmm_n0", *ADDMM, [(7,), (0, 5), (5, 7)]),
    ("addmv", *ADDMV, [(13,), (13, 5), (5,)]),
    ("addmv_scalar_input", *ADDMV, [(1,), (13, 5), (5,)]),
    ("addr", *ADDR, [(3, 7), (3,), (7,)]),
    ("addr_broadcast", *ADDR, [(3, 1), (3,), (7,)]),
    ("baddbmm", *BADDBMM, [(2, 3, 7), (2, 3, 5), (2, 5, 7)]),
    ("baddbmm_broadcast", *BADDBMM, [(1, 7), (2, 3, 5), (2, 5, 7)]),
    ("baddbmm_batch1", *BADDBMM, [(1, 3, 1), (1, 3, 5), (1, 5, 7)]),
    ("addbmm", *ADDBMM, [(3, 7), (13, 3, 5), (13, 5, 7)]),
    ("addbmm_batch0", *ADDBMM, [(3, 7), (0, 3, 5), (0, 5, 7)]),
    ("vdot", jmat.vdot, np.vdot, [(13,), (13,)], jnp.complex128),
    ("vdot_empty", jmat.vdot, np.vdot, [(0,), (0,)]),
    ("inner", jmat.inner, np.inner, [(2, 3, 5), (7, 5)]),
    ("inner_complex_no_conjugation", jmat.inner, np.inner, [(3, 5), (5,)], jnp.complex128),
    ("inner_1d", jmat.inner, np.inner, [(5,), (5,)]),
    ("inner_scalar", jmat.inner, np.inner, [(), (3, 5)]),
    ("inner_k0", jmat.inner, np.inner, [(3, 0), (7, 0)]),
    ("outer", jmat.outer, np.outer, [(3,), (7,)]),
    ("tensordot_2", jmat.tensordot, functools.partial(np.tensordot, axes=2),
     [(3, 5, 7), (5, 7, 2)]),
    ("tensordot_0", functools.partial(jmat.tensordot, dims=0),
     functools.partial(np.tensordot, axes=0), [(3, 5), (7,)]),
    ("tensordot_pairs", functools.partial(jmat.tensordot, dims=([2, 0], [0, 2])),
     functools.partial(np.tensordot, axes=([2, 0], [0, 2])), [(3, 5, 7), (7, 2, 3)]),
    ("tensordot_negative", functools.partial(jmat.tensordot, dims=[[-1], [-2]]),
     functools.partial(np.tensordot, axes=([-1], [-2])), [(3, 5), (2, 5, 7)]),
    ("multi_dot", lambda *xs: jmat.multi_dot(xs), lambda *xs: np.linalg.multi_dot(xs),
     [(3, 13), (13, 2), (2, 7), (7, 5)]),
    ("multi_dot_vectors", lambda *xs: jmat.multi_dot(list(xs)),
     lambda *xs: np.linalg.multi_dot(xs), [(3,), (3, 7), (7, 5), (5,)]),
    ("multi_dot_two_vectors", lambda *xs: jmat.multi_dot(xs),
     lambda *xs: np.linalg.multi_dot(xs), [(5,), (5,)]),
    ("chain_matmul", jmat.chain_matmul, lambda *xs: np.linalg.multi_dot(xs),
     [(3, 13), (13, 2), (2, 7)]),
    ("chain_matmul_one", jmat.chain_matmul, lambda x: x, [(3, 5)]),
    ("linear", jmat.linear, _np_linear, [(2, 3, 5), (7, 5), (7,)]),
    ("linear_no_bias", jmat.linear, _np_linear, [(13, 5), (7, 5)]),
    ("linear_1d_input", jmat.linear, _np_linear, [(5,), (7, 5), (7,)]),
    ("linear_1d_weight", jmat.linear, _np_linear, [(3, 5), (5,)]),
    ("linear_bias_matrix", jmat.linear, _np_linear, [(2, 3, 5), (7, 5), (3, 7)]),
    ("vecdot", jmat.linalg.vecdot, _np_vecdot, [(2, 1, 5), (3, 5)], jnp.complex128),
    ("vecdot_1d", jmat.linalg.vecdot, _np_vecdot, [(5,), (5,)], jnp.complex128),
    ("vecdot_dim0", functools.partial(jmat.linalg.vecdot, dim=0),
     functools.partial(_np_vecdot, dim=0), [(3, 5), (3, 1)]),
    ("vecdot_scalar", jmat.linalg.vecdot, _np_vecdot, [(), (3,)]),
]


class FamilyValuesTest(parameterized.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(*VALUE_CASES)
  def test_matches_numpy_float64(self, jmat_fn, oracle, operand_shapes, dtype=jnp.float64):
    arrays = _arrays(*operand_shapes, dtype=dtype, seed=len(operand_shapes))
    with jax.default_matmul_precision("highest"):
      result = self.variant(jmat_fn)(*arrays)
    expected = oracle(*arrays)
    chex.assert_shape(result, np.shape(expected))
    _assert_close(result, expected, dtype)


DTYPE_CASES = [
    ("addmm", lambda i, x, y: jmat.addmm(i, x, y, beta=2, alpha=3),
     lambda i, x, y: 2 * i + 3 * (x @ y), [(7,), (3, 5), (5, 7)]),
    ("addmv", lambda i, x, y: jmat.addmv(i, x, y, beta=-1, alpha=2),
     lambda i, x, y: -i + 2 * (x @ y), [(3,), (3, 5), (5,)]),
    ("addr", lambda i, x, y: jmat.addr(i, x, y, beta=2), lambda i, x, y: 2 * i + np.outer(x, y),
     [(3, 1), (3,), (7,)]),
    ("baddbmm", lambda i, x, y: jmat.baddbmm(i, x, y, alpha=2), lambda i, x, y: i + 2 * (x @ y),
     [(2, 3, 7), (2, 3, 5), (2, 5, 7)]),
    ("addbmm", lambda i, x, y: jmat.addbmm(i, x, y, beta=0),
     lambda i, x, y: np.einsum("bnk,bkp->np", x, y), [(3, 7), (2, 3, 5), (2, 5, 7)]),
    ("vdot", jmat.vdot, np.vdot, [(13,), (13,)]),
    ("inner", jmat.inner, np.inner, [(2, 5), (3, 5)]),
    ("outer", jmat.outer, np.outer, [(3,), (7,)]),
    ("tensordot", jmat.tensordot, np.tensordot, [(3, 5, 7), (5, 7, 2)]),
    ("multi_dot", lambda *xs: jmat.multi_dot(xs), lambda *xs: np.linalg.multi_dot(xs),
     [(3,), (3, 5), (5, 7), (7, 2)]),
    ("linear", jmat.linear, _np_linear, [(2, 3, 5), (7, 5), (7,)]),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("jmat_fn, oracle, operand_shapes",
                         [c[1:] for c in DTYPE_CASES], ids=[c[0] for c in DTYPE_CASES])
def test_every_dtype_keeps_its_dtype_and_value(jmat_fn, oracle, operand_shapes, dtype):
  arrays = _arrays(*operand_shapes, dtype=dtype, seed=3)
  with jax.default_matmul_precision("highest"):
    result = jmat_fn(*arrays)
  assert result.dtype == np.dtype(dtype)
  wide = [x.astype(oracle_dtype(dtype)) for x in arrays]
  expected = np.asarray(oracle(*wide))
  if np.dtype(dtype).kind in "iu":  # integer products wrap modulo 2**bits, as in torch
    expected = expected.astype(dtype)
  _assert_close(result, expected, dtype)


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16], ids=["float16", "bfloat16"])
def test_vecdot_half_precision_accumulates_in_float32(dtype):
  x = jnp.full((4096,), 0.1, dtype)
  result = jmat.linalg.vecdot(x, jnp.ones(4096, dtype))
  assert result.dtype == dtype
  exact = 4096 * float(jnp.asarray(0.1, dtype))
  np.testing.assert_allclose(float(result), exact, rtol=1e-2)


# ---------------------------------------------------------------------------
# beta and alpha: torch's documented beta == 0 rule, and its alpha == 0 mirror.

SCALED_OPS = [
    (jmat.addmm, [(3, 7), (3, 5), (5, 7)], np.matmul),
    (jmat.addmv, [(3,), (3, 5), (5,)], np.matmul),
    (jmat.addr, [(3, 7), (3,), (7,)], np.outer),
    (jmat.baddbmm, [(2, 3, 7), (2, 3, 5), (2, 5, 7)], np.matmul),
    (jmat.addbmm, [(3, 7), (2, 3, 5), (2, 5, 7)], lambda x, y: np.einsum("bnk,bkp->np", x, y)),
]
_SCALED_IDS = ["addmm", "addmv", "addr", "baddbmm", "addbmm"]


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("fn, operand_shapes, product", SCALED_OPS, ids=_SCALED_IDS)
def test_beta_zero_ignores_nan_and_inf_in_input(fn, operand_shapes, product, bad):
  i, x, y = _arrays(*operand_shapes)
  i[...] = bad
  for beta in (0, 0.0, -0.0, False):
    with jax.default_matmul_precision("highest"):
      result = fn(i, x, y, beta=beta, alpha=2)
    assert np.isfinite(np.asarray(result)).all()
    _assert_close(result, 2 * product(x, y), jnp.float64)


@pytest.mark.parametrize("fn, operand_shapes, product", SCALED_OPS, ids=_SCALED_IDS)
def test_alpha_zero_ignores_nan_in_the_product(fn, operand_shapes, product):
  i, x, y = _arrays(*operand_shapes)
  x[...] = np.nan
  result = fn(i, x, y, beta=-3, alpha=0)
  expected = np.broadcast_to(-3 * i, product(np.zeros_like(x), y).shape)
  _assert_close(result, expected, jnp.float64)
  i[...] = np.nan
  np.testing.assert_array_equal(fn(i, x, y, beta=0, alpha=0), np.zeros_like(expected))


@pytest.mark.parametrize("fn, operand_shapes, product", SCALED_OPS, ids=_SCALED_IDS)
def test_nan_beta_propagates(fn, operand_shapes, product):
  assert np.isnan(np.asarray(fn(*_arrays(*operand_shapes), beta=np.nan))).all()


def test_complex_scales_on_complex_operands():
  i, x, y = _arrays((3, 7), (3, 5), (5, 7), dtype=jnp.complex128)
  with jax.default_matmul_precision("highest"):
    result = jmat.addmm(i, x, y, beta=1j, alpha=2 - 1j)
  _assert_close(result, 1j * i + (2 - 1j) * (x @ y), jnp.complex128)


def test_integer_scales_wrap_modulo_the_dtype():
  i, x, y = (np.full(s, 3, np.uint8) for s in [(2, 2), (2, 3), (3, 2)])
  wide = [a.astype(np.int64) for a in (i, x, y)]
  # beta=-1 on uint8 is 255: the result is the exact value modulo 256, as in torch.
  expected = ((-1 * wide[0] + wide[1] @ wide[2]) % 256).astype(np.uint8)
  np.testing.assert_array_equal(jmat.addmm(i, x, y, beta=-1), expected)
  assert jmat.addmm(i, x, y, beta=2.0).dtype == np.uint8  # an integral float is fine


@pytest.mark.parametrize("fn, operand_shapes, product", SCALED_OPS, ids=_SCALED_IDS)
def test_fractional_scale_on_integers_is_refused(fn, operand_shapes, product):
  arrays = _arrays(*operand_shapes, dtype=jnp.int32)
  name = fn.__name__
  with pytest.raises(TypeError, match=rf"jmat\.{name}: beta=0\.5 is not an integer but the "
                     r"operands are int32; torch would silently truncate it to 0"):
    fn(*arrays, beta=0.5)
  with pytest.raises(TypeError, match=rf"jmat\.{name}: alpha=1\.5 is not an integer"):
    fn(*arrays, alpha=1.5)


def test_complex_scale_on_real_operands_is_refused():
  with pytest.raises(TypeError, match=r"jmat\.addmm: beta=1j is complex but the operands are "
                     r"float64; cast them to a complex dtype"):
    jmat.addmm(*_arrays((2, 2), (2, 3), (3, 2)), beta=1j)
  jmat.addmm(*_arrays((2, 2), (2, 3), (3, 2)), beta=1 + 0j)  # a real value in complex form


def test_non_number_scale_is_refused():
  with pytest.raises(TypeError, match=r"jmat\.addmv: alpha must be a Python number \(static "
                     r"under jit\), got str"):
    jmat.addmv(*_arrays((3,), (3, 5), (5,)), alpha="2")


# ---------------------------------------------------------------------------
# multi_dot: the cheapest order.


def _all_trees(i: int, j: int):
  """Every parenthesisation of matrices i..j, by enumeration (independent of the DP)."""
  if i == j:
    yield i
    return
  for split in range(i, j):
    for left in _all_trees(i, split):
      for right in _all_trees(split + 1, j):
        yield (left, right)


def _cost(tree, dims) -> tuple[int, int, int]:
  """(rows, cols, multiplications) of evaluating ``tree`` on the chain ``dims``."""
  if isinstance(tree, int):
    return dims[tree], dims[tree + 1], 0
  n, k, left = _cost(tree[0], dims)
  _, p, right = _cost(tree[1], dims)
  return n, p, left + right + n * k * p


def _leaves(tree):
  return [tree] if isinstance(tree, int) else _leaves(tree[0]) + _leaves(tree[1])


@hypothesis.settings(derandomize=True, max_examples=150, deadline=None)
@hypothesis.given(st.lists(st.integers(0, 40), min_size=4, max_size=8))
def test_chain_order_is_the_brute_force_optimum(dims):
  cost, tree = shapes.chain_order(dims)
  count = len(dims) - 1
  assert _leaves(tree) == list(range(count))
  assert _cost(tree, dims)[2] == cost
  assert cost == min(_cost(t, dims)[2] for t in _all_trees(0, count - 1))


@hypothesis.settings(derandomize=True, max_examples=12, deadline=None)
@hypothesis.given(
    st.lists(st.integers(1, 9), min_size=4, max_size=8), st.booleans(), st.booleans()
)
def test_multi_dot_matches_numpy_float64(dims, row_vector, column_vector):
  arrays = _arrays(*((dims[i], dims[i + 1]) for i in range(len(dims) - 1)), seed=sum(dims))
  if row_vector:
    arrays[0] = arrays[0][0]
  if column_vector:
    arrays[-1] = arrays[-1][:, 0]
  with jax.default_matmul_precision("highest"):
    result = jmat.multi_dot(arrays)
  expected = functools.reduce(np.matmul, arrays)
  chex.assert_shape(result, expected.shape)
  _assert_close(result, expected, jnp.float64)


def test_multi_dot_computes_in_the_chosen_order():
  """(100x2)(2x100)(100x2)(2x100): the order A0 @ ((A1 @ A2) @ A3) multiplies 2x2 first."""
  arrays = [jnp.ones(s, jnp.float32) for s in [(100, 2), (2, 100), (100, 2), (2, 100)]]
  text = jax.jit(jmat.multi_dot).lower(arrays).as_text()
  results = [line.split("->")[-1].strip() for line in text.splitlines() if "dot_general" in line]
  assert results == ["tensor<2x2xf32>", "tensor<2x100xf32>", "tensor<100x100xf32>"]


# ---------------------------------------------------------------------------
# tensordot, vecdot and linear details.


def test_tensordot_dims_forms_agree():
  a, b = _arrays((3, 5, 7), (5, 7, 2))
  expected = np.tensordot(a, b, axes=2)
  with jax.default_matmul_precision("highest"):
    for dims in (2, ([1, 2], [0, 1]), ((1, 2), (0, 1)), [[1, 2], [0, 1]], [(-2, -1), (0, 1)],
                 np.array([[1, 2], [0, 1]]), np.int64(2)):
      _assert_close(jmat.tensordot(a, b, dims), expected, jnp.float64)


def test_tensordot_sums_out_a_size_one_dim_as_torch():
  a, b = _arrays((3, 1), (4, 5))
  with jax.default_matmul_precision("highest"):
    result = jmat.tensordot(a, b, dims=([1], [0]))
  _assert_close(result, np.outer(a[:, 0], b.sum(0)), jnp.float64)


@pytest.mark.parametrize(
    "dims, error, message",
    [
        (-1, jmat.ShapeError, r"jmat\.tensordot: dims=-1 is out of range: a has shape \(3, 5, 7\), "
         r"b has shape \(5, 7, 2\); .* between 0 and 3"),
        (4, jmat.ShapeError, r"dims=4 is out of range"),
        (1, jmat.ShapeError, r"jmat\.tensordot: contracted sizes 7 and 5 differ: a has shape "
         r"\(3, 5, 7\), b has shape \(5, 7, 2\); dim 2 of a \(7\) is paired with dim 0 of b"),
        (([1, 2], [0]), jmat.ShapeError, r"dims lists have different lengths \(2 and 1\)"),
        (([3], [0]), jmat.ShapeError, r"dim 3 is out of range for a: .* its dims are -3\.\.2"),
        (([1, -2], [0, 1]), jmat.ShapeError,
         r"a dim of a appears more than once in dims \[1, -2\]"),
        ((1, 0), TypeError, r"jmat\.tensordot: dims must be an int .* got \(1, 0\)"),
        ([[1], [0], [2]], TypeError, r"dims must be an int"),
        (2.0, TypeError, r"dims must be an int"),
        (True, TypeError, r"dims must be an int"),
    ],
)
def test_tensordot_bad_dims_are_refused(dims, error, message):
  a, b = _arrays((3, 5, 7), (5, 7, 2))
  with pytest.raises(error, match=message):
    jmat.tensordot(a, b, dims)


def test_vecdot_refuses_integers_like_torch():
  with pytest.raises(TypeError, match=r"jmat\.vecdot: x and y have dtype int32, but vecdot takes "
                     r"floating-point or complex arrays \(as torch\)"):
    jmat.linalg.vecdot(jnp.ones(3, jnp.int32), jnp.ones(3, jnp.int32))


def test_vecdot_dim_out_of_range():
  with pytest.raises(jmat.ShapeError, match=r"jmat\.vecdot: dim 2 is out of range: x has shape "
                     r"\(2, 3\), y has shape \(3,\); .* dim must be in -2\.\.1"):
    jmat.linalg.vecdot(jnp.ones((2, 3)), jnp.ones(3), dim=2)


def test_linear_refusals_name_the_shapes():
  with pytest.raises(jmat.ShapeError, match=r"jmat\.linear: contracted sizes 5 and 7 differ: "
                     r"input has shape \(2, 5\), weight has shape \(3, 7\); input's last dim "
                     r"\(5\) must equal weight's last dim \(7\)"):
    jmat.linear(jnp.ones((2, 5)), jnp.ones((3, 7)))
  with pytest.raises(jmat.ShapeError, match=r"jmat\.linear: input must be at least 1-D, got 0-D"):
    jmat.linear(jnp.ones(()), jnp.ones((3, 7)))
  with pytest.raises(jmat.ShapeError, match=r"jmat\.linear: expects weight of shape "
                     r"\(out_features, in_features\) .* weight has shape \(2, 3, 7\) \(3-D\)"):
    jmat.linear(jnp.ones((2, 7)), jnp.ones((2, 3, 7)))
  with pytest.raises(jmat.ShapeError, match=r"jmat\.linear: bias does not broadcast to the "
                     r"output's shape: bias has shape \(5,\), the output has shape \(2, 3\); "
                     r"aligned from the right, dim -1 of bias is 5 where the output has 3"):
    jmat.linear(jnp.ones((2, 7)), jnp.ones((3, 7)), jnp.ones(5))


def test_add_input_refusals_name_the_shapes():
  with pytest.raises(jmat.ShapeError, match=r"jmat\.addmm: input does not broadcast to the "
                     r"product's shape: input has shape \(3, 7\), the product has shape \(2, 7\)"):
    jmat.addmm(jnp.ones((3, 7)), jnp.ones((2, 5)), jnp.ones((5, 7)))
  with pytest.raises(jmat.ShapeError, match=r"jmat\.baddbmm: input has more dims than the "
                     r"product: input has shape \(1, 2, 3, 7\), the product has shape \(2, 3, 7\)"):
    jmat.baddbmm(jnp.ones((1, 2, 3, 7)), jnp.ones((2, 3, 5)), jnp.ones((2, 5, 7)))
  with pytest.raises(jmat.ShapeError, match=r"jmat\.addbmm: batch sizes differ \(2 and 3\): "
                     r"batch1 has shape \(2, 3, 5\), batch2 has shape \(3, 5, 7\)"):
    jmat.addbmm(jnp.ones((3, 7)), jnp.ones((2, 3, 5)), jnp.ones((3, 5, 7)))
  with pytest.raises(jmat.ShapeError, match=r"jmat\.addmm: contracted sizes 5 and 6 differ: "
                     r"mat1 has shape \(2, 5\), mat2 has shape \(6, 7\)"):
    jmat.addmm(jnp.ones((2, 7)), jnp.ones((2, 5)), jnp.ones((6, 7)))


def test_mixed_dtypes_are_refused_naming_the_operands():
  with pytest.raises(TypeError, match=r"jmat\.addmm: dtypes differ: input is float32, mat1 is "
                     r"float64, mat2 is float64"):
    jmat.addmm(jnp.ones(7, jnp.float32), jnp.ones((2, 5)), jnp.ones((5, 7)))
  with pytest.raises(TypeError, match=r"jmat\.multi_dot: dtypes differ: arrays\[0\] is float64, "
                     r"arrays\[1\] is float32"):
    jmat.multi_dot([jnp.ones((2, 5)), jnp.ones((5, 7), jnp.float32)])
  with pytest.raises(TypeError, match=r"jmat\.outer: a has dtype bool"):
    jmat.outer(jnp.ones(2, bool), jnp.ones(3, bool))


def test_chain_refusals():
  with pytest.raises(jmat.ShapeError, match=r"jmat\.multi_dot: expects at least 2 arrays, got 1"):
    jmat.multi_dot([jnp.ones((2, 3))])
  with pytest.raises(jmat.ShapeError, match=r"jmat\.chain_matmul: expects at least 1 matrices, "
                     r"got 0"):
    jmat.chain_matmul()
  with pytest.raises(jmat.ShapeError, match=r"jmat\.multi_dot: expects 2-D matrices, the first "
                     r"may be 1-D .* arrays\[1\] has shape \(3,\) \(1-D\).*"
                     r"arrays\[1\] must be 2-D"):
    jmat.multi_dot([jnp.ones((2, 3)), jnp.ones(3), jnp.ones((3, 4))])
  with pytest.raises(jmat.ShapeError, match=r"jmat\.multi_dot: contracted sizes 4 and 5 differ: "
                     r"arrays\[1\] has shape \(3, 4\), arrays\[2\] has shape \(5, 6\)"):
    jmat.multi_dot([jnp.ones((2, 3)), jnp.ones((3, 4)), jnp.ones((5, 6))])
  with pytest.raises(TypeError, match=r"jmat\.multi_dot: arrays must be a list or tuple"):
    jmat.multi_dot(jnp.ones((2, 3, 3)))


# ---------------------------------------------------------------------------
# matmul_shape and explain take every new op.


def test_matmul_shape_options():
  assert jmat.matmul_shape((2, 3), (3, 7), op="addmm", input_shape=(7,)) == (2, 7)
  assert jmat.matmul_shape((2, 3), (3, 7), op="addmm") == (2, 7)
  assert jmat.matmul_shape((3, 5, 7), (7, 5, 2), op="tensordot", dims=([1, 2], [1, 0])) == (3, 2)
  assert jmat.matmul_shape((3, 5, 7), (5, 7, 2), op="tensordot") == (3, 2)
  assert jmat.matmul_shape((3,), (3, 5), (5, 7), (7,), op="multi_dot") == ()
  assert jmat.matmul_shape((2, 1, 5), (3, 5), op="vecdot") == (2, 3)
  assert jmat.matmul_shape((2, 1, 5), (3, 5), op="vecdot", dim=0) == (3, 5)
  assert jmat.matmul_shape((2, 5), (3, 5), op="linear", bias_shape=(3,)) == (2, 3)
  with pytest.raises(TypeError, match=r"jmat: op='mm' takes no input_shape; it is an option of "
                     r"addbmm, addmm, addmv, addr, baddbmm"):
    jmat.matmul_shape((2, 3), (3, 7), op="mm", input_shape=(7,))
  with pytest.raises(TypeError, match=r"op='addmm' takes two shapes, got 3"):
    jmat.matmul_shape((2, 3), (3, 7), (7, 2), op="addmm")
  with pytest.raises(jmat.ShapeError, match=r"jmat\.addmm: input does not broadcast"):
    jmat.matmul_shape((2, 3), (3, 7), op="addmm", input_shape=(3,))


def test_explain_addmm():
  text = jmat.explain((2, 3), (3, 7), op="addmm", input_shape=(2, 1))
  assert text.splitlines() == [
      "jmat.addmm: input (2, 1), mat1 (2, 3), mat2 (3, 7)",
      "  1. product: mat1 @ mat2: (2, 3) @ (3, 7) -> (2, 7)",
      "  2. input (2, 1) broadcasts to the product's shape (2, 7)",
      "  3. result: beta * input + alpha * product -> (2, 7)",
      "result: (2, 7)",
  ]


def test_explain_multi_dot_shows_the_order_and_its_cost():
  text = jmat.explain((100, 2), (2, 100), (100, 2), (2, 100), op="multi_dot")
  # (A1 @ A2): 2*100*2 = 400; (..) @ A3: 2*2*100 = 400; A0 @ (..): 100*2*100 = 20000.
  assert "(A0 @ ((A1 @ A2) @ A3)), 20800 multiplications (left to right: 60000)" in text
  assert text.endswith("result: (100, 100)")


def test_explain_failure_names_the_rule():
  text = jmat.explain((2, 3), (4, 3), op="outer")
  assert "fails: jmat.outer: expects two 1-D vectors" in text
  assert text.endswith("result: none, jmat.outer raises ShapeError")


# ---------------------------------------------------------------------------
# Transformations and the compiled code.


def test_vmap_and_grad_compose():
  i, x, y = _arrays((4, 7), (4, 3, 5), (4, 5, 7))
  with jax.default_matmul_precision("highest"):
    result = jax.vmap(lambda a, b, c: jmat.addmm(a, b, c, beta=2))(i, x, y)
    _assert_close(result, 2 * i[:, None] + x @ y, jnp.float64)
    grad = jax.grad(lambda b: jmat.addmm(i[0], b, y[0], alpha=3).sum())(x[0])
  _assert_close(grad, 3 * np.ones((3, 7)) @ y[0].T, jnp.float64)


@pytest.mark.parametrize(
    "call",
    [
        lambda i, x, y: jmat.addmm(i, x, y),
        lambda i, x, y: jmat.baddbmm(i, x[None], y[None]),
        lambda i, x, y: jmat.tensordot(x, y, dims=[[1], [1]]),
        lambda i, x, y: jmat.multi_dot([x, y]),
        lambda i, x, y: jmat.linear(x, y, i),
    ],
    ids=["addmm", "baddbmm", "tensordot", "multi_dot", "linear"],
)
def test_refusals_inside_jit_are_the_same_shape_errors(call):
  """Checks run on static shapes when tracing: a mistake under jit is a ShapeError, not XLA's."""
  arrays = _arrays((3,), (2, 5), (7, 4))
  with pytest.raises(jmat.ShapeError) as eager:
    call(*arrays)
  with pytest.raises(jmat.ShapeError) as jitted:
    jax.jit(call)(*arrays)
  assert str(jitted.value) == str(eager.value)


def test_works_without_x64():
  i, x, y = _arrays((7,), (3, 5), (5, 7))
  with jax.enable_x64(False):
    result = jmat.addmm(i, x, y, beta=0.5)
    assert result.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(result), 0.5 * i + x @ y, rtol=1e-4, atol=1e-4)


def test_no_retrace_on_repeated_calls():
  i, x, y = _arrays((7,), (3, 5), (5, 7))
  jmat.addmm(i, x, y, beta=2)
  before = jmat.addmm._cache_size()
  for _ in range(3):
    jmat.addmm(i, x, y, beta=2)
  assert jmat.addmm._cache_size() == before

  @jax.jit
  @functools.partial(chex.assert_max_traces, n=1)
  def layer(x, w, b):
    return jmat.linear(x, w, b)

  for seed in range(3):
    layer(*_arrays((2, 5), (3, 5), (3,), seed=seed))


def _counts(text: str) -> dict[str, int]:
  return {op: text.count(op) for op in (" dot(", " copy(", " transpose(", "kind=kLoop")}


@pytest.mark.parametrize(
    "name, fn, reference, operand_shapes",
    [
        ("addmm", lambda i, x, y: jmat.addmm(i, x, y, beta=0.5, alpha=2.0),
         lambda i, x, y: 0.5 * i + 2.0 * (x @ y), [(64,), (64, 32), (32, 64)]),
        ("baddbmm", lambda i, x, y: jmat.baddbmm(i, x, y, beta=0.5, alpha=2.0),
         lambda i, x, y: 0.5 * i + 2.0 * (x @ y), [(8, 1, 64), (8, 64, 32), (8, 32, 64)]),
        ("linear", jmat.linear, lambda x, w, b: x @ w.T + b, [(8, 16, 32), (64, 32), (64,)]),
        ("addbmm", lambda i, x, y: jmat.addbmm(i, x, y, beta=0.5),
         lambda i, x, y: 0.5 * i + jnp.einsum("bnk,bkp->np", x, y), [(64,), (8, 64, 32),
                                                                     (8, 32, 64)]),
    ],
)
def test_epilogue_fuses_after_one_dot(name, fn, reference, operand_shapes):
  """beta * input + alpha * product: one dot, then one elementwise fusion, as jnp compiles it.

  addbmm folds the batch sum into the contraction; its one transpose (batch1 to
  (n, b*m)) is the one XLA also inserts for jnp.einsum("bnk,bkp->np").
  """
  args = [jnp.ones(s, jnp.float32) for s in operand_shapes]
  ours = _counts(jax.jit(fn).lower(*args).compile().as_text())
  theirs = _counts(jax.jit(reference).lower(*args).compile().as_text())
  assert ours == theirs
  assert ours[" dot("] == 1
  if name != "addbmm":
    assert ours[" copy("] == ours[" transpose("] == 0 and ours["kind=kLoop"] == 1, ours


def test_every_public_function_is_listed():
  names = {"addmm", "addmv", "addr", "baddbmm", "addbmm", "vdot", "inner", "outer", "tensordot",
           "multi_dot", "chain_matmul", "linear", "linalg"}
  assert names <= set(jmat.__all__)
  assert set(jmat.linalg.__all__) == {"matmul", "multi_dot", "vecdot"}
  assert jmat.linalg.matmul is jmat.matmul and jmat.linalg.multi_dot is jmat.multi_dot
  for op in itertools.chain(names - {"linalg"}, ["vecdot"]):
    assert op in shapes.OPS
