"""create_block_mask, BlockMask, create_mask and the mask combinators against numpy.

The oracle evaluates a numpy version of each mask on the whole (L, S) grid and classifies
every (query block, key block) pair: *full* if every real query of the block may see every
key of the block (a block holding padding keys past KV_LEN is never full), *partial* if some
real pair is allowed, *empty* otherwise.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jmat
from jmat.attention import BlockMask, and_masks, create_block_mask, create_mask, noop_mask, or_masks


def np_dense(mask, b, h, q_len, kv_len):
  """``mask`` on the grid: bool ``(b, h, q_len, kv_len)``."""
  grid = np.ix_(np.arange(b), np.arange(h), np.arange(q_len), np.arange(kv_len))
  return np.broadcast_to(mask(*grid), (b, h, q_len, kv_len))


def np_block_map(mask, b, h, q_len, kv_len, bq, bk):
  """``(b, h, n_q, n_k)`` int: 0 empty, 1 partial, 2 full, from the dense numpy mask."""
  n_q, n_k = -(-q_len // bq), -(-kv_len // bk)
  allowed = np.zeros((b, h, n_q * bq, n_k * bk), bool)
  allowed[:, :, :q_len, :kv_len] = np_dense(mask, b, h, q_len, kv_len)
  real_q = np.arange(n_q * bq) < q_len
  blocks = np.zeros((b, h, n_q, n_k), int)
  for i in range(n_q):
    rows = slice(i * bq, (i + 1) * bq)
    for j in range(n_k):
      block = allowed[:, :, rows, j * bk:(j + 1) * bk][:, :, real_q[rows]]
      some = block.any(axis=(2, 3))
      every = block.all(axis=(2, 3)) & ((j + 1) * bk <= kv_len)
      blocks[:, :, i, j] = np.where(every, 2, np.where(some, 1, 0))
  return blocks


def doc_ids():
  return np.repeat(np.arange(4), [5, 17, 1, 22])  # L = 45


# name: (jnp mask_mod, numpy mask, B, H, Q_LEN, KV_LEN, BLOCK_SIZE)
CASES = {
    "causal-100-by-16": (jmat.mods.causal_mask, lambda b, h, q, kv: q >= kv, None, None, 100,
                         100, 16),
    "window-(16,32)": (jmat.mods.generate_sliding_window(10),
                       lambda b, h, q, kv: (q >= kv) & (q - kv <= 10), None, None, 75, 75,
                       (16, 32)),
    "bottom-right-L<S": (jmat.mods.generate_causal_offset(33), lambda b, h, q, kv: kv <= q + 33,
                         None, None, 20, 53, (8, 16)),
    "per-batch-head": (lambda b, h, q, kv: (kv <= q + 5 * b) & (kv >= h * 7),
                       lambda b, h, q, kv: (kv <= q + 5 * b) & (kv >= h * 7), 2, 3, 37, 45,
                       (8, 16)),
    "documents": (jmat.mods.generate_doc_mask_mod(jmat.mods.causal_mask, doc_ids()),
                  lambda b, h, q, kv: (doc_ids()[q] == doc_ids()[kv]) & (q >= kv), None, None,
                  45, 45, 8),
    "noop-block-larger-than-lengths": (noop_mask, lambda b, h, q, kv: np.ones((), bool), None,
                                       None, 13, 21, 128),
    "nothing": (lambda b, h, q, kv: q < 0, lambda b, h, q, kv: q < 0, None, None, 30, 30, 8),
}


@pytest.mark.parametrize("case", list(CASES))
def test_blocks_are_classified_full_partial_empty_as_numpy(case):
  mask_j, mask_n, b, h, q_len, kv_len, block = CASES[case]
  block_mask = create_block_mask(mask_j, b, h, q_len, kv_len, BLOCK_SIZE=block)
  bq, bk = (block, block) if isinstance(block, int) else block
  want = np_block_map(mask_n, b or 1, h or 1, q_len, kv_len, bq, bk)
  assert block_mask.shape == (b or 1, h or 1, q_len, kv_len)
  assert block_mask.BLOCK_SIZE == (bq, bk)
  assert block_mask.seq_lengths == (q_len, kv_len)
  assert block_mask.mask_mod is mask_j
  np.testing.assert_array_equal(block_mask.to_dense(), want)
  # The tables list exactly those blocks, each once, ascending, counts first.
  for num, indices, kind in ((block_mask.kv_num_blocks, block_mask.kv_indices, 1),
                             (block_mask.full_kv_num_blocks, block_mask.full_kv_indices, 2)):
    assert num.dtype == indices.dtype == jnp.int32
    assert num.shape == want.shape[:3] and indices.shape == want.shape
    np.testing.assert_array_equal(num, (want == kind).sum(-1))
    for row in np.ndindex(*want.shape[:3]):
      listed = np.asarray(indices[row][:num[row]])
      np.testing.assert_array_equal(listed, np.flatnonzero(want[row] == kind))
  empty = (want == 0).sum()
  assert block_mask.sparsity() == pytest.approx(100.0 * empty / want.size, abs=1e-12)


def test_to_string_draws_the_block_map():
  mask_n = lambda b, h, q, kv: (q >= kv) & (q - kv <= 10)  # noqa: E731
  block_mask = create_block_mask(jmat.mods.generate_sliding_window(10), None, None, 75, 75,
                                 BLOCK_SIZE=(16, 32))
  want = np_block_map(mask_n, 1, 1, 75, 75, 16, 32)[0, 0]
  assert block_mask.to_string() == "\n".join("".join("·░█"[x] for x in row) for row in want)
  assert "BlockMask(shape=(1, 1, 75, 75)" in repr(block_mask)


def test_block_mask_is_a_pytree_with_static_mask_mod_and_sizes():
  block_mask = create_block_mask(jmat.mods.causal_mask, 2, None, 40, 50, BLOCK_SIZE=(8, 16))
  leaves, treedef = jax.tree.flatten(block_mask)
  assert len(leaves) == 4
  again = jax.tree.unflatten(treedef, leaves)
  assert isinstance(again, BlockMask)
  assert (again.shape, again.BLOCK_SIZE, again.mask_mod) == (
      block_mask.shape, block_mask.BLOCK_SIZE, block_mask.mask_mod)

  @jax.jit
  def computed_blocks(block_mask):
    return jnp.sum(block_mask.kv_num_blocks) + jnp.sum(block_mask.full_kv_num_blocks)

  want = (np_block_map(lambda b, h, q, kv: q >= kv, 2, 1, 40, 50, 8, 16) > 0).sum()
  assert int(computed_blocks(block_mask)) == want


# --- the list bounds a mask records (static: the TPU kernel's shrunk grid) ----------------------


def _coarse_lists(listed: np.ndarray, factor_q: int, factor_k: int) -> tuple[int, int]:
  """The longest lists of the ``(M, n_q, n_k)`` map coarsened ``factor_q x factor_k``: listed
  key blocks per query block, listed query blocks per key block (a coarse block is listed
  when a block inside it is)."""
  m, n_q, n_k = listed.shape
  rows, cols = -(-n_q // factor_q), -(-n_k // factor_k)
  padded = np.zeros((m, rows * factor_q, cols * factor_k), bool)
  padded[:, :n_q, :n_k] = listed
  coarse = padded.reshape(m, rows, factor_q, cols, factor_k).any(axis=(2, 4))
  return int(coarse.sum(axis=2).max()), int(coarse.sum(axis=1).max())


def _rounded_up(count: int, n: int) -> int:
  """The first of 1, 2, 3, 4, 6, 8, 12, 16, ... at least ``count``, at most ``n``."""
  steps = sorted({1, 2} | {m * 2**e for m in (2, 3) for e in range(20)})
  return min(next(x for x in steps if x >= count), n)


def _check_bounds(bounds, listed: np.ndarray):
  """``bounds`` give every power-of-two coarsening's rounded longest lists; None elsewhere."""
  _, n_q, n_k = listed.shape
  for factor_q in [2**a for a in range(n_q.bit_length() + 1)] + [n_q, n_q + 1]:
    for factor_k in [2**b for b in range(n_k.bit_length() + 1)] + [n_k]:
      per_q, per_k = _coarse_lists(listed, factor_q, factor_k)
      want = (_rounded_up(per_q, -(-n_k // factor_k)), _rounded_up(per_k, -(-n_q // factor_q)))
      assert bounds.at(factor_q, factor_k, n_q, n_k) == want, (factor_q, factor_k)
  if n_q > 3:
    assert bounds.at(3, 1, n_q, n_k) is None  # not a recorded coarsening


@pytest.fixture
def tpu_traced():
  """Masks record list bounds only where a TPU program is traced (here: for export)."""
  with jmat.attention.kernel_platforms("tpu"):
    yield


@pytest.mark.usefixtures("tpu_traced")
@pytest.mark.parametrize("case", ["per-batch-head", "documents", "window-(16,32)"])
def test_a_mask_from_known_tables_records_its_longest_lists(case):
  mask_j, mask_n, b, h, q_len, kv_len, block = CASES[case]
  block_mask = create_block_mask(mask_j, b, h, q_len, kv_len, BLOCK_SIZE=block)
  bq, bk = (block, block) if isinstance(block, int) else block
  listed = np_block_map(mask_n, b or 1, h or 1, q_len, kv_len, bq, bk) > 0
  _check_bounds(block_mask._bounds, listed.reshape((-1,) + listed.shape[2:]))
  # from_kv_blocks from known tables records them too (torch's layout: counts, indices)
  partial, full = (listed & (np_block_map(mask_n, b or 1, h or 1, q_len, kv_len, bq, bk) == k)
                   for k in (1, 2))
  order = lambda x: np.argsort(~x, axis=-1, kind="stable")  # noqa: E731
  rebuilt = BlockMask.from_kv_blocks(partial.sum(-1), order(partial), full.sum(-1), order(full),
                                     BLOCK_SIZE=(bq, bk), mask_mod=mask_j,
                                     seq_lengths=(q_len, kv_len))
  _check_bounds(rebuilt._bounds, listed.reshape((-1,) + listed.shape[2:]))


@pytest.mark.usefixtures("tpu_traced")
def test_list_bounds_survive_rows_slicing_and_jit_and_not_traced_tables():
  """Kept where they still bound the lists: batch or head slices, a jit argument (aux data);
  dropped where not: a slice of query blocks regroups the coarse blocks, tables traced when
  built (under jit) are unknown."""
  mask_n = lambda b, h, q, kv: (kv <= q + 5 * b) & (kv >= h * 7)  # noqa: E731
  block_mask = create_block_mask(mask_n, 2, 3, 37, 45, BLOCK_SIZE=(8, 16))
  listed = np_block_map(mask_n, 2, 3, 37, 45, 8, 16) > 0
  for index, rows in [(1, listed[1:2]), ((slice(None), np.array([2, 0, 2])), listed[:, [2, 0, 2]])]:
    _check_bounds(block_mask[index]._bounds, rows.reshape((-1,) + rows.shape[2:]))
  assert block_mask[:, :, 1:]._bounds is None
  assert block_mask[0, 1, np.array([1, 2])]._bounds is None

  seen = []

  @jax.jit
  def count(block_mask):  # its tables traced, its bounds static
    seen.append(getattr(block_mask.key_blocks(), "bounds", None))
    return jnp.sum(block_mask.kv_num_blocks)

  count(block_mask)
  _check_bounds(seen[-1], listed.reshape((-1,) + listed.shape[2:]))
  inside = jax.jit(lambda: create_block_mask(mask_n, 2, 3, 37, 45, BLOCK_SIZE=(8, 16)))()
  np.testing.assert_array_equal(inside.to_dense(), block_mask.to_dense())
  count(inside)
  assert inside._bounds is None and seen[-1] is None


def test_masks_of_one_shape_never_retrace_where_no_tpu_program_is_traced():
  """On this CPU (no kernel_platforms("tpu")) no bounds are recorded: masks of one shape and
  mask_mod whose longest lists differ (documents of different batches) share one trace of a
  jitted function; built for a TPU program they do not (the bounds are in the cache key)."""
  indices = np.broadcast_to(np.arange(8, dtype=np.int32), (1, 1, 8, 8))

  def masks():  # lists of 1 and of 8 key blocks per query block
    return [BlockMask.from_kv_blocks(np.full((1, 1, 8), n, np.int32), indices, BLOCK_SIZE=8)
            for n in (1, 8)]

  traces = []

  @jax.jit
  def count(block_mask):
    traces.append(1)
    return jnp.sum(block_mask.kv_num_blocks)

  for mask in masks():
    assert mask._bounds is None
    count(mask)
  assert len(traces) == 1
  with jmat.attention.kernel_platforms("tpu"):
    bounded = masks()
  assert bounded[0]._bounds != bounded[1]._bounds
  for mask in bounded:
    count(mask)
  assert len(traces) == 3


# --- create_mask and the combinators --------------------------------------------------------


def test_create_mask_broadcast_dims_and_values():
  mask_j = lambda b, h, q, kv: (kv <= q + b) & (kv != h)  # noqa: E731
  for b, h in ((None, None), (3, None), (None, 2), (3, 2)):
    got = create_mask(mask_j, b, h, 7, 9)
    assert got.dtype == jnp.bool_ and got.shape == (b or 1, h or 1, 7, 9)
    np.testing.assert_array_equal(got, np_dense(mask_j, b or 1, h or 1, 7, 9))


def test_and_or_noop_masks():
  near = lambda b, h, q, kv: abs(q - kv) <= 2  # noqa: E731
  even = lambda b, h, q, kv: kv % 2 == 0  # noqa: E731
  causal = lambda b, h, q, kv: q >= kv  # noqa: E731
  grid = (1, 1, 11, 13)
  n_near, n_even, n_causal = (np_dense(m, *grid) for m in (near, even, causal))
  cases = [
      (and_masks(near, even, causal), n_near & n_even & n_causal),
      (or_masks(near, even, causal), n_near | n_even | n_causal),
      (or_masks(and_masks(near, causal), even), (n_near & n_causal) | n_even),
      (noop_mask, np.ones(grid, bool)),
      (and_masks(), np.ones(grid, bool)),
      (or_masks(), np.zeros(grid, bool)),
  ]
  for mask_j, want in cases:
    np.testing.assert_array_equal(create_mask(mask_j, None, None, 11, 13), want)


# --- refusals ----------------------------------------------------------------------------------

REFUSALS = {
    "B negative": (ValueError, dict(B=-1), ["B", "-1"]),
    "H float": (ValueError, dict(H=2.0), ["H", "2.0"]),
    "Q_LEN None": (ValueError, dict(Q_LEN=None), ["Q_LEN", "None"]),
    "BLOCK_SIZE 0": (ValueError, dict(BLOCK_SIZE=0), ["BLOCK_SIZE", "0"]),
    "BLOCK_SIZE triple": (ValueError, dict(BLOCK_SIZE=(8, 8, 8)), ["BLOCK_SIZE", "(8, 8, 8)"]),
    "arity": (TypeError, dict(mask_mod=lambda q, kv: q >= kv), ["mask_mod", "4 arguments"]),
    "float result": (TypeError, dict(mask_mod=lambda b, h, q, kv: (q - kv) * 1.0),
                     ["mask_mod", "bool"]),
    "not scalar": (TypeError, dict(mask_mod=lambda b, h, q, kv: jnp.ones(3, bool)),
                   ["mask_mod", "(3,)"]),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_create_block_mask_refuses_with_a_message(case):
  error, changes, phrases = REFUSALS[case]
  kwargs = dict(mask_mod=jmat.mods.causal_mask, B=None, H=None, Q_LEN=8, KV_LEN=8,
                BLOCK_SIZE=8) | changes
  with pytest.raises(error) as info:
    create_block_mask(**kwargs)
  message = str(info.value)
  assert "jmat.create_block_mask" in message
  for phrase in phrases:
    assert phrase in message, (phrase, message)


def test_combinators_refuse_non_callables():
  for combine in (and_masks, or_masks):
    with pytest.raises(TypeError, match=rf"jmat\.attention\.{combine.__name__}: argument 1"):
      combine(jmat.mods.causal_mask, 3)
