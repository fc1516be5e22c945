"""jmat.flex_attention against a dense float64 numpy oracle; jit, vmap, refusals, memory.

The oracle (tests/cases.py's) applies a numpy score function and a numpy boolean mask to the
whole (L, S) score grid; masks and score mods are written in numpy here, independently of
jmat.mods. torch's own flex_attention is the oracle in tests/parity/test_torch_flex.py.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jmat
from jmat._src.flex_attention import _flex_attention
from jmat.attention import BlockMask, create_block_mask, or_masks
from tests.cases import attention_reference, attention_reference_vjp, tolerance

# jmat's own jit cache of flex_attention (the public function checks kernel_options, then calls it)
flex_cache_size = _flex_attention._cache_size

RNG = np.random.default_rng(10)


LSE_DTYPE = {jnp.float16: jnp.float32, jnp.bfloat16: jnp.float32, jnp.float32: jnp.float32,
             jnp.float64: jnp.float64}


def randn(*shape):
  return RNG.standard_normal(shape)


def grid(b, h, q_len, kv_len):
  """Index arrays that broadcast to ``(b, h, q_len, kv_len)``."""
  return np.ix_(np.arange(b), np.arange(h), np.arange(q_len), np.arange(kv_len))


def np_mask(mask, b, h, q_len, kv_len):
  """A numpy mask function evaluated as torch's create_mask: ``(b or 1, h or 1, L, S)`` bool."""
  b_, h_ = b or 1, h or 1
  return np.broadcast_to(mask(*grid(b_, h_, q_len, kv_len)), (b_, h_, q_len, kv_len))


def flex_reference(q, k, v, score=None, allowed=None, scale=None):
  """tests/cases.py's float64 oracle as flex attention runs: ``(out, lse)``, GQA allowed.

  ``score(s, b, h, q_idx, kv_idx)`` is a numpy score function on broadcast index grids;
  ``allowed`` a bool array broadcasting to ``(B, Hq, L, S)``.
  """
  return attention_reference(q, k, v, allowed=allowed, score_fn=score, scale=scale,
                             enable_gqa=True, return_lse=True)


def as_f64(x):
  return np.asarray(jnp.asarray(x).astype(jnp.float64))


# Masks and score mods, once in jnp (for jmat) and once in numpy (for the oracle).
def sliding(w):
  return (lambda b, h, q, kv: (q >= kv) & (q - kv <= w),
          lambda b, h, q, kv: (q >= kv) & (q - kv <= w))


def prefix(n):
  return (lambda b, h, q, kv: (kv < n) | (q >= kv), lambda b, h, q, kv: (kv < n) | (q >= kv))


def softcap_jnp(s, b, h, q, kv):
  return 3.0 * jnp.tanh(s / 3.0)


def softcap_np(s, b, h, q, kv):
  return 3.0 * np.tanh(s / 3.0)


# --- values per dtype -----------------------------------------------------------------------


def check_values(dtype, variant=lambda f: f):
  # L != S with bottom-right causal or a prefix, and a softcap: many (16, 32) blocks.
  b, h, q_len, kv_len = 2, 3, 37, 70
  offset = kv_len - q_len
  mask_j = or_masks(lambda b, h, q, kv: q + offset >= kv, prefix(5)[0])
  mask_n = lambda b, h, q, kv: (q + offset >= kv) | (kv < 5)  # noqa: E731
  block_mask = create_block_mask(mask_j, None, None, q_len, kv_len, BLOCK_SIZE=(16, 32))
  q, k, v = (jnp.asarray(randn(b, h, n, 8)).astype(dtype) for n in (q_len, kv_len, kv_len))
  v = v[..., :5]

  @variant
  def attend(q, k, v, block_mask):
    return jmat.flex_attention(q, k, v, softcap_jnp, block_mask, return_lse=True)

  with jax.default_matmul_precision("highest"):
    out, lse = attend(q, k, v, block_mask)
  assert out.dtype == dtype and lse.dtype == LSE_DTYPE[dtype]
  chex.assert_shape([out, lse], [(b, h, q_len, 5), (b, h, q_len)])
  want_out, want_lse = flex_reference(as_f64(q), as_f64(k), as_f64(v), softcap_np,
                                      np_mask(mask_n, None, None, q_len, kv_len))
  np.testing.assert_allclose(as_f64(out), want_out, **tolerance(dtype))
  np.testing.assert_allclose(as_f64(lse), want_lse, **tolerance(dtype))


class FlexValuesTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_float32_matches_numpy_float64(self):
    check_values(jnp.float32, self.variant)


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16, jnp.float64])
def test_matches_numpy_float64_per_dtype(dtype):
  check_values(dtype)


def test_without_mask_or_mod_is_softmax_attention_with_scale():
  q, k, v = randn(1, 2, 13, 5), randn(1, 2, 21, 5), randn(1, 2, 21, 3)
  with jax.default_matmul_precision("highest"):
    out, lse = jmat.flex_attention(q, k, v, scale=0.3, return_lse=True)
  want_out, want_lse = flex_reference(q, k, v, scale=0.3)
  np.testing.assert_allclose(out, want_out, **tolerance(jnp.float64))
  np.testing.assert_allclose(lse, want_lse, **tolerance(jnp.float64))


def test_no_keys_gives_zeros_and_minus_inf():
  q, k, v = randn(2, 3, 5, 4), randn(2, 3, 0, 4), randn(2, 3, 0, 6)
  out, lse = jmat.flex_attention(q, k, v, return_lse=True)
  want_out, want_lse = flex_reference(q, k, v)
  chex.assert_shape([out, lse], [(2, 3, 5, 6), (2, 3, 5)])
  np.testing.assert_array_equal(out, want_out)
  np.testing.assert_array_equal(lse, want_lse)


# --- B- and H-specific masks, GQA/MQA, fully masked rows -------------------------------------

# A mask and a score that depend on the batch and head: query q of (b, h) sees keys
# <= q + 3b - h, so the first rows of the higher heads of batch 0 see no key at all. A
# BlockMask built with B (or H) None is one mask for every batch entry (head), so the mask
# only uses b (h) when B (H) is given.
def per_bh(uses_b, uses_h):
  return lambda b, h, q, kv: kv <= q + 3 * b * uses_b - h * uses_h


def per_bh_score_jnp(s, b, h, q, kv):
  return s + 0.5 * b - 0.25 * h + 0.01 * (kv - q)


def per_bh_score_np(s, b, h, q, kv):
  return s + 0.5 * b - 0.25 * h + 0.01 * (kv - q)


@pytest.mark.parametrize("mask_b,mask_h,kv_heads", [
    (None, None, 1), (2, None, 2), (None, 4, 4), (None, 4, 2), (2, 4, 2)])
def test_batch_and_head_specific_masks_with_gqa(mask_b, mask_h, kv_heads):
  b, h, q_len, kv_len = 2, 4, 21, 34
  q, k, v = randn(b, h, q_len, 6), randn(b, kv_heads, kv_len, 6), randn(b, kv_heads, kv_len, 3)
  mask = per_bh(mask_b is not None, mask_h is not None)
  block_mask = create_block_mask(mask, mask_b, mask_h, q_len, kv_len, BLOCK_SIZE=(8, 16))
  assert block_mask.shape == (mask_b or 1, mask_h or 1, q_len, kv_len)
  with jax.default_matmul_precision("highest"):
    out, lse = jmat.flex_attention(q, k, v, per_bh_score_jnp, block_mask,
                                   enable_gqa=kv_heads != h, return_lse=True)
  want_out, want_lse = flex_reference(q, k, v, per_bh_score_np,
                                      np_mask(mask, mask_b, mask_h, q_len, kv_len))
  np.testing.assert_allclose(out, want_out, **tolerance(jnp.float64))
  np.testing.assert_allclose(lse, want_lse, **tolerance(jnp.float64))
  assert np.isneginf(want_lse).any() == (mask_h is not None)  # rows that see nothing


def test_fully_masked_rows_give_zero_output_minus_inf_lse_and_zero_gradient():
  q, k, v = randn(1, 2, 20, 4), randn(1, 2, 20, 4), randn(1, 2, 20, 3)
  # Query rows 0..9 see nothing; the others see every key.
  block_mask = create_block_mask(lambda b, h, q, kv: q >= 10, None, None, 20, 20, BLOCK_SIZE=8)

  def loss(q, k, v):
    out, lse = jmat.flex_attention(q, k, v, block_mask=block_mask, return_lse=True)
    return jnp.sum(out) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0)), (out, lse)

  (_, (out, lse)), (dq, dk, dv) = jax.value_and_grad(loss, argnums=(0, 1, 2),
                                                      has_aux=True)(q, k, v)
  np.testing.assert_array_equal(out[:, :, :10], 0.0)
  np.testing.assert_array_equal(lse[:, :, :10], -np.inf)
  want_out, _ = flex_reference(q[:, :, 10:], k, v)
  np.testing.assert_allclose(out[:, :, 10:], want_out, **tolerance(jnp.float64))
  for g in (dq, dk, dv):
    assert np.isfinite(g).all()
  np.testing.assert_array_equal(dq[:, :, :10], 0.0)


def test_empty_blocks_are_never_read():
  # NaN keys and values far outside a window of 8: a kernel that computed a skipped block
  # would mix them (0 * NaN) into the rows that cannot see them.
  q, k, v = randn(1, 1, 64, 4), randn(1, 1, 64, 4), randn(1, 1, 64, 3)
  k[..., 48:, :] = np.nan
  v[..., 48:, :] = np.nan
  mask_j, mask_n = sliding(8)
  block_mask = create_block_mask(mask_j, None, None, 64, 64, BLOCK_SIZE=16)
  out = jmat.flex_attention(q, k, v, block_mask=block_mask)
  want, _ = flex_reference(q[..., :32, :], k[..., :32, :], v[..., :32, :],
                           allowed=np_mask(mask_n, None, None, 32, 32))
  np.testing.assert_allclose(out[..., :32, :], want, **tolerance(jnp.float64))


# --- score_mods that capture arrays ------------------------------------------------------------


def test_score_and_mask_mods_capturing_float_and_int_arrays():
  b, h, length = 2, 3, 45
  q, k, v = randn(b, h, length, 4), randn(b, h, length, 4), randn(b, h, length, 4)
  slopes = randn(h)
  doc = np.repeat(np.arange(4), [10, 7, 20, 8])
  per_batch = np.stack([doc, np.repeat(np.arange(2), [30, 15])])  # (B, L) document ids

  def score(s, b, h, q, kv):
    return s + jnp.asarray(slopes)[h] * (kv - q) / 10

  def mask(b, h, q, kv):
    ids = jnp.asarray(per_batch)
    return (ids[b, q] == ids[b, kv]) & (q >= kv)

  block_mask = create_block_mask(mask, b, None, length, length, BLOCK_SIZE=16)
  with jax.default_matmul_precision("highest"):
    out, lse = jmat.flex_attention(q, k, v, score, block_mask, return_lse=True)
  bi, hi, qi, ki = grid(b, 1, length, length)
  allowed = (per_batch[bi, qi] == per_batch[bi, ki]) & (qi >= ki)
  want_out, want_lse = flex_reference(
      q, k, v, lambda s, b, h, q, kv: s + slopes[h] * (kv - q) / 10, allowed)
  np.testing.assert_allclose(out, want_out, **tolerance(jnp.float64))
  np.testing.assert_allclose(lse, want_lse, **tolerance(jnp.float64))


# --- jit with a BlockMask argument, vmap -------------------------------------------------------


def expand_block_mask(block_mask: BlockMask, mask_n) -> np.ndarray:
  """The dense mask a BlockMask stands for: full blocks all allowed, partial ones ``mask_n``."""
  dense = np.asarray(block_mask.to_dense())
  b, h, q_len, kv_len = block_mask.shape
  bq, bk = block_mask.BLOCK_SIZE
  per_entry = np.repeat(np.repeat(dense, bq, axis=2), bk, axis=3)[:, :, :q_len, :kv_len]
  return (per_entry == 2) | ((per_entry == 1) & np_mask(mask_n, b, h, q_len, kv_len))


def test_jit_takes_block_masks_as_data_without_retracing():
  # Two BlockMasks of one structure (same mask_mod, sizes, blocks) whose tables differ: the
  # second call must reuse flex_attention's compiled function and honour the new tables.
  q, k, v = randn(1, 2, 48, 4), randn(1, 2, 40, 4), randn(1, 2, 40, 3)
  mask_j = jmat.mods.causal_mask
  mask_n = lambda b, h, q, kv: q >= kv  # noqa: E731
  causal = create_block_mask(mask_j, None, 2, 48, 40, BLOCK_SIZE=(16, 8))
  window = create_block_mask(sliding(10)[0], None, 2, 48, 40, BLOCK_SIZE=(16, 8))
  banded = jax.tree.unflatten(jax.tree.structure(causal), jax.tree.leaves(window))
  assert banded.mask_mod is mask_j
  before = flex_cache_size()
  outs = []
  with jax.default_matmul_precision("highest"):
    for block_mask in (causal, banded):
      outs.append(jmat.flex_attention(q, k, v, block_mask=block_mask))
      if block_mask is causal:
        after_first = flex_cache_size()
  assert after_first == before + 1
  assert flex_cache_size() == after_first
  for out, block_mask in zip(outs, (causal, banded), strict=True):
    want, _ = flex_reference(q, k, v, allowed=expand_block_mask(block_mask, mask_n))
    np.testing.assert_allclose(out, want, **tolerance(jnp.float64))
  assert not np.allclose(outs[0], outs[1])


def test_block_mask_built_inside_a_jitted_step_from_traced_document_ids():
  length = 40
  q, k, v = randn(1, 2, length, 4), randn(1, 2, length, 4), randn(1, 2, length, 4)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def step(q, k, v, ids):
    mask = jmat.mods.generate_doc_mask_mod(jmat.mods.causal_mask, ids)
    block_mask = create_block_mask(mask, None, None, length, length, BLOCK_SIZE=8)
    return jmat.flex_attention(q, k, v, block_mask=block_mask)

  for lengths in ([10, 20, 10], [3, 30, 7]):
    ids = np.repeat(np.arange(3), lengths)
    with jax.default_matmul_precision("highest"):
      out = step(q, k, v, ids)
    qi, ki = np.ix_(np.arange(length), np.arange(length))
    want, _ = flex_reference(q, k, v, allowed=(ids[qi] == ids[ki]) & (qi >= ki))
    np.testing.assert_allclose(out, want, **tolerance(jnp.float64))


def test_vmap_over_an_extra_batch_axis():
  q, k, v = randn(3, 2, 2, 19, 4), randn(3, 2, 2, 26, 4), randn(3, 2, 2, 26, 5)
  mask_j, mask_n = sliding(6)
  block_mask = create_block_mask(mask_j, None, None, 19, 26, BLOCK_SIZE=8)

  def one(q, k, v):
    return jmat.flex_attention(q, k, v, softcap_jnp, block_mask, return_lse=True)

  with jax.default_matmul_precision("highest"):
    out, lse = jax.vmap(one)(q, k, v)
  allowed = np_mask(mask_n, None, None, 19, 26)
  for i in range(3):
    want_out, want_lse = flex_reference(q[i], k[i], v[i], softcap_np, allowed)
    np.testing.assert_allclose(out[i], want_out, **tolerance(jnp.float64))
    np.testing.assert_allclose(lse[i], want_lse, **tolerance(jnp.float64))


# --- refusals ---------------------------------------------------------------------------------

OK = (2, 4, 8, 6)


# --- decoding: split-KV on the XLA loops ----------------------------------------------------


# None: the CPU's own decode step, 11 entries of a list per step (lists of 4 and 11 blocks).
@pytest.mark.parametrize("split_kv", [None, 3, 16])  # 16: more parts than key blocks
@pytest.mark.parametrize("q_len", [1, 3])
def test_split_kv_decode_matches_the_float64_oracle_with_gradients(split_kv, q_len):
  """A short query over long keys: its key blocks cut into SPLIT_KV parts merged by logsumexp
  (torch's flex-decoding option), or (no SPLIT_KV on a CPU) folded several list entries per
  step, give the oracle's values, lse and gradients, q/k/v and a captured bias; batch entries
  of different lengths leave some parts empty or some entries of a step unused."""
  b, h, kv_len = 2, 4, 700
  lengths = jnp.array([700, 250])
  block_mask = create_block_mask(lambda b, h, q, kv: kv < lengths[b], b, None, q_len, kv_len,
                                 BLOCK_SIZE=(16, 64))  # 11 key blocks, some full
  q, k, v = randn(b, h, q_len, 8), randn(b, h, kv_len, 8), randn(b, h, kv_len, 6)
  bias, d_out = jnp.asarray(randn(h, kv_len)), randn(b, h, q_len, 6)

  def attend(q, k, v, bias):
    return jmat.flex_attention(q, k, v, lambda s, b, h, q_idx, kv: s + bias[h, kv], block_mask,
                               return_lse=True,
                               kernel_options=None if split_kv is None else {"SPLIT_KV": split_kv})

  out, lse = attend(q, k, v, bias)
  allowed = np.arange(kv_len) < np.asarray(lengths)[:, None, None, None]
  full_bias = np.broadcast_to(np.asarray(bias)[None, :, None, :], (b, h, q_len, kv_len))
  want, want_lse = attention_reference(q, k, v, allowed=allowed, bias=full_bias,
                                       return_lse=True)
  np.testing.assert_allclose(out, want, rtol=1e-10, atol=1e-10)
  np.testing.assert_allclose(lse, want_lse, rtol=1e-10, atol=1e-10)
  grads = jax.grad(lambda *a: jnp.sum(attend(*a)[0] * d_out), argnums=(0, 1, 2, 3))(q, k, v,
                                                                                   bias)
  d_q, d_k, d_v, d_s = attention_reference_vjp(q, k, v, d_out, allowed=allowed, bias=full_bias)
  for got, want in zip(grads, (d_q, d_k, d_v, d_s.sum(axis=(0, 2))), strict=True):
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9)


# None: the CPU's decode step, 16 entries of a list per step (each entry's window of the pool).
@pytest.mark.parametrize("split_kv", [None, 4])
def test_split_kv_decode_with_gqa_max_scores_and_a_shared_pool(split_kv):
  """The split (and the CPU's decode step) also serves GQA, max_scores (a max over the parts)
  and a key/value batch of 1 (a paged pool) against a per-entry block mask."""
  b, h, kv_heads, kv_len = 3, 4, 2, 512
  q, k, v = randn(b, h, 1, 8), randn(1, kv_heads, kv_len, 8), randn(1, kv_heads, kv_len, 8)
  starts = jnp.array([0, 128, 320])  # each entry's keys: a window of the pool
  block_mask = create_block_mask(
      lambda b, h, q, kv: (kv >= starts[b]) & (kv < starts[b] + 150), b, None, 1, kv_len,
      BLOCK_SIZE=(1, 32))
  out, aux = jmat.flex_attention(q, k, v, block_mask=block_mask, enable_gqa=True,
                                 kernel_options=None if split_kv is None else {
                                     "SPLIT_KV": split_kv},
                                 return_aux=jmat.attention.AuxRequest(lse=True, max_scores=True))
  kv = np.arange(kv_len)
  allowed = (kv >= np.asarray(starts)[:, None, None, None]) & (
      kv < np.asarray(starts)[:, None, None, None] + 150)
  kk, vv = (np.broadcast_to(x, (b,) + x.shape[1:]) for x in (k, v))
  want, want_lse = flex_reference(q, kk, vv, allowed=allowed)
  np.testing.assert_allclose(out, want, rtol=1e-10, atol=1e-10)
  np.testing.assert_allclose(aux.lse, want_lse, rtol=1e-10, atol=1e-10)
  scores = np.einsum("bhqd,bhkd->bhqk", q, np.repeat(kk, 2, axis=1)) / np.sqrt(8)
  np.testing.assert_allclose(aux.max_scores, np.max(np.where(allowed, scores, -np.inf), -1),
                             rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("q_len", [1, 2])
def test_decode_without_a_block_mask_sees_each_batch_entrys_own_keys_and_bias(q_len):
  """Without a block_mask a decode step's tables get a row per batch entry: a score_mod reading
  the batch index, GQA heads and keys over many blocks still give the float64 oracle's values,
  lse and gradients."""
  b, h, kv_heads, kv_len = 3, 4, 2, 600
  q, k, v = randn(b, h, q_len, 8), randn(b, kv_heads, kv_len, 8), randn(b, kv_heads, kv_len, 5)
  bias, d_out = jnp.asarray(randn(b, h, kv_len)), randn(b, h, q_len, 5)

  def attend(q, k, v, bias):
    return jmat.flex_attention(q, k, v, lambda s, b, h, q_idx, kv: s + bias[b, h, kv],
                               enable_gqa=True, return_lse=True)

  out, lse = attend(q, k, v, bias)
  full_bias = np.broadcast_to(np.asarray(bias)[:, :, None, :], (b, h, q_len, kv_len))
  kk, vv = (np.repeat(x, h // kv_heads, axis=1) for x in (k, v))
  want, want_lse = attention_reference(q, kk, vv, bias=full_bias, return_lse=True)
  np.testing.assert_allclose(out, want, rtol=1e-10, atol=1e-10)
  np.testing.assert_allclose(lse, want_lse, rtol=1e-10, atol=1e-10)
  grads = jax.grad(lambda *a: jnp.sum(attend(*a)[0] * d_out), argnums=(0, 3))(q, k, v, bias)
  d_q, _, _, d_s = attention_reference_vjp(q, kk, vv, d_out, bias=full_bias)
  np.testing.assert_allclose(grads[0], d_q, rtol=1e-9, atol=1e-9)
  np.testing.assert_allclose(grads[1], d_s.sum(axis=2), rtol=1e-9, atol=1e-9)


def test_decode_on_the_xla_loops_splits_where_lowered_for_a_gpu_or_tpu_not_a_cpu():
  """Split-KV is chosen per platform at lowering: the program for a GPU or TPU (where the XLA
  loops are the fused kernels' fallback) gathers the parts' key blocks, the CPU's walks them
  one at a time (no gather); forward and backward lower for every platform."""
  q = jax.ShapeDtypeStruct((2, 8, 1, 64), jnp.bfloat16)
  kv = jax.ShapeDtypeStruct((2, 2, 4096, 64), jnp.bfloat16)

  def attend(q, k, v):
    return jmat.flex_attention(q, k, v, enable_gqa=True, kernel_options={"BACKEND": "XLA"})

  def lowered(fn, on):
    with jmat.attention.kernel_platforms(on):
      return jax.jit(fn).trace(q, kv, kv).lower(lowering_platforms=(on,)).as_text()

  gradient = jax.grad(lambda *a: attend(*a).astype(jnp.float32).sum(), argnums=(0, 1, 2))
  for platform in ("cuda", "tpu"):
    assert "gather" in lowered(attend, platform)
    assert "gather" in lowered(gradient, platform)
  assert "gather" not in lowered(attend, "cpu")


def bad_calls():
  q = jnp.zeros(OK)
  kv = jnp.zeros((2, 4, 10, 6))
  mask_10 = create_block_mask(jmat.mods.causal_mask, None, None, 8, 12)
  mask_b3 = create_block_mask(jmat.mods.causal_mask, 3, None, 8, 10)
  mask_h2 = create_block_mask(jmat.mods.causal_mask, None, 2, 8, 10)
  return {
      "3-D": (jmat.ShapeError, dict(query=q[0], key=kv[0], value=kv[0]), ["4-D", "(4, 8, 6)"]),
      "5-D": (jmat.ShapeError, dict(query=q[None], key=kv[None], value=kv[None]),
              ["4-D", "(1, 2, 4, 8, 6)"]),
      "E differs": (jmat.ShapeError, dict(query=q, key=kv[..., :5], value=kv),
                    ["(2, 4, 8, 6)", "(2, 4, 10, 5)"]),
      "heads without gqa": (jmat.ShapeError, dict(query=q, key=kv[:, :2], value=kv[:, :2]),
                            ["enable_gqa", "(2, 4, 8, 6)", "(2, 2, 10, 6)"]),
      "gqa not dividing": (jmat.ShapeError,
                           dict(query=q, key=kv[:, :3], value=kv[:, :3], enable_gqa=True),
                           ["(2, 4, 8, 6)", "(2, 3, 10, 6)"]),
      "batch differs": (jmat.ShapeError, dict(query=q, key=kv[:1], value=kv[:1]),
                        ["(2, 4, 8, 6)", "(1, 4, 10, 6)"]),
      "mask lengths": (jmat.ShapeError, dict(query=q, key=kv, value=kv, block_mask=mask_10),
                       ["KV_LEN=12", "(2, 4, 8, 6)", "(2, 4, 10, 6)", "create_block_mask"]),
      "mask batch": (jmat.ShapeError, dict(query=q, key=kv, value=kv, block_mask=mask_b3),
                     ["B=3", "(3, 1, 8, 10)", "create_block_mask"]),
      "mask heads": (jmat.ShapeError, dict(query=q, key=kv, value=kv, block_mask=mask_h2),
                     ["H=2", "(1, 2, 8, 10)", "create_block_mask"]),
      "mixed dtypes": (TypeError, dict(query=q.astype(jnp.float32), key=kv, value=kv),
                       ["float32", "float64"]),
      "int inputs": (TypeError, dict(query=q.astype(jnp.int32), key=kv.astype(jnp.int32),
                                     value=kv.astype(jnp.int32)), ["int32"]),
      "score_mod arity": (TypeError, dict(query=q, key=kv, value=kv,
                                          score_mod=lambda s, q, kv: s),
                          ["score_mod", "5 arguments"]),
      "score_mod not scalar": (TypeError, dict(query=q, key=kv, value=kv,
                                               score_mod=lambda s, b, h, q, kv: jnp.stack([s, s])),
                               ["score_mod", "(2,)"]),
      "score_mod bool": (TypeError, dict(query=q, key=kv, value=kv,
                                         score_mod=lambda s, b, h, q, kv: s > 0),
                         ["score_mod", "bool"]),
  }


BAD = bad_calls()


@pytest.mark.parametrize("case", sorted(BAD))
def test_refuses_bad_input_naming_op_shapes_and_fix(case):
  error, kwargs, phrases = BAD[case]
  with pytest.raises(error) as info:
    jmat.flex_attention(**kwargs)
  message = str(info.value)
  assert "jmat.flex_attention" in message
  for phrase in phrases:
    assert phrase in message, (phrase, message)


def test_refuses_a_mask_mod_with_a_wrong_result_at_call_time():
  q = jnp.zeros((1, 1, 8, 4))
  block_mask = create_block_mask(jmat.mods.causal_mask, None, None, 8, 8)
  wrong = jax.tree.unflatten(jax.tree.structure(block_mask), jax.tree.leaves(block_mask))
  wrong.mask_mod = lambda b, h, q, kv: (q - kv).astype(jnp.float32)
  with pytest.raises(TypeError, match=r"jmat\.flex_attention: mask_mod .*float32"):
    jmat.flex_attention(q, q, q, block_mask=wrong)


# --- structural memory --------------------------------------------------------------------------


def fwd_bwd_temp_bytes(length, window=32, dim=16):
  x = jax.ShapeDtypeStruct((1, 1, length, dim), jnp.float32)
  block_mask = create_block_mask(jmat.mods.generate_sliding_window(window), None, None, length,
                                 length, BLOCK_SIZE=32)

  def loss(q, k, v, block_mask):
    return jnp.sum(jmat.flex_attention(q, k, v, block_mask=block_mask))

  grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
  return grad.lower(x, x, x, block_mask).compile().memory_analysis().temp_size_in_bytes


def test_fwd_bwd_temporaries_grow_linearly_in_length_for_a_fixed_window():
  small, large = fwd_bwd_temp_bytes(512), fwd_bwd_temp_bytes(1024)
  assert large <= 2.3 * small, (small, large)
  # A kernel that materialised the (L, S) scores would need 4 * L * S bytes for them alone.
  assert large < 4 * 1024 * 1024 / 8, large
