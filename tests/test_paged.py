"""jmat.attention.PagedAttention against torch 2.13's (CPU): page tables, assign, masks, flex.

torch's ``PagedAttention`` runs on a CPU (``device="cpu"``) and is the semantic oracle: the
same reserve/erase script must give the same page tables, the same assign the same caches,
the same logical block mask the same physical tables, and flex attention over the paged cache
torch's eager flex result. numpy float64 (attention over each sequence's own keys) is the value
oracle where torch is wrong (stale ``physical_to_logical`` rows after ``erase``; a ``batch_idx``
other than ``arange(B)``).
"""

from __future__ import annotations

import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torch.nn.attention import flex_attention as tf
from torch.nn.attention.experimental._paged_attention import (
    PagedAttention as TorchPagedAttention,
)

import jmat
from jmat.attention import PagedAttention, create_block_mask
from tests.cases import attention_reference, tolerance
from tests.torch_oracle import dense_attention

RNG = np.random.default_rng(23)


def randn(*shape):
  return RNG.standard_normal(shape)


def both(n_pages, page_size, max_batch, script):
  """jmat's and torch's PagedAttention after the same ``("reserve", b, n)``/``("erase", b)``."""
  mine, theirs = PagedAttention(n_pages, page_size, max_batch), TorchPagedAttention(
      n_pages, page_size, max_batch, device="cpu")
  for step in script:
    if step[0] == "reserve":
      mine = mine.reserve(step[1], step[2])
      theirs.reserve(torch.tensor(step[1]), torch.tensor(step[2]))
    else:
      mine = mine.erase(step[1])
      theirs.erase(torch.tensor([step[1]]))
  return mine, theirs


def inverse(page_table, n_pages):
  """numpy oracle of physical_to_logical: the logical block each sequence's page holds."""
  out = -np.ones((page_table.shape[0], n_pages), np.int64)
  for b, row in enumerate(page_table):
    for logical, page in enumerate(row):
      if page >= 0:
        out[b, page] = logical
  return out


SCRIPT = [("reserve", 0, 9), ("reserve", 2, 3), ("reserve", 1, 1), ("reserve", 0, 17),
          ("reserve", 0, 12), ("erase", 2), ("reserve", 3, 21), ("reserve", 2, 8),
          ("erase", 0), ("reserve", 1, 16), ("reserve", 0, 4)]


def test_reserve_and_erase_give_torchs_page_tables():
  for stop in range(1, len(SCRIPT) + 1):
    mine, theirs = both(16, 4, 5, SCRIPT[:stop])
    np.testing.assert_array_equal(mine.page_table, theirs.page_table.numpy())
    np.testing.assert_array_equal(mine.capacity, theirs.capacity.numpy())
    assert mine.empty_pages == theirs.empty_pages
    np.testing.assert_array_equal(mine.physical_to_logical,
                                  inverse(theirs.page_table.numpy(), 16))


def test_physical_to_logical_as_torch_until_an_erase():
  # torch 2.13's erase writes -1 into a copy (advanced indexing), so its rows go stale.
  mine, theirs = both(16, 4, 5, SCRIPT[:5])
  np.testing.assert_array_equal(mine.physical_to_logical, theirs.physical_to_logical.numpy())
  mine, theirs = both(16, 4, 5, SCRIPT[:6])
  assert (theirs.physical_to_logical.numpy()[2] >= 0).any()
  assert (np.asarray(mine.physical_to_logical)[2] == -1).all()


def test_reserve_and_erase_return_new_states():
  paged = PagedAttention(8, 4, 2)
  reserved = paged.reserve(0, 5)
  assert paged.empty_pages == list(range(7, -1, -1)) and int(paged.capacity[0]) == 0
  assert reserved.reserve(0, 8) is reserved  # already holds 8 positions
  erased = reserved.erase(0)
  assert int(reserved.capacity[0]) == 8 and int(erased.capacity[0]) == 0


def test_reserve_beyond_the_free_pages_says_how_many_are_free():
  mine, theirs = both(6, 4, 3, [("reserve", 0, 13)])
  with pytest.raises(AssertionError, match="only 2 empty pages"):
    theirs.reserve(torch.tensor(1), torch.tensor(9))
  with pytest.raises(ValueError, match=r"jmat\.attention\.PagedAttention\.reserve: batch "
                                       r"entry 1 needs 3 more pages of 4.*only 2 pages are free"):
    mine.reserve(1, 9)


def test_reserve_and_erase_refuse_traced_and_bad_arguments():
  paged = PagedAttention(6, 4, 3)
  with pytest.raises(TypeError, match=r"reserve: seq_len is a traced value.*outside jax\.jit"):
    jax.jit(lambda n: paged.reserve(0, n))(5)
  with pytest.raises(TypeError, match=r"erase: the PagedAttention is a traced value"):
    jax.jit(lambda p: p.erase(0))(paged)
  with pytest.raises(ValueError, match=r"batch_idx=3 is out of range.*max_batch_size=3"):
    paged.reserve(3, 1)
  with pytest.raises(TypeError, match=r"seq_len must be one integer"):
    paged.reserve(0, 2.5)
  with pytest.raises(ValueError, match=r"PagedAttention: page_size must be a positive int"):
    PagedAttention(4, 0, 1)


def test_reserve_accepts_torchs_one_element_tensors_as_arrays():
  paged = PagedAttention(6, 4, 3).reserve(jnp.array([1]), np.array([6]))
  assert paged.capacity.tolist() == [0, 8, 0]


# --- assign -------------------------------------------------------------------------------------


def test_assign_writes_where_torchs_writes():
  mine, theirs = both(16, 4, 5, SCRIPT)
  batch_idx = np.array([3, 1, 2])
  input_pos = np.array([[0, 5, 20], [15, 3, 4], [7, 6, 0]])  # all reserved
  k_val, v_val = randn(3, 2, 3, 5), randn(3, 2, 3, 7)
  k_cache, v_cache = randn(1, 2, 64, 5), randn(1, 2, 64, 7)
  t_k, t_v = torch.tensor(k_cache), torch.tensor(v_cache)
  theirs.assign(torch.tensor(batch_idx), torch.tensor(input_pos), torch.tensor(k_val),
                torch.tensor(v_val), t_k, t_v)
  new_k, new_v = mine.assign(batch_idx, input_pos, k_val, v_val, k_cache, v_cache)
  np.testing.assert_array_equal(new_k, t_k.numpy())
  np.testing.assert_array_equal(new_v, t_v.numpy())


def test_assign_drops_positions_without_a_page():
  paged = PagedAttention(4, 2, 2).reserve(0, 3)  # logical blocks 0, 1 of sequence 0
  cache = np.zeros((1, 1, 8, 1))
  values = np.array([[[[1.0], [2.0]]], [[[3.0], [4.0]]]])  # (2, 1, 2, 1)
  new, _ = paged.assign(np.array([0, 1]), np.array([[3, 4], [0, 1]]), values, values, cache,
                        cache)
  want = np.zeros(8)
  want[paged.page_table[0, 1] * 2 + 1] = 1.0  # position 3: block 1, slot 1; the rest has none
  np.testing.assert_array_equal(new[0, 0, :, 0], want)


def test_assign_is_jittable_with_donated_caches_and_does_not_retrace():
  paged = PagedAttention(8, 4, 2).reserve(0, 6).reserve(1, 9)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def step(paged, pos, k_val, v_val, k_cache, v_cache):
    return paged.assign(jnp.array([0, 1]), pos, k_val, v_val, k_cache, v_cache)

  donated = jax.jit(step, donate_argnums=(4, 5))
  cache, v_cache = jnp.zeros((1, 2, 32, 4)), jnp.zeros((1, 2, 32, 4))
  val = jnp.ones((2, 2, 1, 4))
  lowered = donated.lower(paged, jnp.array([[5], [8]]), val, val, cache, v_cache)
  assert "input_output_alias" in lowered.compile().as_text()
  k_cache, v_cache = donated(paged, jnp.array([[5], [8]]), val, val, cache, v_cache)
  assert cache.is_deleted()
  other = paged.erase(0).reserve(0, 2)  # a new page table: same shapes, no new trace
  k_cache, v_cache = step(other, jnp.array([[1], [2]]), val, val, k_cache, v_cache)
  written = {int(t[b, p // 4]) * 4 + p % 4 for t, b, p in [
      (paged.page_table, 0, 5), (paged.page_table, 1, 8), (other.page_table, 0, 1),
      (other.page_table, 1, 2)]}
  assert set(np.flatnonzero(k_cache[0, 0, :, 0]).tolist()) == written


def test_assign_refuses_shapes_that_do_not_fit():
  paged = PagedAttention(8, 4, 2).reserve(0, 6)
  val, cache = jnp.ones((1, 2, 3, 4)), jnp.zeros((1, 2, 32, 4))
  with pytest.raises(jmat.ShapeError, match=r"assign: input_pos must be \(B, S\) = \(1, 3\)"):
    paged.assign(jnp.array([0]), jnp.array([[0, 1]]), val, val, cache, cache)
  with pytest.raises(jmat.ShapeError, match=r"assign: k_val has 2 heads, the cache 3"):
    paged.assign(jnp.array([0]), jnp.array([[0, 1, 2]]), val, val, jnp.zeros((1, 3, 32, 4)),
                 jnp.zeros((1, 3, 32, 4)))
  with pytest.raises(jmat.ShapeError, match=r"the cache holds 30 positions, not n_pages \* "
                                            r"page_size = 8 \* 4"):
    paged.assign(jnp.array([0]), jnp.array([[0, 1, 2]]), val, val, cache[:, :, :30],
                 cache[:, :, :30])


# --- block masks and mods -------------------------------------------------------------------


# A script without erase (torch's physical_to_logical stays right): capacities 20, 16, 8, 24 in
# pages of 4 that interleave; the valid lengths of the four sequences (one sees nothing).
GROWTH = [("reserve", 0, 9), ("reserve", 2, 3), ("reserve", 1, 1), ("reserve", 0, 17),
          ("reserve", 3, 21), ("reserve", 2, 8), ("reserve", 1, 16)]
LENGTHS = np.array([17, 13, 0, 21])


def causal_lengths_jnp(offset):
  lengths = jnp.asarray(LENGTHS)
  return lambda b, h, q, kv: (kv <= q + offset[b]) & (kv < lengths[b])


def causal_lengths_torch(offset):
  lengths = torch.tensor(LENGTHS)
  return lambda b, h, q, kv: (kv <= q + offset[b]) & (kv < lengths[b])


def test_convert_logical_block_mask_lists_torchs_pages():
  mine, theirs = both(20, 4, 5, GROWTH)
  offset = np.array([2, 8, 0, 17])
  # Whole query blocks: torch's create_block_mask never marks full a block with padding rows.
  logical_kv = 24
  logical = create_block_mask(causal_lengths_jnp(jnp.asarray(offset)), 4, None, 4, logical_kv,
                              BLOCK_SIZE=(2, 4))
  t_logical = tf.create_block_mask(causal_lengths_torch(torch.tensor(offset)), 4, None, 4,
                                   logical_kv, device="cpu", BLOCK_SIZE=(2, 4))
  got = mine.convert_logical_block_mask(logical, kv_len=jnp.asarray(LENGTHS))
  want = theirs.convert_logical_block_mask(t_logical, kv_len=torch.tensor(LENGTHS))
  assert got.shape == tuple(want.shape) and got.BLOCK_SIZE == tuple(want.BLOCK_SIZE)
  pairs = [(got.kv_num_blocks, got.kv_indices, want.kv_num_blocks, want.kv_indices),
           (got.full_kv_num_blocks, got.full_kv_indices, want.full_kv_num_blocks,
            want.full_kv_indices)]
  for num, indices, t_num, t_indices in pairs:
    np.testing.assert_array_equal(num, t_num.numpy())
    for row in np.ndindex(*num.shape):
      n = int(num[row])
      np.testing.assert_array_equal(indices[row][:n], t_indices.numpy()[row][:n])
  # The dense masks of both mask_mods over the whole pool.
  mask = jmat.attention.create_mask(got.mask_mod, 4, 1, 4, 80)
  t_mask = tf.create_mask(want.mask_mod, 4, 1, 4, 80, device="cpu")
  np.testing.assert_array_equal(mask, t_mask.numpy())


def test_get_mask_mod_and_get_score_mod_as_torchs():
  mine, theirs = both(16, 4, 5, SCRIPT[:5])  # before an erase (torch's stale rows)
  kv_len = np.array([12, 3, 2, 0, 1])
  mask = mine.get_mask_mod(lambda b, h, q, kv: (kv + q) % 3 != 0, jnp.asarray(kv_len))
  t_mask = theirs.get_mask_mod(lambda b, h, q, kv: (kv + q) % 3 != 0, torch.tensor(kv_len))
  np.testing.assert_array_equal(jmat.attention.create_mask(mask, 5, 1, 4, 64),
                                tf.create_mask(t_mask, 5, 1, 4, 64, device="cpu").numpy())
  mask = mine.get_mask_mod(None)
  t_mask = theirs.get_mask_mod(None)
  np.testing.assert_array_equal(jmat.attention.create_mask(mask, 5, 1, 4, 64),
                                tf.create_mask(t_mask, 5, 1, 4, 64, device="cpu").numpy())
  score = mine.get_score_mod(lambda s, b, h, q, kv: s + kv - 2 * q, jnp.asarray(kv_len))
  t_score = theirs.get_score_mod(lambda s, b, h, q, kv: s + kv - 2 * q, torch.tensor(kv_len))
  lifted = jax.vmap(jax.vmap(score, (None, None, None, None, 0)), (None, None, 0, None, None))
  for b in range(5):
    got = lifted(jnp.float64(0.5), jnp.int32(b), jnp.arange(4), jnp.int32(1), jnp.arange(64))
    want = [[float(t_score(torch.tensor(0.5, dtype=torch.float64), torch.tensor(b),
                           torch.tensor(h), torch.tensor(1), torch.tensor(kv)))
             for kv in range(64)] for h in range(4)]
    np.testing.assert_array_equal(got, np.array(want))


def test_convert_refuses_key_blocks_other_than_pages():
  paged = PagedAttention(8, 4, 2)
  logical = create_block_mask(lambda b, h, q, kv: q >= kv, 2, None, 8, 8, BLOCK_SIZE=8)
  with pytest.raises(ValueError, match=r"convert_logical_block_mask: the block_mask's key "
                                       r"block is 8, the page_size 4"):
    paged.convert_logical_block_mask(logical)
  logical = create_block_mask(lambda b, h, q, kv: q >= kv, 2, None, 8, 8, BLOCK_SIZE=4)
  with pytest.raises(jmat.ShapeError, match=r"batch_idx must give one page-table row"):
    paged.convert_logical_block_mask(logical, batch_idx=jnp.array([0, 1, 1]))
  with pytest.raises(jmat.ShapeError, match=r"give batch_idx"):
    PagedAttention(8, 4, 1).convert_logical_block_mask(logical)


# --- flex attention over the paged cache --------------------------------------------------------


def filled_caches(mine, theirs, heads, dims):
  """Both caches holding the same random keys/values at every reserved position.

  ``theirs`` None: jmat's alone (torch's caches are None).
  """
  n_pages, page_size = mine.n_pages, mine.page_size
  k_cache, v_cache = randn(1, heads, n_pages * page_size, dims[0]), randn(
      1, heads, n_pages * page_size, dims[1])
  t_k, t_v = torch.tensor(k_cache), torch.tensor(v_cache)
  for b, capacity in enumerate(np.asarray(mine.capacity)):
    if capacity:
      pos = np.arange(capacity)[None]
      k_val, v_val = randn(1, heads, capacity, dims[0]), randn(1, heads, capacity, dims[1])
      if theirs is not None:
        theirs.assign(torch.tensor([b]), torch.tensor(pos), torch.tensor(k_val),
                      torch.tensor(v_val), t_k, t_v)
      k_cache, v_cache = mine.assign(np.array([b]), pos, k_val, v_val, k_cache, v_cache)
  if theirs is None:
    return (k_cache, v_cache), (None, None)
  np.testing.assert_array_equal(k_cache, t_k.numpy())
  return (k_cache, v_cache), (t_k, t_v)


def logical_keys(paged, cache, b):
  """Sequence ``b``'s keys in logical order, read through its page table (numpy)."""
  table = np.asarray(paged.page_table[b])
  pages = table[table >= 0]
  positions = (pages[:, None] * paged.page_size + np.arange(paged.page_size)).reshape(-1)
  return np.asarray(cache)[0][:, positions]


@pytest.mark.parametrize("q_len, score", [(1, False), (3, True)])
def test_flex_over_the_paged_cache_equals_torchs(q_len, score):
  mine, theirs = both(20, 4, 5, GROWTH)
  (k_cache, v_cache), (t_k, t_v) = filled_caches(mine, theirs, 2, (6, 5))
  offset = LENGTHS - q_len  # the last q_len positions of each sequence
  logical_kv = 24
  q = randn(4, 4, q_len, 6)
  logical = create_block_mask(causal_lengths_jnp(jnp.asarray(offset)), 4, None, q_len,
                              logical_kv, BLOCK_SIZE=(q_len, 4))
  t_logical = tf.create_block_mask(causal_lengths_torch(torch.tensor(offset)), 4, None, q_len,
                                   logical_kv, device="cpu", BLOCK_SIZE=(q_len, 4))
  score_j = score_t = None
  if score:
    score_j = mine.get_score_mod(lambda s, b, h, q, kv: s - 0.25 * jnp.abs(q - kv))
    score_t = theirs.get_score_mod(lambda s, b, h, q, kv: s - 0.25 * torch.abs(q - kv))

  @jax.jit
  def attend(paged, q, k_cache, v_cache, logical):
    physical = paged.convert_logical_block_mask(logical, kv_len=jnp.asarray(LENGTHS))
    return jmat.flex_attention(q, k_cache, v_cache, score_j, physical, enable_gqa=True,
                               return_lse=True)

  with jax.default_matmul_precision("highest"):
    out, lse = attend(mine, q, k_cache, v_cache, logical)
  physical = theirs.convert_logical_block_mask(t_logical, kv_len=torch.tensor(LENGTHS))
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    want, want_lse = tf.flex_attention(torch.tensor(q), t_k, t_v, score_t, physical,
                                       enable_gqa=True, return_lse=True)
  np.testing.assert_allclose(out, want.numpy(), **tolerance(np.float64))
  np.testing.assert_allclose(lse, want_lse.numpy(), **tolerance(np.float64))
  # And each sequence's attention over its own keys, in numpy float64.
  for b in range(4):
    keys, values = logical_keys(mine, k_cache, b), logical_keys(mine, v_cache, b)
    n = min(LENGTHS[b], keys.shape[1])
    positions = np.arange(q_len)[:, None] + offset[b]
    allowed = np.arange(n)[None] <= positions
    # The mods see query indices and logical key positions: the oracle's own indices.
    scores = (lambda s, b, h, q_idx, kv: s - 0.25 * np.abs(q_idx - kv)) if score else None
    ref, ref_lse = attention_reference(q[b][None], keys[None, :, :n], values[None, :, :n],
                                       allowed=allowed, score_fn=scores, enable_gqa=True,
                                       return_lse=True)
    np.testing.assert_allclose(out[b], ref[0], **tolerance(np.float64))
    np.testing.assert_allclose(lse[b], ref_lse[0], **tolerance(np.float64))


def test_convert_with_batch_idx_reads_each_entrys_page_table_row():
  # torch's converted mask_mod reads row b instead of batch_idx[b]; jmat reads batch_idx[b].
  mine, _ = both(16, 4, 5, SCRIPT)
  (k_cache, v_cache), _ = filled_caches(mine, None, 2, (6, 5))
  rows = np.array([3, 1])
  lengths = np.array([21, 16])
  q = randn(2, 2, 1, 6)
  logical = create_block_mask(lambda b, h, q, kv: kv < jnp.asarray(lengths)[b], 2, None, 1, 24,
                              BLOCK_SIZE=(1, 4))
  physical = mine.convert_logical_block_mask(logical, batch_idx=jnp.asarray(rows))
  with jax.default_matmul_precision("highest"):
    out = jmat.flex_attention(q, k_cache, v_cache, block_mask=physical)
  for i, b in enumerate(rows):
    keys, values = logical_keys(mine, k_cache, b), logical_keys(mine, v_cache, b)
    ref = attention_reference(q[i][None], keys[None, :, :lengths[i]],
                              values[None, :, :lengths[i]])
    np.testing.assert_allclose(out[i], ref[0], **tolerance(np.float64))


def test_flex_over_the_paged_cache_after_erase_equals_attention_per_sequence():
  # After erase and reuse of pages (where torch's stale physical_to_logical rows let a sequence
  # see another's keys), against numpy float64 over each sequence's own keys.
  mine, _ = both(16, 4, 5, SCRIPT)  # capacities 4, 16, 8, 24
  (k_cache, v_cache), _ = filled_caches(mine, None, 2, (6, 5))
  lengths = np.array([3, 16, 5, 21])
  q = randn(4, 4, 1, 6)
  logical = create_block_mask(lambda b, h, q, kv: kv < jnp.asarray(lengths)[b], 4, None, 1, 24,
                              BLOCK_SIZE=(1, 4))
  with jax.default_matmul_precision("highest"):
    out = jmat.flex_attention(q, k_cache, v_cache,
                              block_mask=mine.convert_logical_block_mask(logical),
                              enable_gqa=True)
  for b in range(4):
    keys, values = logical_keys(mine, k_cache, b), logical_keys(mine, v_cache, b)
    ref = attention_reference(q[b][None], keys[None, :, :lengths[b]],
                              values[None, :, :lengths[b]], enable_gqa=True)
    np.testing.assert_allclose(out[b], ref[0], **tolerance(np.float64))


def test_gradients_through_assign_and_flex_match_torch_autograd():
  # A decoding step: the new keys/values written with assign, then flex over the pool. The
  # gradients of q, of the new k/v and of both pools (zero where a sequence was overwritten or
  # holds nothing) against dense torch float64 autograd over each sequence's logical keys.
  mine, _ = both(20, 4, 5, GROWTH)  # capacities 20, 16, 8, 24
  rows, positions = np.array([0, 1, 3]), np.array([18, 0, 9])
  q = randn(3, 4, 1, 6)
  k_val, v_val = randn(3, 2, 1, 6), randn(3, 2, 1, 5)
  k_cache, v_cache = randn(1, 2, 80, 6), randn(1, 2, 80, 5)
  w = randn(3, 4, 1, 5)
  logical_kv = 24

  def loss(q, k_val, v_val, k_cache, v_cache):
    k_cache, v_cache = mine.assign(rows, positions[:, None], k_val, v_val, k_cache, v_cache)
    logical = create_block_mask(lambda b, h, q, kv: kv <= jnp.asarray(positions)[b], 3, None,
                                1, logical_kv, BLOCK_SIZE=(1, 4))
    physical = mine.convert_logical_block_mask(logical, batch_idx=rows)
    out = jmat.flex_attention(q, k_cache, v_cache, block_mask=physical, enable_gqa=True)
    return jnp.sum(out * w)

  with jax.default_matmul_precision("highest"):
    got = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))(q, k_val, v_val, k_cache, v_cache)

  table = np.asarray(mine.page_table)[rows][:, : logical_kv // 4]
  slots = torch.tensor((table[:, :, None] * 4 + np.arange(4)).reshape(3, logical_kv))
  leaves = [torch.tensor(x, requires_grad=True) for x in (q, k_val, v_val, k_cache, v_cache)]
  new = torch.nn.functional.one_hot(torch.tensor(positions), logical_kv).bool()[:, None, :, None]
  keys = torch.where(new, leaves[1], leaves[3][0][:, slots].permute(1, 0, 2, 3))
  values = torch.where(new, leaves[2], leaves[4][0][:, slots].permute(1, 0, 2, 3))
  allowed = (torch.arange(logical_kv) <= torch.tensor(positions)[:, None])[:, None, None, :]
  out, _ = dense_attention(leaves[0], keys, values, allowed=allowed, gqa=True)
  (out * torch.tensor(w)).sum().backward()
  for name, g, leaf in zip(("q", "k_val", "v_val", "k_cache", "v_cache"), got, leaves,
                           strict=True):
    assert g.shape == tuple(leaf.shape) and np.abs(g).max() > 0, name
    np.testing.assert_allclose(g, leaf.grad.numpy(), **tolerance(np.float64), err_msg=name)


def test_kv_len_bounds_full_blocks_too():
  # A logical mask of full blocks and the lengths in kv_len alone: torch's eager flex applies
  # the converted mask_mod everywhere (its kernel would skip it in full blocks); jmat makes the
  # full blocks that reach past kv_len[b] partial, so the bound holds there as well.
  mine, theirs = both(20, 4, 5, GROWTH)
  (k_cache, v_cache), (t_k, t_v) = filled_caches(mine, theirs, 2, (6, 5))
  lengths = np.array([17, 13, 1, 21])
  q = randn(4, 4, 1, 6)
  logical = create_block_mask(lambda b, h, q, kv: kv >= 0, 4, None, 1, 24, BLOCK_SIZE=(1, 4))
  assert int(logical.kv_num_blocks.sum()) == 0  # every block full
  physical = mine.convert_logical_block_mask(logical, kv_len=jnp.asarray(lengths))
  with jax.default_matmul_precision("highest"):
    out = jmat.flex_attention(q, k_cache, v_cache, block_mask=physical, enable_gqa=True)
  t_logical = tf.create_block_mask(lambda b, h, q, kv: kv >= 0, 4, None, 1, 24, device="cpu",
                                   BLOCK_SIZE=(1, 4))
  t_physical = theirs.convert_logical_block_mask(t_logical, kv_len=torch.tensor(lengths))
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    want = tf.flex_attention(torch.tensor(q), t_k, t_v, block_mask=t_physical, enable_gqa=True)
  np.testing.assert_allclose(out, want.numpy(), **tolerance(np.float64))
