"""The block-sparse kernel (jmat._src.block_sparse) on its own, against numpy in float64.

Its block tables against a numpy evaluation of which (query block, key block) pairs are full,
partial or empty; ``attend`` (values, logsumexp and gradients) in its own layout
``q (M, R, G, L, E)``, ``k, v (M, R, S, E|Ev)`` against tests/cases.py's attention oracle,
with blocked and whole operands, grouped-query heads, several block-table rows and chains.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jmat._src import block_sparse
from jmat._src.kernels import xla
from tests.cases import attention_reference, attention_reference_vjp, sum_to_shape, tolerance

RNG = np.random.default_rng(20261125)


def randn(*shape: int) -> np.ndarray:
  return RNG.standard_normal(shape)


def numpy_block_maps(q_len, kv_len, block_q, block_k, q_offset=0, k_offset=0, causal=True):
  """``(full, partial)`` ``(n_q, n_k)`` bool maps, from every (query, key) pair of the padded grid.

  A block is full when every pair of a real query row with any of its key columns (padding
  keys are never visible) is visible, partial when some but not all are, empty otherwise.
  """
  n_q, n_k = -(-q_len // block_q), -(-kv_len // block_k)
  rows, cols = np.arange(n_q * block_q), np.arange(n_k * block_k)
  visible = np.broadcast_to(cols[None, :] < kv_len, (rows.size, cols.size))
  if causal:
    visible = visible & ((k_offset + cols)[None, :] <= (q_offset + rows)[:, None])
  real = (rows < q_len).reshape(n_q, block_q, 1, 1)
  pairs = visible.reshape(n_q, block_q, n_k, block_k)
  full = np.all(pairs | ~real, axis=(1, 3))
  return full, np.any(pairs & real, axis=(1, 3)) & ~full


def assert_lists(blocks: block_sparse.KeyBlocks, full: np.ndarray, partial: np.ndarray):
  """The table lists exactly the full and the partial blocks of ``(M, n_q, n_k)`` maps."""
  for name, num, indices, want in (("full", blocks.full_num, blocks.full_indices, full),
                                   ("partial", blocks.num, blocks.indices, partial)):
    num = np.asarray(num)
    assert num.shape == want.shape[:2], name
    for m, i in np.ndindex(*want.shape[:2]):
      if indices is None:  # ranges: full blocks first, then the partial ones
        first = 0 if name == "full" else int(np.asarray(blocks.full_num)[m, i])
        listed = np.arange(first, first + num[m, i])
      else:
        listed = np.asarray(indices)[m, i, :num[m, i]]
      np.testing.assert_array_equal(listed, np.flatnonzero(want[m, i]), err_msg=f"{name} {m, i}")


# (L, S, block_q, block_k, q_offset, k_offset): L != S, lengths that are not multiples of the
# blocks, block_q != block_k, and ring attention's offsets (keys before, after, across).
CAUSAL_CASES = [
    (13, 21, 4, 3, 0, 0),
    (21, 13, 8, 3, 0, 0),
    (17, 17, 16, 16, 0, 0),
    (1, 7, 1, 7, 3, 0),
    (7, 5, 3, 2, 5, 3),
    (6, 10, 2, 3, 12, 20),  # every key after every query: nothing listed
    (6, 10, 4, 3, 30, 10),  # every key before every query: full but for padding keys
    (12, 20, 5, 7, 12, 10),
]


@pytest.mark.parametrize("traced", [False, True])
@pytest.mark.parametrize("case", CAUSAL_CASES)
def test_causal_key_blocks_list_the_full_and_partial_blocks(case, traced):
  q_len, kv_len, block_q, block_k, q_offset, k_offset = case
  offsets = dict(q_offset=q_offset, k_offset=k_offset)
  if traced:  # ring attention's offsets are traced device indices times block lengths
    offsets = {name: jnp.asarray(x, jnp.int32) for name, x in offsets.items()}
  blocks = block_sparse.causal_key_blocks(q_len, kv_len, block_q, block_k, **offsets)
  full, partial = numpy_block_maps(q_len, kv_len, block_q, block_k, q_offset, k_offset)
  assert_lists(blocks, full[None], partial[None])


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("case", [(13, 21, 4, 3), (8, 8, 4, 4), (5, 9, 5, 9)])
def test_dense_key_blocks_list_every_block(case, masked):
  full, partial = numpy_block_maps(*case, causal=False)
  if masked:  # a dense mask is evaluated in every block
    full, partial = np.zeros_like(full), full | partial
  assert_lists(block_sparse.dense_key_blocks(*case, masked=masked), full[None], partial[None])


def random_block_maps(m, n_q, n_k, kv_len=None, block_k=None):
  """Disjoint random ``(full, partial)`` maps, with an empty query block in row 0.

  Given ``kv_len`` and ``block_k``, a last key block holding padding keys is never full (the
  kernel checks bounds in partial blocks only, as every block table it is given promises).
  """
  state = RNG.integers(0, 3, size=(m, n_q, n_k))  # 0 empty, 1 partial, 2 full
  state[0, 1] = 0
  if kv_len is not None and kv_len % block_k:
    state[..., -1] = np.minimum(state[..., -1], 1)
  return state == 2, state == 1


def test_key_blocks_from_dense_lists_each_row_in_ascending_order():
  full, partial = random_block_maps(3, 4, 6)
  assert_lists(block_sparse.key_blocks_from_dense(jnp.asarray(partial), jnp.asarray(full)),
               full, partial)


# --- attend -------------------------------------------------------------------------------

M, R, G, L, S, E, EV = 2, 2, 3, 37, 29, 5, 4
BLOCK_Q, BLOCK_K = 16, 8  # chains=2 splits a query block of 16 into two chains of 8 rows


def scaled_blocked_and_whole(s, m, r, g, q_pos, k_pos, operands):
  """``temp * s + bias + slopes[g] * (k_pos - q_pos)``: a blocked bias, a whole (slopes, temp)."""
  del m, r
  (slopes, temp), (_, bias) = operands
  relative = (k_pos[None, :] - q_pos[:, None]).astype(s.dtype)
  return temp * s + bias + slopes[g][None, :, None, None] * relative


def blocked_mask(m, r, g, q_pos, k_pos, operands):
  del m, r, g, q_pos, k_pos
  return operands.blocked[0]


def causal(m, r, g, q_pos, k_pos, operands):
  del m, r, g, operands
  return k_pos[None, :] <= q_pos[:, None]


def entry_mask(full, partial, allowed):
  """The (M, 1, 1, L, S) mask the kernel applies: all of a full block, ``allowed`` in a partial."""
  def per_entry(x):
    x = np.repeat(np.repeat(x, BLOCK_Q, axis=1), BLOCK_K, axis=2)[:, :L, :S]
    return x[:, None, None]

  return per_entry(full) | (per_entry(partial) & allowed)


@pytest.mark.parametrize("bias_shape, chains", [((1, R, 1, L, S), 1), ((M, 1, G, 1, S), 2)])
def test_attend_with_blocked_and_whole_operands_matches_numpy(bias_shape, chains):
  """M = 2 different block tables, G = 3 query heads per key head; gradients of every input."""
  q, k, v = randn(M, R, G, L, E), randn(M, R, S, E), randn(M, R, S, EV)
  d_out = randn(M, R, G, L, EV)
  full, partial = random_block_maps(M, -(-L // BLOCK_Q), -(-S // BLOCK_K), S, BLOCK_K)
  blocks = block_sparse.key_blocks_from_dense(jnp.asarray(partial), jnp.asarray(full))
  allowed = RNG.random((M, 1, 1, L, S)) > 0.3
  bias, slopes, temp, scale = randn(*bias_shape), randn(G), 0.8, 0.4
  mods = block_sparse.Mods(scaled_blocked_and_whole, blocked_mask)

  def attend(q, k, v, slopes, temp, bias):
    operands = block_sparse.Operands((slopes, temp), (jnp.asarray(allowed), bias))
    return xla.attend(q, k, v, blocks, operands, jnp.asarray(scale), mods=mods,
                      block_q=BLOCK_Q, block_k=BLOCK_K, chains=chains)

  @jax.jit
  def values_and_grads(*inputs):
    (out, lse), vjp = jax.vjp(attend, *inputs)
    return out, lse, vjp((d_out, jnp.zeros_like(lse)))

  with jax.default_matmul_precision("highest"):
    out, lse, grads = values_and_grads(q, k, v, slopes, jnp.asarray(temp), bias)
  d_q, d_k, d_v, d_slopes, d_temp, d_bias = grads

  # The mod is affine in the scores: scale * temp, plus one bias holding the slope term.
  relative = np.arange(S)[None, :] - np.arange(L)[:, None]
  total_bias = bias + slopes[:, None, None] * relative
  options = dict(allowed=entry_mask(full, partial, allowed), bias=total_bias, scale=scale * temp)
  k_g, v_g = k[:, :, None], v[:, :, None]  # one key/value head for the G query heads
  want_out, want_lse = attention_reference(q, k_g, v_g, **options, return_lse=True)
  want_dq, want_dk, want_dv, d_s = attention_reference_vjp(q, k_g, v_g, d_out, **options)
  scores = scale * np.matmul(q, np.swapaxes(k_g, -1, -2))  # what the mod's temp multiplies
  assert np.isneginf(want_lse[0, :, :, BLOCK_Q:2 * BLOCK_Q]).all()  # the empty query block
  tol = tolerance(np.float64)
  np.testing.assert_allclose(out, want_out, **tol)
  np.testing.assert_allclose(lse, want_lse, **tol)
  for name, got, want in [
      ("q", d_q, want_dq), ("k", d_k, want_dk.sum(2)), ("v", d_v, want_dv.sum(2)),
      ("slopes", d_slopes, np.einsum("mrgls,ls->g", d_s, relative)),
      ("temp", d_temp, np.sum(d_s * scores)), ("bias", d_bias, sum_to_shape(d_s, bias_shape))]:
    assert np.isfinite(got).all(), name
    np.testing.assert_allclose(got, want, **tol, err_msg=f"d_{name}")


@pytest.mark.parametrize("q_len, kv_len, chains", [(37, 29, 2), (29, 37, 1)])
def test_attend_over_causal_key_blocks_matches_numpy(q_len, kv_len, chains):
  """Causal blocks as ranges, the mask evaluated in the partial ones only, G = 3, float32."""
  q = randn(1, R, G, q_len, E).astype(np.float32)
  k, v = randn(1, R, kv_len, E).astype(np.float32), randn(1, R, kv_len, EV).astype(np.float32)
  blocks = block_sparse.causal_key_blocks(q_len, kv_len, BLOCK_Q, BLOCK_K)
  with jax.default_matmul_precision("highest"):
    out, lse = xla.attend(q, k, v, blocks, block_sparse.Operands(),
                          jnp.asarray(0.4, jnp.float32), mods=block_sparse.Mods(mask=causal),
                          block_q=BLOCK_Q, block_k=BLOCK_K, chains=chains)
  want_out, want_lse = attention_reference(q, k[:, :, None], v[:, :, None], scale=0.4,
                                           is_causal=True, return_lse=True)
  assert out.dtype == jnp.float32 and lse.dtype == jnp.float32
  np.testing.assert_allclose(out, want_out, **tolerance(np.float32))
  np.testing.assert_allclose(lse, want_lse, **tolerance(np.float32))


def test_backward_statistics_give_delta_and_an_lse_that_zeroes_empty_rows():
  """delta = rowsum(dO * O) - d_lse in the compute dtype; an lse of -inf (a row that saw no key)
  comes back +inf, so exp(s - lse) is 0 for every finite score, not NaN."""
  rng = np.random.default_rng(0)
  out = rng.standard_normal((2, 3, 5, 4)).astype(np.float32)
  d_out = rng.standard_normal((2, 3, 5, 4)).astype(np.float32)
  lse = rng.standard_normal((2, 3, 5))
  lse[0, 1, 2] = -np.inf
  d_lse = rng.standard_normal((2, 3, 5))
  delta, lse_b = block_sparse.backward_statistics(
      jnp.asarray(out, jnp.bfloat16), jnp.asarray(d_out), jnp.asarray(lse), jnp.asarray(d_lse),
      jnp.float64)
  out_bf16 = np.asarray(jnp.asarray(out, jnp.bfloat16), np.float64)
  np.testing.assert_allclose(delta, (d_out.astype(np.float64) * out_bf16).sum(-1) - d_lse,
                             rtol=1e-12, atol=1e-12)
  assert delta.dtype == jnp.float64 and lse_b.dtype == jnp.float64
  expected = np.where(np.isneginf(lse), np.inf, lse)
  np.testing.assert_array_equal(lse_b, expected)
  assert np.exp(1e30 - np.asarray(lse_b)[0, 1, 2]) == 0
