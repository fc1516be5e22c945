"""jmat flex attention against torch 2.13's (CPU): values and lse, create_mask, refusals, grads.

torch's eager ``flex_attention`` is the value oracle (out and lse). It has no CPU backward, so
gradients are checked against dense torch autograd with the same mods. Every mod is written
again here with torch ops, independently of jmat.mods.
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torch.nn.attention import flex_attention as tf

import jmat
from jmat.attention import and_masks, create_block_mask, create_mask, or_masks
from tests.cases import tolerance
from tests.torch_oracle import dense_attention

RNG = np.random.default_rng(11)


def randn(*shape):
  return RNG.standard_normal(shape)


def torch_flex(q, k, v, score, mask, mask_b, mask_h, gqa, dtype=torch.float64):
  """torch's eager flex_attention (it warns that it is a slow reference path)."""
  tq, tk, tv = (torch.tensor(np.asarray(x)).to(dtype) for x in (q, k, v))
  block_mask = None
  if mask is not None:
    block_mask = tf.create_block_mask(mask, mask_b, mask_h, q.shape[2], k.shape[2],
                                      device="cpu")
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    out, lse = tf.flex_attention(tq, tk, tv, score_mod=score, block_mask=block_mask,
                                 enable_gqa=gqa, return_lse=True)
  return out, lse


def as_numpy(t):
  return t.detach().to(torch.float64).numpy()


# --- the mods, in torch and in jnp (jmat.mods where it has them) -------------------------------

IDS = np.repeat(np.arange(3), [12, 20, 13])  # documents of lengths 12, 20, 13 (L = 45)
IDS_BATCH = np.stack([IDS, np.repeat(np.arange(2), [30, 15])])  # per batch entry


def t_starts(ids):
  return torch.tensor([int(np.flatnonzero(ids == d)[0]) for d in ids])


def t_doc(inner, ids):
  ids_t, starts = torch.tensor(ids), t_starts(ids)

  def doc(b, h, q, kv):
    return (ids_t[q] == ids_t[kv]) & inner(b, h, q - starts[q], kv - starts[kv])

  return doc


def t_causal(b, h, q, kv):
  return q >= kv


def t_offset(n):
  return lambda b, h, q, kv: kv <= q + n


def t_sliding(w):
  return lambda b, h, q, kv: (q >= kv) & (q - kv <= w)


def t_prefix(n):
  return lambda b, h, q, kv: (kv < n) | (q >= kv)


def t_softcap(cap):
  return lambda s, b, h, q, kv: cap * torch.tanh(s / cap)


def t_alibi(heads):
  return lambda s, b, h, q, kv: s + torch.exp2(-(h + 1) * 8.0 / heads) * (kv - q)


def t_relative(table):
  table_t, middle = torch.tensor(table), (table.shape[1] - 1) // 2
  return lambda s, b, h, q, kv: s + table_t[h, kv - q + middle]


def per_bh_jnp(b, h, q, kv):
  ids = jnp.asarray(IDS_BATCH)
  return (ids[b, q] == ids[b, kv]) & (kv <= q - h) & (q - kv <= 8 * (h + 1))


def per_bh_torch(b, h, q, kv):
  ids = torch.tensor(IDS_BATCH)
  return (ids[b, q] == ids[b, kv]) & (kv <= q - h) & (q - kv <= 8 * (h + 1))


M = jmat.mods
TABLE = randn(3, 2 * 44 + 1)
# name: ((B, Hq, Hkv, L, S), BLOCK_SIZE, (jmat score_mod, torch score_mod),
#        (jmat mask_mod, torch mask_mod) or None, (mask B, mask H))
CASES = {
    "causal-gqa": ((2, 4, 2, 37, 37), 16, (None, None), (M.causal_mask, t_causal),
                   (None, None)),
    "decode-mqa": ((2, 4, 1, 1, 45), 16, (None, None),
                   (M.generate_causal_offset(44), t_offset(44)), (None, None)),
    "chunked-prefill-alibi": ((1, 4, 4, 20, 53), (16, 32),
                              (M.generate_alibi_bias(4), t_alibi(4)),
                              (M.generate_causal_offset(33), t_offset(33)), (None, None)),
    "sliding-softcap": ((1, 2, 2, 70, 70), (16, 32),
                        (M.generate_tanh_softcap(2.0), t_softcap(2.0)),
                        (M.generate_sliding_window(9), t_sliding(9)), (None, None)),
    "doc-relative-bias": ((1, 3, 3, 45, 45), 16,
                          (M.generate_relative_bias(TABLE), t_relative(TABLE)),
                          (M.generate_doc_mask_mod(M.causal_mask, IDS),
                           t_doc(t_causal, IDS)), (None, None)),
    "prefix-lm": ((2, 3, 3, 40, 40), 16, (None, None),
                  (M.generate_prefix_lm_mask(10), t_prefix(10)), (None, None)),
    "and-or-window-in-doc-plus-sink": (
        (1, 2, 2, 45, 45), 8, (None, None),
        (or_masks(and_masks(M.generate_sliding_window(6),
                            M.generate_doc_mask_mod(M.causal_mask, IDS)),
                  lambda b, h, q, kv: kv == 0),
         tf.or_masks(tf.and_masks(t_sliding(6), t_doc(t_causal, IDS)),
                     lambda b, h, q, kv: kv == 0)), (None, None)),
    "batch-head-specific-empty-rows": ((2, 4, 2, 45, 45), (8, 16), (None, None),
                                       (per_bh_jnp, per_bh_torch), (2, 4)),
    "no-mask-L>S": ((1, 2, 2, 29, 11), 16, (M.generate_tanh_softcap(1.5), t_softcap(1.5)),
                    None, (None, None)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_values_and_lse_match_torch_flex(case):
  (b, hq, hkv, q_len, kv_len), block, scores, masks, (mask_b, mask_h) = CASES[case]
  q, k, v = randn(b, hq, q_len, 8), randn(b, hkv, kv_len, 8), randn(b, hkv, kv_len, 5)
  want_out, want_lse = torch_flex(q, k, v, scores[1], masks and masks[1], mask_b, mask_h,
                                  hq != hkv)
  block_mask = None
  if masks is not None:
    block_mask = create_block_mask(masks[0], mask_b, mask_h, q_len, kv_len, BLOCK_SIZE=block)
  with jax.default_matmul_precision("highest"):
    out, lse = jmat.flex_attention(q, k, v, scores[0], block_mask, enable_gqa=hq != hkv,
                                   return_lse=True)
  assert out.shape == tuple(want_out.shape) and lse.shape == tuple(want_lse.shape)
  np.testing.assert_allclose(out, as_numpy(want_out), **tolerance(np.float64))
  np.testing.assert_allclose(lse, as_numpy(want_lse), **tolerance(np.float64))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_output_and_lse_dtypes_as_torch(dtype):
  q, k, v = randn(1, 2, 19, 8), randn(1, 2, 19, 8), randn(1, 2, 19, 8)
  t_dtype = getattr(torch, dtype)
  want_out, want_lse = torch_flex(q, k, v, None, t_causal, None, None, False, t_dtype)
  # Both get the same rounded inputs.
  args = [jnp.asarray(x).astype(dtype) for x in (q, k, v)]
  block_mask = create_block_mask(M.causal_mask, None, None, 19, 19, BLOCK_SIZE=8)
  with jax.default_matmul_precision("highest"):
    out, lse = jmat.flex_attention(*args, block_mask=block_mask, return_lse=True)
  assert str(out.dtype) == str(want_out.dtype).removeprefix("torch.")
  assert str(lse.dtype) == str(want_lse.dtype).removeprefix("torch.")
  np.testing.assert_allclose(np.asarray(out, np.float64), as_numpy(want_out), **tolerance(dtype))
  # lse is float32 for every input dtype, but computed from scores of the rounded inputs
  np.testing.assert_allclose(lse, as_numpy(want_lse), **tolerance(dtype))


# --- create_mask -------------------------------------------------------------------------------

MASKS = {
    "causal": (M.causal_mask, t_causal, None, None, 13, 21),
    "offset": (M.generate_causal_offset(8), t_offset(8), None, None, 13, 21),
    "sliding": (M.generate_sliding_window(3), t_sliding(3), None, None, 21, 13),
    "prefix": (M.generate_prefix_lm_mask(5), t_prefix(5), None, None, 13, 13),
    "doc": (M.generate_doc_mask_mod(M.causal_mask, IDS), t_doc(t_causal, IDS), None, None,
            45, 45),
    "noop": (jmat.attention.noop_mask, tf.noop_mask, 2, None, 3, 5),
    "per-batch-head": (per_bh_jnp, per_bh_torch, 2, 4, 45, 45),
}


@pytest.mark.parametrize("case", list(MASKS))
def test_create_mask_matches_torch(case):
  mask_j, mask_t, b, h, q_len, kv_len = MASKS[case]
  want = tf.create_mask(mask_t, b, h, q_len, kv_len, device="cpu").numpy()
  got = create_mask(mask_j, b, h, q_len, kv_len)
  assert got.dtype == jnp.bool_
  np.testing.assert_array_equal(got, want)


# --- refusals: what torch refuses, jmat refuses -----------------------------------------------


def refused_by_both():
  q, kv = np.zeros((2, 4, 8, 6)), np.zeros((2, 4, 10, 6))
  return {
      "3-D": (dict(query=q[0], key=kv[0], value=kv[0]), None),
      "E differs": (dict(query=q, key=kv[..., :5], value=kv), None),
      "heads without gqa": (dict(query=q, key=kv[:, :2], value=kv[:, :2]), None),
      "gqa not dividing": (dict(query=q, key=kv[:, :3], value=kv[:, :3], enable_gqa=True),
                           None),
      "batch differs": (dict(query=q, key=kv[:1], value=kv[:1]), None),
      "mask lengths": (dict(query=q, key=kv, value=kv), (8, 12)),
  }


REFUSED = refused_by_both()


@pytest.mark.parametrize("case", list(REFUSED))
def test_refuses_what_torch_refuses(case):
  kwargs, mask_lengths = REFUSED[case]
  t_kwargs = {name: torch.tensor(x) if isinstance(x, np.ndarray) else x
              for name, x in kwargs.items()}
  j_kwargs = dict(kwargs)
  if mask_lengths is not None:
    t_kwargs["block_mask"] = tf.create_block_mask(t_causal, None, None, *mask_lengths,
                                                  device="cpu")
    j_kwargs["block_mask"] = create_block_mask(M.causal_mask, None, None, *mask_lengths)
  with pytest.raises((ValueError, NotImplementedError)):
    tf.flex_attention(**t_kwargs)
  with pytest.raises(jmat.ShapeError, match=r"jmat\.flex_attention"):
    jmat.flex_attention(**j_kwargs)


# --- gradients against dense torch autograd ----------------------------------------------------


def check_gradients(q, k, v, captured, score_j, score_t, mask_j, mask_t, mask_bh, gqa):
  """Gradients of ``sum(out * w) + sum(finite lse * u)`` for q, k, v and the captured array."""
  q_len, kv_len = q.shape[2], k.shape[2]
  w, u = randn(*q.shape[:3], v.shape[-1]), randn(*q.shape[:3])
  block_mask = create_block_mask(mask_j, *mask_bh, q_len, kv_len, BLOCK_SIZE=(8, 16))

  def loss(q, k, v, captured):
    out, lse = jmat.flex_attention(q, k, v, score_j(captured), block_mask, enable_gqa=gqa,
                                   return_lse=True)
    return jnp.sum(out * w) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0) * u)

  with jax.default_matmul_precision("highest"):
    got = jax.grad(loss, argnums=(0, 1, 2, 3))(q, k, v, captured)
  leaves = [torch.tensor(x, requires_grad=True) for x in (q, k, v, captured)]
  allowed = tf.create_mask(mask_t, *mask_bh, q_len, kv_len, device="cpu")
  out, lse = dense_attention(*leaves[:3], score=score_t(leaves[3]), allowed=allowed, gqa=gqa)
  total = (out * torch.tensor(w)).sum() + (
      torch.where(torch.isfinite(lse), lse, 0.0) * torch.tensor(u)).sum()
  total.backward()
  for name, g, leaf in zip("q k v captured".split(), got, leaves, strict=True):
    assert np.isfinite(g).all(), name
    np.testing.assert_allclose(g, leaf.grad.numpy(), **tolerance(np.float64), err_msg=name)


def test_gradients_of_qkv_and_relative_bias_table_gqa_bottom_right_causal():
  q, k, v = randn(2, 4, 37, 6), randn(2, 2, 45, 6), randn(2, 2, 45, 5)
  table = randn(4, 2 * 44 + 1)
  check_gradients(q, k, v, table, M.generate_relative_bias, t_relative_grad,
                  M.generate_causal_offset(8), t_offset(8), (None, None), gqa=True)


def t_relative_grad(table):
  middle = (table.shape[1] - 1) // 2
  return lambda s, b, h, q, kv: s + table[h, kv - q + middle]


def alibi_slopes_jnp(slopes):
  return lambda s, b, h, q, kv: 2.0 * jnp.tanh((s + slopes[h] * (kv - q)) / 2.0)


def alibi_slopes_torch(slopes):
  return lambda s, b, h, q, kv: 2.0 * torch.tanh((s + slopes[h] * (kv - q)) / 2.0)


def test_gradients_of_learnable_alibi_slopes_batch_head_mask_with_empty_rows():
  # Per-batch document ids (an integer capture), per-head windows, rows that see nothing,
  # and a softcap over learnable ALiBi slopes.
  q, k, v = randn(2, 4, 45, 6), randn(2, 4, 45, 6), randn(2, 4, 45, 3)
  slopes = RNG.random(4)
  check_gradients(q, k, v, slopes, alibi_slopes_jnp, alibi_slopes_torch, per_bh_jnp,
                  per_bh_torch, (2, 4), gqa=False)
