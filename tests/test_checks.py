"""Every error message of the core ops: the exception type and what the message says."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jmat


def _raises(exc, fn, shape_a, shape_b, dtype_b=jnp.float32):
  with pytest.raises(exc) as info:
    fn(jnp.zeros(shape_a, jnp.float32), jnp.zeros(shape_b, dtype_b))
  return str(info.value)


def test_shape_error_is_a_value_error():
  assert issubclass(jmat.ShapeError, ValueError)


def test_bmm_batch_mismatch_says_bmm_does_not_broadcast():
  message = _raises(jmat.ShapeError, jmat.bmm, (2, 1, 10), (3, 10, 4))
  assert message == (
      "jmat.bmm: batch sizes differ (2 and 3): a has shape (2, 1, 10), b has shape (3, 10, 4); "
      "bmm does not broadcast (use jmat.matmul to broadcast batch dimensions)"
  )


def test_bmm_wrong_axis_order_suggests_the_swap():
  message = _raises(jmat.ShapeError, jmat.bmm, (2, 10, 1), (2, 10, 4))
  assert message.startswith("jmat.bmm: contracted sizes 1 and 10 differ: ")
  assert "a has shape (2, 10, 1), b has shape (2, 10, 4)" in message
  assert "did you mean a of shape (2, 1, 10)? (jnp.swapaxes(a, -2, -1))" in message


def test_swap_hint_for_b():
  message = _raises(jmat.ShapeError, jmat.matmul, (3, 5), (7, 5))
  assert "did you mean b of shape (5, 7)? (jnp.swapaxes(b, -2, -1))" in message


def test_no_swap_hint_when_no_swap_helps():
  message = _raises(jmat.ShapeError, jmat.matmul, (2, 3, 4), (2, 5, 6))
  assert "contracted sizes 4 and 5 differ" in message
  assert "a's last dim (4) must equal b's second-to-last dim (5)" in message
  assert "did you mean" not in message


@pytest.mark.parametrize(
    "fn, shape_a, shape_b, expected",
    [
        (jmat.bmm, (1, 10), (10, 4), "expects two 3-D arrays (b, n, m) and (b, m, p), but a has "
         "shape (1, 10) (2-D), b has shape (10, 4) (2-D): a must be 3-D; b must be 3-D"),
        (jmat.mm, (2, 3, 4), (4, 5), "expects two 2-D arrays (n, m) and (m, p), but a has shape "
         "(2, 3, 4) (3-D), b has shape (4, 5) (2-D): a must be 2-D"),
        (jmat.dot, (2, 3), (3,), "expects two 1-D arrays of equal length, but a has shape (2, 3) "
         "(2-D), b has shape (3,) (1-D): a must be 1-D"),
        (jmat.mv, (3, 4), (4, 1), "expects a 2-D matrix (n, m) and a 1-D vector (m,), but a has "
         "shape (3, 4) (2-D), b has shape (4, 1) (2-D): b must be 1-D"),
    ],
)
def test_rank_errors_name_both_shapes_and_the_valid_ranks(fn, shape_a, shape_b, expected):
  message = _raises(jmat.ShapeError, fn, shape_a, shape_b)
  assert message.startswith(f"jmat.{fn.__name__}: {expected}")


def test_dot_length_mismatch():
  message = _raises(jmat.ShapeError, jmat.dot, (3,), (4,))
  assert message.startswith("jmat.dot: contracted sizes 3 and 4 differ: a has shape (3,), b has ")
  assert "a's last dim (3) must equal b's last dim (4)" in message


def test_matmul_zero_d_refused_with_a_reason():
  message = _raises(jmat.ShapeError, jmat.matmul, (), (3,))
  assert message.startswith(
      "jmat.matmul: both arguments must be at least 1-D: a has shape (), b has shape (3,)"
  )
  assert "torch.matmul refuses 0-D too" in message


def test_matmul_batch_clash_names_the_dim():
  message = _raises(jmat.ShapeError, jmat.matmul, (5, 2, 3, 4), (3, 4, 6))
  assert message.startswith("jmat.matmul: batch dimensions (5, 2) and (3,) do not broadcast: ")
  assert "aligned from the right, batch dim -1 has sizes 2 and 3" in message


def test_mixed_dtypes_name_both_dtypes():
  message = _raises(TypeError, jmat.mm, (2, 3), (3, 2), jnp.int32)
  assert message.startswith("jmat.mm: dtypes differ: a is float32, b is int32;")
  assert "b.astype(a.dtype)" in message


def test_bool_refused_with_a_cast_hint():
  with pytest.raises(TypeError, match=r"jmat.bmm: a has dtype bool, .*\.astype\(jnp.int32\)"):
    jmat.bmm(jnp.ones((2, 2, 2), bool), jnp.ones((2, 2, 2), bool))


def test_lists_are_refused_like_jnp():
  with pytest.raises(TypeError, match=r"jmat.dot: a must be an array, got list; .*jnp.asarray"):
    jmat.dot([1, 2, 3], jnp.array([4, 5, 6]))


def test_errors_surface_under_jit_and_vmap_as_shape_errors():
  """Checks run at trace time: a user mistake is never an XLA traceback, even inside jit/vmap."""
  with pytest.raises(jmat.ShapeError, match=r"jmat.mm: contracted sizes 3 and 4 differ"):
    jax.jit(lambda a, b: jmat.mm(a, b))(jnp.ones((2, 3)), jnp.ones((4, 2)))
  with pytest.raises(jmat.ShapeError, match=r"jmat.mm: contracted sizes 3 and 4 differ"):
    jax.vmap(jmat.mm)(np.ones((5, 2, 3)), np.ones((5, 4, 2)))


def test_out_sharding_longer_than_the_result_is_refused():
  with pytest.raises(jmat.ShapeError, match=r"jmat.mm: out_sharding \(None, None, None\) has 3 "
                     r"entries, but the result has shape \(2, 2\) \(2-D\)"):
    jmat.mm(jnp.ones((2, 3)), jnp.ones((3, 2)), out_sharding=jax.sharding.PartitionSpec(
        None, None, None))
