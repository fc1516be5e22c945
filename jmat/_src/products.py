"""torch's matrix-product family (matmul, mm, bmm, dot, mv) as jitted pure JAX functions.

There is one kernel, the unbatched 2-D product written with ``jnp.einsum``;
1-D operands are promoted to 2-D around it and batch semantics come from
``jax.vmap``, one vmap per batch dimension. vmap's batching rule for
``dot_general`` turns the nest into a single ``dot_general`` (a stretched size-1
dim becomes a free dimension of the other operand, never a materialised copy),
so a batched product compiles to one GEMM call, as ``jnp.matmul`` does.

Every public function is jitted at definition: the shape and dtype checks are
Python on static shapes and run once per compilation, and an eager call costs
what an eager ``jnp.matmul`` costs.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec
from jax.typing import ArrayLike, DTypeLike

from jmat._src import checks, shapes, sharding

PrecisionLike = jax.lax.PrecisionLike

_HALF_PRECISION = (np.dtype(jnp.float16), np.dtype(jnp.bfloat16))

_jit_product = functools.partial(
    jax.jit, static_argnames=("precision", "preferred_element_type", "out_sharding")
)
Sharding = NamedSharding | PartitionSpec


def operands(op: str, *arrays: ArrayLike, names: tuple[str, ...] = ("a", "b")) -> list[jax.Array]:
  """Converts the operands of ``op`` to arrays and checks their dtypes (same, supported).

  Lists and tuples are refused, as ``jnp.matmul`` refuses them: an implicit
  conversion would hide a dtype choice.
  """
  checks.check_arrays(op, arrays, names)
  converted = [jnp.asarray(x) for x in arrays]
  checks.check_dtypes(op, [x.dtype for x in converted], names)
  return converted


def accumulation_dtype(dtype: DTypeLike) -> np.dtype:
  """The dtype that products (and the sums after them) of ``dtype`` operands are computed in.

  float32 for float16 and bfloat16, as torch does on the CPU (the result is cast
  back); every other dtype is its own accumulation dtype. For floating inputs this
  is also attention's softmax dtype: float64 stays float64, the rest is float32.

  Example:
    >>> from jmat._src.products import accumulation_dtype
    >>> [accumulation_dtype(d).name for d in (jnp.bfloat16, jnp.float16, jnp.float32, jnp.int8)]
    ['float32', 'float32', 'float32', 'int8']
  """
  dtype = np.dtype(dtype)
  return np.dtype(np.float32) if dtype in _HALF_PRECISION else dtype


def matrix_product(
    a: jax.Array,
    b: jax.Array,
    precision: PrecisionLike = None,
    preferred_element_type: DTypeLike | None = None,
    out_sharding: Sharding | None = None,
) -> jax.Array:
  """The one kernel: the product of a 2-D ``(n, k)`` and a 2-D ``(k, p)`` array.

  Half-precision inputs accumulate in float32 and are cast back to their dtype,
  unless ``preferred_element_type`` asks for another result dtype.
  ``out_sharding`` is the sharding of the ``(n, p)`` result (see ``kernel_sharding``).
  """
  out = jnp.einsum(
      "nk,kp->np",
      a,
      b,
      precision=precision,
      preferred_element_type=(
          accumulation_dtype(a.dtype) if preferred_element_type is None
          else preferred_element_type
      ),
      out_sharding=out_sharding,
  )
  return out if preferred_element_type is not None else out.astype(a.dtype)


def kernel_sharding(
    op: str,
    out_sharding: Sharding | None,
    out_shape: tuple[int, ...],
    rows: int | None,
    cols: int | None,
    batched: tuple[jax.Array, ...] = (),
) -> Sharding | None:
  """The sharding of the 2-D kernel's ``(n, p)`` result, from the one asked of the whole result.

  Under ``jax.vmap`` the kernel sees only its own two dims; the batch dims keep the
  sharding of the operands, and ``finish_sharding`` then pins the whole result. As
  for ``jnp.matmul``, ``out_sharding`` may name only Explicit mesh axes.

  Args:
    op: the public name of the operation, for the error message.
    out_sharding: the sharding the user asked of the result, or ``None``.
    out_shape: the shape of the result.
    rows: the axis of the result that holds ``n``, or ``None`` where a 1-D operand removed it.
    cols: the axis of the result that holds ``p``, or ``None`` likewise.
    batched: the operands with batch dims: mesh axes their batch dims are sharded
      over stay with the batch dims, so the kernel's spec leaves them out.
  """
  if out_sharding is None:
    return None
  if isinstance(out_sharding, NamedSharding):
    mesh, spec = out_sharding.mesh, out_sharding.spec
  else:
    mesh, spec = jax.sharding.get_abstract_mesh(), out_sharding
  checks.check_out_sharding(op, tuple(spec), out_shape, set(sharding.explicit_axes(mesh)))
  entries = tuple(spec) + (None,) * (len(out_shape) - len(spec))
  taken = {name for x in batched for name in sharding.spec_axes(sharding.explicit_spec(x)[:-2])}

  def kept(axis: int | None) -> object:
    names = () if axis is None else tuple(
        n for n in sharding.entry_axes(entries[axis]) if n not in taken)
    return names[0] if len(names) == 1 else (names or None)

  inner = PartitionSpec(kept(rows), kept(cols))
  if isinstance(out_sharding, NamedSharding):
    return NamedSharding(out_sharding.mesh, inner)
  return inner


def finish_sharding(out: jax.Array, out_sharding: Sharding | None) -> jax.Array:
  """Pins the result to ``out_sharding`` (a no-op where the product already has it)."""
  return out if out_sharding is None else jax.sharding.reshard(out, out_sharding)


def vmap_batch(
    kernel: Callable[..., jax.Array], plan: shapes.BatchPlan
) -> Callable[[jax.Array, jax.Array], jax.Array]:
  """Lifts ``kernel`` (two operands without batch dims) to the batch dims of ``plan``.

  The operands must carry exactly the batch dims marked as mapped in ``plan``
  (stretched size-1 and missing dims removed); the result has ``plan.shape``
  in front of the kernel's result.
  """
  for mapped_a, mapped_b in reversed(tuple(zip(plan.mapped_a, plan.mapped_b, strict=True))):
    kernel = jax.vmap(kernel, in_axes=(0 if mapped_a else None, 0 if mapped_b else None))
  return kernel


def _unmapped_axes(batch_rank: int, ndim: int, mapped: tuple[bool, ...]) -> tuple[int, ...]:
  """The axes of an operand that a batch plan stretches: its size-1 batch dims, not mapped."""
  offset = batch_rank - (ndim - 2)
  return tuple(i - offset for i, m in enumerate(mapped) if i >= offset and not m)


def batched_matrix_product(
    a: jax.Array,
    b: jax.Array,
    plan: shapes.BatchPlan,
    precision: PrecisionLike = None,
    preferred_element_type: DTypeLike | None = None,
    out_sharding: Sharding | None = None,
) -> jax.Array:
  """``matrix_product`` over broadcast batch dims: ``a`` ``(..., n, k)``, ``b`` ``(..., k, p)``."""
  rank = len(plan.shape)
  a = jnp.squeeze(a, _unmapped_axes(rank, a.ndim, plan.mapped_a))
  b = jnp.squeeze(b, _unmapped_axes(rank, b.ndim, plan.mapped_b))
  kernel = functools.partial(
      matrix_product,
      precision=precision,
      preferred_element_type=preferred_element_type,
      out_sharding=out_sharding,
  )
  return vmap_batch(kernel, plan)(a, b)


@_jit_product
def matmul(
    a: ArrayLike,
    b: ArrayLike,
    /,
    *,
    precision: PrecisionLike = None,
    preferred_element_type: DTypeLike | None = None,
    out_sharding: Sharding | None = None,
) -> jax.Array:
  """Matrix product with the semantics of ``torch.matmul``.

  * 1-D @ 1-D: the dot product, a 0-D array.
  * 2-D @ 2-D: the matrix product.
  * a 1-D operand is promoted to a matrix (a 1 prepended on the left, appended
    on the right) and the added dimension is removed from the result.
  * N-D operands: the last two dims are matrices, the rest are batch dims,
    broadcast NumPy-style (aligned from the right; a 1 stretches).

  Unlike ``jnp.matmul``, mixed dtypes are refused (torch refuses them), and
  float16/bfloat16 accumulate in float32. 0-D operands are refused, as in torch.

  Args:
    a: array of shape ``(k,)`` or ``(..., n, k)``.
    b: array of shape ``(k,)`` or ``(..., k, p)``, of the same dtype as ``a``.
    precision: ``None`` (JAX's default for the backend, which follows
      ``jax.default_matmul_precision``), ``"highest"`` for full float32 on
      GPU/TPU as torch computes by default, or any ``jax.lax.Precision``.
    preferred_element_type: accumulate in, and return, this dtype.
    out_sharding: the ``PartitionSpec`` (under ``jax.set_mesh``) or ``NamedSharding``
      of the result, as for ``jnp.matmul``; needed on a mesh with explicit axes when
      the contracted dim is sharded, where the result's sharding is ambiguous.

  Returns:
    The product, of the shape ``jmat.matmul_shape(a.shape, b.shape)`` and the dtype
    of the operands (or ``preferred_element_type``).

  Raises:
    ShapeError: if an operand is 0-D, the contracted sizes differ, or the batch
      dims do not broadcast.
    TypeError: if the dtypes differ or are not supported (bool, uint16, ...).

  Example:
    >>> print(jmat.matmul(jnp.array([1, 2, 3]), jnp.array([4, 5, 6])))
    32
    >>> jmat.matmul(jnp.ones((5, 1, 4, 2)), jnp.ones((3, 2, 1))).shape
    (5, 3, 4, 1)
  """
  a, b = operands("matmul", a, b)
  out_shape = shapes.derive("matmul", a.shape, b.shape)
  a2 = a[None, :] if a.ndim == 1 else a
  b2 = b[:, None] if b.ndim == 1 else b
  plan = shapes.broadcast_batch("matmul", a.shape, b.shape, a2.shape[:-2], b2.shape[:-2])
  rank = len(out_shape)
  rows = rank - 1 - (b.ndim > 1) if a.ndim > 1 else None
  cols = rank - 1 if b.ndim > 1 else None
  inner = kernel_sharding("matmul", out_sharding, out_shape, rows, cols, (a2, b2))
  out = batched_matrix_product(a2, b2, plan, precision, preferred_element_type, inner)
  return finish_sharding(out.reshape(out_shape), out_sharding)


@_jit_product
def mm(
    a: ArrayLike,
    b: ArrayLike,
    /,
    *,
    precision: PrecisionLike = None,
    preferred_element_type: DTypeLike | None = None,
    out_sharding: Sharding | None = None,
) -> jax.Array:
  """Product of two 2-D matrices, as ``torch.mm`` (no broadcasting, no 1-D promotion).

  Args:
    a: array of shape ``(n, m)``.
    b: array of shape ``(m, p)``, of the same dtype.
    precision: as for :func:`jmat.matmul`.
    preferred_element_type: as for :func:`jmat.matmul`.
    out_sharding: as for :func:`jmat.matmul`.

  Returns:
    Array of shape ``(n, p)``.

  Raises:
    ShapeError: if either operand is not 2-D or ``m`` differs.
    TypeError: if the dtypes differ or are not supported.

  Example:
    >>> print(jmat.mm(jnp.array([[1, 2], [3, 4]]), jnp.array([[5, 6], [7, 8]])))
    [[19 22]
     [43 50]]
  """
  a, b = operands("mm", a, b)
  out_shape = shapes.derive("mm", a.shape, b.shape)
  inner = kernel_sharding("mm", out_sharding, out_shape, 0, 1)
  return matrix_product(a, b, precision, preferred_element_type, inner)


@_jit_product
def bmm(
    a: ArrayLike,
    b: ArrayLike,
    /,
    *,
    precision: PrecisionLike = None,
    preferred_element_type: DTypeLike | None = None,
    out_sharding: Sharding | None = None,
) -> jax.Array:
  """Batched matrix product of two 3-D arrays with equal batch size (no broadcasting).

  Args:
    a: array of shape ``(b, n, m)``.
    b: array of shape ``(b, m, p)``, of the same dtype.
    precision: as for :func:`jmat.matmul`.
    preferred_element_type: as for :func:`jmat.matmul`.
    out_sharding: as for :func:`jmat.matmul`.

  Returns:
    Array of shape ``(b, n, p)``.

  Raises:
    ShapeError: if either input is not 3-D, the batch sizes differ, or ``m`` differs.
    TypeError: if the dtypes differ or are not supported.

  Example:
    >>> jmat.bmm(jnp.ones((2, 1, 10)), jnp.ones((2, 10, 4))).shape
    (2, 1, 4)
  """
  a, b = operands("bmm", a, b)
  out_shape = shapes.derive("bmm", a.shape, b.shape)
  plan = shapes.BatchPlan((a.shape[0],), (True,), (True,))
  inner = kernel_sharding("bmm", out_sharding, out_shape, 1, 2, (a, b))
  out = batched_matrix_product(a, b, plan, precision, preferred_element_type, inner)
  return finish_sharding(out, out_sharding)


@_jit_product
def dot(
    a: ArrayLike,
    b: ArrayLike,
    /,
    *,
    precision: PrecisionLike = None,
    preferred_element_type: DTypeLike | None = None,
    out_sharding: Sharding | None = None,
) -> jax.Array:
  """Dot product of two 1-D arrays of equal length, as ``torch.dot`` (no conjugation).

  Args:
    a: array of shape ``(n,)``.
    b: array of shape ``(n,)``, of the same dtype.
    precision: as for :func:`jmat.matmul`.
    preferred_element_type: as for :func:`jmat.matmul`.
    out_sharding: as for :func:`jmat.matmul`.

  Returns:
    A 0-D array.

  Raises:
    ShapeError: if either operand is not 1-D or the lengths differ.
    TypeError: if the dtypes differ or are not supported.

  Example:
    >>> print(jmat.dot(jnp.array([1, 2, 3]), jnp.array([4, 5, 6])))
    32
  """
  a, b = operands("dot", a, b)
  out_shape = shapes.derive("dot", a.shape, b.shape)
  inner = kernel_sharding("dot", out_sharding, out_shape, None, None)
  out = matrix_product(a[None, :], b[:, None], precision, preferred_element_type, inner)
  return finish_sharding(out[0, 0], out_sharding)


@_jit_product
def mv(
    a: ArrayLike,
    b: ArrayLike,
    /,
    *,
    precision: PrecisionLike = None,
    preferred_element_type: DTypeLike | None = None,
    out_sharding: Sharding | None = None,
) -> jax.Array:
  """Product of a 2-D matrix and a 1-D vector, as ``torch.mv``.

  Args:
    a: array of shape ``(n, m)``.
    b: array of shape ``(m,)``, of the same dtype.
    precision: as for :func:`jmat.matmul`.
    preferred_element_type: as for :func:`jmat.matmul`.
    out_sharding: as for :func:`jmat.matmul`.

  Returns:
    Array of shape ``(n,)``.

  Raises:
    ShapeError: if ``a`` is not 2-D, ``b`` is not 1-D, or ``m`` differs.
    TypeError: if the dtypes differ or are not supported.

  Example:
    >>> print(jmat.mv(jnp.array([[1, 2], [3, 4]]), jnp.array([1, 1])))
    [3 7]
  """
  a, b = operands("mv", a, b)
  out_shape = shapes.derive("mv", a.shape, b.shape)
  inner = kernel_sharding("mv", out_sharding, out_shape, 0, None)
  out = matrix_product(a, b[:, None], precision, preferred_element_type, inner)
  return finish_sharding(out[:, 0], out_sharding)
