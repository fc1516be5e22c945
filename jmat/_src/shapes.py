"""Pure shape algebra of the matrix-product family: result shapes and their derivation.

One derivation per operation serves three callers, so they can never disagree:
the products (which call :func:`derive` at trace time to validate their
operands), :func:`matmul_shape` (the result shape from shapes alone) and
:func:`explain` (the same derivation, printed step by step, in the manner of the
torch.matmul and torch.bmm explainers jmat was built from).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

from jmat._src import checks
from jmat._src.checks import Shape, ShapeError, fmt_shape


@dataclasses.dataclass
class Derivation:
  """The steps of one shape derivation, in words; collected only for :func:`explain`."""

  op: str
  steps: list[str] = dataclasses.field(default_factory=list)

  def note(self, text: str) -> None:
    self.steps.append(text)


Rule = Callable[[Derivation, Shape, Shape], Shape]


@dataclasses.dataclass(frozen=True)
class BatchPlan:
  """How two stacks of matrices broadcast: the batch shape and who carries each batch dim.

  Attributes:
    shape: the broadcast batch shape of the result.
    mapped_a: per batch dim, whether ``a`` has that dim at the result's size (it is
      mapped over); ``False`` where ``a`` lacks it or has a 1 that is stretched.
    mapped_b: the same for ``b``.
  """

  shape: Shape
  mapped_a: tuple[bool, ...]
  mapped_b: tuple[bool, ...]


def broadcast_batch(
    op: str,
    shape_a: Shape,
    shape_b: Shape,
    batch_a: Shape,
    batch_b: Shape,
    derivation: Derivation | None = None,
) -> BatchPlan:
  """Broadcasts two batch shapes NumPy-style (aligned from the right), or raises ShapeError.

  Args:
    op: the public name of the operation, for the error message.
    shape_a: the first operand's full shape, for the error message.
    shape_b: the second operand's full shape, for the error message.
    batch_a: the first operand's batch dimensions.
    batch_b: the second operand's batch dimensions.
    derivation: where to note the steps, if anyone is listening.
  """
  rank = max(len(batch_a), len(batch_b))
  padded_a: tuple[int | None, ...] = (None,) * (rank - len(batch_a)) + tuple(batch_a)
  padded_b: tuple[int | None, ...] = (None,) * (rank - len(batch_b)) + tuple(batch_b)
  shape: list[int] = []
  mapped_a: list[bool] = []
  mapped_b: list[bool] = []
  words: list[str] = []
  for i, (da, db) in enumerate(zip(padded_a, padded_b, strict=True)):
    sizes = [d for d in (da, db) if d is not None]
    stretched = [d for d in sizes if d != 1]
    if len(set(stretched)) > 1:
      raise checks.broadcast_dim_error(op, shape_a, shape_b, batch_a, batch_b, i - rank)
    out = stretched[0] if stretched else 1
    shape.append(out)
    mapped_a.append(da == out)
    mapped_b.append(db == out)
    words.append(f"batch dim {i - rank}: {_broadcast_words(da, db, out)}")
  if derivation is not None and rank:
    derivation.note(
        "broadcast the batch dims, aligned from the right:\n"
        + _aligned_row("a batch", padded_a)
        + "\n"
        + _aligned_row("b batch", padded_b)
        + "".join(f"\n  {w}" for w in words)
        + f"\n  batch shape: {fmt_shape(shape)}"
    )
  return BatchPlan(tuple(shape), tuple(mapped_a), tuple(mapped_b))


def _aligned_row(label: str, dims: Sequence[int | None]) -> str:
  return f"  {label}: " + " ".join(f"{'-' if d is None else d:>4}" for d in dims)


def _broadcast_words(da: int | None, db: int | None, out: int) -> str:
  if da is None or db is None:
    return f"only {'a' if db is None else 'b'} has it -> {out}"
  if da == db:
    return f"{da} and {db} are equal -> {out}"
  return f"{da} and {db}: the 1 stretches -> {out}"


def _check_not_scalar(op: str, shape_a: Shape, shape_b: Shape) -> None:
  if len(shape_a) == 0 or len(shape_b) == 0:
    raise checks.shape_error(
        op,
        "both arguments must be at least 1-D",
        checks.both_shapes(shape_a, shape_b),
        "0-D arrays are scalars: scale with a * b instead (torch.matmul refuses 0-D too, "
        "whatever some tutorials say)",
    )


def _matmul_rule(d: Derivation, shape_a: Shape, shape_b: Shape) -> Shape:
  op = d.op
  _check_not_scalar(op, shape_a, shape_b)
  d.note(f"a {fmt_shape(shape_a)} is {len(shape_a)}-D, b {fmt_shape(shape_b)} is {len(shape_b)}-D")
  mat_a, mat_b = shape_a, shape_b
  if len(shape_a) == 1:
    mat_a = (1,) + shape_a
    d.note(f"a is 1-D: prepend a 1 -> {fmt_shape(mat_a)} (removed again from the result)")
  if len(shape_b) == 1:
    mat_b = shape_b + (1,)
    d.note(f"b is 1-D: append a 1 -> {fmt_shape(mat_b)} (removed again from the result)")
  d.note(
      f"matrices: a's last two dims {fmt_shape(mat_a[-2:])}, b's last two dims "
      f"{fmt_shape(mat_b[-2:])}; batch dims: a {fmt_shape(mat_a[:-2])}, b {fmt_shape(mat_b[:-2])}"
  )
  plan = broadcast_batch(op, shape_a, shape_b, mat_a[:-2], mat_b[:-2], d)
  checks.check_contraction(op, shape_a, shape_b, -1, -2 if len(shape_b) > 1 else -1)
  n, k, p = mat_a[-2], mat_a[-1], mat_b[-1]
  d.note(f"contract: a's last dim {k} == b's {'second-to-last' if len(shape_b) > 1 else 'only'} "
         f"dim {k}: ({n}, {k}) @ ({k}, {p}) -> ({n}, {p})")
  result = plan.shape + (n, p)
  if plan.shape:
    d.note(
        f"result: batch shape {fmt_shape(plan.shape)} + matrix ({n}, {p}) -> {fmt_shape(result)}"
    )
  if len(shape_a) == 1 or len(shape_b) == 1:
    kept = plan.shape + ((n,) if len(shape_a) > 1 else ()) + ((p,) if len(shape_b) > 1 else ())
    d.note(f"drop the dims added for 1-D operands: {fmt_shape(result)} -> {fmt_shape(kept)}")
    result = kept
  return result


def _mm_rule(d: Derivation, shape_a: Shape, shape_b: Shape) -> Shape:
  checks.check_ranks(
      d.op, (shape_a, shape_b), ((2,), (2,)), "two 2-D arrays (n, m) and (m, p)",
      advice="jmat.bmm multiplies stacks of matrices, jmat.matmul any ranks",
  )
  d.note(f"a {fmt_shape(shape_a)} and b {fmt_shape(shape_b)} are both 2-D")
  checks.check_contraction(d.op, shape_a, shape_b, -1, -2)
  (n, k), p = shape_a, shape_b[1]
  d.note(f"contract: a's columns ({k}) == b's rows ({k}): ({n}, {k}) @ ({k}, {p}) -> ({n}, {p})")
  return (n, p)


def _bmm_rule(d: Derivation, shape_a: Shape, shape_b: Shape) -> Shape:
  checks.check_ranks(
      d.op, (shape_a, shape_b), ((3,), (3,)), "two 3-D arrays (b, n, m) and (b, m, p)",
      advice="jmat.mm multiplies 2-D matrices, jmat.matmul any ranks",
  )
  d.note(f"a {fmt_shape(shape_a)} and b {fmt_shape(shape_b)} are both 3-D")
  checks.check_bmm_batch(d.op, shape_a, shape_b)
  batch, n, k = shape_a
  p = shape_b[2]
  d.note(f"batch sizes are equal ({batch}); bmm never broadcasts")
  checks.check_contraction(d.op, shape_a, shape_b, -1, -2)
  d.note(f"each of the {batch} pairs: ({n}, {k}) @ ({k}, {p}) -> ({n}, {p})")
  d.note(f"stack the {batch} results -> {fmt_shape((batch, n, p))}")
  return (batch, n, p)


def _dot_rule(d: Derivation, shape_a: Shape, shape_b: Shape) -> Shape:
  checks.check_ranks(
      d.op, (shape_a, shape_b), ((1,), (1,)), "two 1-D arrays of equal length",
      advice="jmat.matmul multiplies any ranks, jmat.inner contracts the last dims",
  )
  checks.check_contraction(d.op, shape_a, shape_b, -1, -1)
  d.note(f"a and b are 1-D of length {shape_a[0]}: sum of the {shape_a[0]} products -> ()")
  return ()


def _mv_rule(d: Derivation, shape_a: Shape, shape_b: Shape) -> Shape:
  checks.check_ranks(
      d.op, (shape_a, shape_b), ((2,), (1,)), "a 2-D matrix (n, m) and a 1-D vector (m,)",
      advice="jmat.matmul multiplies any ranks",
  )
  checks.check_contraction(d.op, shape_a, shape_b, -1, -1)
  n, k = shape_a
  d.note(f"({n}, {k}) @ ({k},) -> ({n},): one dot product per row of a")
  return (n,)


RULES: dict[str, Rule] = {
    "matmul": _matmul_rule,
    "mm": _mm_rule,
    "bmm": _bmm_rule,
    "dot": _dot_rule,
    "mv": _mv_rule,
}


def _as_shape(name: str, shape: object) -> Shape:
  """Validates a user-given shape: a sequence of non-negative Python ints."""
  try:
    dims = tuple(shape)  # type: ignore[arg-type]
  except TypeError:
    raise TypeError(f"jmat: {name} must be a shape, a tuple of ints, not {shape!r}") from None
  for d in dims:
    if isinstance(d, bool) or not isinstance(d, int) or d < 0:
      raise TypeError(f"jmat: {name} must be a tuple of non-negative ints, got {shape!r}")
  return dims


def _rule(op: str) -> Rule:
  try:
    return RULES[op]
  except KeyError:
    raise ValueError(f"jmat: unknown op {op!r}; known ops: {', '.join(sorted(RULES))}") from None


def derive(op: str, shape_a: Shape, shape_b: Shape) -> Shape:
  """The result shape of ``op`` on operands of these shapes; raises ShapeError if invalid."""
  return _rule(op)(Derivation(op), tuple(shape_a), tuple(shape_b))


def matmul_shape(shape_a: Sequence[int], shape_b: Sequence[int], /, *, op: str = "matmul") -> Shape:
  """The shape of ``jmat.<op>(a, b)`` computed from the shapes alone, without any array.

  Args:
    shape_a: the shape of the first operand.
    shape_b: the shape of the second operand.
    op: one of ``"matmul"``, ``"mm"``, ``"bmm"``, ``"dot"``, ``"mv"``.

  Returns:
    The result shape as a tuple of ints.

  Raises:
    ShapeError: if ``op`` refuses operands of these shapes (the same message the
      operation itself would raise).

  Example:
    >>> jmat.matmul_shape((5, 1, 4, 2), (3, 2, 1))
    (5, 3, 4, 1)
    >>> jmat.matmul_shape((3,), (2, 3, 4))
    (2, 4)
  """
  rule = _rule(op)
  return rule(Derivation(op), _as_shape("shape_a", shape_a), _as_shape("shape_b", shape_b))


def explain(shape_a: Sequence[int], shape_b: Sequence[int], /, *, op: str = "matmul") -> str:
  """How the result shape of ``jmat.<op>(a, b)`` is derived, step by step.

  For an invalid pair, the derivation stops at the step that fails and says why,
  with the error message the operation would raise.

  Args:
    shape_a: the shape of the first operand.
    shape_b: the shape of the second operand.
    op: one of ``"matmul"``, ``"mm"``, ``"bmm"``, ``"dot"``, ``"mv"``.

  Returns:
    A multi-line text whose last line starts with ``result:``.

  Example:
    >>> print(jmat.explain((2, 1, 10), (2, 10, 4), op="bmm"))
    jmat.bmm: a (2, 1, 10), b (2, 10, 4)
      1. a (2, 1, 10) and b (2, 10, 4) are both 3-D
      2. batch sizes are equal (2); bmm never broadcasts
      3. each of the 2 pairs: (1, 10) @ (10, 4) -> (1, 4)
      4. stack the 2 results -> (2, 1, 4)
    result: (2, 1, 4)
  """
  rule = _rule(op)
  a, b = _as_shape("shape_a", shape_a), _as_shape("shape_b", shape_b)
  d = Derivation(op)
  try:
    outcome = f"result: {fmt_shape(rule(d, a, b))}"
  except ShapeError as error:
    d.note(f"fails: {error}")
    outcome = f"result: none, jmat.{op} raises ShapeError"
  lines = [f"jmat.{op}: a {fmt_shape(a)}, b {fmt_shape(b)}"]
  for i, step in enumerate(d.steps, start=1):
    first, *rest = step.split("\n")
    lines.append(f"  {i}. {first}")
    lines.extend(f"     {line}" for line in rest)
  lines.append(outcome)
  return "\n".join(lines)
