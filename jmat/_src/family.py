"""The rest of torch's product family as jitted pure JAX functions.

``addmm``, ``addmv``, ``addr``, ``baddbmm``, ``addbmm`` (``beta * input + alpha *
product``), ``vdot``, ``inner``, ``outer``, ``tensordot``, ``multi_dot``,
``chain_matmul``, ``linear`` and ``vecdot``. Every product goes through the one
kernel of :mod:`jmat._src.products` (``matrix_product``, vmapped for batches),
every shape through a rule of :mod:`jmat._src.shapes`, every dtype through
``operands``, so these ops share the core's semantics and messages.

``beta`` and ``alpha`` are static Python numbers, as in torch (where they are
Python scalars, not tensors): the ``beta == 0`` rule ("``input`` is ignored, NaN
and inf in it do not propagate") and the ``alpha == 0`` rule (the product is
ignored) are then decided when tracing, so ``0 * nan`` never appears in the
graph, and ``beta == 1``/``alpha == 1`` cost no multiplication. Each distinct
value (and type: ``2`` and ``2.0`` are two) compiles once; to scale by a traced
value, scale an operand instead. The scaling is an elementwise epilogue that XLA
fuses after the one dot.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from jmat._src import checks, shapes
from jmat._src.products import (
    PrecisionLike,
    accumulation_dtype,
    batched_matrix_product,
    matrix_product,
    operands,
)

_jit_scaled = functools.partial(jax.jit, static_argnames=("beta", "alpha", "precision"))
_jit = functools.partial(jax.jit, static_argnames=("precision",))

Scalar = bool | int | float | complex


def _constant(number: complex, dtype: np.dtype, compute: np.dtype) -> np.ndarray:
  """A checked scale as a constant of the computation's dtype.

  Integers wrap modulo 2**bits (``beta=-1`` on uint8 is 255), so the result is
  the same modular arithmetic torch computes.
  """
  if dtype.kind in "iu":
    bits = np.iinfo(dtype).bits
    value = int(number.real) % (1 << bits)
    if dtype.kind == "i" and value >= 1 << (bits - 1):
      value -= 1 << bits
    return np.asarray(value, dtype)
  return np.asarray(number if dtype.kind == "c" else number.real, compute)


def _combine(
    op: str,
    input: jax.Array | None,
    product: jax.Array,
    beta: Scalar,
    alpha: Scalar,
    dtype: np.dtype,
) -> jax.Array:
  """``beta * input + alpha * product``, with torch's rules for a zero scale.

  ``product`` is in the computation dtype (float32 for half inputs); a zero
  ``beta`` (or a missing ``input``) drops ``input``, a zero ``alpha`` drops the
  product, decided statically so that NaN and inf in a dropped term never reach
  the result.
  """
  dtype = np.dtype(dtype)
  compute = product.dtype
  b = checks.check_scale(op, "beta", beta, dtype)
  a = checks.check_scale(op, "alpha", alpha, dtype)
  terms = []
  if a != 0:
    terms.append(product if a == 1 else _constant(a, dtype, compute) * product)
  if b != 0 and input is not None:
    x = input.astype(compute)
    terms.append(x if b == 1 else _constant(b, dtype, compute) * x)
  if not terms:
    return jnp.zeros(product.shape, dtype)
  return jnp.broadcast_to(sum(terms[1:], terms[0]), product.shape).astype(dtype)


@_jit_scaled
def addmm(
    input: ArrayLike,
    mat1: ArrayLike,
    mat2: ArrayLike,
    /,
    *,
    beta: Scalar = 1,
    alpha: Scalar = 1,
    precision: PrecisionLike = None,
) -> jax.Array:
  """``beta * input + alpha * (mat1 @ mat2)``, as ``torch.addmm``.

  Args:
    input: array broadcastable to ``(n, p)`` (one-way, as torch's expand).
    mat1: array of shape ``(n, m)``.
    mat2: array of shape ``(m, p)``; all three of one dtype.
    beta: Python number (static); 0 ignores ``input`` entirely (NaN and inf in it
      do not propagate). On integer arrays it must be an integer.
    alpha: Python number (static); 0 ignores the product.
    precision: as for :func:`jmat.matmul`.

  Returns:
    Array of shape ``(n, p)`` and the operands' dtype.

  Raises:
    ShapeError: if mat1 or mat2 is not 2-D, ``m`` differs, or input does not
      broadcast to ``(n, p)``.
    TypeError: if the dtypes differ or are not supported, or beta/alpha do not fit
      the dtype (a fractional scale on integers, a complex one on reals).

  Example:
    >>> print(jmat.addmm(jnp.array([10, 20]), jnp.array([[1, 2], [3, 4]]), jnp.eye(2, dtype=int),
    ...                  beta=2))
    [[21 42]
     [23 44]]
  """
  input, mat1, mat2 = operands("addmm", input, mat1, mat2, names=("input", "mat1", "mat2"))
  shapes.derive("addmm", mat1.shape, mat2.shape, input_shape=input.shape)
  product = matrix_product(mat1, mat2, precision, accumulation_dtype(mat1.dtype))
  return _combine("addmm", input, product, beta, alpha, mat1.dtype)


@_jit_scaled
def addmv(
    input: ArrayLike,
    mat: ArrayLike,
    vec: ArrayLike,
    /,
    *,
    beta: Scalar = 1,
    alpha: Scalar = 1,
    precision: PrecisionLike = None,
) -> jax.Array:
  """``beta * input + alpha * (mat @ vec)``, as ``torch.addmv``.

  Args:
    input: array broadcastable to ``(n,)``.
    mat: array of shape ``(n, m)``.
    vec: array of shape ``(m,)``; all three of one dtype.
    beta: as for :func:`addmm`.
    alpha: as for :func:`addmm`.
    precision: as for :func:`jmat.matmul`.

  Returns:
    Array of shape ``(n,)``.

  Raises:
    ShapeError: if mat is not 2-D, vec not 1-D, ``m`` differs, or input does not
      broadcast to ``(n,)``.
    TypeError: as for :func:`addmm`.

  Example:
    >>> print(jmat.addmv(jnp.array([1., 1.]), jnp.array([[1., 2.], [3., 4.]]),
    ...                  jnp.array([1., 1.]), alpha=0.5))
    [2.5 4.5]
  """
  input, mat, vec = operands("addmv", input, mat, vec, names=("input", "mat", "vec"))
  shapes.derive("addmv", mat.shape, vec.shape, input_shape=input.shape)
  wide = accumulation_dtype(mat.dtype)
  product = matrix_product(mat, vec[:, None], precision, wide)[:, 0]
  return _combine("addmv", input, product, beta, alpha, mat.dtype)


@_jit_scaled
def addr(
    input: ArrayLike,
    vec1: ArrayLike,
    vec2: ArrayLike,
    /,
    *,
    beta: Scalar = 1,
    alpha: Scalar = 1,
    precision: PrecisionLike = None,
) -> jax.Array:
  """``beta * input + alpha * outer(vec1, vec2)``, as ``torch.addr``.

  Unlike torch (which computes addr elementwise), mixed dtypes and bool are
  refused, as for every jmat product.

  Args:
    input: array broadcastable to ``(n, p)``.
    vec1: array of shape ``(n,)``.
    vec2: array of shape ``(p,)``; all three of one dtype.
    beta: as for :func:`addmm`.
    alpha: as for :func:`addmm`.
    precision: as for :func:`jmat.matmul`.

  Returns:
    Array of shape ``(n, p)``.

  Raises:
    ShapeError: if vec1 or vec2 is not 1-D, or input does not broadcast to ``(n, p)``.
    TypeError: as for :func:`addmm`.

  Example:
    >>> print(jmat.addr(jnp.zeros((2, 3), int), jnp.array([1, 2]), jnp.array([1, 10, 100])))
    [[  1  10 100]
     [  2  20 200]]
  """
  input, vec1, vec2 = operands("addr", input, vec1, vec2, names=("input", "vec1", "vec2"))
  shapes.derive("addr", vec1.shape, vec2.shape, input_shape=input.shape)
  wide = accumulation_dtype(vec1.dtype)
  product = matrix_product(vec1[:, None], vec2[None, :], precision, wide)
  return _combine("addr", input, product, beta, alpha, vec1.dtype)


@_jit_scaled
def baddbmm(
    input: ArrayLike,
    batch1: ArrayLike,
    batch2: ArrayLike,
    /,
    *,
    beta: Scalar = 1,
    alpha: Scalar = 1,
    precision: PrecisionLike = None,
) -> jax.Array:
  """``beta * input + alpha * bmm(batch1, batch2)``, as ``torch.baddbmm``.

  Args:
    input: array broadcastable to ``(b, n, p)``.
    batch1: array of shape ``(b, n, m)``.
    batch2: array of shape ``(b, m, p)``; all three of one dtype.
    beta: as for :func:`addmm`.
    alpha: as for :func:`addmm`.
    precision: as for :func:`jmat.matmul`.

  Returns:
    Array of shape ``(b, n, p)``.

  Raises:
    ShapeError: if batch1 or batch2 is not 3-D, the batch sizes or ``m`` differ,
      or input does not broadcast to ``(b, n, p)``.
    TypeError: as for :func:`addmm`.

  Example:
    >>> jmat.baddbmm(jnp.zeros((1, 4)), jnp.ones((2, 3, 5)), jnp.ones((2, 5, 4)),
    ...              alpha=0.5).shape
    (2, 3, 4)
  """
  names = ("input", "batch1", "batch2")
  input, batch1, batch2 = operands("baddbmm", input, batch1, batch2, names=names)
  shapes.derive("baddbmm", batch1.shape, batch2.shape, input_shape=input.shape)
  plan = shapes.BatchPlan((batch1.shape[0],), (True,), (True,))
  wide = accumulation_dtype(batch1.dtype)
  product = batched_matrix_product(batch1, batch2, plan, precision, wide)
  return _combine("baddbmm", input, product, beta, alpha, batch1.dtype)


@_jit_scaled
def addbmm(
    input: ArrayLike,
    batch1: ArrayLike,
    batch2: ArrayLike,
    /,
    *,
    beta: Scalar = 1,
    alpha: Scalar = 1,
    precision: PrecisionLike = None,
) -> jax.Array:
  """``beta * input + alpha * sum_i(batch1[i] @ batch2[i])``, as ``torch.addbmm``.

  The sum over the batch is part of the contraction: one ``(n, b*m) @ (b*m, p)``
  product, not ``b`` products and a sum.

  Args:
    input: array broadcastable to ``(n, p)``.
    batch1: array of shape ``(b, n, m)``.
    batch2: array of shape ``(b, m, p)``; all three of one dtype.
    beta: as for :func:`addmm`.
    alpha: as for :func:`addmm`.
    precision: as for :func:`jmat.matmul`.

  Returns:
    Array of shape ``(n, p)``.

  Raises:
    ShapeError: as for :func:`baddbmm`, with ``(n, p)`` the target of input.
    TypeError: as for :func:`addmm`.

  Example:
    >>> print(jmat.addbmm(jnp.zeros(2), jnp.ones((3, 2, 5)), jnp.ones((3, 5, 2))))
    [[15. 15.]
     [15. 15.]]
  """
  names = ("input", "batch1", "batch2")
  input, batch1, batch2 = operands("addbmm", input, batch1, batch2, names=names)
  shapes.derive("addbmm", batch1.shape, batch2.shape, input_shape=input.shape)
  b, n, k = batch1.shape
  rows = jnp.moveaxis(batch1, 0, 1).reshape(n, b * k)
  cols = batch2.reshape(b * k, batch2.shape[2])
  product = matrix_product(rows, cols, precision, accumulation_dtype(batch1.dtype))
  return _combine("addbmm", input, product, beta, alpha, batch1.dtype)


@_jit
def vdot(a: ArrayLike, b: ArrayLike, /, *, precision: PrecisionLike = None) -> jax.Array:
  """Dot product of two 1-D arrays that conjugates the first, as ``torch.vdot``.

  Args:
    a: array of shape ``(n,)`` (conjugated if complex).
    b: array of shape ``(n,)``, of the same dtype.
    precision: as for :func:`jmat.matmul`.

  Returns:
    A 0-D array, ``sum(conj(a) * b)``.

  Raises:
    ShapeError: if either operand is not 1-D or the lengths differ.
    TypeError: if the dtypes differ or are not supported.

  Example:
    >>> print(jmat.vdot(jnp.array([1j, 2]), jnp.array([1j, 1])))
    (3+0j)
  """
  a, b = operands("vdot", a, b)
  shapes.derive("vdot", a.shape, b.shape)
  if jnp.iscomplexobj(a):
    a = jnp.conj(a)
  return matrix_product(a[None, :], b[:, None], precision)[0, 0]


@_jit
def inner(a: ArrayLike, b: ArrayLike, /, *, precision: PrecisionLike = None) -> jax.Array:
  """Inner product over the last dims, as ``torch.inner`` (no conjugation).

  A 0-D operand is a scalar: the result is the elementwise product, as in torch.

  Args:
    a: array of shape ``(*A, k)``, or 0-D.
    b: array of shape ``(*B, k)``, or 0-D; of the same dtype.
    precision: as for :func:`jmat.matmul`.

  Returns:
    Array of shape ``(*A, *B)``.

  Raises:
    ShapeError: if the last dims differ.
    TypeError: if the dtypes differ or are not supported.

  Example:
    >>> jmat.inner(jnp.ones((2, 5, 3)), jnp.ones((4, 3))).shape
    (2, 5, 4)
  """
  a, b = operands("inner", a, b)
  out_shape = shapes.derive("inner", a.shape, b.shape)
  if a.ndim == 0 or b.ndim == 0:
    return a * b
  k = a.shape[-1]
  rows = a.reshape(math.prod(a.shape[:-1]), k)
  cols = b.reshape(math.prod(b.shape[:-1]), k).T
  return matrix_product(rows, cols, precision).reshape(out_shape)


@_jit
def outer(a: ArrayLike, b: ArrayLike, /, *, precision: PrecisionLike = None) -> jax.Array:
  """Outer product of two 1-D arrays, as ``torch.outer``.

  Unlike torch (which computes it elementwise), mixed dtypes and bool are refused.

  Args:
    a: array of shape ``(n,)``.
    b: array of shape ``(p,)``, of the same dtype.
    precision: as for :func:`jmat.matmul`.

  Returns:
    Array of shape ``(n, p)``, ``a[i] * b[j]``.

  Raises:
    ShapeError: if either operand is not 1-D.
    TypeError: if the dtypes differ or are not supported.

  Example:
    >>> print(jmat.outer(jnp.array([1, 2]), jnp.array([1, 10, 100])))
    [[  1  10 100]
     [  2  20 200]]
  """
  a, b = operands("outer", a, b)
  shapes.derive("outer", a.shape, b.shape)
  return matrix_product(a[:, None], b[None, :], precision)


def tensordot(
    a: ArrayLike,
    b: ArrayLike,
    /,
    dims: int | Sequence[Sequence[int]] = 2,
    *,
    precision: PrecisionLike = None,
) -> jax.Array:
  """Contraction over chosen dims, as ``torch.tensordot``.

  ``dims`` is an int ``d`` (contract the last ``d`` dims of ``a`` with the first
  ``d`` of ``b``), a pair of sequences ``([1, 2], [0, 1])`` or a 2-row nested list
  ``[[1, 2], [0, 1]]``. As in torch, a contracted dim of size 1 paired with a
  larger one is summed out of the other operand. ``dims`` is normalised to a
  hashable value here and the product is jitted with it static.

  Args:
    a: array.
    b: array of the same dtype.
    dims: the dims to contract.
    precision: as for :func:`jmat.matmul`.

  Returns:
    Array of shape ``a's other dims + b's other dims``.

  Raises:
    ShapeError: if a dim is out of range or repeated, the lists' lengths differ,
      or paired sizes differ.
    TypeError: if ``dims`` has another structure, or the dtypes differ or are not
      supported.

  Example:
    >>> jmat.tensordot(jnp.ones((3, 4, 5)), jnp.ones((4, 5, 6))).shape
    (3, 6)
    >>> jmat.tensordot(jnp.ones((3, 4, 5)), jnp.ones((5, 4, 2)), dims=([1, 2], [1, 0])).shape
    (3, 2)
  """
  return _tensordot(a, b, dims=shapes.normalize_dims("tensordot", dims), precision=precision)


@functools.partial(jax.jit, static_argnames=("dims", "precision"))
def _tensordot(
    a: ArrayLike,
    b: ArrayLike,
    /,
    *,
    dims: int | tuple[tuple[int, ...], tuple[int, ...]],
    precision: PrecisionLike,
) -> jax.Array:
  a, b = operands("tensordot", a, b)
  out_shape = shapes.derive("tensordot", a.shape, b.shape, dims=dims)
  axes_a, axes_b = shapes.tensordot_axes("tensordot", a.shape, b.shape, dims)
  for i, j in zip(axes_a, axes_b, strict=True):
    if a.shape[i] != b.shape[j]:  # one of them is 1: sum the other out, as torch does
      if a.shape[i] == 1:
        b = jnp.sum(b, axis=j, keepdims=True, dtype=b.dtype)
      else:
        a = jnp.sum(a, axis=i, keepdims=True, dtype=a.dtype)
  free_a = tuple(i for i in range(a.ndim) if i not in axes_a)
  free_b = tuple(j for j in range(b.ndim) if j not in axes_b)
  k = math.prod(a.shape[i] for i in axes_a)
  rows = jnp.transpose(a, free_a + axes_a).reshape(math.prod(a.shape[i] for i in free_a), k)
  cols = jnp.transpose(b, axes_b + free_b).reshape(k, math.prod(b.shape[j] for j in free_b))
  return matrix_product(rows, cols, precision).reshape(out_shape)


def _chain(op: str, arrays: Sequence[ArrayLike], precision: PrecisionLike) -> jax.Array:
  """The chain product in the cheapest order, chosen from the shapes at trace time."""
  converted = operands(op, *arrays, names=shapes.operand_names(op, len(arrays)))
  out_shape = shapes.derive(op, *(x.shape for x in converted))
  mats = [
      x[None, :] if x.ndim == 1 and i == 0 else x[:, None] if x.ndim == 1 else x
      for i, x in enumerate(converted)
  ]
  _, tree = shapes.chain_order([mats[0].shape[0]] + [m.shape[1] for m in mats])

  def evaluate(node: shapes.ChainTree) -> jax.Array:
    if isinstance(node, int):
      return mats[node]
    return matrix_product(evaluate(node[0]), evaluate(node[1]), precision)

  return evaluate(tree).reshape(out_shape)


@_jit
def multi_dot(arrays: Sequence[ArrayLike], /, *, precision: PrecisionLike = None) -> jax.Array:
  """The product of a chain of matrices in the cheapest order, as ``torch.linalg.multi_dot``.

  The order is chosen by dynamic programming over the shapes when tracing (no
  run-time cost): ``(1000, 10) @ (10, 1000) @ (1000, 10)`` is computed as
  ``A0 @ (A1 @ A2)``, 200 000 multiplications instead of 20 000 000.
  ``jmat.explain(*shapes, op="multi_dot")`` shows the order.

  Args:
    arrays: a list or tuple of at least two arrays of one dtype: 2-D matrices,
      except that the first may be 1-D (a row vector) and the last 1-D (a column
      vector).
    precision: as for :func:`jmat.matmul`.

  Returns:
    The product; the dims of 1-D end vectors are removed, as in torch.

  Raises:
    ShapeError: if there are fewer than two arrays, a rank is not allowed, or
      neighbouring sizes differ.
    TypeError: if ``arrays`` is not a list or tuple, or the dtypes differ or are not
      supported.

  Example:
    >>> jmat.multi_dot([jnp.ones(3), jnp.ones((3, 4)), jnp.ones((4, 5))]).shape
    (5,)
  """
  checks.check_array_list("multi_dot", arrays)
  return _chain("multi_dot", arrays, precision)


@_jit
def chain_matmul(*matrices: ArrayLike, precision: PrecisionLike = None) -> jax.Array:
  """The product of one or more 2-D matrices in the cheapest order, as ``torch.chain_matmul``.

  torch's older (deprecated) spelling of :func:`multi_dot`: the matrices are
  separate arguments, all must be 2-D, and a single matrix is returned as is.

  Args:
    *matrices: 2-D arrays of one dtype, neighbouring sizes equal.
    precision: as for :func:`jmat.matmul`.

  Returns:
    Array of shape ``(rows of the first, columns of the last)``.

  Raises:
    ShapeError: if there is no matrix, one is not 2-D, or neighbouring sizes differ.
    TypeError: if the dtypes differ or are not supported.

  Example:
    >>> jmat.chain_matmul(jnp.ones((2, 3)), jnp.ones((3, 4)), jnp.ones((4, 5))).shape
    (2, 5)
  """
  return _chain("chain_matmul", matrices, precision)


@_jit
def linear(
    input: ArrayLike,
    weight: ArrayLike,
    bias: ArrayLike | None = None,
    /,
    *,
    precision: PrecisionLike = None,
) -> jax.Array:
  """``input @ weight.T + bias``, as ``torch.nn.functional.linear``.

  Args:
    input: array of shape ``(*, in_features)``, at least 1-D.
    weight: array of shape ``(out_features, in_features)``, as torch stores it, or
      ``(in_features,)``.
    bias: ``None`` or an array broadcastable to the output (typically
      ``(out_features,)``); all of one dtype.
    precision: as for :func:`jmat.matmul`.

  Returns:
    Array of shape ``(*, out_features)`` (``(*)`` for a 1-D weight).

  Raises:
    ShapeError: if input is 0-D, weight is not 1-D or 2-D, ``in_features`` differ,
      or bias does not broadcast to the output.
    TypeError: if the dtypes differ or are not supported.

  Example:
    >>> print(jmat.linear(jnp.array([1., 2.]), jnp.array([[1., 0.], [1., 1.]]),
    ...                   jnp.array([0.5, 0.5])))
    [1.5 3.5]
  """
  if bias is None:
    input, weight = operands("linear", input, weight, names=("input", "weight"))
  else:
    names = ("input", "weight", "bias")
    input, weight, bias = operands("linear", input, weight, bias, names=names)
  out_shape = shapes.derive(
      "linear", input.shape, weight.shape, bias_shape=None if bias is None else bias.shape
  )
  rows = input.reshape(math.prod(input.shape[:-1]), input.shape[-1])
  cols = weight.T if weight.ndim == 2 else weight[:, None]
  wide = accumulation_dtype(input.dtype)
  product = matrix_product(rows, cols, precision, wide).reshape(out_shape)
  return _combine("linear", bias, product, 1, 1, input.dtype)


@functools.partial(jax.jit, static_argnames=("dim",))
def vecdot(x: ArrayLike, y: ArrayLike, /, *, dim: int = -1) -> jax.Array:
  """``sum(conj(x) * y)`` over ``dim`` of the broadcast operands, as ``torch.linalg.vecdot``.

  As torch, integer and bool arrays are refused; two 1-D arrays must have equal
  lengths, otherwise the operands broadcast NumPy-style first.

  Args:
    x: floating or complex array (conjugated if complex).
    y: array of the same dtype.
    dim: the dim of the broadcast shape to sum over (static).

  Returns:
    Array of the broadcast shape without ``dim``.

  Raises:
    ShapeError: if the shapes do not broadcast or ``dim`` is out of range.
    TypeError: if the dtypes differ, are not supported, or are not floating/complex.

  Example:
    >>> print(jmat.linalg.vecdot(jnp.array([1j, 2.]), jnp.array([1j, 1.])))
    (3+0j)
  """
  x, y = operands("vecdot", x, y, names=("x", "y"))
  checks.check_floating("vecdot", x.dtype)
  out_shape = shapes.derive("vecdot", x.shape, y.shape, dim=dim)
  dtype = x.dtype
  compute = accumulation_dtype(dtype)
  x, y = x.astype(compute), y.astype(compute)
  products = (jnp.conj(x) if jnp.iscomplexobj(x) else x) * y
  summed = jnp.sum(products, axis=dim) if products.ndim else products
  return summed.reshape(out_shape).astype(dtype)
