"""to_layout / from_layout on a mesh of 8 devices: each device's shard holds exactly its chunks.

Run by ``tests/test_parallel.py`` in its own process with 8 simulated CPU devices (see
``tests/distributed/test_mesh.py``); collected by the main run, which has one device, it
skips itself. The oracle is the layout rule written out in ``tests/test_layouts.py``
(``expected_positions``) applied to numpy arrays, and the compiled HLO for which
collectives run.
"""

from __future__ import annotations

import collections
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import jmat
from tests.distributed import require_8_devices
from tests.test_layouts import expected_positions

require_8_devices()

LAYOUTS = ("contiguous", "zigzag")
_COLLECTIVE = re.compile(
    r"\b(all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute|collective-broadcast)"
    r"(?:-start)?\("
)

# name: (mesh shape, mesh axis names, axis type, the spec x arrives with)
MESHES = {
    "8 auto": ((8,), ("seq",), AxisType.Auto, P()),
    "8 explicit, x sharded in order": ((8,), ("seq",), AxisType.Explicit, P(None, None, "seq")),
    "2x4 auto, batch over data": ((2, 4), ("data", "seq"), AxisType.Auto, P("data")),
    "2x4 explicit, batch over data": ((2, 4), ("data", "seq"), AxisType.Explicit, P("data")),
}


def make_mesh(name: str):
  shape, names, kind, spec = MESHES[name]
  return jax.make_mesh(shape, names, axis_types=(kind,) * len(shape)), spec


def seq_coordinate(mesh, device) -> int:
  """The position of ``device`` along the mesh axis ``"seq"``."""
  where = np.argwhere(mesh.devices == device)[0]
  return int(where[mesh.axis_names.index("seq")])


def assert_shards_hold(y: jax.Array, expected: np.ndarray, mesh, axis: int, rows: np.ndarray):
  """Each shard of ``y`` is, along ``axis``, the rows ``rows[d]`` of ``expected`` for its
  device's ``seq`` coordinate ``d`` (and the shard's own slice of the other dims)."""
  n = mesh.shape["seq"]
  local = y.shape[axis] // n
  seen = collections.Counter()
  for shard in y.addressable_shards:
    d = seq_coordinate(mesh, shard.device)
    seen[d] += 1
    assert shard.index[axis] == slice(d * local, (d + 1) * local)
    index = list(shard.index)
    index[axis] = rows[d]
    np.testing.assert_array_equal(np.asarray(shard.data), expected[tuple(index)])
  assert sorted(seen) == list(range(n))  # every device along seq holds one share


@pytest.mark.parametrize("mesh_name", list(MESHES))
@pytest.mark.parametrize("layout", LAYOUTS)
def test_each_device_holds_its_chunks_and_the_round_trip_is_exact(mesh_name, layout):
  mesh, spec = make_mesh(mesh_name)
  x = np.random.default_rng(0).standard_normal((4, 3, 48, 2))  # zigzag: 16 chunks of 3
  placed = jax.device_put(x, NamedSharding(mesh, spec))
  laid = jmat.parallel.to_layout(placed, mesh, "seq", layout)
  rows = expected_positions(layout, mesh.shape["seq"], 48)
  assert_shards_hold(laid, x, mesh, 2, rows)
  back = jmat.parallel.from_layout(laid, mesh, "seq", layout)
  np.testing.assert_array_equal(np.asarray(back), x)
  # Back in global order, sharded contiguously: device d holds the d-th run.
  assert_shards_hold(back, x, mesh, 2, np.arange(48).reshape(len(rows), -1))
  if "data" in mesh.axis_names:  # the batch stays sharded over the other mesh axis
    for y in (laid, back):
      assert tuple(y.sharding.spec)[:3] == ("data", None, "seq")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_any_axis_of_any_rank(layout):
  mesh = jax.make_mesh((8,), ("seq",))
  x = np.arange(2 * 32 * 3).reshape(32, 2, 3).astype(np.int32)
  laid = jmat.parallel.to_layout(x, mesh, "seq", layout, axis=0)
  assert_shards_hold(laid, x, mesh, 0, expected_positions(layout, 8, 32))
  np.testing.assert_array_equal(
      np.asarray(jmat.parallel.from_layout(laid, mesh, "seq", layout, axis=-3)), x)
  line = np.arange(16.0)
  np.testing.assert_array_equal(
      np.asarray(jmat.parallel.to_layout(line, mesh, "seq", layout, axis=0)),
      line[expected_positions(layout, 8, 16).reshape(-1)])


@pytest.mark.parametrize("layout", LAYOUTS)
def test_chunks_travel_by_permutes_only(layout):
  # A device sends and receives its own L / n share at most: no gather of the sequence.
  mesh = jax.make_mesh((8,), ("seq",), axis_types=(AxisType.Auto,))
  x = jax.device_put(jnp.ones((2, 64, 4)), NamedSharding(mesh, P(None, "seq")))
  for fn in (jmat.parallel.to_layout, jmat.parallel.from_layout):
    text = jax.jit(lambda x, fn=fn: fn(x, mesh, "seq", layout)).lower(x).compile().as_text()
    found = collections.Counter(_COLLECTIVE.findall(text))
    assert set(found) <= {"collective-permute"}, found
    assert found["collective-permute"] <= (4 if layout == "zigzag" else 0)


@pytest.mark.parametrize("kind", [AxisType.Auto, AxisType.Explicit])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_gradient_is_the_inverse_permutation(kind, layout):
  mesh = jax.make_mesh((8,), ("seq",), axis_types=(kind,))
  w = np.random.default_rng(1).standard_normal((3, 32, 2))
  order = expected_positions(layout, 8, 32).reshape(-1)
  with jax.set_mesh(mesh):
    d_to = jax.grad(lambda x: jnp.sum(jmat.parallel.to_layout(x, mesh, "seq", layout) * w))
    d_from = jax.grad(lambda x: jnp.sum(jmat.parallel.from_layout(x, mesh, "seq", layout) * w))
    zeros = np.zeros_like(w)
    # sum(x[:, order] * w) has gradient w scattered back to order; the inverse's, w gathered.
    np.testing.assert_array_equal(np.asarray(d_to(zeros))[:, order], w)
    np.testing.assert_array_equal(np.asarray(d_from(zeros)), w[:, order])
