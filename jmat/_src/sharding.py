"""Mesh and partition-spec helpers shared by the products and the mesh-parallel attention.

With sharding in types (``AxisType.Explicit`` mesh axes) an array's sharding is
part of its type, ``jax.typeof(x).sharding``; on Auto axes the partitioner
decides and the type says nothing. The products need this to place the
result of their 2-D kernel (``out_sharding``), the ring attention to make its
``shard_map`` manual over the axes the batch dims are already split over.
"""

from __future__ import annotations

from collections.abc import Iterable

import jax
from jax.sharding import AxisType


def explicit_axes(mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh) -> frozenset[str]:
  """The names of the mesh axes of type ``AxisType.Explicit``.

  Example:
    >>> from jax.sharding import AxisType
    >>> mesh = jax.make_mesh((1, 1), ("data", "seq"),
    ...                      axis_types=(AxisType.Explicit, AxisType.Auto))
    >>> sorted(jmat._src.sharding.explicit_axes(mesh))
    ['data']
  """
  return frozenset(
      name for name, kind in zip(mesh.axis_names, mesh.axis_types, strict=True)
      if kind == AxisType.Explicit
  )


def entry_axes(entry: object) -> tuple[str, ...]:
  """The mesh axis names of one ``PartitionSpec`` entry: ``None``, a name or a tuple of names.

  Example:
    >>> jmat._src.sharding.entry_axes(None), jmat._src.sharding.entry_axes("seq")
    ((), ('seq',))
    >>> jmat._src.sharding.entry_axes(("data", "seq"))
    ('data', 'seq')
  """
  if entry is None:
    return ()
  return tuple(entry) if isinstance(entry, tuple | list) else (str(entry),)


def spec_axes(spec: Iterable[object]) -> frozenset[str]:
  """Every mesh axis a partition spec (or some of its entries) shards over.

  Example:
    >>> from jax.sharding import PartitionSpec as P
    >>> sorted(jmat._src.sharding.spec_axes(P(("data", "model"), None, "seq")))
    ['data', 'model', 'seq']
  """
  return frozenset(name for entry in spec for name in entry_axes(entry))


def explicit_spec(x: jax.Array) -> tuple[object, ...]:
  """How each dim of ``x`` is sharded over Explicit mesh axes: one entry per dim.

  The entries of ``x``'s typed sharding, padded with ``None`` to ``x.ndim``; an
  entry that names a non-Explicit axis is ``None`` (on Auto axes jit's
  partitioner, not the type, decides).

  Example:
    >>> from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
    >>> mesh = jax.make_mesh((1,), ("data",), axis_types=(AxisType.Explicit,))
    >>> x = jax.device_put(jnp.ones((2, 3, 4)), NamedSharding(mesh, P("data")))
    >>> jmat._src.sharding.explicit_spec(x)
    ('data', None, None)
  """
  sharding = jax.typeof(x).sharding
  explicit = explicit_axes(sharding.mesh)
  spec = tuple(sharding.spec) + (None,) * (x.ndim - len(sharding.spec))
  return tuple(e if set(entry_axes(e)) <= explicit else None for e in spec)
