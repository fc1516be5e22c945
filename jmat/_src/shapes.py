"""Pure shape algebra of the matrix-product family: result shapes and their derivation.

One derivation per operation serves three callers, so they can never disagree:
the products (which call :func:`derive` at trace time to validate their
operands), :func:`matmul_shape` (the result shape from shapes alone) and
:func:`explain` (the same derivation, printed step by step, in the manner of the
torch.matmul and torch.bmm explainers jmat was built from).
"""

from __future__ import annotations

import dataclasses
import operator
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


Rule = Callable[..., Shape]


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
    names: tuple[str, str] = ("a", "b"),
) -> BatchPlan:
  """Broadcasts two batch shapes NumPy-style (aligned from the right), or raises ShapeError.

  Args:
    op: the public name of the operation, for the error message.
    shape_a: the first operand's full shape, for the error message.
    shape_b: the second operand's full shape, for the error message.
    batch_a: the first operand's batch dimensions.
    batch_b: the second operand's batch dimensions.
    derivation: where to note the steps, if anyone is listening.
    names: the operands' names in the message and the steps.
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
      raise checks.broadcast_dim_error(op, shape_a, shape_b, batch_a, batch_b, i - rank, names)
    out = stretched[0] if stretched else 1
    shape.append(out)
    mapped_a.append(da == out)
    mapped_b.append(db == out)
    words.append(f"batch dim {i - rank}: {_broadcast_words(da, db, out, names)}")
  if derivation is not None and rank:
    derivation.note(
        "broadcast the batch dims, aligned from the right:\n"
        + _aligned_row(f"{names[0]} batch", padded_a)
        + "\n"
        + _aligned_row(f"{names[1]} batch", padded_b)
        + "".join(f"\n  {w}" for w in words)
        + f"\n  batch shape: {fmt_shape(shape)}"
    )
  return BatchPlan(tuple(shape), tuple(mapped_a), tuple(mapped_b))


def _aligned_row(label: str, dims: Sequence[int | None]) -> str:
  return f"  {label}: " + " ".join(f"{'-' if d is None else d:>4}" for d in dims)


def _broadcast_words(
    da: int | None, db: int | None, out: int, names: tuple[str, str] = ("a", "b")
) -> str:
  if da is None or db is None:
    return f"only {names[0] if db is None else names[1]} has it -> {out}"
  if da == db:
    return f"{da} and {db} are equal -> {out}"
  return f"{da} and {db}: the 1 stretches -> {out}"


def _matmul_rule(d: Derivation, shape_a: Shape, shape_b: Shape) -> Shape:
  op = d.op
  checks.check_not_scalar(op, shape_a, shape_b)
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


# --- the rest of torch's product family -----------------------------------------------------
# These rules take ``(derivation, *shapes, **options)``: the add* ops take ``input_shape``,
# linear ``bias_shape``, tensordot ``dims`` and vecdot ``dim``; the chains take any number of
# shapes.

ChainTree = int | tuple["ChainTree", "ChainTree"]


def _added(d: Derivation, name: str, shape: Shape | None, result: Shape, what: str) -> Shape:
  """Checks that the added operand (input, bias) broadcasts to ``result``, one-way as torch."""
  if shape is not None:
    checks.check_expand(d.op, name, shape, result, what)
    d.note(f"{name} {fmt_shape(shape)} broadcasts to {what}'s shape {fmt_shape(result)}")
  return result


def _scaled(d: Derivation, input_shape: Shape | None, product: Shape) -> Shape:
  _added(d, "input", input_shape, product, "the product")
  d.note(f"result: beta * input + alpha * product -> {fmt_shape(product)}")
  return product


def _addmm_rule(d: Derivation, mat1: Shape, mat2: Shape, *, input_shape: Shape | None = None):
  names = ("mat1", "mat2")
  checks.check_ranks(
      d.op, (mat1, mat2), ((2,), (2,)), "two 2-D matrices mat1 (n, m) and mat2 (m, p)", names,
      advice="jmat.baddbmm adds to a stack of products, jmat.addmv to a matrix-vector product",
  )
  checks.check_contraction(d.op, mat1, mat2, -1, -2, names)
  (n, k), p = mat1, mat2[1]
  d.note(f"product: mat1 @ mat2: ({n}, {k}) @ ({k}, {p}) -> ({n}, {p})")
  return _scaled(d, input_shape, (n, p))


def _addmv_rule(d: Derivation, mat: Shape, vec: Shape, *, input_shape: Shape | None = None):
  names = ("mat", "vec")
  checks.check_ranks(
      d.op, (mat, vec), ((2,), (1,)), "a 2-D matrix mat (n, m) and a 1-D vector vec (m,)", names,
      advice="jmat.addmm adds to a matrix product",
  )
  checks.check_contraction(d.op, mat, vec, -1, -1, names)
  n, k = mat
  d.note(f"product: mat @ vec: ({n}, {k}) @ ({k},) -> ({n},)")
  return _scaled(d, input_shape, (n,))


def _addr_rule(d: Derivation, vec1: Shape, vec2: Shape, *, input_shape: Shape | None = None):
  names = ("vec1", "vec2")
  checks.check_ranks(
      d.op, (vec1, vec2), ((1,), (1,)), "two 1-D vectors vec1 (n,) and vec2 (p,)", names,
      advice="jmat.addmm adds to a matrix product",
  )
  d.note(f"product: the outer product of vec1 and vec2: ({vec1[0]},) x ({vec2[0]},) -> "
         f"({vec1[0]}, {vec2[0]})")
  return _scaled(d, input_shape, (vec1[0], vec2[0]))


def _batches_rule(d: Derivation, batch1: Shape, batch2: Shape) -> tuple[int, int, int, int]:
  names = ("batch1", "batch2")
  checks.check_ranks(
      d.op, (batch1, batch2), ((3,), (3,)), "two 3-D arrays batch1 (b, n, m) and batch2 (b, m, p)",
      names, advice="jmat.addmm takes 2-D matrices",
  )
  checks.check_bmm_batch(d.op, batch1, batch2, names)
  checks.check_contraction(d.op, batch1, batch2, -1, -2, names)
  b, n, k = batch1
  p = batch2[2]
  d.note(f"each of the {b} pairs: ({n}, {k}) @ ({k}, {p}) -> ({n}, {p}); no broadcasting")
  return b, n, k, p


def _baddbmm_rule(
    d: Derivation, batch1: Shape, batch2: Shape, *, input_shape: Shape | None = None
) -> Shape:
  b, n, _, p = _batches_rule(d, batch1, batch2)
  d.note(f"product: stack the {b} products -> ({b}, {n}, {p})")
  return _scaled(d, input_shape, (b, n, p))


def _addbmm_rule(
    d: Derivation, batch1: Shape, batch2: Shape, *, input_shape: Shape | None = None
) -> Shape:
  b, n, _, p = _batches_rule(d, batch1, batch2)
  d.note(f"product: sum the {b} products -> ({n}, {p})")
  return _scaled(d, input_shape, (n, p))


def _inner_rule(d: Derivation, shape_a: Shape, shape_b: Shape) -> Shape:
  if not shape_a or not shape_b:
    result = shape_a or shape_b
    d.note(f"a 0-D operand is a scalar: the elementwise product -> {fmt_shape(result)}")
    return result
  checks.check_contraction(d.op, shape_a, shape_b, -1, -1)
  result = shape_a[:-1] + shape_b[:-1]
  d.note(f"contract the last dims ({shape_a[-1]}): a's other dims {fmt_shape(shape_a[:-1])} + "
         f"b's other dims {fmt_shape(shape_b[:-1])} -> {fmt_shape(result)}")
  return result


def _outer_rule(d: Derivation, shape_a: Shape, shape_b: Shape) -> Shape:
  checks.check_ranks(
      d.op, (shape_a, shape_b), ((1,), (1,)), "two 1-D vectors",
      advice="jmat.tensordot(a, b, dims=0) is the outer product of any ranks",
  )
  result = shape_a + shape_b
  d.note(f"every product a[i] * b[j]: ({shape_a[0]},) x ({shape_b[0]},) -> {fmt_shape(result)}")
  return result


def normalize_dims(op: str, dims: object) -> int | tuple[tuple[int, ...], tuple[int, ...]]:
  """``tensordot``'s ``dims`` as a hashable value: an int or two tuples of ints.

  Accepts what torch accepts: an int, a pair of sequences of ints (lists or
  tuples), or a 2-row nested list (or array).

  Raises:
    TypeError: if ``dims`` has another structure.
  """
  if isinstance(dims, bool):
    raise checks.dims_type_error(op, dims)
  try:
    return operator.index(dims)  # type: ignore[arg-type]
  except TypeError:
    pass
  try:
    rows = list(dims)  # type: ignore[call-overload]
  except TypeError:
    raise checks.dims_type_error(op, dims) from None
  if len(rows) != 2:
    raise checks.dims_type_error(op, dims)
  pair: list[tuple[int, ...]] = []
  for row in rows:
    try:
      items = list(row)
      if any(isinstance(item, bool) for item in items):
        raise TypeError
      pair.append(tuple(operator.index(item) for item in items))
    except TypeError:
      raise checks.dims_type_error(op, dims) from None
  return pair[0], pair[1]


def tensordot_axes(
    op: str, shape_a: Shape, shape_b: Shape, dims: object
) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """The contracted axes of a and b (non-negative), or raises TypeError/ShapeError."""
  parsed = normalize_dims(op, dims)
  if isinstance(parsed, int):
    checks.check_tensordot_count(op, shape_a, shape_b, parsed)
    return tuple(range(len(shape_a) - parsed, len(shape_a))), tuple(range(parsed))
  checks.check_tensordot_dims(op, shape_a, shape_b, *parsed)
  return (
      tuple(axis % len(shape_a) for axis in parsed[0]),
      tuple(axis % len(shape_b) for axis in parsed[1]),
  )


def _tensordot_rule(d: Derivation, shape_a: Shape, shape_b: Shape, *, dims: object = 2) -> Shape:
  axes_a, axes_b = tensordot_axes(d.op, shape_a, shape_b, dims)
  checks.check_tensordot_sizes(d.op, shape_a, shape_b, axes_a, axes_b)
  if axes_a:
    pairs = ", ".join(
        f"a dim {i} ({shape_a[i]}) with b dim {j} ({shape_b[j]})"
        for i, j in zip(axes_a, axes_b, strict=True)
    )
    d.note(f"contract {pairs}")
  else:
    d.note("dims=0: nothing is contracted, the result is the outer product")
  for i, j in zip(axes_a, axes_b, strict=True):
    if shape_a[i] != shape_b[j]:
      summed = "b" if shape_a[i] == 1 else "a"
      d.note(f"a size 1 meets size {max(shape_a[i], shape_b[j])}: {summed}'s dim is summed "
             f"out first, as torch does")
  free_a = tuple(s for i, s in enumerate(shape_a) if i not in axes_a)
  free_b = tuple(s for j, s in enumerate(shape_b) if j not in axes_b)
  result = free_a + free_b
  d.note(f"a's other dims {fmt_shape(free_a)} + b's other dims {fmt_shape(free_b)} -> "
         f"{fmt_shape(result)}")
  return result


def chain_order(dims: Sequence[int]) -> tuple[int, ChainTree]:
  """The cheapest parenthesisation of a chain of matrices, by dynamic programming.

  Args:
    dims: ``n + 1`` sizes; matrix ``i`` has shape ``(dims[i], dims[i + 1])``.

  Returns:
    ``(cost, tree)``: the number of scalar multiplications of the best order and the
    order itself, a leaf index ``i`` or a pair ``(left, right)`` of subtrees.
  """
  n = len(dims) - 1
  cost = [[0] * n for _ in range(n)]
  split = [[0] * n for _ in range(n)]
  for length in range(1, n):
    for i in range(n - length):
      j = i + length
      cost[i][j], split[i][j] = min(
          (cost[i][s] + cost[s + 1][j] + dims[i] * dims[s + 1] * dims[j + 1], s)
          for s in range(i, j)
      )

  def tree(i: int, j: int) -> ChainTree:
    return i if i == j else (tree(i, split[i][j]), tree(split[i][j] + 1, j))

  return cost[0][n - 1], tree(0, n - 1)


def _tree_words(tree: ChainTree) -> str:
  if isinstance(tree, int):
    return f"A{tree}"
  return f"({_tree_words(tree[0])} @ {_tree_words(tree[1])})"


def _chain_rule(d: Derivation, *chain: Shape) -> Shape:
  op, count = d.op, len(chain)
  names = operand_names(op, count)
  if op == "multi_dot":
    checks.check_count(op, count, 2, "arrays")
    allowed = ((1, 2),) + ((2,),) * (count - 2) + ((1, 2),)
    expected = (
        "2-D matrices, the first may be 1-D (a row vector) and the last 1-D (a column vector)"
    )
  else:
    checks.check_count(op, count, 1, "matrices")
    allowed, expected = ((2,),) * count, "2-D matrices (jmat.multi_dot also takes end vectors)"
  checks.check_ranks(op, chain, allowed, expected, names)
  for i in range(count - 1):
    axis_b = -2 if len(chain[i + 1]) == 2 else -1
    checks.check_contraction(op, chain[i], chain[i + 1], -1, axis_b, (names[i], names[i + 1]))
  mats = [((1,) + s if len(s) == 1 and i == 0 else s + (1,) if len(s) == 1 else s)
          for i, s in enumerate(chain)]
  dims = [mats[0][0]] + [m[1] for m in mats]
  if len(chain[0]) == 1:
    d.note(f"{names[0]} is 1-D: a row vector {fmt_shape(mats[0])}")
  if count > 1 and len(chain[-1]) == 1:
    d.note(f"{names[-1]} is 1-D: a column vector {fmt_shape(mats[-1])}")
  cost, tree = chain_order(dims)
  left = sum(dims[0] * dims[i] * dims[i + 1] for i in range(1, count))
  d.note("matrices " + ", ".join(f"A{i} {fmt_shape(m)}" for i, m in enumerate(mats)))
  d.note(f"cheapest order (dynamic programming over the shapes): {_tree_words(tree)}, "
         f"{cost} multiplications (left to right: {left})")
  _note_products(d, tree, dims)
  result = ((dims[0],) if len(chain[0]) == 2 else ()) + (
      (dims[-1],) if len(chain[-1]) == 2 else ())
  if result != (dims[0], dims[-1]):
    d.note(f"drop the 1s of the end vectors: ({dims[0]}, {dims[-1]}) -> {fmt_shape(result)}")
  return result


def _note_products(d: Derivation, tree: ChainTree, dims: Sequence[int]) -> tuple[int, int]:
  """Notes the products of ``tree`` in evaluation order; returns the (first, last) matrix."""
  if isinstance(tree, int):
    return tree, tree
  first, middle = _note_products(d, tree[0], dims)
  _, last = _note_products(d, tree[1], dims)
  n, k, p = dims[first], dims[middle + 1], dims[last + 1]
  d.note(f"{_tree_words(tree[0])} @ {_tree_words(tree[1])}: ({n}, {k}) @ ({k}, {p}) -> "
         f"({n}, {p}), {n * k * p} multiplications")
  return first, last


def _linear_rule(
    d: Derivation, input_shape: Shape, weight: Shape, *, bias_shape: Shape | None = None
) -> Shape:
  names = ("input", "weight")
  checks.check_min_rank(d.op, names, (input_shape, weight), 0, 1)
  checks.check_ranks(
      d.op, (weight,), ((1, 2),), "weight of shape (out_features, in_features) or (in_features,)",
      ("weight",),
  )
  checks.check_contraction(d.op, input_shape, weight, -1, -1, names)
  result = input_shape[:-1] + weight[:-1]
  d.note(f"input {fmt_shape(input_shape)} @ weight.T: the last dim ({input_shape[-1]}) is "
         f"contracted with weight's in_features -> {fmt_shape(result)}")
  return _added(d, "bias", bias_shape, result, "the output")


def _vecdot_rule(d: Derivation, x: Shape, y: Shape, *, dim: int = -1) -> Shape:
  names = ("x", "y")
  described = checks.both_shapes(x, y, names)
  if len(x) == 1 and len(y) == 1:
    checks.check_contraction(d.op, x, y, -1, -1, names)
    checks.check_dim(d.op, dim, 1, described)
    d.note(f"x and y are 1-D of length {x[0]}: sum of conj(x) * y -> ()")
    return ()
  plan = broadcast_batch(d.op, x, y, x, y, d, names)
  axis = checks.check_dim(d.op, dim, len(plan.shape), described)
  result = plan.shape[:axis] + plan.shape[axis + 1:]
  d.note(f"sum conj(x) * y over dim {dim} of the broadcast shape {fmt_shape(plan.shape)} -> "
         f"{fmt_shape(result)}")
  return result


@dataclasses.dataclass(frozen=True)
class OpSpec:
  """What the shape algebra knows of one op: its rule and the names of its arguments.

  Adding an op to jmat's shape algebra (and so to ``matmul_shape``, ``explain`` and
  ``python -m jmat explain --op``) is one entry of :data:`OPS`.

  Attributes:
    rule: derives the result shape: ``rule(derivation, *shapes, **options)``.
    operands: the names of the two operands, in messages and in explain's header.
    options: the keyword options the rule takes. A ``<name>_shape`` option is an
      added operand (``input`` of the add* ops, ``bias`` of linear), shown in the
      header by its name: before the operands for ``input``, which torch's add* ops
      take first, after them otherwise.
    chain: for a chain product, the name of its list of operands (``"arrays"``):
      the op takes any number of shapes, named ``arrays[0]``, ``arrays[1]``, ...
  """

  rule: Rule
  operands: tuple[str, str] = ("a", "b")
  options: tuple[str, ...] = ()
  chain: str | None = None


_ADDED = ("input_shape",)

OPS: dict[str, OpSpec] = {
    "matmul": OpSpec(_matmul_rule),
    "mm": OpSpec(_mm_rule),
    "bmm": OpSpec(_bmm_rule),
    "dot": OpSpec(_dot_rule),
    "mv": OpSpec(_mv_rule),
    "addmm": OpSpec(_addmm_rule, ("mat1", "mat2"), _ADDED),
    "addmv": OpSpec(_addmv_rule, ("mat", "vec"), _ADDED),
    "addr": OpSpec(_addr_rule, ("vec1", "vec2"), _ADDED),
    "baddbmm": OpSpec(_baddbmm_rule, ("batch1", "batch2"), _ADDED),
    "addbmm": OpSpec(_addbmm_rule, ("batch1", "batch2"), _ADDED),
    "vdot": OpSpec(_dot_rule),
    "inner": OpSpec(_inner_rule),
    "outer": OpSpec(_outer_rule),
    "tensordot": OpSpec(_tensordot_rule, options=("dims",)),
    "multi_dot": OpSpec(_chain_rule, chain="arrays"),
    "chain_matmul": OpSpec(_chain_rule, chain="matrices"),
    "linear": OpSpec(_linear_rule, ("input", "weight"), ("bias_shape",)),
    "vecdot": OpSpec(_vecdot_rule, ("x", "y"), ("dim",)),
}


def _spec(op: str) -> OpSpec:
  checks.check_known_op(op, tuple(OPS))
  return OPS[op]


def operand_names(op: str, count: int) -> tuple[str, ...]:
  """The names of ``count`` operands of ``op``: ``("mat1", "mat2")``, ``("arrays[0]", ...)``."""
  spec = _spec(op)
  if spec.chain is None:
    return spec.operands
  return tuple(f"{spec.chain}[{i}]" for i in range(count))


def derive(op: str, *operand_shapes: Shape, **options: object) -> Shape:
  """The result shape of ``op`` on operands of these shapes; raises ShapeError if invalid."""
  return _spec(op).rule(Derivation(op), *(tuple(s) for s in operand_shapes), **options)


def _arguments(
    op: str, shapes: Sequence[object], options: dict[str, object]
) -> tuple[tuple[Shape, ...], dict[str, object]]:
  """Validates the shapes and options a user gave ``matmul_shape``/``explain`` for ``op``."""
  spec = _spec(op)
  chains = tuple(name for name, s in OPS.items() if s.chain is not None)
  checks.check_shape_count(op, len(shapes), chains)
  labels = ("shape_a", "shape_b") + tuple(f"more_shapes[{i}]" for i in range(len(shapes) - 2))
  checked = tuple(
      checks.check_shape_argument(label, s) for label, s in zip(labels, shapes, strict=True)
  )
  given = {k: v for k, v in options.items() if v is not None}
  for key, value in given.items():
    takers = [name for name, s in OPS.items() if key in s.options]
    checks.check_option(op, key, spec.options, takers)
    if key.endswith("_shape"):
      given[key] = checks.check_shape_argument(key, value)
  if "dims" in given:
    given["dims"] = normalize_dims(op, given["dims"])
  return checked, given


def _header(op: str, shapes: tuple[Shape, ...], options: dict[str, object]) -> str:
  parts = [f"{n} {fmt_shape(s)}" for n, s in zip(operand_names(op, len(shapes)), shapes,
                                                    strict=True)]
  for key, value in options.items():
    if key.endswith("_shape"):
      label = f"{key.removesuffix('_shape')} {fmt_shape(value)}"  # type: ignore[arg-type]
      parts.insert(0 if key in _ADDED else len(parts), label)
    else:
      parts.append(f"{key}={value!r}")
  return f"jmat.{op}: {', '.join(parts)}"


def matmul_shape(
    shape_a: Sequence[int],
    shape_b: Sequence[int],
    /,
    *more_shapes: Sequence[int],
    op: str = "matmul",
    input_shape: Sequence[int] | None = None,
    bias_shape: Sequence[int] | None = None,
    dims: object = None,
    dim: int | None = None,
) -> Shape:
  """The shape of ``jmat.<op>(a, b)`` computed from the shapes alone, without any array.

  Args:
    shape_a: the shape of the first operand (``mat1`` of addmm, ``input`` of linear, ...).
    shape_b: the shape of the second operand.
    *more_shapes: the rest of the chain, for ``op="multi_dot"`` and ``"chain_matmul"``.
    op: any jmat product: ``"matmul"``, ``"mm"``, ``"bmm"``, ``"dot"``, ``"mv"``,
      ``"addmm"``, ``"addmv"``, ``"addr"``, ``"baddbmm"``, ``"addbmm"``, ``"vdot"``,
      ``"inner"``, ``"outer"``, ``"tensordot"``, ``"multi_dot"``, ``"chain_matmul"``,
      ``"linear"``, ``"vecdot"``.
    input_shape: for the add* ops, the shape of ``input`` (checked to broadcast to the
      product; omitted, only the product is checked).
    bias_shape: for ``"linear"``, the shape of ``bias``.
    dims: for ``"tensordot"``, its ``dims`` (default 2).
    dim: for ``"vecdot"``, its ``dim`` (default -1).

  Returns:
    The result shape as a tuple of ints.

  Raises:
    ShapeError: if ``op`` refuses operands of these shapes (the same message the
      operation itself would raise).
    TypeError: if an option is given to an op that does not take it.

  Example:
    >>> jmat.matmul_shape((5, 1, 4, 2), (3, 2, 1))
    (5, 3, 4, 1)
    >>> jmat.matmul_shape((3,), (2, 3, 4))
    (2, 4)
    >>> jmat.matmul_shape((2, 3), (3, 4), op="addmm", input_shape=(4,))
    (2, 4)
    >>> jmat.matmul_shape((3, 4, 5), (4, 5, 6), op="tensordot", dims=2)
    (3, 6)
  """
  options = {"input_shape": input_shape, "bias_shape": bias_shape, "dims": dims, "dim": dim}
  shapes, given = _arguments(op, (shape_a, shape_b, *more_shapes), options)
  return OPS[op].rule(Derivation(op), *shapes, **given)


def explain(
    shape_a: Sequence[int],
    shape_b: Sequence[int],
    /,
    *more_shapes: Sequence[int],
    op: str = "matmul",
    input_shape: Sequence[int] | None = None,
    bias_shape: Sequence[int] | None = None,
    dims: object = None,
    dim: int | None = None,
) -> str:
  """How the result shape of ``jmat.<op>(a, b)`` is derived, step by step.

  For an invalid pair, the derivation stops at the step that fails and says why,
  with the error message the operation would raise. Takes the same arguments as
  :func:`matmul_shape`; for ``multi_dot`` it also shows the cheapest order.

  Args:
    shape_a: the shape of the first operand.
    shape_b: the shape of the second operand.
    *more_shapes: the rest of the chain, for ``op="multi_dot"`` and ``"chain_matmul"``.
    op: any op :func:`matmul_shape` takes.
    input_shape: for the add* ops, the shape of ``input``.
    bias_shape: for ``"linear"``, the shape of ``bias``.
    dims: for ``"tensordot"``, its ``dims``.
    dim: for ``"vecdot"``, its ``dim``.

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
    >>> print(jmat.explain((2, 3), (3, 4), op="addmm", input_shape=(4,)))
    jmat.addmm: input (4,), mat1 (2, 3), mat2 (3, 4)
      1. product: mat1 @ mat2: (2, 3) @ (3, 4) -> (2, 4)
      2. input (4,) broadcasts to the product's shape (2, 4)
      3. result: beta * input + alpha * product -> (2, 4)
    result: (2, 4)
  """
  options = {"input_shape": input_shape, "bias_shape": bias_shape, "dims": dims, "dim": dim}
  shapes, given = _arguments(op, (shape_a, shape_b, *more_shapes), options)
  d = Derivation(op)
  try:
    outcome = f"result: {fmt_shape(OPS[op].rule(d, *shapes, **given))}"
  except ShapeError as error:
    d.note(f"fails: {error}")
    outcome = f"result: none, jmat.{op} raises ShapeError"
  lines = [_header(op, shapes, given)]
  for i, step in enumerate(d.steps, start=1):
    first, *rest = step.split("\n")
    lines.append(f"  {i}. {first}")
    lines.extend(f"     {line}" for line in rest)
  lines.append(outcome)
  return "\n".join(lines)
