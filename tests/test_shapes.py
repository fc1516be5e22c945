"""Shape algebra: matmul_shape against a brute-force rule, explain's derivations."""

from __future__ import annotations

import hypothesis.strategies as st
import numpy as np
import pytest
import torch
from hypothesis import given, settings

import jmat
from tests.cases import invalid_matmul_pairs, matmul_pairs

_dims = st.lists(st.integers(min_value=0, max_value=3), min_size=0, max_size=5).map(tuple)


def _brute_force_matmul_shape(shape_a, shape_b):
  """numpy's matmul on tiny arrays (torch's rule for >= 1-D operands), or None if refused."""
  if not shape_a or not shape_b:
    return None  # torch 2.x refuses 0-D operands (numpy does too)
  try:
    return np.matmul(np.zeros(shape_a), np.zeros(shape_b)).shape
  except ValueError:
    return None


@settings(derandomize=True, max_examples=400, deadline=None)
@given(_dims, _dims)
def test_matmul_shape_agrees_with_brute_force(shape_a, shape_b):
  expected = _brute_force_matmul_shape(shape_a, shape_b)
  if expected is None:
    with pytest.raises(jmat.ShapeError):
      jmat.matmul_shape(shape_a, shape_b)
  else:
    assert jmat.matmul_shape(shape_a, shape_b) == expected


@settings(derandomize=True, max_examples=200, deadline=None)
@given(_dims, _dims)
def test_explain_ends_in_numpys_result_or_the_error(shape_a, shape_b):
  text = jmat.explain(shape_a, shape_b)
  last = text.splitlines()[-1]
  expected = _brute_force_matmul_shape(shape_a, shape_b)
  if expected is None:
    assert last == "result: none, jmat.matmul raises ShapeError"
    assert ". fails: jmat.matmul: " in text
  else:
    assert last == f"result: {expected}"


@pytest.mark.parametrize("shape_a, shape_b", matmul_pairs()[::7])
def test_explain_names_the_batch_shape(shape_a, shape_b):
  text = jmat.explain(shape_a, shape_b)
  batch = np.broadcast_shapes(shape_a[:-2], shape_b[:-2])
  if batch:
    assert f"batch shape: {tuple(batch)}" in text


def test_explain_broadcast_example_step_by_step():
  """The matmul document's broadcasting example, (5, 1, 4, 2) @ (3, 2, 1) -> (5, 3, 4, 1)."""
  lines = jmat.explain((5, 1, 4, 2), (3, 2, 1)).splitlines()
  text = "\n".join(lines)
  assert lines[0] == "jmat.matmul: a (5, 1, 4, 2), b (3, 2, 1)"
  assert "batch dims: a (5, 1), b (3,)" in text
  assert "batch dim -2: only a has it -> 5" in text
  assert "batch dim -1: 1 and 3: the 1 stretches -> 3" in text
  assert "(4, 2) @ (2, 1) -> (4, 1)" in text
  assert lines[-1] == "result: (5, 3, 4, 1)"


def test_explain_one_d_promotion():
  text = jmat.explain((3,), (2, 3, 4))
  assert "a is 1-D: prepend a 1 -> (1, 3)" in text
  assert "drop the dims added for 1-D operands: (2, 1, 4) -> (2, 4)" in text
  assert text.endswith("result: (2, 4)")
  text = jmat.explain((2, 3, 4), (4,))
  assert "b is 1-D: append a 1 -> (4, 1)" in text
  assert text.endswith("result: (2, 3)")


def test_explain_bmm_document_example_and_mistakes():
  ok = jmat.explain((2, 1, 10), (2, 10, 4), op="bmm")
  assert "each of the 2 pairs: (1, 10) @ (10, 4) -> (1, 4)" in ok
  assert ok.endswith("result: (2, 1, 4)")
  batch = jmat.explain((2, 1, 10), (3, 10, 4), op="bmm")
  assert "bmm does not broadcast" in batch
  assert batch.endswith("result: none, jmat.bmm raises ShapeError")
  order = jmat.explain((2, 10, 1), (2, 10, 4), op="bmm")
  assert "did you mean a of shape (2, 1, 10)?" in order


@pytest.mark.parametrize("shape_a, shape_b", invalid_matmul_pairs())
def test_explain_stops_at_the_failing_step(shape_a, shape_b):
  assert _brute_force_matmul_shape(shape_a, shape_b) is None  # numpy refuses the pair too
  text = jmat.explain(shape_a, shape_b)
  fails = [line for line in text.splitlines() if ". fails: " in line]
  assert len(fails) == 1
  assert f"a has shape {shape_a}, b has shape {shape_b}" in fails[0]
  assert text.splitlines()[-1] == "result: none, jmat.matmul raises ShapeError"


# op -> (torch's function of two tensors, a valid pair of shapes).
TORCH_OPS = {
    "mm": (torch.mm, (3, 5), (5, 7)),
    "bmm": (torch.bmm, (2, 3, 5), (2, 5, 7)),
    "dot": (torch.dot, (5,), (5,)),
    "mv": (torch.mv, (3, 5), (5,)),
    "vdot": (torch.vdot, (5,), (5,)),
    "inner": (torch.inner, (2, 3, 5), (7, 5)),
    "outer": (torch.outer, (3,), (7,)),
    "tensordot": (torch.tensordot, (3, 5, 7), (5, 7, 2)),
    "linear": (torch.nn.functional.linear, (2, 3, 5), (7, 5)),
}


@pytest.mark.parametrize("op", sorted(TORCH_OPS))
def test_explain_other_ops_end_in_torchs_shape(op):
  fn, shape_a, shape_b = TORCH_OPS[op]
  expected = tuple(fn(torch.zeros(shape_a), torch.zeros(shape_b)).shape)
  assert jmat.explain(shape_a, shape_b, op=op).endswith(f"result: {expected}")


def test_unknown_op_and_bad_shapes_are_refused():
  with pytest.raises(ValueError, match=r"unknown op 'matmal'; known ops: .*matmul"):
    jmat.matmul_shape((2, 3), (3, 2), op="matmal")
  with pytest.raises(TypeError, match=r"shape_a must be a tuple of non-negative ints"):
    jmat.matmul_shape((2, -3), (3, 2))
  with pytest.raises(TypeError, match=r"shape_b must be a shape"):
    jmat.explain((2, 3), 3)
