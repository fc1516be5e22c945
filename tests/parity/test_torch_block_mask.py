"""BlockMask slicing, from_kv_blocks, as_tuple, numel and to against torch 2.13's BlockMask.

Tables are compared with torch's own (``as_tuple``, which holds every table torch keeps),
attention with torch's eager ``flex_attention`` on float64. That eager path evaluates
``mask_mod`` on the whole (L, S) grid and never reads the block tables
(``torch/_higher_order_ops/flex_attention.py``, ``_math_attention_inner``); torch's compiled
kernels visit only the listed blocks and skip ``mask_mod`` in full ones. Where tables are
written by hand (not the block summary of a mask_mod), the oracle's mask_mod therefore spells
that kernel rule out with torch's own block maps (``BlockMask.to_dense``): a pair attends when
its block is full, or partial and ``mask_mod`` allows it.
"""

from __future__ import annotations

import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torch.nn.attention import flex_attention as tf

import jmat
from jmat.attention import BlockMask
from tests.cases import tolerance

B, H, L, S, E = 2, 3, 200, 77, 8
BLOCK = (32, 16)
RNG = np.random.default_rng(29)
QUERY, KEY, VALUE = (RNG.standard_normal(shape) for shape in ((B, H, L, E), (B, H, S, E),
                                                              (B, H, S, E)))


def per_batch_head(b, h, q, kv):
  """Depends on b and h, so a slice evaluated at the wrong entry shows (jnp and torch alike)."""
  return (kv <= q + 5 * b) & (kv >= h * 7)


def causal(b, h, q, kv):
  return q >= kv


def torch_flex(query, key, value, block_mask):
  """torch's eager flex_attention (it warns that it is a slow reference path)."""
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    return tf.flex_attention(*(torch.from_numpy(np.asarray(x)) for x in (query, key, value)),
                             block_mask=block_mask).numpy()


def assert_close(got, want):
  np.testing.assert_allclose(np.asarray(got), want, **tolerance(np.float64))


def tables(block_mask):
  """The four kv tables of a torch BlockMask as numpy arrays (None stays None)."""
  return [None if x is None else x.numpy() for x in (
      block_mask.kv_num_blocks, block_mask.kv_indices, block_mask.full_kv_num_blocks,
      block_mask.full_kv_indices)]


def assert_same_fields(got: BlockMask, want: tf.BlockMask):
  """jmat's as_tuple (both layouts), shape, numel and block map are torch's (mask_mod excepted).

  torch's to_dense is 0/1 (listed or not), jmat's 0/1/2 (skipped, partial, full); jmat's
  sparsity is the percent of unlisted blocks (torch's counts elements, wrongly for padded
  lengths: /work/shared/TORCH_SEMANTICS.md).
  """
  assert got.shape == want.shape and got.numel() == want.numel()
  listed = want.to_dense().numpy() > 0
  np.testing.assert_array_equal(np.asarray(got.to_dense()) > 0, listed)
  assert got.sparsity() == pytest.approx(100.0 * (1.0 - listed.mean()) if listed.size else 0.0)
  for flatten in (True, False):
    mine, theirs = got.as_tuple(flatten), want.as_tuple(flatten)
    assert len(mine) == len(theirs)
    for a, b in zip(mine[:-1], theirs[:-1], strict=True):
      if isinstance(b, torch.Tensor):
        assert a is not None and a.shape == tuple(b.shape)
        np.testing.assert_array_equal(np.asarray(a), b.numpy())
      else:
        assert a == b


@pytest.fixture(scope="module")
def masks():
  """torch's mask, jmat's create_block_mask mask and jmat's mask of torch's tables."""
  mine = jmat.create_block_mask(per_batch_head, B, H, L, S, BLOCK_SIZE=BLOCK)
  theirs = tf.create_block_mask(per_batch_head, B, H, L, S, device="cpu", BLOCK_SIZE=BLOCK)
  rebuilt = BlockMask.from_kv_blocks(*tables(theirs), BLOCK_SIZE=BLOCK, mask_mod=per_batch_head,
                                     seq_lengths=(L, S))
  return theirs, mine, rebuilt


def test_whole_masks_attend_and_hold_fields_as_torch(masks):
  theirs, mine, rebuilt = masks
  want = torch_flex(QUERY, KEY, VALUE, theirs)
  assert_close(jmat.flex_attention(QUERY, KEY, VALUE, block_mask=mine), want)
  assert_close(jmat.flex_attention(QUERY, KEY, VALUE, block_mask=rebuilt), want)
  assert_same_fields(rebuilt, theirs)
  assert mine.numel() == theirs.numel()
  assert rebuilt.mask_mod is per_batch_head


# (jmat's index, torch's index); a 0-D array keeps its dim in jmat, as an int does in torch
ALL = slice(None)
INDEXES = {
    "b=1": (1, 1),
    "b=-1": (-1, -1),
    "h=2": ((ALL, 2), (ALL, 2)),
    "h=1:3": ((ALL, slice(1, 3)), (ALL, slice(1, 3))),
    "b,h,q=0,2,6": ((0, 2, 6), (0, 2, 6)),
    "q=3": ((ALL, ALL, 3), (ALL, ALL, 3)),
    "q=2:5": ((ALL, ALL, slice(2, 5)), (ALL, ALL, slice(2, 5))),
    "q=list": ((ALL, ALL, [6, 0, 3]), (ALL, ALL, [6, 0, 3])),
    "q=array": ((ALL, ALL, np.array([1, 5])), (ALL, ALL, torch.tensor([1, 5]))),
    "q=bool": ((ALL, ALL, np.arange(7) % 3 == 0), (ALL, ALL, torch.arange(7) % 3 == 0)),
    "h=array,q=-1": ((ALL, jnp.array([2, 0]), -1), (ALL, torch.tensor([2, 0]), -1)),
    "q=0-D numpy": ((ALL, ALL, np.int64(4)), (ALL, ALL, 4)),
    "q=0-D jax": ((ALL, ALL, jnp.array(4)), (ALL, ALL, 4)),
}


@pytest.mark.parametrize("case", list(INDEXES))
def test_slices_hold_torchs_tables(masks, case):
  theirs, _, rebuilt = masks
  mine_index, their_index = INDEXES[case]
  got, want = rebuilt[mine_index], theirs[their_index]
  assert_same_fields(got, want)
  assert (got.BLOCK_SIZE, got.seq_lengths) == (want.BLOCK_SIZE, want.seq_lengths) == (BLOCK,
                                                                                       (L, S))
  # Both reset mask_mod to one that refuses to run: the slice renumbers b, h or query blocks.
  with pytest.raises(RuntimeError, match="Cannot use mask_mod from a sliced BlockMask"):
    want.mask_mod(*(torch.tensor(0),) * 4)
  with pytest.raises(RuntimeError, match="Cannot use mask_mod from a sliced BlockMask"):
    got.mask_mod(*(jnp.int32(0),) * 4)


def test_flex_attention_refuses_a_sliced_mask_until_its_mask_mod_is_given(masks):
  theirs, mine, _ = masks
  args = (QUERY[1:], KEY[1:], VALUE[1:])
  with pytest.raises(RuntimeError, match="Cannot use mask_mod from a sliced BlockMask"):
    torch_flex(*args, theirs[1])
  with pytest.raises(RuntimeError, match="Cannot use mask_mod from a sliced BlockMask"):
    jmat.flex_attention(*args, block_mask=mine[1])
  # A query block's slice also needs the lengths it covers: both refuse the old ones.
  their_step, my_step = theirs[:, :, 2], mine[:, :, 2]
  their_step.mask_mod = my_step.mask_mod = lambda b, h, q, kv: per_batch_head(b, h, q + 64, kv)
  step = (QUERY[:, :, 64:65], KEY, VALUE)
  with pytest.raises(ValueError, match="block_mask was created for"):
    torch_flex(*step, their_step)
  with pytest.raises(jmat.ShapeError, match=re.escape("built for Q_LEN=200, KV_LEN=77")):
    jmat.flex_attention(*step, block_mask=my_step)


@pytest.mark.parametrize("source", ["create_block_mask", "torch's tables"])
def test_batch_and_head_slices_attend_as_torch(masks, source):
  """torch users' idiom: slice, then set the slice's mask_mod from the original's, shifted."""
  theirs, mine, rebuilt = masks
  mine = mine if source == "create_block_mask" else rebuilt
  for b, h in ((1, None), (None, 2), (0, 1)):
    index = (b if b is not None else ALL, h if h is not None else ALL)
    rows = (slice(b, b + 1) if b is not None else ALL, slice(h, h + 1) if h is not None else ALL)
    shifted = lambda bi, hi, q, kv, b=b, h=h: per_batch_head(  # noqa: E731
        bi + (b or 0), hi + (h or 0), q, kv)
    their_part, my_part = theirs[index], mine[index]
    their_part.mask_mod = my_part.mask_mod = shifted
    args = tuple(x[rows] for x in (QUERY, KEY, VALUE))
    assert_close(jmat.flex_attention(*args, block_mask=my_part), torch_flex(*args, their_part))


def torch_attend_from(query, key, value, block_mask, start):
  """torch users' decoding step (gpt-fast): queries from ``start`` within one query block."""
  part = block_mask[:, :, start // block_mask.BLOCK_SIZE[0]]
  base = block_mask.mask_mod
  part.mask_mod = lambda b, h, q, kv: base(b, h, q + start, kv)
  part.seq_lengths = (query.shape[2], key.shape[2])
  return torch_flex(query, key, value, part)


TRACES = []


@jax.jit
def attend_from(query, key, value, block_mask, start):
  """jmat's: the same step at a traced position, the slice rebuilt with from_kv_blocks."""
  TRACES.append(query.shape)
  part = block_mask[:, :, start // block_mask.BLOCK_SIZE[0]]
  base = block_mask.mask_mod
  part = BlockMask.from_kv_blocks(
      part.kv_num_blocks, part.kv_indices, part.full_kv_num_blocks, part.full_kv_indices,
      BLOCK_SIZE=part.BLOCK_SIZE, seq_lengths=(query.shape[2], key.shape[2]),
      mask_mod=lambda b, h, q, kv: base(b, h, q + start, kv))
  return jmat.flex_attention(query, key, value, block_mask=part)


def test_decode_loop_slices_query_blocks_as_torch(masks):
  theirs, mine, _ = masks
  TRACES.clear()
  for i in (0, 31, 32, 70, 199):  # one query (L = 1) with the full KV, position traced
    args = (QUERY[:, :, i:i + 1], KEY, VALUE)
    assert_close(attend_from(*args, mine, i), torch_attend_from(*args, theirs, i))
  assert TRACES == [(B, H, 1, E)]  # one compilation for every position
  for j in (2, 6):  # a block's worth of queries (the last block holds 200 - 192 = 8)
    start = j * BLOCK[0]
    args = (QUERY[:, :, start:start + BLOCK[0]], KEY, VALUE)
    assert_close(attend_from(*args, mine, start), torch_attend_from(*args, theirs, start))
  # torch's own idiom works on jmat's slice as well (a new object: nothing shared is changed)
  i = 70
  step = mine[:, :, i // BLOCK[0]]
  step.mask_mod = lambda b, h, q, kv: per_batch_head(b, h, q + i, kv)
  step.seq_lengths = (1, S)
  args = (QUERY[:, :, i:i + 1], KEY, VALUE)
  assert_close(jmat.flex_attention(*args, block_mask=step), torch_attend_from(*args, theirs, i))
  assert mine.mask_mod is per_batch_head and mine.seq_lengths == (L, S)


def random_tables(rng, shape, with_full, mask_mod, block_size, seq_lengths):
  """Tables of a random block map: each row's blocks in random order, filler zeros (torch
  users' habit; it repeats block 0).

  Full blocks are anywhere (torch's kernel then skips mask_mod, even where it would mask),
  except that a full block holding keys past KV_LEN is one where mask_mod allows every pair
  (torch's contract for full blocks): jmat's kernel checks key bounds only where it evaluates
  mask_mod, so it evaluates mask_mod in that block too.
  """
  kinds = rng.integers(0, 3 if with_full else 2, size=shape)  # 0 skipped, 1 partial, 2 full
  (bq, bk), (q_len, kv_len) = block_size, seq_lengths
  if with_full and mask_mod is not None and kv_len % bk:
    last = shape[3] - 1
    for b, h, i in np.ndindex(*shape[:3]):
      q, kv = np.ix_(np.arange(i * bq, min((i + 1) * bq, q_len)), np.arange(last * bk, kv_len))
      if not np.all(mask_mod(b, h, q, kv)) and kinds[b, h, i, last] == 2:
        kinds[b, h, i, last] = 1
  out = []
  for kind in (1, 2) if with_full else (1,):
    num = np.zeros(shape[:3], np.int32)
    indices = np.zeros(shape, np.int32)
    for row in np.ndindex(*shape[:3]):
      listed = rng.permutation(np.flatnonzero(kinds[row] == kind))
      num[row], indices[row][:len(listed)] = len(listed), listed
    out += [num, indices]
  return out + [None, None] * (not with_full)


def kernel_rule(their_mask, mask_mod, block_size):
  """torch's kernel's rule as a mask_mod, from torch's block maps of ``their_mask``'s tables."""
  partial = tf.BlockMask.from_kv_blocks(their_mask.kv_num_blocks, their_mask.kv_indices).to_dense()
  full = torch.zeros_like(partial) if their_mask.full_kv_num_blocks is None else (
      tf.BlockMask.from_kv_blocks(their_mask.full_kv_num_blocks,
                                  their_mask.full_kv_indices).to_dense())
  mask_mod = mask_mod or tf.noop_mask
  bq, bk = block_size

  def rule(b, h, q, kv):
    return (full[b, h, q // bq, kv // bk] > 0) | (
        (partial[b, h, q // bq, kv // bk] > 0) & mask_mod(b, h, q, kv))

  return rule


# name: (with full blocks, mask_mod, BLOCK_SIZE (None: default), seq_lengths, table grid n_q, n_k)
FROM_KV_BLOCKS = {
    "partial only, noop mask_mod, default lengths": (False, None, BLOCK, None, (7, 5)),
    "full and partial, mask_mod, padded last key block": (True, per_batch_head, BLOCK, (L, S),
                                                          (7, 5)),
    "partial only, mask_mod, (16, 32) blocks": (False, per_batch_head, (16, 32), (L, S),
                                                (13, 3)),
    "full and partial, default BLOCK_SIZE 128": (True, causal, None, (L, S), (2, 1)),
    "full and partial, noop, square 24": (True, None, 24, (L, S), (9, 4)),
}


@pytest.mark.parametrize("case", list(FROM_KV_BLOCKS))
def test_from_kv_blocks_attends_and_holds_fields_as_torch(case):
  with_full, mask_mod, block_size, seq_lengths, grid = FROM_KV_BLOCKS[case]
  rng = np.random.default_rng(sorted(FROM_KV_BLOCKS).index(case))
  options = {} if block_size is None else {"BLOCK_SIZE": block_size}
  block_pair = (128, 128) if block_size is None else (
      (block_size, block_size) if isinstance(block_size, int) else block_size)
  lengths = seq_lengths or (grid[0] * block_pair[0], grid[1] * block_pair[1])
  arrays = random_tables(rng, (B, H, *grid), with_full, mask_mod, block_pair, lengths)
  theirs = tf.BlockMask.from_kv_blocks(
      *(None if x is None else torch.from_numpy(x) for x in arrays), mask_mod=mask_mod,
      seq_lengths=seq_lengths, **options)
  mine = BlockMask.from_kv_blocks(*arrays, mask_mod=mask_mod, seq_lengths=seq_lengths, **options)
  assert_same_fields(mine, theirs)
  assert mine.mask_mod is (mask_mod or jmat.attention.noop_mask)
  q_len, kv_len = theirs.seq_lengths
  query = RNG.standard_normal((B, H, q_len, E))
  key, value = (RNG.standard_normal((B, H, kv_len, E)) for _ in range(2))
  oracle = tf.BlockMask.from_kv_blocks(
      theirs.kv_num_blocks, theirs.kv_indices, theirs.full_kv_num_blocks, theirs.full_kv_indices,
      BLOCK_SIZE=theirs.BLOCK_SIZE, seq_lengths=theirs.seq_lengths,
      mask_mod=kernel_rule(theirs, mask_mod, theirs.BLOCK_SIZE))
  assert_close(jmat.flex_attention(query, key, value, block_mask=mine),
               torch_flex(query, key, value, oracle))


def test_to_cpu_as_torch(masks):
  theirs, mine, rebuilt = masks
  assert rebuilt.to("cpu") is rebuilt
  assert_same_fields(rebuilt.to("cpu"), theirs.to("cpu"))
  moved = mine.to(jax.devices("cpu")[0])
  assert moved.kv_indices.devices() == {jax.devices("cpu")[0]}
  assert_close(jmat.flex_attention(QUERY, KEY, VALUE, block_mask=moved),
               torch_flex(QUERY, KEY, VALUE, theirs.to("cpu")))


# --- refusals --------------------------------------------------------------------------------

COUNTS, INDICES = np.ones((B, H, 7), np.int32), np.zeros((B, H, 7, 5), np.int32)
OP = "jmat.BlockMask.from_kv_blocks"

# name: (args, kwargs, jmat error, message parts, torch's refusal or None where it accepts)
FROM_KV_REFUSALS = {
    "indices 1-D": ((np.ones(7, np.int32), np.zeros(7, np.int32)), {}, jmat.ShapeError,
                    [OP, "kv_num_blocks must be 3-D", "kv_indices has shape (7,)"],
                    RuntimeError),
    "tables 2-D and 3-D": ((COUNTS[0, 0], INDICES[0]), {}, jmat.ShapeError,
                           [OP, "kv_num_blocks has shape (7,)", "kv_indices has shape (3, 7, 5)",
                            "kv_num_blocks[None, None]"], None),
    "counts not indices' rows": ((COUNTS[:, :, :6], INDICES), {}, jmat.ShapeError,
                                 [OP, "without its last dim", "kv_num_blocks has shape "
                                  "(2, 3, 6), kv_indices has shape (2, 3, 7, 5)"], RuntimeError),
    "float indices": ((COUNTS, INDICES.astype(np.float64)), {}, TypeError,
                      [OP, "kv_indices has dtype float64", "integer arrays"], None),
    "bool counts": ((COUNTS.astype(bool), INDICES), {}, TypeError,
                    [OP, "kv_num_blocks has dtype bool"], None),
    "full counts alone": ((COUNTS, INDICES, COUNTS), {}, ValueError,
                          [OP, "go together", "full_kv_indices is None"], AssertionError),
    "full of other shape": ((COUNTS, INDICES, COUNTS[:, :, :6], INDICES[:, :, :6]), {},
                            jmat.ShapeError, [OP, "full tables must have the shapes",
                                              "full_kv_indices has shape (2, 3, 6, 5)"], None),
    "BLOCK_SIZE 0": ((COUNTS, INDICES), {"BLOCK_SIZE": 0}, ValueError,
                     [OP, "BLOCK_SIZE must be a positive int", "got 0"], None),
    "seq_lengths one int": ((COUNTS, INDICES), {"seq_lengths": (200,)}, ValueError,
                            [OP, "seq_lengths must be a (Q_LEN, KV_LEN) pair", "(200,)"], None),
    "mask_mod of 3 arguments": ((COUNTS, INDICES), {"mask_mod": lambda b, q, kv: q >= kv},
                                TypeError, [OP, "mask_mod does not accept 4 arguments"], None),
}


@pytest.mark.parametrize("case", list(FROM_KV_REFUSALS))
def test_from_kv_blocks_refusals(case):
  args, kwargs, error, parts, torch_error = FROM_KV_REFUSALS[case]
  with pytest.raises(error, match=".*".join(re.escape(p) for p in parts)):
    BlockMask.from_kv_blocks(*args, **kwargs)
  if torch_error is not None:
    with pytest.raises(torch_error):
      tf.BlockMask.from_kv_blocks(*(torch.from_numpy(a) for a in args), **kwargs)


GET = "jmat.BlockMask.__getitem__"
TABLES = "the tables have shape (2, 3, 7, 5)"
N_Q = -(-L // BLOCK[0])

# name: (jmat's index, torch's, jmat's error, message parts, torch's error or kv_num_blocks shape)
INDEX_REFUSALS = {
    "4 entries": ((0, 0, 0, 5), (0, 0, 0, 5), IndexError, [GET, "4 indices", TABLES],
                  (1, 1, 1)),  # torch ignores the 4th
    "Ellipsis": ((Ellipsis, 0), (Ellipsis, 0), TypeError, [GET, "batch index is Ellipsis", TABLES],
                 ValueError),
    "None": ((ALL, None), (ALL, None), TypeError, [GET, "head index is None"], (B, 1, H, N_Q)),
    "bool": (True, True, TypeError, [GET, "batch index is True"], (1, H, N_Q)),  # True as 1
    "two index arrays": ((np.array([0, 1]), np.array([0, 2])),
                         (torch.tensor([0, 1]), torch.tensor([0, 2])), IndexError,
                         [GET, "more than one 1-D index array", "block_mask[bs][:, hs]"],
                         (2, N_Q)),  # torch pairs them into one dim
    "int past the end": ((ALL, 3), (ALL, 3), IndexError,
                         [GET, "head index 3 is out of range for size 3", TABLES, "-3 .. 2"],
                         (B, 0, N_Q)),
    "int before the start": ((ALL, ALL, -8), (ALL, ALL, -8), IndexError,
                             [GET, "query block index -8 is out of range for size 7"],
                             (B, H, 0)),
    "array past the end": ((ALL, ALL, np.array([1, 7])), (ALL, ALL, torch.tensor([1, 7])),
                           IndexError, [GET, "query block index 7 is out of range"], IndexError),
    "float": (1.0, 1.0, TypeError, [GET, "batch index is a float"], IndexError),
    "float array": ((ALL, ALL, np.array([1.0])), (ALL, ALL, torch.tensor([1.0])), TypeError,
                    [GET, "query block index is an array of dtype float64 and shape (1,)"],
                    IndexError),
    "2-D array": ((ALL, ALL, np.array([[1]])), (ALL, ALL, torch.tensor([[1]])), TypeError,
                  [GET, "query block index is an array of dtype int64 and shape (1, 1)"],
                  (B, H, 1, 1)),
    "bool array of other length": ((ALL, np.array([True, False])),
                                   (ALL, torch.tensor([True, False])), IndexError,
                                   [GET, "boolean array of length 2, the dim has size 3"],
                                   IndexError),
}


@pytest.mark.parametrize("case", list(INDEX_REFUSALS))
def test_index_refusals(masks, case):
  """jmat refuses; torch refuses too, or returns a mask that is not (B, H, n_q) tables."""
  index, their_index, error, parts, torch_does = INDEX_REFUSALS[case]
  with pytest.raises(error, match=".*".join(re.escape(p) for p in parts)):
    masks[2][index]
  if isinstance(torch_does, tuple):
    assert tuple(masks[0][their_index].kv_num_blocks.shape) == torch_does
  else:
    with pytest.raises(torch_does):
      masks[0][their_index]


def test_flex_attention_refuses_fewer_query_block_rows_than_the_lengths_span(masks):
  part = masks[1][:, :, 2:3]
  part = BlockMask.from_kv_blocks(part.kv_num_blocks, part.kv_indices, part.full_kv_num_blocks,
                                  part.full_kv_indices, BLOCK_SIZE=BLOCK, seq_lengths=(64, S))
  parts = ["jmat.flex_attention", "1 query-block rows", "seq_lengths (64, 77) at BLOCK_SIZE "
           "(32, 16) span 2", "kv_indices has shape (2, 3, 1, 5)", "block_mask[:, :, i:i + n]"]
  with pytest.raises(jmat.ShapeError, match=".*".join(re.escape(p) for p in parts)):
    jmat.flex_attention(QUERY[:, :, :64], KEY, VALUE, block_mask=part)
