"""torch 2.13 as the oracle of the family: shapes, refusals, dtypes, beta/alpha, gradients."""

from __future__ import annotations

import itertools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jmat
from tests.cases import DTYPES, random_operand, tolerance
from tests.parity.test_torch_products import assert_like_torch, to_torch

F = torch.nn.functional


def _chain_matmul(*xs):
  with warnings.catch_warnings():  # torch.chain_matmul is deprecated in favour of multi_dot
    warnings.simplefilter("ignore", UserWarning)
    return torch.chain_matmul(*xs)


# name -> (jmat function, torch function); the first operand of each is the added ``input``.
ADD_OPS = {
    "addmm": (jmat.addmm, torch.addmm),
    "addmv": (jmat.addmv, torch.addmv),
    "addr": (jmat.addr, torch.addr),
    "baddbmm": (jmat.baddbmm, torch.baddbmm),
    "addbmm": (jmat.addbmm, torch.addbmm),
}
PAIR_OPS = {
    "vdot": (jmat.vdot, torch.vdot),
    "inner": (jmat.inner, torch.inner),
    "outer": (jmat.outer, torch.outer),
}


def _torch_shape(fn, shapes, **options):
  """torch's result shape, or None when torch refuses."""
  try:
    return tuple(fn(*(torch.zeros(s, dtype=torch.float64) for s in shapes), **options).shape)
  except (RuntimeError, IndexError, ValueError):
    return None


def _assert_same_outcome(op, fn, shapes, expected, shape_options=None, **options):
  """jmat's op and matmul_shape give torch's shape, or both raise a ShapeError naming the op."""
  arrays = [jnp.zeros(s) for s in shapes]
  if expected is None:
    with pytest.raises(jmat.ShapeError) as info:
      fn(*arrays, **options)
    message = str(info.value)
    assert message.startswith(f"jmat.{op}: "), message
    assert any(str(tuple(s)) in message for s in shapes), message
  else:
    assert fn(*arrays, **options).shape == expected, (op, shapes, options)
  if shape_options is None:
    return
  if expected is None:
    with pytest.raises(jmat.ShapeError):
      jmat.matmul_shape(*shape_options.pop("shapes"), op=op, **shape_options)
  else:
    assert jmat.matmul_shape(*shape_options.pop("shapes"), op=op, **shape_options) == expected


# Product operands per add* op (valid and invalid), and input shapes to try with each.
ADD_PRODUCTS = {
    "addmm": [((3, 5), (5, 7)), ((1, 5), (5, 1)), ((3, 0), (0, 7)), ((3, 5), (6, 7)),
              ((5,), (5, 7)), ((2, 3, 5), (2, 5, 7))],
    "addmv": [((3, 5), (5,)), ((3, 5), (6,)), ((3, 5), (5, 1)), ((5,), (5,))],
    "addr": [((3,), (7,)), ((0,), (7,)), ((3, 1), (7,)), ((), (7,))],
    "baddbmm": [((2, 3, 5), (2, 5, 7)), ((1, 3, 5), (1, 5, 7)), ((2, 3, 5), (3, 5, 7)),
                ((3, 5), (5, 7)), ((2, 3, 5), (2, 6, 7))],
    "addbmm": [((2, 3, 5), (2, 5, 7)), ((0, 3, 5), (0, 5, 7)), ((2, 3, 5), (3, 5, 7)),
               ((3, 5), (5, 7)), ((2, 3, 5), (2, 6, 7))],
}
INPUTS = [(), (1,), (3,), (7,), (3, 1), (1, 7), (3, 7), (7, 3), (2, 3, 7), (1, 3, 7), (2, 1, 1),
          (3, 3, 7), (1, 2, 3, 7), (2, 3, 1)]


@pytest.mark.parametrize("op", sorted(ADD_OPS))
def test_add_ops_shapes_and_input_broadcasting_agree_with_torch(op):
  fn, torch_fn = ADD_OPS[op]
  for (shape_x, shape_y), shape_i in itertools.product(ADD_PRODUCTS[op], INPUTS):
    expected = _torch_shape(torch_fn, (shape_i, shape_x, shape_y))
    _assert_same_outcome(op, fn, (shape_i, shape_x, shape_y), expected,
                         {"shapes": (shape_x, shape_y), "input_shape": shape_i})


PAIR_SHAPES = [(), (5,), (7,), (0,), (3, 5), (5, 7), (1, 5), (2, 3, 5), (2, 0)]


@pytest.mark.parametrize("op", sorted(PAIR_OPS))
def test_vdot_inner_outer_shapes_agree_with_torch(op):
  fn, torch_fn = PAIR_OPS[op]
  for shape_a, shape_b in itertools.product(PAIR_SHAPES, repeat=2):
    expected = _torch_shape(torch_fn, (shape_a, shape_b))
    _assert_same_outcome(op, fn, (shape_a, shape_b), expected, {"shapes": (shape_a, shape_b)})


TENSORDOT_CASES = [
    ((3, 5, 7), (5, 7, 2), 2), ((3, 5, 7), (5, 7, 2), 0), ((3, 5, 7), (5, 7, 2), 1),
    ((3, 5, 7), (5, 7, 2), 3), ((3, 5, 7), (5, 7, 2), -1), ((5, 7), (5, 7), 2),
    ((3, 5, 7), (7, 2, 5), ([1, 2], [2, 0])), ((3, 5, 7), (7, 2, 5), ((1, 2), (2, 0))),
    ((3, 5, 7), (7, 2, 5), [[-2, -1], [-1, 0]]), ((3, 5, 7), (7, 2, 5), [[1, 2], [0, 2]]),
    ((3, 5, 7), (7, 2, 5), ([1, 2], [2])), ((3, 5, 7), (7, 2, 5), ([3], [0])),
    ((3, 5, 7), (5, 5, 2), ([1, 1], [0, 1])), ((3, 1), (4, 5), ([1], [0])),
    ((3, 4), (1, 5), ([1], [0])), ((3, 1), (4, 5), 1), ((), (), 0), ((3,), (), 0),
    ((), (3,), 1), ((3, 0), (0, 5), 1), ((3, 5), (5, 7), ([], [])),
]


def test_tensordot_shapes_agree_with_torch():
  for shape_a, shape_b, dims in TENSORDOT_CASES:
    expected = _torch_shape(torch.tensordot, (shape_a, shape_b), dims=dims)
    _assert_same_outcome("tensordot", jmat.tensordot, (shape_a, shape_b), expected,
                         {"shapes": (shape_a, shape_b), "dims": dims}, dims=dims)


CHAINS = [
    [(3, 5), (5, 7)], [(3, 5), (5, 7), (7, 2), (2, 13)], [(5,), (5, 7), (7, 2)],
    [(3, 5), (5, 7), (7,)], [(5,), (5, 7), (7,)], [(5,), (5,)], [(3, 5)], [],
    [(3, 5), (5,), (5, 7)], [(3, 5), (2, 5, 7)], [(), (5, 7)], [(3, 5), (6, 7)],
    [(3, 5), (5, 7), (6, 2)], [(3, 0), (0, 7), (7, 2)], [(5,)], [(2, 3, 5), (5, 7)],
]


@pytest.mark.parametrize(
    "op, fn, torch_fn",
    [("multi_dot", lambda *xs: jmat.multi_dot(list(xs)), lambda *xs: torch.linalg.multi_dot(xs)),
     ("chain_matmul", jmat.chain_matmul, _chain_matmul)],
    ids=["multi_dot", "chain_matmul"],
)
def test_chain_shapes_agree_with_torch(op, fn, torch_fn):
  for chain in CHAINS:
    expected = _torch_shape(torch_fn, chain)
    arrays = [jnp.zeros(s) for s in chain]
    if expected is None:
      with pytest.raises(jmat.ShapeError, match=rf"^jmat\.{op}: "):
        fn(*arrays)
    else:
      assert fn(*arrays).shape == expected, chain
    if len(chain) >= 2:
      _assert_same_outcome(op, fn, chain, expected, {"shapes": chain})


LINEAR_CASES = [
    ((2, 3), (4, 3), (4,)), ((3,), (4, 3), (4,)), ((3,), (4, 3), None), ((5, 2, 3), (4, 3), None),
    ((3,), (3,), None), ((2, 3), (3,), None), ((3,), (3,), ()), ((2, 3), (4, 3), ()),
    ((2, 3), (4, 3), (1,)), ((2, 3), (4, 3), (2, 4)), ((2, 3), (4, 3), (5,)),
    ((2, 3), (4, 3), (3, 4)), ((2, 3), (4, 3), (1, 2, 4)), ((2, 3), (4, 5), None),
    ((), (4, 3), None), ((2, 3), (2, 4, 3), None), ((2, 0), (4, 0), (4,)), ((0, 3), (4, 3), (4,)),
    ((2, 3), (0, 3), (0,)), ((2, 3), (4, 3), (2, 1)), ((7, 2, 3), (4, 3), (2, 4)),
    ((2, 3), (), None),
]
# torch's linear takes different paths (addmm, flatten + addmm, matmul + add_) that check bias
# differently; jmat applies one rule, bias broadcasts to the output, and differs here:
LINEAR_DEVIATIONS = {
    ((2, 3), (3,), (2,)): ((2,), None),  # torch: "mat2 must be a matrix" (its addmm path)
    ((3,), (4, 3), (1, 4)): (None, (4,)),  # torch squeezes a (1, 4) bias into a (4,) output
}


def test_linear_shapes_agree_with_torch():
  for shape_x, shape_w, shape_b in LINEAR_CASES:
    shapes = (shape_x, shape_w) if shape_b is None else (shape_x, shape_w, shape_b)
    expected = _torch_shape(F.linear, shapes)
    _assert_same_outcome("linear", jmat.linear, shapes, expected,
                         {"shapes": (shape_x, shape_w), "bias_shape": shape_b})


@pytest.mark.parametrize("shapes", sorted(LINEAR_DEVIATIONS))
def test_linear_deviations_from_torch_are_the_documented_ones(shapes):
  ours, theirs = LINEAR_DEVIATIONS[shapes]
  assert _torch_shape(F.linear, shapes) == theirs
  _assert_same_outcome("linear", jmat.linear, shapes, ours)


VECDOT_CASES = [
    ((5,), (5,), -1), ((2, 5), (5,), -1), ((2, 1, 5), (3, 5), -1), ((2, 5), (2, 5), 0),
    ((2, 5), (5, 2), 0), ((2, 5), (5,), 0), ((), (), -1), ((), (), 0), ((), (), 1),
    ((5,), (1,), -1), ((2, 5), (2, 3), -1), ((2, 5), (2, 5), 2), ((2, 5), (2, 5), -3),
    ((0, 5), (5,), -1), ((2, 5), (2, 1), -1), ((5,), (2, 1), -1), ((), (2, 5), 0),
]


def test_vecdot_shapes_agree_with_torch():
  for shape_x, shape_y, dim in VECDOT_CASES:
    expected = _torch_shape(torch.linalg.vecdot, (shape_x, shape_y), dim=dim)
    _assert_same_outcome("vecdot", jmat.linalg.vecdot, (shape_x, shape_y), expected,
                         {"shapes": (shape_x, shape_y), "dim": dim}, dim=dim)


def test_vecdot_of_two_vectors_checks_dim_where_torch_ignores_it():
  assert _torch_shape(torch.linalg.vecdot, ((5,), (5,)), dim=1) == ()
  with pytest.raises(jmat.ShapeError, match=r"jmat\.vecdot: dim 1 is out of range"):
    jmat.linalg.vecdot(jnp.ones(5), jnp.ones(5), dim=1)


# ---------------------------------------------------------------------------
# dtypes: the result dtype is the operands', for every dtype torch multiplies.

DTYPE_CALLS = {
    "addmm": (lambda lib: lib.addmm, [(7,), (3, 5), (5, 7)], {"beta": 2, "alpha": 3}),
    "addmv": (lambda lib: lib.addmv, [(3,), (3, 5), (5,)], {"beta": -1}),
    "addr": (lambda lib: lib.addr, [(3, 7), (3,), (7,)], {"alpha": 2}),
    "baddbmm": (lambda lib: lib.baddbmm, [(1, 7), (2, 3, 5), (2, 5, 7)], {"beta": 0}),
    "addbmm": (lambda lib: lib.addbmm, [(3, 7), (2, 3, 5), (2, 5, 7)], {}),
    "vdot": (lambda lib: lib.vdot, [(5,), (5,)], {}),
    "inner": (lambda lib: lib.inner, [(2, 5), (3, 5)], {}),
    "outer": (lambda lib: lib.outer, [(3,), (7,)], {}),
    "tensordot": (lambda lib: lib.tensordot, [(3, 5, 7), (5, 7, 2)], {"dims": 2}),
    "multi_dot": (lambda lib: lambda *xs: lib.linalg.multi_dot(list(xs)),
                  [(5,), (5, 7), (7, 2)], {}),
    "linear": (lambda lib: F.linear if lib is torch else lib.linear, [(2, 5), (3, 5), (3,)], {}),
    "vecdot": (lambda lib: lib.linalg.vecdot, [(2, 5), (5,)], {}),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("op", sorted(DTYPE_CALLS))
def test_result_dtype_and_values_agree_with_torch(op, dtype):
  pick, shapes, options = DTYPE_CALLS[op]
  rng = np.random.default_rng(11)
  arrays = [random_operand(rng, s, dtype) for s in shapes]
  try:
    theirs = pick(torch)(*(to_torch(x) for x in arrays), **options)
  except RuntimeError as error:  # torch.linalg.vecdot refuses integers
    assert "floating point or complex" in str(error)
    with pytest.raises(TypeError, match=rf"jmat\.{op}: .* floating-point or complex"):
      pick(jmat)(*arrays, **options)
    return
  with jax.default_matmul_precision("highest"):
    ours = pick(jmat)(*arrays, **options)
  assert_like_torch(ours, theirs)


@pytest.mark.parametrize("op", ["addmm", "baddbmm", "vdot", "inner", "tensordot", "multi_dot",
                                "linear", "vecdot"])
def test_mixed_dtypes_are_refused_like_torch(op):
  pick, shapes, options = DTYPE_CALLS[op]
  arrays = [np.ones(s, np.float32) for s in shapes]
  arrays[-1] = arrays[-1].astype(np.float64)
  with pytest.raises(RuntimeError):
    pick(torch)(*(to_torch(x) for x in arrays), **options)
  with pytest.raises(TypeError, match=rf"jmat\.{op}: dtypes differ: .* is float32, .* is float64"):
    pick(jmat)(*arrays, **options)


@pytest.mark.parametrize("op", ["addr", "outer"])
def test_elementwise_torch_ops_still_follow_the_product_dtype_rule(op):
  """torch computes addr/outer elementwise, so it promotes and takes bool; jmat refuses both."""
  pick, shapes, options = DTYPE_CALLS[op]
  mixed = [np.ones(s, np.float32) for s in shapes]
  mixed[-1] = mixed[-1].astype(np.float64)
  assert pick(torch)(*(to_torch(x) for x in mixed)).dtype == torch.float64
  with pytest.raises(TypeError, match=rf"jmat\.{op}: dtypes differ"):
    pick(jmat)(*mixed)
  boolean = [np.ones(s, bool) for s in shapes]
  assert pick(torch)(*(to_torch(x) for x in boolean)).dtype == torch.bool
  with pytest.raises(TypeError, match=rf"jmat\.{op}: .* has dtype bool"):
    pick(jmat)(*boolean)


# ---------------------------------------------------------------------------
# beta and alpha.

SCALED = {
    "addmm": [(3, 7), (3, 5), (5, 7)],
    "addmv": [(3,), (3, 5), (5,)],
    "addr": [(3, 7), (3,), (7,)],
    "baddbmm": [(2, 3, 7), (2, 3, 5), (2, 5, 7)],
    "addbmm": [(3, 7), (2, 3, 5), (2, 5, 7)],
}


def _both(op, arrays, **options):
  jmat_fn, torch_fn = ADD_OPS[op]
  theirs = torch_fn(*(to_torch(x) for x in arrays), **options).numpy()
  with jax.default_matmul_precision("highest"):
    ours = np.asarray(jmat_fn(*arrays, **options))
  return ours, theirs


@pytest.mark.parametrize("op", sorted(SCALED))
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_beta_zero_ignores_nan_and_inf_like_torch(op, bad):
  rng = np.random.default_rng(5)
  arrays = [random_operand(rng, s, np.float64) for s in SCALED[op]]
  arrays[0][...] = bad
  ours, theirs = _both(op, arrays, beta=0, alpha=-2)
  assert np.isfinite(theirs).all()
  np.testing.assert_allclose(ours, theirs, **tolerance(np.float64))


# torch ignores the product when alpha == 0 in addmm, addmv (real) and addbmm; its addr and
# small baddbmm kernels compute 0 * nan = nan. jmat ignores it in all five (test_family).
@pytest.mark.parametrize("op", ["addmm", "addmv", "addbmm"])
def test_alpha_zero_ignores_nan_in_the_product_like_torch(op):
  rng = np.random.default_rng(6)
  arrays = [random_operand(rng, s, np.float64) for s in SCALED[op]]
  arrays[1][...] = np.nan
  ours, theirs = _both(op, arrays, beta=-3, alpha=0)
  assert np.isfinite(theirs).all()
  np.testing.assert_allclose(ours, theirs, **tolerance(np.float64))


def test_addmv_with_empty_product_broadcasts_input_where_torch_does_not():
  """torch.addmv returns beta * input unbroadcast when m == 0 (and warns about a resize)."""
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", UserWarning)
    assert _torch_shape(torch.addmv, ((), (3, 0), (0,))) == ()
  assert jmat.addmv(jnp.ones(()), jnp.ones((3, 0)), jnp.ones(0)).shape == (3,)
  _assert_same_outcome("addmv", jmat.addmv, ((3,), (3, 0), (0,)),
                       _torch_shape(torch.addmv, ((3,), (3, 0), (0,))))


_SCALES = [(np.int64, -2, 3), (np.int32, 0, -1), (np.uint8, -1, 1), (np.int8, 2.0, -3),
           (np.int64, True, False), (np.float64, -0.5, 2.5), (np.float64, np.nan, 1),
           (np.complex128, 0.5, 1 + 0j), (np.float32, 1, 1 + 0j)]


@pytest.mark.parametrize(
    "op, dtype, beta, alpha",
    [(op, *scales) for op, scales in itertools.product(sorted(SCALED), _SCALES)
     # torch.addr refuses float and bool scales on integers: see the test below
     if not (op == "addr" and np.dtype(scales[0]).kind in "iu" and
             isinstance(scales[1], float | bool))],
)
def test_scales_agree_with_torch(op, dtype, beta, alpha):
  rng = np.random.default_rng(8)
  arrays = [random_operand(rng, s, dtype) for s in SCALED[op]]
  ours, theirs = _both(op, arrays, beta=beta, alpha=alpha)
  assert ours.dtype == theirs.dtype
  np.testing.assert_allclose(ours, theirs, **tolerance(ours.dtype))


def test_addr_integer_scales():
  """torch.addr refuses every float scale on integers; jmat refuses fractional ones only."""
  arrays = [np.full(s, 3, np.int64) for s in SCALED["addr"]]
  with pytest.raises(RuntimeError, match="must not be a floating point number"):
    torch.addr(*(to_torch(x) for x in arrays), beta=2.0)
  expected = torch.addr(*(to_torch(x) for x in arrays), beta=2).numpy()
  np.testing.assert_array_equal(jmat.addr(*arrays, beta=2.0), expected)
  with pytest.raises(TypeError, match=r"jmat\.addr: beta=0\.5 is not an integer"):
    jmat.addr(*arrays, beta=0.5)


@pytest.mark.parametrize("op", sorted(set(SCALED) - {"addr"}))
def test_fractional_scale_on_integers_torch_truncates_jmat_refuses(op):
  arrays = [np.full(s, 3, np.int64) for s in SCALED[op]]
  jmat_fn, torch_fn = ADD_OPS[op]
  truncated = torch_fn(*(to_torch(x) for x in arrays), beta=0.5, alpha=1.5).numpy()
  product_only = torch_fn(*(to_torch(x) for x in arrays), beta=0, alpha=1).numpy()
  np.testing.assert_array_equal(truncated, product_only)  # 0.5 -> 0 and 1.5 -> 1, silently
  with pytest.raises(TypeError, match=rf"jmat\.{op}: beta=0\.5 is not an integer .* torch would "
                     r"silently truncate it to 0"):
    jmat_fn(*arrays, beta=0.5, alpha=1.5)


def test_complex_scale_on_real_operands_is_refused_like_torch():
  arrays = [np.ones(s) for s in SCALED["addmm"]]
  with pytest.raises(RuntimeError):
    torch.addmm(*(to_torch(x) for x in arrays), beta=1j)
  with pytest.raises(TypeError, match=r"jmat\.addmm: beta=1j is complex"):
    jmat.addmm(*arrays, beta=1j)


# ---------------------------------------------------------------------------
# Gradients.

GRAD_CALLS = {
    "addmm": (lambda lib, *xs: lib.addmm(*xs, beta=0.5, alpha=-2), [(7,), (3, 5), (5, 7)]),
    "addmv": (lambda lib, *xs: lib.addmv(*xs, beta=2), [(1,), (3, 5), (5,)]),
    "addr": (lambda lib, *xs: lib.addr(*xs, alpha=3), [(3, 1), (3,), (7,)]),
    "baddbmm": (lambda lib, *xs: lib.baddbmm(*xs, beta=-1, alpha=0.5), [(3, 7), (2, 3, 5),
                                                                       (2, 5, 7)]),
    "addbmm": (lambda lib, *xs: lib.addbmm(*xs, beta=0), [(3, 7), (2, 3, 5), (2, 5, 7)]),
    "vdot": (lambda lib, *xs: lib.vdot(*xs), [(5,), (5,)]),
    "inner": (lambda lib, *xs: lib.inner(*xs), [(2, 5), (3, 5)]),
    "outer": (lambda lib, *xs: lib.outer(*xs), [(3,), (7,)]),
    "tensordot": (lambda lib, *xs: lib.tensordot(*xs, dims=([0, 2], [2, 0])), [(3, 5, 7),
                                                                              (7, 2, 3)]),
    "tensordot_size1": (lambda lib, *xs: lib.tensordot(*xs, dims=([1], [0])), [(3, 1), (4, 5)]),
    "multi_dot": (lambda lib, *xs: lib.linalg.multi_dot(list(xs)),
                  [(5,), (5, 7), (7, 2), (2, 13)]),
    "chain_matmul": (lambda lib, *xs: (_chain_matmul if lib is torch else lib.chain_matmul)(*xs),
                     [(3, 5), (5, 7), (7, 2)]),
    "linear": (lambda lib, *xs: (F.linear if lib is torch else lib.linear)(*xs),
               [(2, 3, 5), (7, 5), (7,)]),
    "vecdot": (lambda lib, *xs: lib.linalg.vecdot(*xs), [(2, 1, 5), (3, 5)]),
}


@pytest.mark.parametrize("op", sorted(GRAD_CALLS))
def test_gradients_agree_with_torch(op):
  call, shapes = GRAD_CALLS[op]
  rng = np.random.default_rng(9)
  arrays = [rng.standard_normal(s) for s in shapes]
  tensors = [torch.tensor(x, requires_grad=True) for x in arrays]
  out = call(torch, *tensors)
  weight = rng.standard_normal(tuple(out.shape))
  (out * torch.tensor(weight)).sum().backward()

  def loss(*xs):
    return jnp.sum(call(jmat, *xs) * weight)

  with jax.default_matmul_precision("highest"):
    grads = jax.jit(jax.grad(loss, argnums=tuple(range(len(arrays)))))(*arrays)
  for ours, tensor in zip(grads, tensors, strict=True):
    np.testing.assert_allclose(ours, tensor.grad.numpy(), rtol=1e-10, atol=1e-10)
