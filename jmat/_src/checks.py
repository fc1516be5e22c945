"""Every input check and every error message of jmat.

A user mistake is reported here, in Python, before any XLA computation is
traced: shapes and dtypes are static under ``jax.jit``, so the checks run once
per compilation and cost nothing on later calls. Messages always name the
operation, the shapes as Python tuples (or the dtypes) and what would be valid.
"""

from __future__ import annotations

import reprlib
from collections.abc import Mapping, Sequence
from typing import cast

import jax
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


def check_out_sharding(
    op: str, spec: tuple[object, ...], out_shape: Shape, explicit_axes: set[str]
) -> None:
  """Refuses an ``out_sharding`` longer than the result's rank or naming a non-Explicit axis.

  As for ``jnp.matmul``, ``out_sharding`` belongs to sharding-in-types (Explicit mesh
  axes); on Auto axes the partitioner decides, and a hint is a sharding constraint.
  """
  if len(spec) > len(out_shape):
    raise ShapeError(
        f"jmat.{op}: out_sharding {spec} has {len(spec)} entries, but the result has shape "
        f"{fmt_shape(out_shape)} ({len(out_shape)}-D); give at most one entry per result dim"
    )
  for entry in spec:
    for name in entry if isinstance(entry, tuple) else (entry,):
      if name is not None and name not in explicit_axes:
        raise ValueError(
            f"jmat.{op}: out_sharding names mesh axis {name!r}, which is not an Explicit axis "
            f"of the mesh (Explicit axes: {sorted(explicit_axes)}); out_sharding is for "
            f"Explicit axes, as in jnp.matmul: on Auto axes, constrain the result with "
            f"jax.lax.with_sharding_constraint instead"
        )


def check_bmm_batch(
    op: str, shape_a: Shape, shape_b: Shape, names: tuple[str, str] = ("a", "b")
) -> None:
  """bmm, unlike matmul, never broadcasts: the batch sizes must be equal."""
  if shape_a[0] != shape_b[0]:
    raise shape_error(
        op,
        f"batch sizes differ ({shape_a[0]} and {shape_b[0]})",
        both_shapes(shape_a, shape_b, names),
        f"{op} does not broadcast (use jmat.matmul to broadcast batch dimensions)",
    )


def check_arrays(op: str, arrays: Sequence[object], names: Sequence[str]) -> None:
  """Refuses operands that are not arrays (or scalars): lists and tuples, as ``jnp.matmul`` does.

  An implicit conversion would hide a dtype choice.

  Raises:
    TypeError: naming the operation, the operand and its type.
  """
  for name, x in zip(names, arrays, strict=True):
    if not isinstance(x, jax.Array | np.ndarray | np.generic | int | float | complex):
      raise TypeError(
          f"jmat.{op}: {name} must be an array, got {type(x).__name__}; "
          f"convert it first, e.g. jnp.asarray({name})"
      )


def check_not_scalar(op: str, shape_a: Shape, shape_b: Shape) -> None:
  """Refuses a 0-D operand of ``matmul``, as torch does (whatever some tutorials say)."""
  if len(shape_a) == 0 or len(shape_b) == 0:
    raise shape_error(
        op,
        "both arguments must be at least 1-D",
        both_shapes(shape_a, shape_b),
        "0-D arrays are scalars: scale with a * b instead (torch.matmul refuses 0-D too, "
        "whatever some tutorials say)",
    )


# --- the rest of the product family (addmm, ..., tensordot, multi_dot, linear, vecdot) ---


def _listed(names: Sequence[str], shapes: Sequence[Shape]) -> str:
  return ", ".join(_described(n, s) for n, s in zip(names, shapes, strict=True))


def check_expand(
    op: str, name: str, shape: Shape, target: Shape, what: str = "the product"
) -> None:
  """Refuses an added operand (``input``, ``bias``) that cannot be broadcast to the result.

  The broadcast is one-way, as torch's ``expand``: the operand may have fewer
  dims than the result and size-1 dims, never more dims or another size.
  """
  if len(shape) > len(target):
    raise shape_error(
        op,
        f"{name} has more dims than {what}",
        f"{_described(name, shape)}, {what} has shape {fmt_shape(target)}",
        f"{name} must broadcast to {fmt_shape(target)}: at most {len(target)} dims, "
        f"each equal to the result's or 1",
    )
  for position in range(-1, -len(shape) - 1, -1):
    if shape[position] not in (1, target[position]):
      raise shape_error(
          op,
          f"{name} does not broadcast to {what}'s shape",
          f"{_described(name, shape)}, {what} has shape {fmt_shape(target)}",
          f"aligned from the right, dim {position} of {name} is {shape[position]} where "
          f"{what} has {target[position]}; it must be {target[position]} or 1",
      )


def check_scale(op: str, name: str, value: object, dtype: np.dtype) -> complex:
  """Checks a ``beta``/``alpha`` against the operands' dtype and returns it as a Python number.

  torch silently truncates a fractional scale on integer tensors (``beta=0.5``
  becomes 0); jmat refuses it, and refuses a complex scale on real operands as
  torch does.

  Raises:
    TypeError: if ``value`` is not a Python/NumPy number, or does not fit ``dtype``.
  """
  if not isinstance(value, bool | int | float | complex | np.number):
    raise TypeError(
        f"jmat.{op}: {name} must be a Python number (static under jit), got "
        f"{type(value).__name__}; scale the operand yourself to use a traced value, e.g. "
        f"jmat.{op}(x * s, ...)"
    )
  number = complex(value)
  kind = np.dtype(dtype).kind
  if kind != "c" and number.imag != 0:
    raise TypeError(
        f"jmat.{op}: {name}={value!r} is complex but the operands are {_dtype_name(dtype)}; "
        f"cast them to a complex dtype"
    )
  if kind in "iu" and not float(number.real).is_integer():
    raise TypeError(
        f"jmat.{op}: {name}={value!r} is not an integer but the operands are "
        f"{_dtype_name(dtype)}; torch would silently truncate it to {int(number.real)}: pass "
        f"an integer {name}, or cast the operands to a floating dtype"
    )
  return number


def check_floating(op: str, dtype: np.dtype, names: Sequence[str] = ("x", "y")) -> None:
  """Refuses integer operands where torch does (``torch.linalg.vecdot``)."""
  if np.dtype(dtype).kind in "biu":
    listed = " and ".join(names)
    raise TypeError(
        f"jmat.{op}: {listed} have dtype {_dtype_name(dtype)}, but {op} takes floating-point "
        f"or complex arrays (as torch); cast them, e.g. {names[0]}.astype(jnp.float32)"
    )


def check_min_rank(
    op: str, names: Sequence[str], shapes: Sequence[Shape], index: int, minimum: int
) -> None:
  """Refuses operand ``index`` if it has fewer than ``minimum`` dims."""
  if len(shapes[index]) < minimum:
    raise shape_error(
        op,
        f"{names[index]} must be at least {minimum}-D, got {len(shapes[index])}-D",
        _listed(names, shapes),
        "a 0-D array is a scalar: multiply by it instead" if minimum == 1 else "",
    )


def check_array_list(op: str, arrays: object) -> None:
  """Refuses a chain product's ``arrays`` that is not a list or tuple (``multi_dot``)."""
  if not isinstance(arrays, list | tuple):
    raise TypeError(
        f"jmat.{op}: arrays must be a list or tuple of arrays, got "
        f"{type(arrays).__name__}; e.g. jmat.{op}([a, b, c])"
    )


def check_count(op: str, count: int, minimum: int, what: str) -> None:
  """Refuses a chain product of fewer than ``minimum`` arrays."""
  if count < minimum:
    raise ShapeError(
        f"jmat.{op}: expects at least {minimum} {what}, got {count}"
        + ("; for one array there is nothing to multiply: use it directly" if count == 1 else "")
    )


def dims_type_error(op: str, dims: object) -> TypeError:
  """The error for a ``tensordot`` ``dims`` that is neither an int nor two sequences of ints."""
  return TypeError(
      f"jmat.{op}: dims must be an int (contract the last dims of a with the first dims of b), "
      f"a pair of sequences of ints ([1, 2], [0, 1]), or a 2-row nested list, got {dims!r}"
  )


def check_tensordot_dims(
    op: str, shape_a: Shape, shape_b: Shape, axes_a: Sequence[int], axes_b: Sequence[int]
) -> None:
  """Refuses ``tensordot`` axis lists of unequal length, out of range or repeated."""
  shapes = both_shapes(shape_a, shape_b)
  if len(axes_a) != len(axes_b):
    raise shape_error(
        op,
        f"dims lists have different lengths ({len(axes_a)} and {len(axes_b)})",
        shapes,
        f"dims pairs axis i of a with axis i of b: got {list(axes_a)} and {list(axes_b)}",
    )
  for name, shape, axes in (("a", shape_a, axes_a), ("b", shape_b, axes_b)):
    for axis in axes:
      if not -len(shape) <= axis < len(shape):
        raise shape_error(
            op,
            f"dim {axis} is out of range for {name}",
            shapes,
            f"{name} is {len(shape)}-D: its dims are {-len(shape)}..{len(shape) - 1}",
        )
    normalized = [a % len(shape) for a in axes]
    if len(set(normalized)) != len(normalized):
      raise shape_error(
          op, f"a dim of {name} appears more than once in dims {list(axes)}", shapes,
          "each dim can be contracted once",
      )


def check_tensordot_count(op: str, shape_a: Shape, shape_b: Shape, dims: int) -> None:
  """Refuses an int ``dims`` that is negative or larger than an operand's rank."""
  if dims < 0 or dims > min(len(shape_a), len(shape_b)):
    raise shape_error(
        op,
        f"dims={dims} is out of range",
        both_shapes(shape_a, shape_b),
        f"an int dims contracts the last dims of a with the first dims of b: it must be "
        f"between 0 and {min(len(shape_a), len(shape_b))}",
    )


def check_tensordot_sizes(
    op: str, shape_a: Shape, shape_b: Shape, axes_a: Sequence[int], axes_b: Sequence[int]
) -> None:
  """Refuses contracted dims of different sizes (a size 1 is summed out, as torch does)."""
  for axis_a, axis_b in zip(axes_a, axes_b, strict=True):
    size_a, size_b = shape_a[axis_a], shape_b[axis_b]
    if size_a != size_b and 1 not in (size_a, size_b):
      raise shape_error(
          op,
          f"contracted sizes {size_a} and {size_b} differ",
          both_shapes(shape_a, shape_b),
          f"dim {axis_a} of a ({size_a}) is paired with dim {axis_b} of b ({size_b}); "
          f"paired dims must have equal sizes (or one of them 1)",
      )


def check_dim(op: str, dim: int, rank: int, shapes: str) -> int:
  """Normalises a user's ``dim`` against ``rank`` (a 0-D array takes -1 and 0, as torch)."""
  wrap = max(rank, 1)
  if isinstance(dim, bool) or not isinstance(dim, int | np.integer):
    raise TypeError(f"jmat.{op}: dim must be an int, got {dim!r}")
  if not -wrap <= dim < wrap:
    raise shape_error(
        op, f"dim {dim} is out of range", shapes,
        f"the broadcast operands are {rank}-D: dim must be in {-wrap}..{wrap - 1}",
    )
  return int(dim) % wrap


# --- the arguments of matmul_shape and explain (shapes, not arrays) ---


def check_shape_argument(name: str, shape: object) -> Shape:
  """A user-given shape as a tuple, or TypeError: a sequence of non-negative Python ints."""
  try:
    dims = tuple(shape)  # type: ignore[arg-type]
  except TypeError:
    raise TypeError(f"jmat: {name} must be a shape, a tuple of ints, not {shape!r}") from None
  for d in dims:
    if isinstance(d, bool) or not isinstance(d, int) or d < 0:
      raise TypeError(f"jmat: {name} must be a tuple of non-negative ints, got {shape!r}")
  return dims


def check_known_op(op: str, known: Sequence[str]) -> None:
  """Refuses an ``op`` that is not one of jmat's products."""
  if op not in known:
    raise ValueError(f"jmat: unknown op {op!r}; known ops: {', '.join(sorted(known))}")


def check_shape_count(op: str, count: int, chains: Sequence[str]) -> None:
  """Refuses more than two shapes for an op that is not a chain product."""
  if count > 2 and op not in chains:
    raise TypeError(
        f"jmat: op={op!r} takes two shapes, got {count}; only "
        f"{' and '.join(chains)} take a chain of shapes"
    )


def check_option(op: str, option: str, accepted: Sequence[str], takers: Sequence[str]) -> None:
  """Refuses an option (``input_shape``, ``dims``, ...) that ``op`` does not take."""
  if option not in accepted:
    raise TypeError(
        f"jmat: op={op!r} takes no {option}; it is an option of {', '.join(sorted(takers))}"
    )


def check_ring_attention(
    op: str,
    query: Shape,
    key: Shape,
    value: Shape,
    dtypes: Sequence[np.dtype],
    axis_name: str,
    mesh_axes: dict[str, int],
) -> None:
  """Refuses sequence-sharded attention operands that cannot be split one block per device.

  The attention rules are :func:`check_attention_shapes` and
  :func:`check_attention_dtypes`; on top, the leading dims must be equal (no
  broadcasting across the ring) and both lengths divisible by the axis size.

  Args:
    op: the public name of the operation.
    query: ``(*lead, L, E)``.
    key: ``(*lead, S, E)``.
    value: ``(*lead, S, Ev)``.
    dtypes: the dtypes of query, key and value.
    axis_name: the mesh axis the sequence dim is sharded over.
    mesh_axes: the mesh's axis names and sizes.
  """
  devices = check_mesh_axis(op, axis_name, mesh_axes)
  check_attention_shapes(op, query, key, value, enable_gqa=False)
  shapes = (query, key, value)
  listed = _listed(_ATTENTION_NAMES, shapes)
  if not query[:-2] == key[:-2] == value[:-2]:
    raise shape_error(
        op, "leading (batch, head) dims differ", listed,
        "sequence-sharded attention does not broadcast them: repeat or expand the inputs to "
        "equal leading dims" + _gqa_hint(query, key, value),
    )
  for name, shape in zip(_ATTENTION_NAMES, shapes, strict=True):
    if shape[-2] % devices:
      raise shape_error(
          op,
          f"the sequence length {shape[-2]} of {name} is not divisible by the {devices} "
          f"devices of mesh axis {axis_name!r}",
          listed,
          f"each device holds one block of dim -2: pad the sequence to a multiple of {devices}",
      )
  check_attention_dtypes(op, dtypes, _ATTENTION_NAMES)


def _gqa_hint(query: Shape, key: Shape, value: Shape) -> str:
  """``"; for grouped-query attention ... pass enable_gqa=True"`` where key and value have
  fewer heads (dim -3) than query, dividing its, and the dims around agree; else ``""``."""
  if min(len(query), len(key), len(value)) < 3 or key[:-2] != value[:-2]:
    return ""
  heads, kv_heads = query[-3], key[-3]
  if heads == kv_heads or not kv_heads or heads % kv_heads or query[:-3] != key[:-3]:
    return ""
  needs_batch = ("" if len(query) == 4
                 else " with 4-D (B, H, L, E) inputs (add the batch dim: x[None])")
  return (f"; for grouped-query attention (key/value with {kv_heads} heads, query with "
          f"{heads}) pass enable_gqa=True{needs_batch}")


def check_mesh(op: str, mesh: object) -> None:
  """Refuses a ``mesh`` that is no :class:`jax.sharding.Mesh` (before jit hashes it)."""
  if not isinstance(mesh, jax.sharding.Mesh | jax.sharding.AbstractMesh):
    raise TypeError(
        f"jmat.{op}: mesh must be a jax.sharding.Mesh, got {type(mesh).__name__} "
        f"{reprlib.repr(mesh)}; "
        f"make one from the devices, e.g. mesh=jax.make_mesh((len(jax.devices()),), "
        f"('seq',)), and pass the name of its axis as axis_name='seq'")


def check_ring_lead_sharding(op: str, query: Shape, lead_spec: tuple, axis_name: str) -> None:
  """Refuses a query whose leading dims are already sharded over the ring's own mesh axis."""
  for dim, entry in enumerate(lead_spec):
    names = (entry,) if isinstance(entry, str) else (entry or ())
    if axis_name in names:
      raise ValueError(
          f"jmat.{op}: query of shape {fmt_shape(query)} has dim {dim} sharded over mesh axis "
          f"{axis_name!r}, the axis the sequence (dim -2) is to be sharded over; shard the "
          f"leading dims over another axis, or reshard them first (jax.sharding.reshard)"
      )


# --- attention (scaled_dot_product_attention, multi_head_attention) ---

_ATTENTION_NAMES = ("query", "key", "value")


def _broadcast_or_none(shapes: Sequence[Shape]) -> Shape | None:
  """NumPy broadcast of ``shapes``, or None if they do not broadcast."""
  try:
    return tuple(int(d) for d in np.broadcast_shapes(*shapes))
  except ValueError:
    return None


def check_attention_scale(op: str, scale: object) -> None:
  """Refuses an attention ``scale`` that is not a real scalar (a number or a 0-d array)."""
  dtype = getattr(scale, "dtype", None)
  if dtype is None:
    if isinstance(scale, bool) or not isinstance(scale, int | float | np.number):
      raise TypeError(
          f"jmat.{op}: scale must be a real number or a 0-d float array, got "
          f"{type(scale).__name__} {scale!r}"
      )
    dtype = np.asarray(scale).dtype
  if not (jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.integer)):
    raise TypeError(
        f"jmat.{op}: scale has dtype {_dtype_name(np.dtype(dtype))}; it must be a real "
        f"number (e.g. a float32 scalar), the factor of query @ key^T"
    )
  shape = tuple(getattr(scale, "shape", ()))
  if shape:
    raise shape_error(
        op, "scale is not a scalar", f"scale has shape {fmt_shape(shape)}",
        "pass one factor for every score (a Python float or a 0-d array); for a factor "
        "per head, scale the queries: query * s[:, None, None]",
    )


def check_attention_dtypes(op: str, dtypes: Sequence[np.dtype], names: Sequence[str]) -> None:
  """Refuses attention inputs of different dtypes or of a non-floating dtype (as torch)."""
  check_dtypes(op, dtypes, names)
  if not jnp.issubdtype(dtypes[0], jnp.floating):
    listed = ", ".join(names)
    raise TypeError(
        f"jmat.{op}: {listed} have dtype {_dtype_name(dtypes[0])}; attention needs "
        f"floating-point inputs (float16, bfloat16, float32 or float64), e.g. "
        f"{names[0]}.astype(jnp.float32)"
    )


def check_attention_shapes(
    op: str, query: Shape, key: Shape, value: Shape, enable_gqa: bool
) -> Shape:
  """Checks ``query (..., L, E)``, ``key (..., S, E)``, ``value (..., S, Ev)``.

  Returns:
    The broadcast leading shape of the output, ``(N..., L, Ev)`` without ``(L, Ev)``.
  """
  shapes = (query, key, value)
  listed = _listed(_ATTENTION_NAMES, shapes)
  if min(len(s) for s in shapes) < 2:
    raise shape_error(
        op, "query, key and value must be at least 2-D", listed,
        "the last two dims are (sequence, embedding): (..., L, E), (..., S, E), (..., S, Ev)",
    )
  _check_sizes_agree(op, shapes, -2, listed,
                     "scores are query @ key^T, so the last dims of query and key must be equal "
                     "(value's may differ)", "there must be one value per key (dim -2)")
  if enable_gqa:
    if min(len(s) for s in shapes) < 3:
      raise shape_error(
          op, "enable_gqa=True needs a heads dim (dim -3) in query, key and value", listed,
          "use (..., heads, L, E) inputs, or enable_gqa=False",
      )
    heads = query[-3]
    _check_kv_heads(op, shapes, -3, listed, "")
    lead = _broadcast_or_none([s[:-3] for s in shapes])
    if lead is not None:
      return lead + (heads,)
  else:
    lead = _broadcast_or_none([s[:-2] for s in shapes])
    if lead is not None:
      return lead
  hint = ""
  if (not enable_gqa and min(len(s) for s in shapes) >= 3
      and all(s[-3] and query[-3] % s[-3] == 0 for s in shapes[1:])):
    hint = (f"; for grouped-query attention (key/value with fewer heads than query's "
            f"{query[-3]}) pass enable_gqa=True")
  raise shape_error(
      op, "the leading (batch, heads) dims do not broadcast", listed,
      "dims before (L, E) are aligned from the right and must be equal or 1" + hint,
  )


def check_attention_mask(
    op: str, mask: Shape, mask_dtype: np.dtype, query_dtype: np.dtype, target: Shape
) -> None:
  """Checks an ``attn_mask`` against the scores' shape ``target = (N..., L, S)``.

  torch accepts a boolean mask, a float32 mask, or a mask of the query's dtype.
  """
  dtype = np.dtype(mask_dtype)
  if dtype != np.bool_ and dtype != np.dtype(np.float32) and dtype != np.dtype(query_dtype):
    raise TypeError(
        f"jmat.{op}: attn_mask has dtype {_dtype_name(dtype)}; it must be bool (True = may "
        f"attend), float32 or the query's dtype {_dtype_name(query_dtype)} (added to the scores)"
    )
  if len(mask) < 2:
    raise shape_error(
        op, f"attn_mask must be at least 2-D, got {len(mask)}-D",
        f"attn_mask has shape {fmt_shape(mask)}, the scores have shape {fmt_shape(target)}",
        "the last two dims of attn_mask are (L, S): for one mask per key use shape (1, S)",
    )
  check_expand(op, "attn_mask", mask, target, what="the scores (N..., L, S)")


def _check_sizes_agree(op: str, shapes: Sequence[Shape], length_dim: int, listed: str,
                       size_advice: str, length_advice: str) -> None:
  """Refuses query/key embedding sizes or key/value lengths (at ``length_dim``) that differ."""
  query, key, value = shapes
  if query[-1] != key[-1]:
    raise shape_error(
        op, f"query and key embedding sizes {query[-1]} and {key[-1]} differ", listed,
        size_advice)
  if key[length_dim] != value[length_dim]:
    raise shape_error(
        op, f"key and value lengths {key[length_dim]} and {value[length_dim]} differ", listed,
        length_advice)


def _check_kv_heads(op: str, shapes: Sequence[Shape], heads_dim: int, listed: str,
                    layout: str) -> None:
  """Refuses key/value head counts (at ``heads_dim``) that do not divide query's."""
  heads = shapes[0][heads_dim]
  for name, shape in zip(_ATTENTION_NAMES[1:], shapes[1:], strict=True):
    if shape[heads_dim] == 0 or heads % shape[heads_dim]:
      raise shape_error(
          op,
          f"the {shape[heads_dim]} heads of {name} do not divide the {heads} heads of query",
          listed,
          f"{layout}grouped-query attention shares each key/value head among query_heads / "
          f"kv_heads query heads: the number of key and value heads (dim {heads_dim}) must "
          f"divide query's",
      )


def check_flax_attention_shapes(op: str, query: Shape, key: Shape, value: Shape) -> Shape:
  """Checks flax's ``(batch..., length, heads, head_dim)`` attention inputs.

  Returns:
    The scores' shape ``(batch..., heads, q_length, kv_length)``.
  """
  shapes = (query, key, value)
  listed = _listed(_ATTENTION_NAMES, shapes)
  layout = "flax's layout is (batch..., length, heads, head_dim); "
  if min(len(s) for s in shapes) < 3:
    raise shape_error(op, "query, key and value must be at least 3-D", listed, layout[:-2])
  _check_sizes_agree(op, shapes, -3, listed,
                     f"{layout}scores are query @ key^T per head, so their last dims must be "
                     f"equal", f"{layout}there must be one value per key (dim -3)")
  _check_kv_heads(op, shapes, -2, listed, layout)
  batch = _broadcast_or_none([s[:-3] for s in shapes])
  if batch is None:
    raise shape_error(
        op, "the batch dims do not broadcast", listed,
        f"{layout}the dims before (length, heads, head_dim) must be equal or 1")
  return batch + (query[-2], query[-3], key[-3])


def check_probability(op: str, name: str, p: object) -> None:
  """Refuses a probability (``dropout_p``, flax's ``dropout_rate``) outside [0, 1]."""
  if isinstance(p, bool) or not isinstance(p, int | float) or not 0.0 <= p <= 1.0:
    raise ValueError(f"jmat.{op}: {name} must be a Python float in [0, 1], got {p!r}")


def check_dropout(op: str, dropout_p: float, has_rng: bool) -> None:
  """Refuses a dropout probability outside [0, 1], or dropout without a random key."""
  check_probability(op, "dropout_p", dropout_p)
  if dropout_p > 0.0 and not has_rng:
    raise ValueError(
        f"jmat.{op}: dropout_p={dropout_p} needs an explicit random key: pass "
        f"dropout_rng=jax.random.key(seed) (JAX has no hidden global RNG state); for "
        f"evaluation pass dropout_p=0.0"
    )


def check_attention_implementation(op: str, implementation: object, dropout_p: float) -> None:
  """Refuses an unknown ``implementation``, and dropout in the blockwise one."""
  if implementation not in (None, "dense", "blockwise", "pallas", "cudnn"):
    raise ValueError(
        f"jmat.{op}: implementation must be None (pick by size), 'dense', 'blockwise', "
        f"'pallas' or 'cudnn', got {implementation!r}"
    )
  if implementation not in (None, "dense") and dropout_p > 0.0:
    raise ValueError(
        f"jmat.{op}: implementation={implementation!r} does not support dropout "
        f"(dropout_p={dropout_p}); use implementation='dense' or None"
    )


def check_multi_head_attention(
    op: str,
    params: dict[str, Shape],
    query: Shape,
    key: Shape,
    value: Shape,
    num_heads: int,
) -> None:
  """Checks batch-first ``(N, L, E)`` inputs and torch.nn.MultiheadAttention's parameters."""
  listed = _listed(_ATTENTION_NAMES, (query, key, value))
  ranks = {len(query), len(key), len(value)}
  if not ranks <= {2, 3} or len(ranks) != 1:
    raise shape_error(
        op, "query, key and value must all be 3-D (batched) or all 2-D (unbatched)", listed,
        "batch-first layout: (N, L, E), (N, S, E), (N, S, E)",
    )
  expected = {"in_proj_weight": None, "in_proj_bias": None, "out_proj.weight": None,
              "out_proj.bias": None}
  missing = [k for k in expected if k not in params]
  if missing:
    raise ValueError(
        f"jmat.{op}: params lacks {missing}; it takes torch.nn.MultiheadAttention's "
        f"state_dict keys (in_proj_weight, in_proj_bias, out_proj.weight, out_proj.bias), "
        f"e.g. jmat.init_multi_head_attention(rng, embed_dim, num_heads)"
    )
  embed = params["out_proj.weight"][0] if params["out_proj.weight"] else 0
  wanted = {
      "in_proj_weight": (3 * embed, embed),
      "in_proj_bias": (3 * embed,),
      "out_proj.weight": (embed, embed),
      "out_proj.bias": (embed,),
  }
  for name, shape in wanted.items():
    if tuple(params[name]) != shape:
      raise shape_error(
          op, f"params[{name!r}] has shape {fmt_shape(params[name])}, expected {fmt_shape(shape)}",
          ", ".join(f"{k} {fmt_shape(params[k])}" for k in wanted),
          f"for embed_dim={embed} the parameters are in_proj_weight (3E, E), in_proj_bias "
          f"(3E,), out_proj.weight (E, E), out_proj.bias (E,)",
      )
  if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1 or (
      embed % num_heads):
    raise ValueError(
        f"jmat.{op}: num_heads={num_heads!r} must be a positive int dividing embed_dim={embed}"
    )
  for name, shape in zip(_ATTENTION_NAMES, (query, key, value), strict=True):
    if shape[-1] != embed:
      raise shape_error(
          op, f"{name}'s last dim {shape[-1]} is not embed_dim={embed}", listed,
          "query, key and value have the module's embed_dim as their last dim",
      )
  if key[:-1] != value[:-1] or query[:-2] != key[:-2]:
    raise shape_error(
        op, "batch sizes or key/value lengths differ", listed,
        "key and value must have the same (N, S), and query the same N",
    )


def check_key_padding_mask(op: str, mask: Shape, dtype: np.dtype, expected: Shape) -> None:
  """Checks ``key_padding_mask``: ``(N, S)`` (or ``(S,)`` unbatched), bool or float."""
  if np.dtype(dtype) != np.bool_ and not jnp.issubdtype(dtype, jnp.floating):
    raise TypeError(
        f"jmat.{op}: key_padding_mask has dtype {_dtype_name(dtype)}; it must be bool "
        f"(True = ignore that key) or float (added to the scores)"
    )
  if tuple(mask) != tuple(expected):
    raise shape_error(
        op, "key_padding_mask has the wrong shape",
        f"key_padding_mask has shape {fmt_shape(mask)}, expected {fmt_shape(expected)}",
        "one entry per key: (N, S) for batched inputs, (S,) unbatched",
    )


def check_scores_shapes(op: str, query: Shape, key: Shape) -> Shape:
  """Checks ``query (..., L, E)`` and ``key (..., S, E)``; returns the scores' shape."""
  names = _ATTENTION_NAMES[:2]
  for index in (0, 1):
    check_min_rank(op, names, (query, key), index, 2)
  if query[-1] != key[-1]:
    raise shape_error(
        op, f"query and key embedding sizes {query[-1]} and {key[-1]} differ",
        both_shapes(query, key, names),
        "scores are query @ key^T: the last dims of query and key must be equal",
    )
  lead = _broadcast_or_none([query[:-2], key[:-2]])
  if lead is None:
    raise shape_error(
        op, "the leading (batch, heads) dims do not broadcast", both_shapes(query, key, names),
        "dims before (L, E) are aligned from the right and must be equal or 1",
    )
  return lead + (query[-2], key[-2])


# --- flex attention (flex_attention, create_block_mask, mask/score mods) ---


def check_mask_mods(op: str, mods: Sequence[object]) -> None:
  """Refuses combinators (and_masks, or_masks) of anything but callables."""
  for i, mod in enumerate(mods):
    if not callable(mod):
      raise TypeError(
          f"jmat.{op}: argument {i} is {type(mod).__name__}, not a mask_mod; pass functions "
          f"(b, h, q_idx, kv_idx) -> bool"
      )


def check_mod_result(
    op: str, kind: str, names: Sequence[str], signature_ok: bool, result: object
) -> None:
  """Refuses a score_mod/mask_mod that does not take torch's arguments or return a scalar.

  Args:
    op: the public name of the operation.
    kind: ``"score_mod"`` or ``"mask_mod"``.
    names: the arguments it must accept, in order.
    signature_ok: whether it accepts them.
    result: ``jax.eval_shape`` of a call on scalars (a ShapeDtypeStruct).
  """
  wanted = "a bool scalar" if kind == "mask_mod" else "a floating-point scalar"
  usage = f"{kind} must be a function ({', '.join(names)}) -> {wanted}, as in torch"
  if not signature_ok:
    raise TypeError(f"jmat.{op}: {kind} does not accept {len(names)} arguments; {usage}")
  shape = getattr(result, "shape", None)
  dtype = getattr(result, "dtype", None)
  if shape != () or dtype is None:
    raise TypeError(
        f"jmat.{op}: {kind} returned {_result_phrase(result)} for scalar arguments; {usage} "
        f"(it is applied to one entry at a time; jmat vmaps it over blocks)"
    )
  ok = dtype == np.bool_ if kind == "mask_mod" else jnp.issubdtype(dtype, jnp.floating)
  if not ok:
    raise TypeError(
        f"jmat.{op}: {kind} returned a scalar of dtype {_dtype_name(np.dtype(dtype))}; {usage}"
    )


def _result_phrase(result: object) -> str:
  shape = getattr(result, "shape", None)
  if shape is None:
    return f"a {type(result).__name__}"
  return f"an array of shape {fmt_shape(shape)}"


def check_mask_sizes(
    op: str, batch: object, heads: object, q_len: object, kv_len: object
) -> tuple[int, int, int, int]:
  """Checks create_block_mask's ``B, H, Q_LEN, KV_LEN``; returns them with None as 1."""
  sizes = []
  for name, value, optional in (("B", batch, True), ("H", heads, True),
                                ("Q_LEN", q_len, False), ("KV_LEN", kv_len, False)):
    if value is None and optional:
      sizes.append(1)
      continue
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 0:
      allowed = "a non-negative int or None (broadcast)" if optional else "a non-negative int"
      raise ValueError(f"jmat.{op}: {name} must be {allowed}, got {value!r}")
    sizes.append(max(int(value), 1) if optional else int(value))
  return sizes[0], sizes[1], sizes[2], sizes[3]


def check_block_size(op: str, block_size: object) -> tuple[int, int]:
  """Checks ``BLOCK_SIZE``: a positive int or a pair of them; returns the pair."""
  pair: Sequence = block_size if isinstance(block_size, tuple | list) else (
      block_size, block_size)
  if len(pair) != 2 or any(
      isinstance(b, bool) or not isinstance(b, int | np.integer) or b < 1 for b in pair
  ):
    raise ValueError(
        f"jmat.{op}: BLOCK_SIZE must be a positive int or a (query block, key block) pair "
        f"of them, got {block_size!r}"
    )
  return int(pair[0]), int(pair[1])  # type: ignore[arg-type]  (checked ints above)


def check_flex_shapes(
    op: str, query: Shape, key: Shape, value: Shape, enable_gqa: bool
) -> None:
  """Checks flex attention's ``(B, Hq, L, E)``, ``(B, Hkv, S, E)``, ``(B, Hkv, S, Ev)``."""
  shapes = (query, key, value)
  listed = _listed(_ATTENTION_NAMES, shapes)
  if any(len(s) != 4 for s in shapes):
    raise shape_error(
        op, "query, key and value must be 4-D", listed,
        "flex attention takes (batch, heads, length, embedding): (B, Hq, L, E), "
        "(B, Hkv, S, E), (B, Hkv, S, Ev); add size-1 dims with x[None] for missing ones",
    )
  if not query[0] == key[0] == value[0]:
    raise shape_error(op, "batch sizes (dim 0) differ", listed,
                      "flex attention does not broadcast the batch: pass equal batch sizes")
  if query[-1] != key[-1]:
    raise shape_error(
        op, f"query and key embedding sizes {query[-1]} and {key[-1]} differ", listed,
        "scores are query @ key^T, so the last dims of query and key must be equal "
        "(value's may differ)",
    )
  if key[1:3] != value[1:3]:
    raise shape_error(op, "key and value heads or lengths differ", listed,
                      "there must be one value per key: dims 1 and 2 of key and value match")
  _check_head_groups(op, query[1], key[1], enable_gqa, listed, " (dim 1)")


def _check_head_groups(op: str, heads: int, kv_heads: int, enable_gqa: bool, listed: str,
                       where: str) -> None:
  """Refuses query and key/value head counts that differ without ``enable_gqa``, or that do
  not group (``kv_heads`` must divide ``heads``); ``where`` names the heads' dim."""
  if heads == kv_heads:
    return
  if not enable_gqa:
    hint = (", or pass enable_gqa=True for grouped-query attention"
            if kv_heads and heads % kv_heads == 0 else "")
    raise shape_error(op, f"query has {heads} heads and key/value {kv_heads}", listed,
                      f"give them equal head counts{where}{hint}")
  if kv_heads == 0 or heads % kv_heads:
    raise shape_error(
        op, f"the {kv_heads} key/value heads do not divide the {heads} query heads", listed,
        "grouped-query attention shares each key/value head among Hq / Hkv query heads")


def check_block_mask_fits(
    op: str, mask_shape: Sequence[int], query: Shape, key: Shape
) -> None:
  """Refuses a BlockMask built for other lengths, batch size or head count."""
  batch, heads, q_len, kv_len = (int(d) for d in mask_shape)
  wanted = (query[0], query[1], query[2], key[2])
  problems = []
  if (q_len, kv_len) != (query[2], key[2]):
    problems.append(f"it was built for Q_LEN={q_len}, KV_LEN={kv_len}, the inputs have "
                    f"L={query[2]}, S={key[2]}")
  if batch not in (1, query[0]):
    problems.append(f"it was built for B={batch}, the batch size is {query[0]}")
  if heads not in (1, query[1]):
    problems.append(f"it was built for H={heads}, query has {query[1]} heads")
  if problems:
    raise shape_error(
        op, "the block_mask does not fit the inputs: " + "; ".join(problems),
        f"block_mask has shape {fmt_shape(mask_shape)}, query has shape {fmt_shape(query)}, "
        f"key has shape {fmt_shape(key)}",
        f"build it with create_block_mask(mask_mod, {wanted[0]} or None, {wanted[1]} or None, "
        f"{wanted[2]}, {wanted[3]})",
    )


# --- kernel backends (flex_attention's kernel_options, SDPA's implementation) ---


def check_flag(op: str, name: str, value: object) -> bool:
  """Refuses a flag that is not a bool (a Python bool or ``np.bool_``); returns it as a bool.

  ``"no"`` and ``1`` are truthy: taking them as True would silently turn on what
  the caller meant to turn off.
  """
  if not isinstance(value, bool | np.bool_):
    raise TypeError(
        f"jmat.{op}: {name} must be True or False (a bool), got {type(value).__name__} "
        f"{value!r}")
  return bool(value)


def _is_int(value: object) -> bool:
  """A Python or NumPy integer, not a bool (``np.int64(32)`` is an int; ``True`` is not)."""
  return isinstance(value, int | np.integer) and not isinstance(value, bool | np.bool_)


def check_kernel_options(op: str, options: object, keys: Sequence[str],
                         backends: Sequence[str]) -> dict:
  """Refuses a ``kernel_options`` that is no dict, or an unknown key or value, listing the valid.

  Returns:
    The options as a dict with Python values (``np.int64(32)`` becomes ``32``).
  """
  if options is None:
    return {}
  if not isinstance(options, Mapping):
    raise TypeError(
        f"jmat.{op}: kernel_options must be a dict (or None), got {type(options).__name__} "
        f"{options!r}; it maps option names to values, e.g. kernel_options={{'BACKEND': "
        f"'XLA'}} (valid keys: {', '.join(keys)})")
  unknown = sorted(str(k) for k in options if k not in keys)
  if unknown:
    raise ValueError(
        f"jmat.{op}: unknown kernel_options key(s) {unknown}; the valid keys are "
        f"{', '.join(keys)}")
  checked = dict(options)
  backend = checked.get("BACKEND", "AUTO")
  if not isinstance(backend, str) or backend not in backends:
    raise ValueError(
        f"jmat.{op}: kernel_options BACKEND={backend!r} is not a backend; use one of "
        f"{', '.join(repr(b) for b in backends)}")
  if "INTERPRET" in checked:
    checked["INTERPRET"] = check_flag(op, "kernel_options INTERPRET", checked["INTERPRET"])
  for key, value in checked.items():
    if key not in ("BACKEND", "INTERPRET"):
      if not _is_int(value) or value < 1:
        raise ValueError(
            f"jmat.{op}: kernel_options {key}={value!r} must be a positive int")
      checked[key] = int(value)
  return checked


def bad_kernel_option(op: str, key: str, value: int, rule: str) -> ValueError:
  """The error for a Triton tunable the kernel cannot take, named by the user's key."""
  return ValueError(
      f"jmat.{op}: kernel_options {key}={value!r} is not valid for the Triton kernel: {key} "
      f"must be {rule}")


def refuse_backend(op: str, backend: str, reason: str) -> None:
  """Refuses a backend asked for by name that cannot run the call: never a silent fallback."""
  raise ValueError(
      f"jmat.{op}: the {backend} backend cannot run this call: {reason}; use "
      f"kernel_options={{'BACKEND': 'AUTO'}} (which runs it on the XLA backend there) or "
      f"'XLA'")


def wrong_platform_message(op: str, backend: str, platform: str,
                           native: Sequence[str]) -> str:
  """Why a Pallas kernel asked for by name does not compile for ``platform``, and the fixes."""
  where = " and ".join(native)
  return (
      f"jmat.{op}: kernel_options BACKEND={backend!r} compiles the Pallas kernel for "
      f"{where} only, and this program is lowered for {platform}; add \"INTERPRET\": True "
      f"to run the Pallas kernel interpreted on {platform} (slow: for tests and debugging), "
      f"or use BACKEND 'XLA' or 'AUTO' (which runs the XLA loops on {platform} and the fused "
      f"kernel on a GPU or TPU)")


def cudnn_absent(op: str, error: Exception) -> ValueError:
  """The error for ``implementation="cudnn"`` where jax finds no cuDNN (a machine without GPU)."""
  return ValueError(
      f"jmat.{op}: implementation='cudnn' needs cuDNN, which jax does not find here "
      f"({type(error).__name__}: {error}); use implementation=None (cuDNN on a GPU where it "
      f"can run the call, the blockwise kernel or dense attention otherwise), 'blockwise', "
      f"'dense' or 'pallas'")


def check_flex_aux(op: str, return_lse: object, return_aux: object,
                   request: type) -> None:
  """Refuses ``return_lse`` that is no bool, both ways to ask for the lse at once (torch), or a
  ``return_aux`` that is no ``request`` (:class:`jmat.attention.AuxRequest`)."""
  return_lse = check_flag(op, "return_lse", return_lse)
  if return_aux is None:
    return
  if return_lse:
    raise ValueError(
        f"jmat.{op}: return_lse and return_aux both given; return_lse is deprecated (torch "
        f"2.13): pass return_aux=AuxRequest(lse=True) alone")
  if not isinstance(return_aux, request):
    raise TypeError(
        f"jmat.{op}: return_aux must be a jmat.attention.AuxRequest(lse=..., max_scores=...), "
        f"got {type(return_aux).__name__}")


def check_platform(op: str, platform: object, platforms: Sequence[str]) -> None:
  """Refuses a platform name jax does not lower for."""
  if platform not in platforms:
    raise ValueError(
        f"jmat.{op}: platform={platform!r} is not one jax lowers for; use one of "
        f"{', '.join(repr(p) for p in platforms)}")


# --- BlockMask tables and indexing (BlockMask.from_kv_blocks, block_mask[...]) ----------------

_TABLE_NAMES = ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices")
_MASK_AXES = ("batch", "head", "query block")


def check_block_tables(
    op: str, shapes: Sequence[Shape | None], dtypes: Sequence[np.dtype | None]
) -> None:
  """Checks torch's block tables ``kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices``.

  ``(B, H, n_q)`` counts and ``(B, H, n_q, n_k)`` indices of integer dtype; the
  full pair is given together (or not at all) with the shapes of the partial pair.
  """
  given = [(n, s) for n, s in zip(_TABLE_NAMES, shapes, strict=True) if s is not None]
  listed = _listed([n for n, _ in given], [s for _, s in given])
  if (shapes[2] is None) != (shapes[3] is None):
    missing = _TABLE_NAMES[2] if shapes[2] is None else _TABLE_NAMES[3]
    raise ValueError(
        f"jmat.{op}: full_kv_num_blocks and full_kv_indices go together, but {missing} is "
        f"None: {listed}; pass both (the full blocks, where mask_mod is not evaluated) or "
        f"neither"
    )
  counts, indices = shapes[0], shapes[1]
  if counts is None or indices is None or len(counts) != 3 or len(indices) != 4:
    raise shape_error(
        op, "kv_num_blocks must be 3-D (B, H, n_q) and kv_indices 4-D (B, H, n_q, n_k)",
        listed, "as create_block_mask's tables; add size-1 dims for a mask shared by the "
        "batch or the heads (kv_num_blocks[None, None], kv_indices[None, None])",
    )
  if tuple(counts) != tuple(indices[:3]):
    raise shape_error(op, "kv_num_blocks must have the shape of kv_indices without its last "
                      "dim (one count per row of indices)", listed)
  if shapes[2] is not None and (tuple(shapes[2]) != tuple(counts)
                                or tuple(shapes[3] or ()) != tuple(indices)):
    raise shape_error(op, "the full tables must have the shapes of kv_num_blocks and "
                      "kv_indices (both list key blocks of the same grid)", listed)
  for name, dtype in zip(_TABLE_NAMES, dtypes, strict=True):
    if dtype is not None and not (jnp.issubdtype(dtype, jnp.integer)
                                  and not jnp.issubdtype(dtype, jnp.bool_)):
      raise TypeError(
          f"jmat.{op}: {name} has dtype {_dtype_name(np.dtype(dtype))}; block tables hold "
          f"block counts and block indices: pass integer arrays (int32, as "
          f"create_block_mask's)"
      )


def check_seq_lengths(op: str, seq_lengths: object) -> tuple[int, int]:
  """Checks a BlockMask's ``seq_lengths``: a ``(Q_LEN, KV_LEN)`` pair of non-negative ints."""
  pair = seq_lengths if isinstance(seq_lengths, tuple | list) else ()
  if len(pair) != 2 or any(
      isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 0 for n in pair
  ):
    raise ValueError(
        f"jmat.{op}: seq_lengths must be a (Q_LEN, KV_LEN) pair of non-negative ints (or "
        f"None: the lengths the tables cover), got {seq_lengths!r}"
    )
  return int(pair[0]), int(pair[1])


def check_block_mask_index(op: str, index: object, table_shape: Shape) -> tuple:
  """Checks ``block_mask[index]``: at most 3 entries (batch, head, query block); returns them.

  An entry is an int, a slice or an index array; torch combines two index arrays
  into one dim, which a BlockMask cannot hold, so at most one may be 1-D.
  """
  items: tuple = index if isinstance(index, tuple) else (index,)
  where = f"the tables have shape {fmt_shape(table_shape)} (B, H, n_q, n_k)"
  usage = ("index as block_mask[b], block_mask[:, h] or block_mask[:, :, q_blocks] with ints, "
           "slices or index arrays")
  if len(items) > 3:
    raise IndexError(f"jmat.{op}: {len(items)} indices for the 3 indexable dims (batch, head, "
                     f"query block): {where}; {usage}")
  for axis, item in enumerate(items):
    if item is None or item is Ellipsis or isinstance(item, bool):
      raise TypeError(f"jmat.{op}: the {_MASK_AXES[axis]} index is {item!r}: {where}; {usage}")
  if sum(np.ndim(item) == 1 for item in items if not isinstance(item, slice)) > 1:
    raise IndexError(
        f"jmat.{op}: more than one 1-D index array: {where}; torch pairs them up into one dim, "
        f"which a BlockMask cannot hold: index one dim at a time "
        f"(block_mask[bs][:, hs])"
    )
  return items


def block_mask_index_type_error(op: str, axis: int, item: object) -> TypeError:
  """The error for a ``block_mask[...]`` entry that is no int, slice or integer index array."""
  dtype = getattr(item, "dtype", None)
  what = f"a {type(item).__name__}" if dtype is None else (
      f"an array of dtype {dtype} and shape {fmt_shape(getattr(item, 'shape', ()))}")
  return TypeError(
      f"jmat.{op}: the {_MASK_AXES[axis]} index is {what}; index a BlockMask with ints, slices, "
      f"0-D or 1-D integer arrays or (concrete) 1-D boolean arrays of the dim's size"
  )


def check_block_positions(op: str, axis: int, positions: np.ndarray, table_shape: Shape) -> None:
  """Refuses concrete ``block_mask[...]`` positions outside ``-size .. size - 1``."""
  size = int(table_shape[axis])
  bad = positions[(positions < -size) | (positions >= size)]
  if bad.size:
    raise IndexError(
        f"jmat.{op}: {_MASK_AXES[axis]} index {int(bad[0])} is out of range for size {size}: "
        f"the tables have shape {fmt_shape(table_shape)} (B, H, n_q, n_k); valid positions "
        f"are -{size} .. {size - 1}"
    )


def check_block_mask_rows(
    op: str, table_shape: Shape, seq_lengths: tuple[int, int], block_size: tuple[int, int]
) -> None:
  """Refuses tables with fewer query-block rows than ``seq_lengths`` spans."""
  needed = -(-seq_lengths[0] // block_size[0])
  if table_shape[2] < needed:
    raise shape_error(
        op, f"the block_mask's tables have {table_shape[2]} query-block rows, its seq_lengths "
        f"{seq_lengths} at BLOCK_SIZE {block_size} span {needed}",
        f"kv_indices has shape {fmt_shape(table_shape)}",
        "slice as many query blocks as the queries span (block_mask[:, :, i:i + n]) and set "
        "seq_lengths to the queries they cover",
    )


def sliced_mask_mod_error() -> RuntimeError:
  """The error of calling the mask_mod of a sliced BlockMask (torch's, with jmat's remedy)."""
  return RuntimeError(
      "jmat.BlockMask: Cannot use mask_mod from a sliced BlockMask: block_mask[...] renumbers "
      "the batch entries, heads or query blocks, so (as torch) it resets mask_mod; give the "
      "slice the original mask's mask_mod with the slice's offsets, e.g. "
      "BlockMask.from_kv_blocks(s.kv_num_blocks, s.kv_indices, s.full_kv_num_blocks, "
      "s.full_kv_indices, BLOCK_SIZE=s.BLOCK_SIZE, seq_lengths=(L, S), mask_mod=lambda b, h, "
      "q, kv: base.mask_mod(b, h, q + offset, kv))"
  )


def check_boolean_index(op: str, axis: int, length: int, table_shape: Shape) -> None:
  """Refuses a boolean ``block_mask[...]`` index whose length is not the dim's size."""
  size = int(table_shape[axis])
  if length != size:
    raise IndexError(
        f"jmat.{op}: the {_MASK_AXES[axis]} index is a boolean array of length {length}, the "
        f"dim has size {size}: the tables have shape {fmt_shape(table_shape)} (B, H, n_q, n_k); "
        f"a boolean index picks entries of the dim, one flag per entry"
    )


# --- sequence layouts over a mesh axis (to_layout, from_layout, work_per_device) -------------


def check_layout(op: str, layout: object, layouts: Sequence[str]) -> None:
  """Refuses a layout that is not one of ``layouts`` (listing them)."""
  if not isinstance(layout, str) or layout not in layouts:
    valid = ", ".join(repr(name) for name in layouts)
    raise ValueError(
        f"jmat.{op}: unknown layout {layout!r}; valid layouts are {valid} (zigzag balances "
        f"causal attention: device i holds chunks i and 2n-1-i of 2n)"
    )


def check_num_devices(op: str, num_devices: object) -> int:
  """Checks a number of devices: a positive int; returns it."""
  if isinstance(num_devices, bool) or not isinstance(num_devices, int | np.integer) or (
      num_devices < 1):
    raise ValueError(f"jmat.{op}: num_devices must be a positive int, got {num_devices!r}")
  return int(num_devices)


def check_mesh_axis(op: str, axis_name: object, mesh_axes: dict[str, int]) -> int:
  """Refuses an ``axis_name`` the mesh does not have; returns the axis's size."""
  if not isinstance(axis_name, str) or axis_name not in mesh_axes:
    raise ValueError(
        f"jmat.{op}: the mesh has no axis {axis_name!r}; its axes are "
        f"{tuple(mesh_axes)}: pass one of them as axis_name"
    )
  return int(mesh_axes[axis_name])


def check_int(op: str, name: str, value: object) -> int:
  """Refuses ``value`` unless it is an int (``np.int64`` too, not a bool); returns it as one."""
  if not _is_int(value):
    raise TypeError(f"jmat.{op}: {name} must be an int, got {value!r}")
  return int(value)  # type: ignore[arg-type]  (checked above)


def check_layout_axis(op: str, shape: Shape, axis: object) -> int:
  """Normalises the ``axis`` a layout permutes against ``shape``; returns it as ``0..rank-1``."""
  axis = check_int(op, "axis", axis)
  rank = len(shape)
  if not -rank <= axis < rank:
    valid = f"axis must be in {-rank}..{rank - 1}" if rank else "it has no axis to lay out"
    raise shape_error(op, f"axis {axis} is out of range", _described("x", shape),
                      f"x is {rank}-D: {valid}")
  return int(axis) % rank


def check_layout_length(
    op: str, shape: Shape, axis: int, layout: str, chunks: int, devices: int,
    axis_name: str | None = None,
) -> None:
  """Refuses an ``axis`` whose length does not split into the layout's equal chunks."""
  length = shape[axis]
  if length % chunks:
    over = f"the {devices} devices" + (f" of mesh axis {axis_name!r}" if axis_name else "")
    raise shape_error(
        op,
        f"the length {length} of axis {axis} is not divisible by the {chunks} chunks of layout "
        f"{layout!r} over {over}",
        _described("x", shape),
        f"pad axis {axis} to a multiple of {chunks} (e.g. {-(-length // chunks) * chunks})",
    )


def check_layout_blocks(
    op: str, seq_lengths: tuple[int, int], block_size: tuple[int, int], layout: str,
    chunks: int, devices: int,
) -> None:
  """Refuses a block mask whose query length does not split into chunks of whole query blocks."""
  q_len, block_q = seq_lengths[0], block_size[0]
  where = (f"the block_mask has seq_lengths {tuple(seq_lengths)} and BLOCK_SIZE "
           f"{tuple(block_size)}")
  advice = (f"layout {layout!r} over {devices} devices cuts the queries into {chunks} chunks: "
            f"Q_LEN must be a multiple of {chunks} * BLOCK_SIZE[0] = {chunks * block_q}")
  if q_len % chunks:
    raise shape_error(op, f"Q_LEN {q_len} is not divisible by the {chunks} chunks", where,
                      advice)
  if (q_len // chunks) % block_q:
    raise shape_error(
        op, f"a chunk of {q_len // chunks} queries is not a whole number of query blocks of "
        f"{block_q}", where, advice + " (or a BLOCK_SIZE[0] that divides Q_LEN / chunks)")


def check_layout_sharding(op: str, shape: Shape, spec: Sequence[object], axis: int,
                          axis_name: str) -> None:
  """Refuses an ``x`` whose other dims are already sharded over the layout's own mesh axis."""
  for dim, entry in enumerate(spec):
    names = (entry,) if isinstance(entry, str) else tuple(cast(Sequence[str], entry or ()))
    if dim != axis and axis_name in names:
      raise ValueError(
          f"jmat.{op}: x of shape {fmt_shape(shape)} has dim {dim} sharded over mesh axis "
          f"{axis_name!r}, the axis dim {axis} is to be laid out over; shard dim {dim} over "
          f"another mesh axis, or reshard it first (jax.sharding.reshard)"
      )


def not_a_block_mask_error(op: str, block_mask: object) -> TypeError:
  """The error for a ``block_mask`` argument that is no :class:`jmat.BlockMask`."""
  return TypeError(
      f"jmat.{op}: block_mask must be a jmat.BlockMask (from jmat.create_block_mask or "
      f"BlockMask.from_kv_blocks), got {type(block_mask).__name__}"
  )


# --- sequence-sharded attention (jmat.parallel) ---


def check_sequence_split(op: str, query: Shape, key: Shape, value: Shape, chunks: int,
                         layout: str, axis_name: str) -> None:
  """Refuses sequence lengths the layout cannot cut into ``chunks`` equal chunks."""
  listed = _listed(_ATTENTION_NAMES, (query, key, value))
  for name, shape in zip(_ATTENTION_NAMES, (query, key, value), strict=True):
    if shape[-2] % chunks:
      raise shape_error(
          op,
          f"the sequence length {shape[-2]} of {name} does not split into the {chunks} equal "
          f"chunks of layout={layout!r} over mesh axis {axis_name!r}",
          listed,
          f"pad the sequence to a multiple of {chunks}",
      )


def check_causal_with_block_mask(op: str, is_causal: bool) -> None:
  """Refuses ``is_causal`` together with a ``block_mask`` (the mask says it all)."""
  if is_causal:
    raise ValueError(
        f"jmat.{op}: is_causal=True with a block_mask; put the causal rule in the mask_mod "
        f"(e.g. and_masks(jmat.mods.causal_mask, your_mask)) and drop is_causal"
    )


def check_chunks_hold_blocks(op: str, chunk: tuple[int, int], block: tuple[int, int],
                             layout: str, devices: int) -> None:
  """Refuses a block_mask whose blocks do not tile each device's chunks of the sequence."""
  for what, size, block_size in zip(("query", "key"), chunk, block, strict=True):
    if size % block_size:
      raise shape_error(
          op,
          f"a {what} chunk of {size} positions (layout={layout!r} over {devices} devices) is "
          f"not a whole number of the block_mask's {block_size}-blocks",
          f"block_mask BLOCK_SIZE={block}, chunks of {chunk}",
          "build the block_mask with a BLOCK_SIZE that divides the chunk, or pad the sequence",
      )


# --- flex attention's key/value batch of 1; PagedAttention (jmat.attention) ---


def check_flex_kv_batch(op: str, query: Shape, key: Shape, value: Shape,
                        mask_batch: int | None) -> bool:
  """Whether a key/value batch of 1 broadcasts against the query's; refuses other mismatches.

  As torch 2.13: the batch sizes of query and key/value may differ only when the
  key/value batch is 1 and a block_mask of the query's batch size is given (what
  a paged cache, one pool for every sequence, needs). Shapes of other ranks are
  left to the rank check. ``mask_batch`` is the block_mask's batch size, or None.
  """
  if any(len(s) != 4 for s in (query, key, value)) or query[0] == key[0] == value[0]:
    return False
  listed = _listed(_ATTENTION_NAMES, (query, key, value))
  if key[0] != value[0] or key[0] != 1:
    raise shape_error(
        op, "batch sizes (dim 0) differ", listed,
        "key and value must have the query's batch size, or both a batch of 1 (one pool, "
        "e.g. a paged cache) with a block_mask of the query's batch size",
    )
  if mask_batch != query[0]:
    given = "no block_mask" if mask_batch is None else f"a block_mask of batch size {mask_batch}"
    raise shape_error(
        op, f"a key/value batch of 1 against a query batch of {query[0]} with {given}",
        listed,
        f"a key/value batch of 1 broadcasts only with a block_mask built for the query's "
        f"batch: create_block_mask(mask_mod, {query[0]}, ...) (as torch)",
    )
  return True


def check_paged_sizes(op: str, n_pages: object, page_size: object,
                      max_batch_size: object) -> tuple[int, int, int]:
  """Refuses PagedAttention sizes that are not positive ints."""
  sizes = {"n_pages": n_pages, "page_size": page_size, "max_batch_size": max_batch_size}
  for name, value in sizes.items():
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
      raise ValueError(f"jmat.{op}: {name} must be a positive int, got {value!r}")
  return int(n_pages), int(page_size), int(max_batch_size)  # type: ignore[arg-type]


def traced_paging_error(op: str, name: str) -> TypeError:
  """The error of a traced argument (or page table) given to reserve or erase."""
  return TypeError(
      f"jmat.{op}: {name} is a traced value; reserve and erase run on the host, between "
      f"jitted steps (they pick free pages): call them outside jax.jit, and pass the "
      f"PagedAttention they return to your jitted step"
  )


def concrete_int(op: str, name: str, value: object, bound: int | None = None) -> int:
  """One concrete integer (a Python int or a 1-element integer array), checked against ``bound``.

  PagedAttention's ``reserve`` and ``erase`` run on the host between jitted steps
  (they choose pages, as torch's do with Python lists): a traced value is refused.
  """
  try:
    array = np.asarray(value)
  except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
    raise traced_paging_error(op, name) from None
  if array.size != 1 or not (np.issubdtype(array.dtype, np.integer) and array.dtype != np.bool_):
    raise TypeError(f"jmat.{op}: {name} must be one integer (an int or a 1-element integer "
                    f"array), got {value!r}")
  number = int(array.reshape(()))
  if bound is not None and not 0 <= number < bound:
    raise ValueError(f"jmat.{op}: {name}={number} is out of range: the page table holds "
                     f"max_batch_size={bound} sequences (0 .. {bound - 1})")
  if number < 0:
    raise ValueError(f"jmat.{op}: {name} must be non-negative, got {number}")
  return number


def check_free_pages(op: str, wanted: int, free: int, batch_idx: int, seq_len: int,
                     capacity: int, page_size: int) -> None:
  """Refuses a reservation beyond the free pages (torch asserts), saying how many are free."""
  if wanted > free:
    raise ValueError(
        f"jmat.{op}: batch entry {batch_idx} needs {wanted} more pages of {page_size} for "
        f"seq_len={seq_len} (it holds {capacity}), but only {free} pages are free; erase "
        f"finished sequences first or build the PagedAttention with more n_pages"
    )


def check_paged_assign(op: str, batch_idx: Shape, input_pos: Shape, k_val: Shape,
                       v_val: Shape, k_cache: Shape, v_cache: Shape) -> None:
  """Checks ``assign``'s ``(B,)``, ``(B, S)``, ``(B, H, S, D)`` and ``(1, H, P, D)`` shapes."""
  names = ("batch_idx", "input_pos", "k_val", "v_val", "k_cache", "v_cache")
  shapes = (batch_idx, input_pos, k_val, v_val, k_cache, v_cache)
  listed = _listed(names, shapes)
  wanted = (1, 2, 4, 4, 4, 4)
  if tuple(len(s) for s in shapes) != wanted:
    raise shape_error(op, "wrong ranks", listed,
                      "give batch_idx (B,), input_pos (B, S), k_val/v_val (B, H, S, D) and "
                      "k_cache/v_cache (1, H, n_pages * page_size, D)")
  problems = []
  if k_val[:3] != v_val[:3]:
    problems.append("k_val and v_val differ in dims 0-2 (B, H, S)")
  if batch_idx[0] != k_val[0]:
    problems.append(f"batch_idx has {batch_idx[0]} entries, k_val a batch of {k_val[0]}")
  if input_pos != (k_val[0], k_val[2]):
    problems.append(f"input_pos must be (B, S) = {fmt_shape((k_val[0], k_val[2]))}")
  if k_cache[:3] != v_cache[:3] or k_cache[0] != 1:
    problems.append("k_cache and v_cache must both be (1, H, n_pages * page_size, D)")
  if k_val[1] != k_cache[1]:
    problems.append(f"k_val has {k_val[1]} heads, the cache {k_cache[1]}")
  if (k_val[3], v_val[3]) != (k_cache[3], v_cache[3]):
    problems.append("the head dims (dim 3) of k_val/v_val and k_cache/v_cache differ")
  if problems:
    raise shape_error(op, "; ".join(problems), listed,
                      "give batch_idx (B,), input_pos (B, S), k_val/v_val (B, H, S, D) and "
                      "k_cache/v_cache (1, H, n_pages * page_size, D)")


def check_paged_cache_length(op: str, cache: Shape, n_pages: int, page_size: int) -> None:
  """Refuses a cache that is not ``n_pages * page_size`` long."""
  if cache[2] != n_pages * page_size:
    raise shape_error(op, f"the cache holds {cache[2]} positions, not n_pages * page_size = "
                          f"{n_pages} * {page_size}", f"cache has shape {fmt_shape(cache)}",
                      f"make the caches (1, H, {n_pages * page_size}, D)")


def check_paged_block_mask(op: str, block_size: tuple[int, int], page_size: int,
                           mask_batch: int, batch_idx: Shape | None, max_batch: int) -> None:
  """Refuses a logical block mask whose key blocks are not pages, or a bad ``batch_idx``."""
  if block_size[1] != page_size:
    raise ValueError(
        f"jmat.{op}: the block_mask's key block is {block_size[1]}, the page_size "
        f"{page_size}; build it with create_block_mask(..., BLOCK_SIZE=(q_block, {page_size}))"
    )
  if batch_idx is not None and batch_idx != (mask_batch,):
    raise shape_error(op, "batch_idx must give one page-table row per batch entry of the "
                          "block_mask", f"batch_idx has shape {fmt_shape(batch_idx)}, the "
                          f"block_mask batch size {mask_batch}",
                      f"give batch_idx of shape ({mask_batch},)")
  if batch_idx is None and mask_batch > max_batch:
    raise shape_error(op, f"the block_mask has batch size {mask_batch}, the page table "
                          f"{max_batch} rows", f"block_mask batch {mask_batch}",
                      "give batch_idx: the page-table row of each batch entry")

# --- varlen_attn (torch 2.13's torch.nn.attention.varlen.varlen_attn) -------------------------


def check_varlen_arrays(op: str, query: object, key: object, value: object) -> tuple:
  """Refuses a query, key or value that is not an array (lists hide a dtype choice)."""
  check_arrays(op, (query, key, value), _ATTENTION_NAMES)
  return query, key, value


def _concrete(x: object) -> np.ndarray | None:
  """``x`` as numpy when its value is known now (not traced under jit), else None."""
  if x is None or isinstance(x, jax.core.Tracer):  # pyright: ignore[reportAttributeAccessIssue]
    return None
  return np.asarray(x)


def _check_int_vector(op: str, name: str, x, length: int | None, advice: str) -> None:
  if not jnp.issubdtype(x.dtype, jnp.integer):
    raise TypeError(
        f"jmat.{op}: {name} has dtype {_dtype_name(np.dtype(x.dtype))}; it must hold "
        f"integers (e.g. {name}.astype(jnp.int32))")
  if x.ndim != 1 or (length is not None and x.shape[0] != length):
    wanted = "1-D" if length is None else f"of shape ({length},)"
    raise shape_error(op, f"{name} must be {wanted}", f"{name} has shape {fmt_shape(x.shape)}",
                      advice)


def _check_offsets(op: str, name: str, offsets, total: int, length_name: str) -> None:
  """Refuses concrete offsets that do not start at 0, decrease or pass the packed length."""
  values = _concrete(offsets)
  if values is None or values.size == 0:
    return
  if values[0] != 0:
    raise shape_error(op, f"{name} must start at 0, got {name}[0] = {int(values[0])}",
                      f"{name} = {values.tolist()}",
                      f"prepend 0: {name} = [0, *cumsum(lengths)]")
  steps = np.diff(values)
  if np.any(steps < 0):
    at = int(np.argmax(steps < 0))
    raise shape_error(
        op, f"{name} decreases at index {at + 1} ({int(values[at])} -> {int(values[at + 1])})",
        f"{name} = {values.tolist()}",
        f"offsets are cumulative lengths: {name} = [0, *cumsum(lengths)], non-decreasing")
  if values[-1] > total:
    raise shape_error(
        op, f"{name} ends at {int(values[-1])}, past the {total} packed {length_name}",
        f"{name} = {values.tolist()}",
        f"the last offset is the total number of {length_name} (dim 0)")


def _check_longest(op: str, name: str, lengths: np.ndarray | None, limit: int,
                   what: str) -> None:
  """Refuses a concrete run longer than the static ``max_q``/``max_k`` the call was given."""
  if lengths is None or lengths.size == 0 or lengths.max() <= limit:
    return
  at = int(np.argmax(lengths))
  raise shape_error(
      op, f"sequence {at} has {int(lengths[at])} {what}, more than {name}={limit}",
      f"lengths {lengths.tolist()}",
      f"{name} is the longest run of the batch (static): pass {name}={int(lengths.max())} "
      "or more")


def check_varlen(op: str, query, key, value, cu_seq_q, cu_seq_k, max_q: object, max_k: object,
                 window_size: object, enable_gqa: bool, seqused_k, block_table,
                 num_splits: object, return_aux: object) -> tuple[int, int]:
  """Checks varlen_attn's inputs (static ones always, offsets and page tables when concrete).

  Returns:
    The window as a ``(left, right)`` tuple of ints.
  """
  paged = block_table is not None
  names = _ATTENTION_NAMES
  shapes = (query.shape, key.shape, value.shape)
  listed = _listed(names, shapes)
  check_attention_dtypes(op, [x.dtype for x in (query, key, value)], names)
  kv_rank = 4 if paged else 3
  if query.ndim != 3 or key.ndim != kv_rank or value.ndim != kv_rank:
    layout = ("key and value (pages, page_size, Hkv, D) with block_table" if paged
              else "key and value (Tk, Hkv, D)")
    raise shape_error(op, f"query must be 3-D and key/value {kv_rank}-D", listed,
                      f"varlen_attn takes packed query (Tq, Hq, D) and {layout}")
  if query.shape[-1] != key.shape[-1]:
    raise shape_error(op, f"query and key head dims {query.shape[-1]} and {key.shape[-1]} "
                      "differ", listed, "scores are query @ key^T: the last dims must match")
  if key.shape[:-1] != value.shape[:-1]:
    raise shape_error(op, "key and value differ in every dim but the last", listed,
                      "there is one value per key: key and value share all dims but the last")
  _check_head_groups(op, query.shape[1], key.shape[-2], enable_gqa, listed, "")
  for name, size in (("max_q", max_q), ("max_k", max_k)):
    if isinstance(size, bool) or not isinstance(size, int | np.integer) or size < 0:
      raise TypeError(f"jmat.{op}: {name} must be a non-negative Python int (static under "
                      f"jit), got {size!r}; pass the longest sequence length, e.g. int(...)")
  if (not isinstance(window_size, tuple | list) or len(window_size) != 2
      or any(isinstance(w, bool) or not isinstance(w, int | np.integer) for w in window_size)):
    raise ValueError(f"jmat.{op}: window_size must be a pair of ints (left, right), got "
                     f"{window_size!r}; (-1, -1) is full attention, (-1, 0) causal")
  window = (int(window_size[0]), int(window_size[1]))
  if min(window) < -1:
    raise ValueError(
        f"jmat.{op}: window_size={window} has a size below -1; each side is -1 (unbounded) "
        f"or the number of keys a query sees on that side (0 or more), e.g. (-1, 0) causal")
  if num_splits is not None and (isinstance(num_splits, bool) or not isinstance(
      num_splits, int | np.integer) or num_splits < 1):
    raise ValueError(f"jmat.{op}: num_splits={num_splits!r} must be None (jmat chooses) or a "
                     "positive int (1: no split-KV, batch-invariant)")
  if return_aux is not None:
    if not hasattr(return_aux, "lse"):
      raise TypeError(f"jmat.{op}: return_aux must be an AuxRequest, got "
                      f"{type(return_aux).__name__}; use jmat.attention.AuxRequest(lse=True)")
    if getattr(return_aux, "max_scores", False):
      raise ValueError(f"jmat.{op}: return_aux asks for max_scores, which varlen_attn does "
                       "not return (as torch's); use AuxRequest(lse=True)")
  advice = "offsets are (N + 1,) integers: [0, *cumsum(lengths)]"
  _check_int_vector(op, "cu_seq_q", cu_seq_q, None, advice)
  n = cu_seq_q.shape[0] - 1
  if n < 0:
    raise shape_error(op, "cu_seq_q is empty", "cu_seq_q has shape (0,)",
                      "pass [0] for no sequence, [0, L] for one")
  _check_offsets(op, "cu_seq_q", cu_seq_q, query.shape[0], "queries")
  if paged:
    if seqused_k is None:
      raise ValueError(
          f"jmat.{op}: block_table without seqused_k; pass seqused_k (N,), the number of "
          "valid keys of each sequence (its last page is usually part-filled)")
    if not jnp.issubdtype(block_table.dtype, jnp.integer):
      raise TypeError(f"jmat.{op}: block_table has dtype "
                      f"{_dtype_name(np.dtype(block_table.dtype))}; it must hold integer page "
                      "indices (e.g. block_table.astype(jnp.int32))")
    if block_table.ndim != 2 or block_table.shape[0] != n:
      raise shape_error(op, f"block_table must be (N, max_pages) with N = {n} sequences",
                        f"block_table has shape {fmt_shape(block_table.shape)}, cu_seq_q "
                        f"{fmt_shape(cu_seq_q.shape)}", "one row of page indices per sequence")
    pages = _concrete(block_table)
    if pages is not None and pages.size and (pages.max() >= key.shape[0] or pages.min() < 0):
      row = int(np.argmax(np.any((pages >= key.shape[0]) | (pages < 0), axis=1)))
      raise shape_error(
          op, f"block_table row {row} points past the pool of {key.shape[0]} pages",
          f"block_table[{row}] = {pages[row].tolist()}, key has shape {fmt_shape(key.shape)}",
          f"page indices are 0 .. {key.shape[0] - 1} (point unused slots at any valid page)")
  else:
    if cu_seq_k is None:
      raise ValueError(f"jmat.{op}: cu_seq_k is None without block_table; pass the (N + 1,) "
                       "offsets of the keys")
    _check_int_vector(op, "cu_seq_k", cu_seq_k, n + 1, advice + ", one per sequence + 1")
    _check_offsets(op, "cu_seq_k", cu_seq_k, key.shape[0], "keys")
  if seqused_k is not None:
    _check_int_vector(op, "seqused_k", seqused_k, n,
                      "seqused_k holds the number of valid keys of each sequence")
  offsets_q = _concrete(cu_seq_q)
  _check_longest(op, "max_q", None if offsets_q is None else np.diff(offsets_q),
                 int(cast(int, max_q)), "queries")
  used = _concrete(seqused_k)
  if not paged:
    offsets_k = _concrete(cu_seq_k)
    runs = None if offsets_k is None else np.diff(offsets_k)
    used = runs if used is None else (None if runs is None else np.minimum(used, runs))
  _check_longest(op, "max_k", used, int(cast(int, max_k)), "keys")
  return window
