"""flex_attention with a key/value batch of 1 against a query batch, as torch 2.13 (CPU).

torch's eager flex_attention is the value oracle (out and lse); it has no CPU backward, so the
gradients of q, k and v come from dense torch float64 autograd with the key/value pool expanded
over the batch (its gradient is the sum over the batch). Masks are written again in torch.
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
from jmat.attention import create_block_mask
from tests.cases import tolerance
from tests.torch_oracle import dense_attention

RNG = np.random.default_rng(22)
LENGTHS = np.array([4, 29, 0, 17])  # keys each batch entry may see: one sees none


def randn(*shape):
  return RNG.standard_normal(shape)


def mask_jnp(b, h, q, kv):
  return (kv < jnp.asarray(LENGTHS)[b]) & ((kv + q) % 3 != 0)


def mask_torch(b, h, q, kv):
  return (kv < torch.tensor(LENGTHS)[b]) & ((kv + q) % 3 != 0)


def per_head_jnp(b, h, q, kv):
  return mask_jnp(b, h, q, kv) & (kv % 4 != h)


def per_head_torch(b, h, q, kv):
  return mask_torch(b, h, q, kv) & (kv % 4 != h)


def softcap_jnp(s, b, h, q, kv):
  return 4.0 * jnp.tanh(s / 4.0) + b.astype(s.dtype) / 8


def softcap_torch(s, b, h, q, kv):
  return 4.0 * torch.tanh(s / 4.0) + b / 8


# name: (Hq, Hkv, L, S, block, per-head mask, score mods)
CASES = {
    "gqa-decode-L1": (4, 2, 1, 29, (1, 8), False, (None, None)),
    "gqa-L5-softcap": (4, 2, 5, 29, (4, 8), False, (softcap_jnp, softcap_torch)),
    "mha-per-head-mask": (4, 4, 7, 29, (8, 16), True, (None, None)),
}


def inputs(hq, hkv, q_len, kv_len):
  return randn(len(LENGTHS), hq, q_len, 8), randn(1, hkv, kv_len, 8), randn(1, hkv, kv_len, 5)


def masks(per_head):
  return (per_head_jnp, per_head_torch) if per_head else (mask_jnp, mask_torch)


@pytest.mark.parametrize("case", list(CASES))
def test_values_and_lse_match_torch_flex(case):
  hq, hkv, q_len, kv_len, block, per_head, (score_j, score_t) = CASES[case]
  q, k, v = inputs(hq, hkv, q_len, kv_len)
  mask_j, mask_t = masks(per_head)
  heads = hq if per_head else None
  t_mask = tf.create_block_mask(mask_t, len(LENGTHS), heads, q_len, kv_len, device="cpu",
                                BLOCK_SIZE=block)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    want_out, want_lse = tf.flex_attention(*(torch.tensor(x) for x in (q, k, v)), score_t,
                                           block_mask=t_mask, enable_gqa=hq != hkv,
                                           return_lse=True)
  block_mask = create_block_mask(mask_j, len(LENGTHS), heads, q_len, kv_len, BLOCK_SIZE=block)
  with jax.default_matmul_precision("highest"):
    out, lse = jmat.flex_attention(q, k, v, score_j, block_mask, enable_gqa=hq != hkv,
                                   return_lse=True)
  assert out.shape == tuple(want_out.shape) and lse.shape == tuple(want_lse.shape)
  np.testing.assert_allclose(out, want_out.numpy(), **tolerance(np.float64))
  np.testing.assert_allclose(lse, want_lse.numpy(), **tolerance(np.float64))


@pytest.mark.parametrize("case", list(CASES))
def test_gradients_of_q_and_the_shared_k_v_match_torch_autograd(case):
  hq, hkv, q_len, kv_len, block, per_head, (score_j, score_t) = CASES[case]
  q, k, v = inputs(hq, hkv, q_len, kv_len)
  mask_j, mask_t = masks(per_head)
  heads = hq if per_head else None
  w, u = randn(*q.shape[:3], 5), randn(*q.shape[:3])
  block_mask = create_block_mask(mask_j, len(LENGTHS), heads, q_len, kv_len, BLOCK_SIZE=block)

  def loss(q, k, v):
    out, lse = jmat.flex_attention(q, k, v, score_j, block_mask, enable_gqa=hq != hkv,
                                   return_lse=True)
    return jnp.sum(out * w) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0) * u)

  with jax.default_matmul_precision("highest"):
    got = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)
  leaves = [torch.tensor(x, requires_grad=True) for x in (q, k, v)]
  batch = len(LENGTHS)
  allowed = tf.create_mask(mask_t, batch, heads, q_len, kv_len, device="cpu")
  index = [torch.arange(n).view([-1 if i == d else 1 for i in range(4)])
           for d, n in enumerate((batch, hq, q_len, kv_len))]
  scores = None if score_t is None else (lambda s, *_: score_t(s, *index))
  out, lse = dense_attention(leaves[0], leaves[1].expand(batch, -1, -1, -1),
                             leaves[2].expand(batch, -1, -1, -1), score=scores,
                             allowed=allowed, gqa=hq != hkv)
  total = (out * torch.tensor(w)).sum() + (
      torch.where(torch.isfinite(lse), lse, 0.0) * torch.tensor(u)).sum()
  total.backward()
  for name, g, leaf in zip("qkv", got, leaves, strict=True):
    assert g.shape == tuple(leaf.shape), name
    assert np.isfinite(g).all() and np.abs(g).max() > 0, name
    np.testing.assert_allclose(g, leaf.grad.numpy(), **tolerance(np.float64), err_msg=name)


def refused_by_both():
  q, kv = randn(4, 2, 5, 8), randn(2, 2, 9, 8)
  return {
      "kv batch 1 without block_mask": (q, kv[:1], kv[:1], None),
      "kv batch 1, block_mask batch 1": (q, kv[:1], kv[:1], 1),
      "kv batch 1, block_mask batch 2": (q, kv[:1], kv[:1], 2),
  }


REFUSED = refused_by_both()


@pytest.mark.parametrize("case", list(REFUSED))
def test_refuses_what_torch_refuses(case):
  q, k, v, mask_batch = REFUSED[case]
  t_mask = j_mask = None
  if mask_batch is not None:
    t_mask = tf.create_block_mask(lambda b, h, q, kv: q >= kv, mask_batch, None, 5, 9,
                                  device="cpu")
    j_mask = create_block_mask(lambda b, h, q, kv: q >= kv, mask_batch, None, 5, 9)
  with pytest.raises(ValueError):
    tf.flex_attention(*(torch.tensor(x) for x in (q, k, v)), block_mask=t_mask)
  with pytest.raises(jmat.ShapeError, match=r"jmat\.flex_attention: a key/value batch of 1 "
                                            r"against a query batch of 4.*\(4, 2, 5, 8\)"):
    jmat.flex_attention(q, k, v, block_mask=j_mask)


def test_refuses_a_kv_batch_other_than_1_or_the_querys():
  # torch 2.13 accepts it (with a block_mask of the query's batch) and fails inside its kernel
  # ("Bq and Bkv must broadcast"); jmat says what broadcasts.
  q, kv = randn(4, 2, 5, 8), randn(2, 2, 9, 8)
  block_mask = create_block_mask(lambda b, h, q, kv: q >= kv, 4, None, 5, 9)
  with pytest.raises(jmat.ShapeError, match=r"key and value must have the query's batch size, "
                                            r"or both a batch of 1"):
    jmat.flex_attention(q, kv, kv, block_mask=block_mask)
  with pytest.raises(jmat.ShapeError, match=r"batch sizes \(dim 0\) differ"):
    jmat.flex_attention(q, kv[:1], kv, block_mask=block_mask)


@pytest.mark.parametrize("backend", ["TRITON", "MOSAIC"])
def test_pallas_kernels_in_interpret_mode_match_torch_flex(backend):
  # The Pallas kernels index key/value rows by table row: they get the pool repeated.
  hq, hkv, q_len, kv_len, block = 4, 2, 1, 29, (1, 16)  # Triton tiles: powers of 2 from 16
  q, k, v = inputs(hq, hkv, q_len, kv_len)
  t_mask = tf.create_block_mask(mask_torch, len(LENGTHS), None, q_len, kv_len, device="cpu",
                                BLOCK_SIZE=block)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    want = tf.flex_attention(*(torch.tensor(x, dtype=torch.float32) for x in (q, k, v)),
                             block_mask=t_mask, enable_gqa=True)
  block_mask = create_block_mask(mask_jnp, len(LENGTHS), None, q_len, kv_len, BLOCK_SIZE=block)
  with jax.default_matmul_precision("highest"):
    out = jmat.flex_attention(*(jnp.asarray(x, jnp.float32) for x in (q, k, v)),
                              block_mask=block_mask, enable_gqa=True,
                              kernel_options={"BACKEND": backend, "INTERPRET": True})
  np.testing.assert_allclose(out, want.numpy(), **tolerance(np.float32))


@pytest.mark.parametrize("platform, backend", [("cuda", "TRITON"), ("tpu", "MOSAIC")])
def test_auto_picks_the_platforms_pallas_kernel_for_a_shared_pool(platform, backend):
  q = jax.ShapeDtypeStruct((3, 4, 1, 64), jnp.float32)
  kv = jax.ShapeDtypeStruct((1, 2, 256, 64), jnp.float32)
  block_mask = create_block_mask(lambda b, h, q, kv: kv <= 100 * b, 3, None, 1, 256,
                                 BLOCK_SIZE=(1, 128))
  choice = jmat.attention.flex_attention_backend(q, kv, kv, block_mask=block_mask,
                                                 enable_gqa=True, platform=platform)
  assert choice.backend == backend, choice
