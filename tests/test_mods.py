"""jmat.mods against numpy: each ready-made mask_mod via create_mask, each score_mod on a grid.

Each mod is written again below in numpy from its definition (attention-gym's formulas).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

import jmat
from jmat.attention import create_mask

M = jmat.mods


def grid(q_len, kv_len):
  return np.ix_(np.arange(q_len), np.arange(kv_len))


def starts(ids):
  """Per position, the first position holding its document id."""
  return np.array([np.flatnonzero(ids == d)[0] for d in ids])


def np_doc(inner, q_ids, kv_ids):
  def doc(q, kv):
    q_rel, kv_rel = q - starts(q_ids)[q], kv - starts(kv_ids)[kv]
    return (q_ids[q] == kv_ids[kv]) & inner(q_rel, kv_rel)
  return doc


IDS = np.repeat(np.array([3, 4, 7, 9]), [6, 1, 15, 9])  # ids need not start at 0 (L = 31)
KV_IDS = np.repeat(np.array([2, 3, 4, 7, 9]), [4, 10, 3, 20, 3])  # S = 40

# name: (mask_mod, numpy mask on (q, kv) grids, L, S)
MASKS = {
    "causal": (M.causal_mask, lambda q, kv: q >= kv, 13, 21),
    "causal L>S": (M.causal_mask, lambda q, kv: q >= kv, 21, 13),
    "offset bottom-right": (M.generate_causal_offset(21 - 13), lambda q, kv: kv <= q + 8, 13,
                            21),
    "offset decode": (M.generate_causal_offset(20), lambda q, kv: kv <= q + 20, 1, 21),
    "offset array": (M.generate_causal_offset(jnp.asarray(5)), lambda q, kv: kv <= q + 5, 13,
                     21),
    "sliding 0": (M.generate_sliding_window(0), lambda q, kv: q == kv, 7, 7),
    "sliding 4": (M.generate_sliding_window(4), lambda q, kv: (kv <= q) & (kv >= q - 4), 21,
                  21),
    "prefix 5": (M.generate_prefix_lm_mask(5), lambda q, kv: (kv < 5) | (kv <= q), 13, 13),
    "prefix array": (M.generate_prefix_lm_mask(jnp.asarray(3)),
                     lambda q, kv: (kv < 3) | (kv <= q), 13, 17),
    "doc causal": (M.generate_doc_mask_mod(M.causal_mask, IDS),
                   np_doc(lambda q, kv: q >= kv, IDS, IDS), 31, 31),
    "doc prefix (relative positions)": (
        M.generate_doc_mask_mod(M.generate_prefix_lm_mask(2), IDS),
        np_doc(lambda q, kv: (kv < 2) | (q >= kv), IDS, IDS), 31, 31),
    "doc with kv ids": (M.generate_doc_mask_mod(M.causal_mask, IDS, KV_IDS),
                        np_doc(lambda q, kv: q >= kv, IDS, KV_IDS), 31, 40),
}


@pytest.mark.parametrize("case", list(MASKS))
def test_mask_mods_match_numpy(case):
  mask_j, mask_n, q_len, kv_len = MASKS[case]
  got = create_mask(mask_j, None, None, q_len, kv_len)
  np.testing.assert_array_equal(got[0, 0], np.broadcast_to(mask_n(*grid(q_len, kv_len)),
                                                          (q_len, kv_len)))


def score_grid(heads, q_len, kv_len):
  """A float32 score and index arrays broadcasting to ``(heads, q_len, kv_len)``."""
  s = np.random.default_rng(3).standard_normal((heads, q_len, kv_len)).astype(np.float32) * 20
  h, q, kv = np.ix_(np.arange(heads), np.arange(q_len), np.arange(kv_len))
  return s, h, q, kv


TABLE = np.random.default_rng(4).standard_normal((3, 2 * 12 + 1))


def np_alibi(heads):
  return lambda s, h, q, kv: s + 2.0 ** (-8.0 * (h + 1) / heads) * (kv - q)


# name: (score_mod, numpy score_mod, heads, L, S)
SCORES = {
    "softcap": (M.generate_tanh_softcap(5.0), lambda s, h, q, kv: 5.0 * np.tanh(s / 5.0),
                2, 7, 9),
    "softcap approx": (M.generate_tanh_softcap(5.0, approx=True),
                       lambda s, h, q, kv: 5.0 * np.tanh(s / 5.0), 2, 7, 9),
    "alibi 8": (M.generate_alibi_bias(8), np_alibi(8), 8, 7, 9),
    "alibi 6": (M.generate_alibi_bias(6), np_alibi(6), 6, 9, 7),
    "relative": (M.generate_relative_bias(TABLE),
                 lambda s, h, q, kv: s + TABLE[h, kv - q + 12], 3, 13, 13),
}


@pytest.mark.parametrize("case", list(SCORES))
def test_score_mods_match_numpy_and_keep_the_score_dtype(case):
  score_j, score_n, heads, q_len, kv_len = SCORES[case]
  s, h, q, kv = score_grid(heads, q_len, kv_len)
  got = score_j(jnp.asarray(s), 0, jnp.asarray(h), jnp.asarray(q), jnp.asarray(kv))
  assert got.dtype == jnp.float32  # as torch, the mod keeps the score's dtype
  want = score_n(s.astype(np.float64), h, q, kv)
  np.testing.assert_allclose(got, want, rtol=2e-6, atol=2e-5)
  scalar = score_j(jnp.float32(s[0, 1, 2]), jnp.int32(0), jnp.int32(0), jnp.int32(1),
                   jnp.int32(2))
  assert scalar.shape == () and scalar.dtype == jnp.float32
