"""Every input check and every error message of jmat.

A user mistake is reported here, in Python, before any XLA computation is
traced: shapes and dtypes are static under ``jax.jit``, so the checks run once
per compilation and cost nothing on later calls. Messages always name the
operation, the shapes as Python tuples (or the dtypes) and what would be valid.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np

Shape = tuple[int, ...]


class ShapeError(ValueError):
  """An operand has a shape the operation cannot accept.

  A subclass of :class:`ValueError`, so code that catches ``ValueError`` keeps
  working. The message names the operation, every operand's shape and the rule
  that was broken.
  """


# The dtypes torch 2.13 multiplies on the CPU (and XLA on every backend). Others,
# such as bool (torch: "not implemented for 'Bool'") and uint16/32/64, are refused.
SUPPORTED_DTYPES: tuple[np.dtype, ...] = tuple(
    np.dtype(d)
    for d in (
        jnp.float16,
        jnp.bfloat16,
        jnp.float32,
        jnp.float64,
        jnp.int8,
        jnp.int16,
        jnp.int32,
        jnp.int64,
        jnp.uint8,
        jnp.complex64,
        jnp.complex128,
    )
)


def fmt_shape(shape: Sequence[int]) -> str:
  """Formats a shape as the Python tuple a user would type: ``(3,)``, ``(2, 1)``."""
  return str(tuple(int(d) for d in shape))


def _described(name: str, shape: Shape) -> str:
  return f"{name} has shape {fmt_shape(shape)}"


def both_shapes(shape_a: Shape, shape_b: Shape, names: tuple[str, str] = ("a", "b")) -> str:
  """``"a has shape (2, 3), b has shape (4,)"``: the phrase every shape error carries."""
  return f"{_described(names[0], shape_a)}, {_described(names[1], shape_b)}"


def shape_error(op: str, problem: str, shapes: str, advice: str = "") -> ShapeError:
  """Builds the one message format of jmat: ``jmat.OP: PROBLEM: SHAPES; ADVICE``."""
  message = f"jmat.{op}: {problem}: {shapes}"
  if advice:
    message += f"; {advice}"
  return ShapeError(message)


def _rank_phrase(ranks: Sequence[int]) -> str:
  words = [f"{r}-D" for r in ranks]
  return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " or " + words[-1]


def check_ranks(
    op: str,
    shapes: Sequence[Shape],
    allowed: Sequence[Sequence[int]],
    expected: str,
    names: Sequence[str] = ("a", "b"),
    advice: str = "",
) -> None:
  """Refuses operands whose rank is not among ``allowed`` (one tuple of ranks per operand).

  Args:
    op: the public name of the operation, e.g. ``"bmm"``.
    shapes: the operands' shapes.
    allowed: for each operand, the ranks it may have.
    expected: what the operation takes, in words, e.g. ``"two 3-D arrays (b, n, m) and
      (b, m, p)"``.
    names: the operands' names in the message.
    advice: what to call instead.
  """
  if all(len(s) in ok for s, ok in zip(shapes, allowed, strict=True)):
    return
  got = ", ".join(
      f"{_described(n, s)} ({len(s)}-D)" for n, s in zip(names, shapes, strict=True)
  )
  wanted = "; ".join(
      f"{n} must be {_rank_phrase(ok)}"
      for n, s, ok in zip(names, shapes, allowed, strict=True)
      if len(s) not in ok
  )
  message = f"jmat.{op}: expects {expected}, but {got}: {wanted}"
  if advice:
    message += f" ({advice})"
  raise ShapeError(message)


def _dtype_name(dtype: np.dtype) -> str:
  return np.dtype(dtype).name


def check_dtypes(op: str, dtypes: Sequence[np.dtype], names: Sequence[str] = ("a", "b")) -> None:
  """Refuses unsupported dtypes and operands whose dtypes differ (as torch does).

  ``jnp.matmul`` silently promotes ``float32 @ float64`` to ``float64``; torch
  refuses it, and so does jmat, so that a port never changes precision silently.

  Raises:
    TypeError: naming the operation and every operand's dtype.
  """
  for name, dtype in zip(names, dtypes, strict=True):
    if np.dtype(dtype) not in SUPPORTED_DTYPES:
      supported = ", ".join(_dtype_name(d) for d in SUPPORTED_DTYPES)
      is_bool = np.dtype(dtype) == np.bool_
      hint = " (cast with .astype(jnp.int32) or .astype(jnp.float32))" if is_bool else ""
      raise TypeError(
          f"jmat.{op}: {name} has dtype {_dtype_name(dtype)}, which matrix products do not "
          f"support{hint}; supported dtypes: {supported}"
      )
  if len({np.dtype(d) for d in dtypes}) > 1:
    listed = ", ".join(
        f"{n} is {_dtype_name(d)}" for n, d in zip(names, dtypes, strict=True)
    )
    raise TypeError(
        f"jmat.{op}: dtypes differ: {listed}; like torch, jmat does not promote mixed "
        f"dtypes (jnp would silently): cast one operand, e.g. "
        f"{names[1]}.astype({names[0]}.dtype)"
    )


def check_contraction(
    op: str,
    shape_a: Shape,
    shape_b: Shape,
    axis_a: int,
    axis_b: int,
    names: tuple[str, str] = ("a", "b"),
) -> None:
  """Refuses operands whose contracted dimensions differ.

  Args:
    op: the public name of the operation.
    shape_a: the first operand's shape (as the user passed it).
    shape_b: the second operand's shape (as the user passed it).
    axis_a: the contracted axis of ``shape_a`` (negative, counted from the end).
    axis_b: the contracted axis of ``shape_b`` (negative, counted from the end).
    names: the operands' names in the message.
  """
  k_a, k_b = shape_a[axis_a], shape_b[axis_b]
  if k_a == k_b:
    return
  where_a, where_b = _axis_words(axis_a), _axis_words(axis_b)
  advice = f"{names[0]}'s {where_a} ({k_a}) must equal {names[1]}'s {where_b} ({k_b})"
  hint = _transpose_hint(shape_a, shape_b, axis_a, axis_b, names)
  if hint:
    advice += f"; {hint}"
  raise shape_error(
      op, f"contracted sizes {k_a} and {k_b} differ", both_shapes(shape_a, shape_b, names), advice
  )


def _axis_words(axis: int) -> str:
  return {-1: "last dim", -2: "second-to-last dim"}.get(axis, f"dim {axis}")


def _transpose_hint(
    shape_a: Shape, shape_b: Shape, axis_a: int, axis_b: int, names: tuple[str, str]
) -> str:
  """Suggests the swap of the last two axes that would make the product valid, if one does."""
  if len(shape_a) >= 2 and axis_a == -1 and shape_a[-2] == shape_b[axis_b]:
    swapped = shape_a[:-2] + (shape_a[-1], shape_a[-2])
    return (
        f"did you mean {names[0]} of shape {fmt_shape(swapped)}? "
        f"(jnp.swapaxes({names[0]}, -2, -1))"
    )
  if len(shape_b) >= 2 and axis_b == -2 and shape_b[-1] == shape_a[axis_a]:
    swapped = shape_b[:-2] + (shape_b[-1], shape_b[-2])
    return (
        f"did you mean {names[1]} of shape {fmt_shape(swapped)}? "
        f"(jnp.swapaxes({names[1]}, -2, -1))"
    )
  return ""


def broadcast_dim_error(
    op: str,
    shape_a: Shape,
    shape_b: Shape,
    batch_a: Shape,
    batch_b: Shape,
    position: int,
    names: tuple[str, str] = ("a", "b"),
) -> ShapeError:
  """The error for batch dimensions that cannot be broadcast together.

  Args:
    op: the public name of the operation.
    shape_a: the first operand's full shape.
    shape_b: the second operand's full shape.
    batch_a: the first operand's batch dimensions.
    batch_b: the second operand's batch dimensions.
    position: the clashing batch dimension, counted from the right (-1 is the last).
  """
  size_a, size_b = batch_a[position], batch_b[position]
  return shape_error(
      op,
      f"batch dimensions {fmt_shape(batch_a)} and {fmt_shape(batch_b)} do not broadcast",
      both_shapes(shape_a, shape_b, names),
      f"aligned from the right, batch dim {position} has sizes {size_a} and {size_b}; "
      f"broadcasting needs equal sizes or a 1 in one of them",
  )


def check_bmm_batch(op: str, shape_a: Shape, shape_b: Shape) -> None:
  """bmm, unlike matmul, never broadcasts: the batch sizes must be equal."""
  if shape_a[0] != shape_b[0]:
    raise shape_error(
        op,
        f"batch sizes differ ({shape_a[0]} and {shape_b[0]})",
        both_shapes(shape_a, shape_b),
        f"{op} does not broadcast (use jmat.matmul to broadcast batch dimensions)",
    )
