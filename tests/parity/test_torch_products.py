"""torch 2.13 as the oracle of semantics: shapes, dtypes, refusals and gradients of the core ops."""

from __future__ import annotations

import itertools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jmat
from tests.cases import DTYPES, invalid_matmul_pairs, matmul_pairs, random_operand, tolerance

OPS = {
    "matmul": (jmat.matmul, torch.matmul),
    "mm": (jmat.mm, torch.mm),
    "bmm": (jmat.bmm, torch.bmm),
    "dot": (jmat.dot, torch.dot),
    "mv": (jmat.mv, torch.mv),
}


def to_torch(x: np.ndarray) -> torch.Tensor:
  if x.dtype == jnp.bfloat16:
    return torch.from_numpy(x.astype(np.float32)).to(torch.bfloat16)
  return torch.from_numpy(np.ascontiguousarray(x))


def torch_dtype_name(t: torch.Tensor) -> str:
  return str(t.dtype).removeprefix("torch.")


def assert_like_torch(ours, theirs: torch.Tensor) -> None:
  """jmat's result has torch's dtype and shape, and its values within the dtype's tolerance."""
  assert ours.dtype.name == torch_dtype_name(theirs)
  assert ours.shape == tuple(theirs.shape)
  np.testing.assert_allclose(
      np.asarray(ours.astype(jnp.complex128 if "complex" in ours.dtype.name else jnp.float64)),
      theirs.to(torch.complex128 if theirs.is_complex() else torch.float64).numpy(),
      **tolerance(ours.dtype),
  )


def torch_shape(op: str, shape_a, shape_b):
  """torch's result shape, or None when torch refuses the pair."""
  try:
    return tuple(OPS[op][1](torch.zeros(shape_a), torch.zeros(shape_b)).shape)
  except (RuntimeError, IndexError, ValueError):
    return None


def _all_rank_pairs():
  """Shape pairs over ranks 0..4 with sizes chosen so some pairs fit each op and some do not."""
  shapes = [(), (5,), (7,), (3, 5), (5, 7), (1, 5), (2, 3, 5), (2, 5, 7), (3, 5, 7), (1, 5, 7),
            (2, 2, 3, 5), (2, 1, 5, 7), (2, 10, 1), (2, 10, 4), (2, 1, 10), (3, 10, 4)]
  return list(itertools.product(shapes, repeat=2))


@pytest.mark.parametrize("op", sorted(OPS))
def test_shape_or_refusal_agrees_with_torch_for_every_rank_pair(op):
  fn = OPS[op][0]
  for shape_a, shape_b in _all_rank_pairs():
    expected = torch_shape(op, shape_a, shape_b)
    if expected is None:
      with pytest.raises(jmat.ShapeError):
        fn(jnp.zeros(shape_a), jnp.zeros(shape_b))
      with pytest.raises(jmat.ShapeError):
        jmat.matmul_shape(shape_a, shape_b, op=op)
    else:
      assert fn(jnp.zeros(shape_a), jnp.zeros(shape_b)).shape == expected, (shape_a, shape_b)
      assert jmat.matmul_shape(shape_a, shape_b, op=op) == expected


def test_matmul_table_shapes_agree_with_torch():
  for shape_a, shape_b in matmul_pairs():
    expected = torch_shape("matmul", shape_a, shape_b)
    assert expected is not None, (shape_a, shape_b)
    assert jmat.matmul_shape(shape_a, shape_b) == expected
    assert jmat.matmul(jnp.zeros(shape_a), jnp.zeros(shape_b)).shape == expected


@pytest.mark.parametrize("shape_a, shape_b", invalid_matmul_pairs())
def test_matmul_refusals_agree_with_torch(shape_a, shape_b):
  assert torch_shape("matmul", shape_a, shape_b) is None
  with pytest.raises(jmat.ShapeError) as info:
    jmat.matmul(jnp.zeros(shape_a), jnp.zeros(shape_b))
  message = str(info.value)
  assert message.startswith("jmat.matmul: ")
  assert f"a has shape {shape_a}" in message and f"b has shape {shape_b}" in message


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("op", sorted(OPS))
def test_result_dtype_and_values_agree_with_torch(op, dtype):
  shapes = {"matmul": ((2, 3, 5), (5, 7)), "mm": ((3, 5), (5, 7)), "bmm": ((2, 3, 5), (2, 5, 7)),
            "dot": ((5,), (5,)), "mv": ((3, 5), (5,))}[op]
  rng = np.random.default_rng(7)
  a, b = (random_operand(rng, s, dtype) for s in shapes)
  theirs = OPS[op][1](to_torch(a), to_torch(b))
  with jax.default_matmul_precision("highest"):
    ours = OPS[op][0](jnp.asarray(a), jnp.asarray(b))
  assert_like_torch(ours, theirs)


@pytest.mark.parametrize("op", sorted(OPS))
def test_mixed_dtypes_are_refused_like_torch(op):
  shapes = {"matmul": ((3, 5), (5, 7)), "mm": ((3, 5), (5, 7)), "bmm": ((2, 3, 5), (2, 5, 7)),
            "dot": ((5,), (5,)), "mv": ((3, 5), (5,))}[op]
  a = np.ones(shapes[0], np.float32)
  b = np.ones(shapes[1], np.float64)
  with pytest.raises(RuntimeError):
    OPS[op][1](to_torch(a), to_torch(b))
  with pytest.raises(TypeError, match=rf"jmat\.{op}: dtypes differ: a is float32, b is float64"):
    OPS[op][0](a, b)


@pytest.mark.parametrize("dtype", [np.bool_, np.uint16, np.uint32])
def test_unsupported_dtypes_are_refused_like_torch(dtype):
  a = np.ones((3, 5), dtype)
  b = np.ones((5, 7), dtype)
  with pytest.raises((RuntimeError, NotImplementedError)):
    torch.matmul(torch.from_numpy(a), torch.from_numpy(b))
  with pytest.raises(TypeError, match=rf"jmat\.matmul: a has dtype {np.dtype(dtype).name}"):
    jmat.matmul(a, b)


@pytest.mark.parametrize(
    "shape_a, shape_b",
    [
        ((5, 1, 3, 5), (2, 5, 7)),
        ((5,), (2, 5, 7)),
        ((2, 3, 5), (5,)),
        ((5,), (5,)),
        ((3, 5), (5, 7)),
    ],
)
def test_gradients_agree_with_torch(shape_a, shape_b):
  rng = np.random.default_rng(3)
  a, b = rng.standard_normal(shape_a), rng.standard_normal(shape_b)
  weight = rng.standard_normal(np.matmul(a, b).shape)
  ta = torch.tensor(a, requires_grad=True)
  tb = torch.tensor(b, requires_grad=True)
  (torch.matmul(ta, tb) * torch.tensor(weight)).sum().backward()

  def loss(x, y):
    return jnp.sum(jmat.matmul(x, y) * weight)

  with jax.default_matmul_precision("highest"):
    grad_a, grad_b = jax.jit(jax.grad(loss, argnums=(0, 1)))(a, b)
  np.testing.assert_allclose(grad_a, ta.grad.numpy(), **tolerance(np.float64))
  np.testing.assert_allclose(grad_b, tb.grad.numpy(), **tolerance(np.float64))


def _torch_message(fn, shape_a, shape_b) -> str:
  try:
    fn(torch.zeros(shape_a), torch.zeros(shape_b))
  except RuntimeError as e:
    return str(e)
  raise AssertionError("torch accepted the pair")


@pytest.mark.parametrize(
    "op, shape_a, shape_b",
    [
        ("matmul", (2, 3, 4), (2, 5, 6)),
        ("bmm", (2, 1, 10), (3, 10, 4)),
        ("bmm", (2, 10, 1), (2, 10, 4)),
        ("bmm", (1, 10), (10, 4)),
        ("mm", (3,), (3, 2)),
    ],
)
def test_messages_are_clearer_than_torch(op, shape_a, shape_b):
  """torch names internal tensors ("batch2") or one shape; jmat names the op and both shapes."""
  theirs = _torch_message(OPS[op][1], shape_a, shape_b)
  with pytest.raises(jmat.ShapeError) as info:
    OPS[op][0](jnp.zeros(shape_a), jnp.zeros(shape_b))
  ours = str(info.value)
  assert ours.startswith(f"jmat.{op}: ")
  for shape in (shape_a, shape_b):
    assert str(shape) in ours
  torch_names_both = all(
      re.search(r"\b" + r"\D+".join(map(str, s)) + r"\b", theirs) for s in (shape_a, shape_b)
  )
  assert not torch_names_both, theirs
