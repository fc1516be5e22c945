"""Sequence layouts (jmat._src.layouts) on one device: the chunk rule, the permutation, the work.

The oracles are written here from the rule itself: with ``n`` devices, ``"contiguous"``
gives device ``i`` the ``i``-th of ``n`` equal runs of the sequence, ``"zigzag"`` the
``i``-th and the ``(2n - 1 - i)``-th of ``2n``. The work of a block mask is counted from a
dense numpy mask: a (query block, key block) pair is computed when some query of the block
may see some key of it. The 8-device placement tests are in
``tests/distributed/test_layouts.py``.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import jmat
from jmat._src import layouts


def expected_positions(layout: str, n: int, length: int) -> np.ndarray:
  """The global positions device ``i`` holds, in local order: ``(n, length // n)``."""
  if layout == "contiguous":
    return np.arange(length).reshape(n, length // n)
  chunk = length // (2 * n)
  runs = np.arange(length).reshape(2 * n, chunk)
  return np.stack([np.concatenate([runs[i], runs[2 * n - 1 - i]]) for i in range(n)])


# --- the chunk rule ---------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8, 13])
def test_device_chunks_follow_the_rule(n):
  assert layouts.device_chunks("contiguous", n) == tuple((i,) for i in range(n))
  assert layouts.device_chunks("zigzag", n) == tuple((i, 2 * n - 1 - i) for i in range(n))
  assert (layouts.num_chunks("contiguous", n), layouts.num_chunks("zigzag", n)) == (n, 2 * n)
  for layout in layouts.LAYOUTS:  # every chunk is held once, and each device holds as many
    held = [c for chunks in layouts.device_chunks(layout, n) for c in chunks]
    assert sorted(held) == list(range(layouts.num_chunks(layout, n)))
    assert len({len(chunks) for chunks in layouts.device_chunks(layout, n)}) == 1


def test_layouts_are_the_two_known_ones():
  assert layouts.LAYOUTS == ("contiguous", "zigzag")


@pytest.mark.parametrize("layout", layouts.LAYOUTS)
@pytest.mark.parametrize("n, chunk", [(1, 3), (2, 1), (3, 5), (8, 7), (13, 2), (5, 0)])
def test_positions_are_a_permutation_whose_inverse_round_trips(layout, n, chunk):
  length = layouts.num_chunks(layout, n) * chunk
  positions = layouts.device_positions(layout, n, length)
  np.testing.assert_array_equal(positions, expected_positions(layout, n, length))
  x = np.random.default_rng(0).standard_normal((3, length))
  laid = x[:, positions.reshape(-1)]
  np.testing.assert_array_equal(laid[:, np.argsort(positions.reshape(-1))], x)
  # Sharded contiguously, device i's run of the laid-out array is exactly its chunks.
  runs = laid.reshape(3, n, length // n)
  size = length // layouts.num_chunks(layout, n)
  for i, chunks in enumerate(layouts.device_chunks(layout, n)):
    np.testing.assert_array_equal(
        runs[:, i], np.concatenate([x[:, c * size:(c + 1) * size] for c in chunks], axis=1))


# --- to_layout / from_layout on a 1-device mesh -------------------------------------------------

ONE = {"auto": (AxisType.Auto,), "explicit": (AxisType.Explicit,)}


@pytest.mark.parametrize("kind", list(ONE))
@pytest.mark.parametrize("layout", layouts.LAYOUTS)
@pytest.mark.parametrize("shape, axis, dtype", [
    ((6,), 0, np.float32), ((3, 4, 5), -2, np.float64), ((2, 4, 3, 7), 1, np.int32),
    ((4, 2), -1, jnp.bfloat16), ((0, 6, 3), 1, np.float32), ((3, 0, 2), -2, np.float32)])
def test_one_device_keeps_values_shape_dtype_and_shards_the_axis(kind, layout, shape, axis,
                                                                 dtype):
  mesh = jax.make_mesh((1,), ("seq",), axis_types=ONE[kind])
  x = np.arange(np.prod(shape)).reshape(shape).astype(dtype)
  laid = jmat.parallel.to_layout(x, mesh, "seq", layout, axis=axis)
  back = jmat.parallel.from_layout(laid, mesh, "seq", layout, axis=axis)
  for y in (laid, back):
    chex.assert_shape(y, shape)
    assert y.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(np.asarray(y), x)  # one device: the identity permutation
    if kind == "explicit":  # on Auto axes the partitioner may drop a size-1 axis
      spec = tuple(y.sharding.spec) + (None,) * (len(shape) - len(y.sharding.spec))
      assert spec == tuple("seq" if d == axis % len(shape) else None for d in range(len(shape)))


def test_jitted_calls_do_not_retrace():
  mesh = jax.make_mesh((1,), ("seq",))

  @jax.jit
  @chex.assert_max_traces(n=1)
  def round_trip(x):
    return jmat.parallel.from_layout(jmat.parallel.to_layout(x, mesh, "seq", "zigzag"), mesh,
                                     "seq", "zigzag")

  for value in range(3):
    np.testing.assert_array_equal(round_trip(jnp.full((4, 6, 2), value)), value)


@pytest.mark.parametrize("layout", layouts.LAYOUTS)
def test_gradient_is_the_inverse_permutation_on_one_device(layout):
  mesh = jax.make_mesh((1,), ("seq",), axis_types=(AxisType.Auto,))
  w = np.random.default_rng(1).standard_normal((3, 4, 5))
  for fn in (jmat.parallel.to_layout, jmat.parallel.from_layout):
    grad = jax.grad(lambda x, fn=fn: jnp.sum(fn(x, mesh, "seq", layout) * w))(np.zeros_like(w))
    np.testing.assert_array_equal(grad, w)


# --- refusals ------------------------------------------------------------------------------------


@pytest.mark.parametrize("fn", [jmat.parallel.to_layout, jmat.parallel.from_layout])
def test_to_and_from_layout_refuse_with_the_sizes_and_what_is_valid(fn):
  mesh = jax.make_mesh((1,), ("seq",))
  name = f"jmat.parallel.{fn.__name__}"
  x = jnp.ones((3, 5, 4))
  with pytest.raises(ValueError, match=rf"{name}: the mesh has no axis 'sp'; its axes are "
                     r"\('seq',\): pass one of them"):
    fn(x, mesh, "sp", "zigzag")
  with pytest.raises(ValueError, match=rf"{name}: unknown layout 'striped'; valid layouts are "
                     r"'contiguous', 'zigzag'"):
    fn(x, mesh, "seq", "striped")
  with pytest.raises(jmat.ShapeError, match=rf"{name}: axis 3 is out of range: x has shape "
                     r"\(3, 5, 4\); x is 3-D: axis must be in -3..2"):
    fn(x, mesh, "seq", "zigzag", axis=3)
  with pytest.raises(jmat.ShapeError, match=rf"{name}: axis -1 is out of range: x has shape "
                     r"\(\); x is 0-D: it has no axis to lay out"):
    fn(jnp.ones(()), mesh, "seq", "zigzag", axis=-1)
  with pytest.raises(TypeError, match=rf"{name}: axis must be an int, got 1.0"):
    fn(x, mesh, "seq", "zigzag", axis=1.0)
  with pytest.raises(jmat.ShapeError, match=rf"{name}: the length 5 of axis 1 is not divisible "
                     r"by the 2 chunks of layout 'zigzag' over the 1 devices of mesh axis 'seq': "
                     r"x has shape \(3, 5, 4\); pad axis 1 to a multiple of 2 \(e.g. 6\)"):
    fn(x, mesh, "seq", "zigzag")


def test_a_dim_already_sharded_over_the_layout_axis_is_refused():
  mesh = jax.make_mesh((1,), ("seq",), axis_types=(AxisType.Explicit,))
  x = jax.device_put(jnp.ones((2, 4, 3)), NamedSharding(mesh, P("seq")))
  with pytest.raises(ValueError, match=r"jmat.parallel.to_layout: x of shape \(2, 4, 3\) has "
                     r"dim 0 sharded over mesh axis 'seq', the axis dim 1 is to be laid out over"):
    jmat.parallel.to_layout(x, mesh, "seq", "zigzag")


def test_the_chunk_rule_refuses_bad_layouts_and_device_counts():
  with pytest.raises(ValueError, match="unknown layout 'ring'; valid layouts are 'contiguous', "
                     "'zigzag'"):
    layouts.device_chunks("ring", 4)
  for bad in (0, -2, 2.0, True):
    with pytest.raises(ValueError, match=f"num_devices must be a positive int, got {bad!r}"):
      layouts.num_chunks("zigzag", bad)
  with pytest.raises(jmat.ShapeError, match=r"the length 12 of axis 0 is not divisible by the "
                     r"8 chunks of layout 'zigzag' over the 4 devices: x has shape \(12,\)"):
    layouts.device_positions("zigzag", 4, 12)


def test_work_per_device_refuses_masks_it_cannot_split():
  causal = jmat.create_block_mask(jmat.mods.causal_mask, None, None, 1024, 1024)
  with pytest.raises(jmat.ShapeError, match=r"jmat.parallel.work_per_device: Q_LEN 1024 is not "
                     r"divisible by the 6 chunks: the block_mask has seq_lengths \(1024, 1024\) "
                     r"and BLOCK_SIZE \(128, 128\); .* a multiple of 6 \* BLOCK_SIZE\[0\] = "
                     r"768"):
    jmat.parallel.work_per_device(causal, 3, "zigzag")
  with pytest.raises(jmat.ShapeError, match=r"jmat.parallel.work_per_device: a chunk of 64 "
                     r"queries is not a whole number of query blocks of 128"):
    jmat.parallel.work_per_device(causal, 8, "zigzag")
  with pytest.raises(ValueError, match="jmat.parallel.work_per_device: unknown layout 'zig'"):
    jmat.parallel.work_per_device(causal, 8, "zig")
  with pytest.raises(ValueError, match="num_devices must be a positive int, got 0"):
    jmat.parallel.work_per_device(causal, 0, "zigzag")
  with pytest.raises(TypeError, match="jmat.parallel.work_per_device: block_mask must be a "
                     "jmat.BlockMask .*, got ndarray"):
    jmat.parallel.work_per_device(np.ones((4, 4), bool), 2, "zigzag")


# --- work_per_device against numpy --------------------------------------------------------------


def np_block_work(allowed: np.ndarray, block_q: int, block_k: int) -> np.ndarray:
  """Per query block, the computed (non-empty) blocks summed over batch, heads and keys."""
  b, h, q_len, kv_len = allowed.shape
  n_k = -(-kv_len // block_k)
  padded = np.zeros((b, h, q_len, n_k * block_k), bool)
  padded[..., :kv_len] = allowed
  blocks = padded.reshape(b, h, q_len // block_q, block_q, n_k, block_k).any(axis=(3, 5))
  return blocks.sum(axis=(0, 1, 3))


def grid(b: int, h: int, q_len: int, kv_len: int):
  return np.ix_(np.arange(b), np.arange(h), np.arange(q_len), np.arange(kv_len))


DOCS = np.repeat(np.arange(6), [40, 3, 150, 77, 1, 209])  # L = 480
BATCH_DOCS = np.stack([DOCS, np.repeat(np.arange(3), [300, 100, 80])])
WINDOWS = np.array([8, 40, 100])


def prefix(b, h, q, kv):
  return (kv < 75) | (kv <= q)


# name: (jnp mask_mod, numpy mask on the grid, B, H, KV_LEN)
WORK_CASES = {
    "causal": (jmat.mods.causal_mask, lambda b, h, q, kv: kv <= q, None, None, 480),
    "causal, S > L": (jmat.mods.causal_mask, lambda b, h, q, kv: kv <= q, 2, None, 611),
    "sliding window": (jmat.mods.generate_sliding_window(50),
                       lambda b, h, q, kv: (kv <= q) & (q - kv <= 50), None, None, 480),
    "documents": (jmat.mods.generate_doc_mask_mod(jmat.mods.causal_mask, jnp.asarray(DOCS)),
                  lambda b, h, q, kv: (DOCS[q] == DOCS[kv]) & (kv <= q), None, None, 480),
    "documents per batch entry": (
        lambda b, h, q, kv: (jnp.asarray(BATCH_DOCS)[b, q] == jnp.asarray(BATCH_DOCS)[b, kv])
        & (kv <= q),
        lambda b, h, q, kv: (BATCH_DOCS[b, q] == BATCH_DOCS[b, kv]) & (kv <= q), 2, None, 480),
    "prefix-LM": (jmat.mods.generate_prefix_lm_mask(75), prefix, None, None, 480),
    "window per head": (
        lambda b, h, q, kv: (kv <= q) & (q - kv <= jnp.asarray(WINDOWS)[h]),
        lambda b, h, q, kv: (kv <= q) & (q - kv <= WINDOWS[h]), 2, 3, 480),
    "per batch and head": (lambda b, h, q, kv: (kv <= q + 37 * b) & (kv >= 29 * h),
                           lambda b, h, q, kv: (kv <= q + 37 * b) & (kv >= 29 * h), 2, 3, 455),
}


# Building a mask compiles per (mask_mod, BLOCK_SIZE): each case takes one block size and is
# split over every device count whose zigzag chunks are whole query blocks of it.
BLOCK_SIZES = [(16, 24), (48, 32), (24, 13)]


@pytest.mark.parametrize("name", list(WORK_CASES))
def test_work_per_device_counts_the_blocks_of_the_dense_mask(name):
  mask_mod, np_mask, b, h, kv_len = WORK_CASES[name]
  q_len, block_size = 480, BLOCK_SIZES[list(WORK_CASES).index(name) % len(BLOCK_SIZES)]
  block_mask = jmat.create_block_mask(mask_mod, b, h, q_len, kv_len, BLOCK_SIZE=block_size)
  allowed = np.broadcast_to(np_mask(*grid(b or 1, h or 1, q_len, kv_len)),
                            (b or 1, h or 1, q_len, kv_len))
  per_block = np_block_work(allowed, *block_size)
  counts = [n for n in (1, 2, 3, 5, 10, 15) if q_len % (2 * n * block_size[0]) == 0]
  assert len(counts) >= 2
  for n in counts:
    for layout in layouts.LAYOUTS:
      got = jmat.parallel.work_per_device(block_mask, n, layout)
      rows = expected_positions(layout, n, len(per_block))
      assert got == tuple(int(per_block[r].sum()) for r in rows)
      assert all(type(w) is int for w in got)
      assert sum(got) == per_block.sum()  # every computed block belongs to exactly one device


def test_work_per_device_of_tables_without_full_blocks():
  # from_kv_blocks without full tables (torch's default): the partial tables alone, with
  # repeated filler and a row whose count is 0.
  rng = np.random.default_rng(2)
  n_q, n_k = 12, 7
  counts = rng.integers(0, n_k + 1, (2, 1, n_q))
  indices = np.stack([rng.permutation(n_k) for _ in range(2 * n_q)]).reshape(2, 1, n_q, n_k)
  mask = jmat.attention.BlockMask.from_kv_blocks(jnp.asarray(counts), jnp.asarray(indices),
                                                 BLOCK_SIZE=16)
  listed = np.arange(n_k) < counts[..., None]  # (2, 1, n_q, n_k) over the index slots
  per_block = listed.sum(axis=(0, 1, 3))
  for layout in layouts.LAYOUTS:
    rows = expected_positions(layout, 3, n_q)
    assert jmat.parallel.work_per_device(mask, 3, layout) == tuple(
        int(per_block[r].sum()) for r in rows)


def test_zigzag_balances_causal_attention_over_8_devices():
  # The figure: the busiest device does about twice the mean work with contiguous
  # chunks and the mean with zigzag.
  length = 8192
  causal = jmat.create_block_mask(jmat.mods.causal_mask, None, None, length, length)
  allowed = np.tril(np.ones((length, length), bool))[None, None]
  per_block = np_block_work(allowed, 128, 128)
  ratios = {}
  for layout in layouts.LAYOUTS:
    work = jmat.parallel.work_per_device(causal, 8, layout)
    assert work == tuple(int(per_block[rows].sum()) for rows in expected_positions(layout, 8, 64))
    ratios[layout] = max(work) / np.mean(work)
  assert ratios["zigzag"] <= 1.1
  assert ratios["contiguous"] > 1.7
