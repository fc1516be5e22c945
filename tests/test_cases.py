"""The shared numpy attention oracle of tests/cases.py, checked against torch 2.13 in float64."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from tests.cases import attention_reference, attention_reference_vjp, tolerance

RNG = np.random.default_rng(11)
SDPA = torch.nn.functional.scaled_dot_product_attention


def _torch(q, k, v, **options):
  tensors = [torch.tensor(x) for x in (q, k, v)]
  options = {key: torch.tensor(x) if isinstance(x, np.ndarray) else x
             for key, x in options.items()}
  return SDPA(*tensors, **options).numpy()


@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("q_len, k_len", [(5, 5), (3, 7), (7, 3)])
def test_matches_torch_sdpa_with_masks_and_scale(is_causal, q_len, k_len):
  q, k = RNG.standard_normal((2, 3, q_len, 5)), RNG.standard_normal((2, 3, k_len, 5))
  v = RNG.standard_normal((2, 3, k_len, 4))
  allowed = RNG.random((3, 1, k_len)) < 0.7
  bias = RNG.standard_normal((q_len, k_len))
  got = attention_reference(q, k, v, scale=0.4, is_causal=is_causal)
  want = _torch(q, k, v, scale=0.4, is_causal=is_causal)
  np.testing.assert_allclose(got, want, **tolerance(np.float64))
  # torch's fused CPU kernel refuses attn_mask with is_causal: give it the causal mask as a mask
  tril = torch.ones(q_len, k_len, dtype=torch.bool).tril().numpy() if is_causal else True
  for mask, theirs in ((allowed, allowed & tril), (bias, np.where(tril, bias, -np.inf))):
    options = {"allowed": mask} if mask.dtype == bool else {"bias": mask}
    got = attention_reference(q, k, v, **options, scale=0.4, is_causal=is_causal)
    want = _torch(q, k, v, attn_mask=theirs, scale=0.4)
    np.testing.assert_allclose(got, np.nan_to_num(want), **tolerance(np.float64))


def test_grouped_query_heads_match_torch():
  q, k, v = (RNG.standard_normal((2, h, 5, 3)) for h in (6, 2, 2))
  got = attention_reference(q, k, v, enable_gqa=True)
  np.testing.assert_allclose(got, _torch(q, k, v, enable_gqa=True), **tolerance(np.float64))


def test_a_query_with_no_key_gets_zero_and_lse_minus_inf():
  q, k, v = RNG.standard_normal((4, 3)), RNG.standard_normal((5, 3)), RNG.standard_normal((5, 2))
  allowed = np.ones((4, 5), bool)
  allowed[1] = False
  out, lse = attention_reference(q, k, v, allowed=allowed, return_lse=True)
  assert not out[1].any() and lse[1] == -np.inf
  scores = torch.tensor(q @ k.T / np.sqrt(3))
  np.testing.assert_allclose(np.delete(lse, 1), torch.logsumexp(scores, -1).numpy()[[0, 2, 3]],
                             **tolerance(np.float64))
  np.testing.assert_allclose(out, _torch(q, k, v, attn_mask=allowed), **tolerance(np.float64))


@pytest.mark.parametrize("is_causal", [False, True])
def test_vjp_matches_torch_autograd(is_causal):
  q, k, v = (RNG.standard_normal((2, 5, 3)) for _ in range(3))
  d_out = RNG.standard_normal((2, 5, 3))
  bias = RNG.standard_normal((5, 5))
  tensors = [torch.tensor(x, requires_grad=True) for x in (q, k, v, bias)]
  mask = tensors[3] + (torch.ones(5, 5).tril().log() if is_causal else 0)
  (SDPA(*tensors[:3], attn_mask=mask, scale=0.7) * torch.tensor(d_out)).sum().backward()
  d_q, d_k, d_v, d_s = attention_reference_vjp(
      q, k, v, d_out, bias=bias, scale=0.7, is_causal=is_causal)
  for ours, tensor in zip((d_q, d_k, d_v, d_s.sum(0)), tensors, strict=True):
    np.testing.assert_allclose(ours, tensor.grad.numpy(), **tolerance(np.float64))


def test_score_fn_sees_torch_score_mod_indices():
  """A numpy score function gets the (b, h, q_idx, kv_idx) grids of torch's flex score_mod."""
  from torch.nn.attention import flex_attention as tf

  q, k, v = (RNG.standard_normal((2, 3, n, 4)) for n in (5, 7, 7))
  table = RNG.standard_normal((2, 3, 5, 7))

  def score_np(s, b, h, q_idx, kv_idx):
    return np.tanh(s / 2) * 2 + table[b, h, q_idx, kv_idx] + 0.1 * (kv_idx - q_idx) * h

  def score_torch(s, b, h, q_idx, kv_idx):
    # the index tensors are integers: float64 before scaling them, as numpy does
    return torch.tanh(s / 2) * 2 + torch.tensor(table)[b, h, q_idx, kv_idx] + (
        0.1 * ((kv_idx - q_idx) * h).double())

  out, lse = attention_reference(q, k, v, score_fn=score_np, scale=0.6, return_lse=True)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # torch's eager flex_attention warns that it is slow
    want_out, want_lse = tf.flex_attention(*(torch.tensor(x) for x in (q, k, v)),
                                           score_mod=score_torch, scale=0.6, return_lse=True)
  np.testing.assert_allclose(out, want_out.numpy(), **tolerance(np.float64))
  np.testing.assert_allclose(lse, want_lse.numpy(), **tolerance(np.float64))
