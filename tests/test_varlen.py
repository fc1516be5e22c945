"""jmat.attention.varlen_attn against per-sequence oracles: numpy float64 for values, torch float64
autograd (SDPA per sequence, with FlashAttention's bottom-right window) for gradients."""

from __future__ import annotations

from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jmat
from jmat.attention import AuxRequest, varlen_attn

INTERPRET = {
    "TRITON": {"BACKEND": "TRITON", "INTERPRET": True},
    "MOSAIC": {"BACKEND": "MOSAIC", "INTERPRET": True},
}


def allowed(len_q: int, len_k: int, window: tuple[int, int]) -> np.ndarray:
  """FlashAttention's mask of one sequence: queries aligned with the end of the keys."""
  a = np.arange(len_q)[:, None] + len_k - len_q
  b = np.arange(len_k)[None, :]
  left, right = window
  ok = np.ones((len_q, len_k), bool)
  if right >= 0:
    ok &= b <= a + right
  if left >= 0:
    ok &= b >= a - left
  return ok


def oracle(q, k, v, cu_q, cu_k, window=(-1, -1), used=None, scale=None):
  """numpy float64, one sequence at a time: ``(out (Tq, Hq, Dv), lse (Hq, Tq))``."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  heads, kv_heads = q.shape[1], k.shape[1]
  scale = 1 / np.sqrt(q.shape[-1]) if scale is None else scale
  out = np.zeros(q.shape[:2] + v.shape[-1:])
  lse = np.full((heads, q.shape[0]), -np.inf)
  for i in range(len(cu_q) - 1):
    qs = slice(cu_q[i], cu_q[i + 1])
    n_k = cu_k[i + 1] - cu_k[i] if used is None else used[i]
    ks = slice(cu_k[i], cu_k[i] + n_k)
    kk = np.repeat(k[ks], heads // kv_heads, axis=1)
    vv = np.repeat(v[ks], heads // kv_heads, axis=1)
    s = np.einsum("qhd,khd->hqk", q[qs], kk) * scale
    ok = allowed(q[qs].shape[0], n_k, window)
    s = np.where(ok, s, -np.inf)
    top = np.max(s, axis=-1, keepdims=True, initial=-np.inf)
    top = np.where(np.isfinite(top), top, 0)
    p = np.exp(s - top)
    total = p.sum(-1, keepdims=True)
    out[qs] = np.einsum("hqk,khd->qhd", p / np.where(total > 0, total, 1), vv)
    lse[:, qs] = np.where(total > 0, np.log(np.where(total > 0, total, 1)) + top, -np.inf)[..., 0]
  return out, lse


def packed(rng, lens_q, lens_k, heads=4, kv_heads=4, dim=8, dtype: Any = np.float64):
  cu_q = np.concatenate([[0], np.cumsum(lens_q)]).astype(np.int32)
  cu_k = np.concatenate([[0], np.cumsum(lens_k)]).astype(np.int32)
  q = rng.standard_normal((cu_q[-1], heads, dim)).astype(dtype)
  k = rng.standard_normal((cu_k[-1], kv_heads, dim)).astype(dtype)
  v = rng.standard_normal((cu_k[-1], kv_heads, dim + 3)).astype(dtype)
  return q, k, v, cu_q, cu_k


CASES = [  # (query lengths, key lengths, window)
    ([5, 0, 1, 13], [5, 0, 3, 13], (-1, -1)),
    ([5, 0, 1, 13], [5, 0, 3, 13], (-1, 0)),
    ([7, 3], [11, 3], (-1, 0)),          # fewer queries than keys: bottom-right
    ([7, 3], [11, 3], (2, 0)),           # sliding window
    ([7, 3, 1], [11, 3, 5], (3, 2)),     # local window both sides
    ([1, 1, 1], [300, 7, 129], (-1, 0)),  # decode: one query per sequence
    ([3, 2], [2, 5], (-1, 0)),           # more queries than keys: early ones see nothing
    ([1], [1], (0, 0)),
    # longer than a decode run: the block-sparse kernel's tables (full blocks inside a sequence)
    ([20, 3, 0], [25, 30, 4], (-1, 0)),
    ([150, 20], [300, 20], (-1, 0)),
    ([150, 20], [300, 140], (-1, -1)),
    ([150, 33], [140, 300], (40, 7)),
]


@pytest.mark.parametrize("lens_q, lens_k, window", CASES)
def test_values_and_lse_match_the_float64_oracle(lens_q, lens_k, window):
  rng = np.random.default_rng(0)
  q, k, v, cu_q, cu_k = packed(rng, lens_q, lens_k)
  out, lse = varlen_attn(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), window_size=window,
                         return_aux=AuxRequest(lse=True))
  want, want_lse = oracle(q, k, v, cu_q, cu_k, window)
  chex.assert_shape(out, q.shape[:2] + v.shape[-1:])
  chex.assert_shape(lse, (q.shape[1], q.shape[0]))
  np.testing.assert_allclose(out, want, rtol=1e-10, atol=1e-10)
  np.testing.assert_allclose(lse, want_lse, rtol=1e-10, atol=1e-10)


def test_gqa_traced_offsets_and_float32():
  rng = np.random.default_rng(1)
  q, k, v, cu_q, cu_k = packed(rng, [4, 9, 2], [6, 9, 30], heads=6, kv_heads=2,
                               dtype=np.float32)
  f = jax.jit(lambda q, k, v, a, b: varlen_attn(q, k, v, a, b, 9, 30, window_size=(-1, 0),
                                                enable_gqa=True))
  want, _ = oracle(q, k, v, cu_q, cu_k, (-1, 0))
  with jax.default_matmul_precision("highest"):
    np.testing.assert_allclose(f(q, k, v, cu_q, cu_k), want, rtol=2e-5, atol=2e-5)


def test_seqused_k_and_paged_cache():
  rng = np.random.default_rng(2)
  page, heads, kv_heads, dim = 4, 4, 2, 8
  used = np.array([9, 1, 0, 16], np.int32)
  table = np.array([[5, 2, 7, 0], [3, 3, 3, 3], [1, 1, 1, 1], [4, 6, 8, 9]], np.int32)
  k_pool = rng.standard_normal((10, page, kv_heads, dim))
  v_pool = rng.standard_normal((10, page, kv_heads, dim))
  lens_q = [2, 1, 1, 3]
  cu_q = np.concatenate([[0], np.cumsum(lens_q)]).astype(np.int32)
  q = rng.standard_normal((cu_q[-1], heads, dim))
  out, lse = varlen_attn(q, k_pool, v_pool, cu_q, None, 3, 16, window_size=(-1, 0),
                         enable_gqa=True, seqused_k=used, block_table=table,
                         return_aux=AuxRequest(lse=True))
  # The oracle reads the pages in order, contiguously.
  k = k_pool[table].reshape(-1, kv_heads, dim)
  v = v_pool[table].reshape(-1, kv_heads, dim)
  cu_k = np.arange(5) * 4 * page
  want, want_lse = oracle(q, k, v, cu_q, cu_k, (-1, 0), used=used)
  np.testing.assert_allclose(out, want, rtol=1e-10, atol=1e-10)
  np.testing.assert_allclose(lse, want_lse, rtol=1e-10, atol=1e-10)
  # seqused_k without a table: the first used keys of each packed run.
  lens_k = [12, 3, 4, 16]
  q, k, v, cu_q, cu_k = packed(rng, lens_q, lens_k, heads, kv_heads)
  out = varlen_attn(q, k, v, cu_q, cu_k, 3, 16, enable_gqa=True, seqused_k=used)
  np.testing.assert_allclose(out, oracle(q, k, v, cu_q, cu_k, used=used)[0], rtol=1e-10,
                             atol=1e-10)


@pytest.mark.parametrize("splits", [1, 2, 5])
def test_split_kv_decode_merges_to_the_oracle(splits):
  rng = np.random.default_rng(3)
  q, k, v, cu_q, cu_k = packed(rng, [1, 2, 1], [700, 33, 1100], heads=8, kv_heads=2)
  out, lse = varlen_attn(q, k, v, cu_q, cu_k, 2, 1100, window_size=(-1, 0), enable_gqa=True,
                         num_splits=splits, return_aux=AuxRequest(lse=True))
  want, want_lse = oracle(q, k, v, cu_q, cu_k, (-1, 0))
  np.testing.assert_allclose(out, want, rtol=1e-10, atol=1e-10)
  np.testing.assert_allclose(lse, want_lse, rtol=1e-10, atol=1e-10)


def test_num_splits_1_is_batch_invariant():
  rng = np.random.default_rng(4)
  q, k, v, cu_q, cu_k = packed(rng, [1, 1, 1], [900, 40, 1500], dtype=np.float32)
  alone = varlen_attn(q[:1], k[:900], v[:900], cu_q[:2], cu_k[:2], 1, 900, num_splits=1)
  batch = varlen_attn(q, k, v, cu_q, cu_k, 1, 1500, num_splits=1)
  np.testing.assert_array_equal(np.asarray(batch[:1]), np.asarray(alone))


def torch_loss(q, k, v, cu_q, cu_k, window, scale, weights, lse_weights):
  """sum(out * weights) + sum(lse * lse_weights), torch float64 SDPA per sequence."""
  heads, kv_heads = q.shape[1], k.shape[1]
  total = torch.zeros((), dtype=torch.float64)
  for i in range(len(cu_q) - 1):
    qs, ks = slice(cu_q[i], cu_q[i + 1]), slice(cu_k[i], cu_k[i + 1])
    qq = q[qs].transpose(0, 1)
    kk = k[ks].transpose(0, 1).repeat_interleave(heads // kv_heads, 0)
    vv = v[ks].transpose(0, 1).repeat_interleave(heads // kv_heads, 0)
    mask = torch.from_numpy(allowed(qq.shape[1], kk.shape[1], window))
    # a tensor scale (for its gradient) goes into the queries
    out = torch.nn.functional.scaled_dot_product_attention(qq * scale, kk, vv, attn_mask=mask,
                                                           scale=1.0)
    s = (qq @ kk.transpose(1, 2)) * scale
    lse = torch.logsumexp(s.masked_fill(~mask, -torch.inf), -1)
    total = total + (out.transpose(0, 1) * weights[qs]).sum() + (lse * lse_weights[:, qs]).sum()
  return total


@pytest.mark.parametrize("backend, lens_q, lens_k", [
    ("XLA", [3, 1, 6], [5, 4, 6]),        # the decode loop
    ("XLA", [19, 1, 6], [25, 4, 6]),      # the block-sparse kernel's XLA loops
    ("TRITON", [3, 1, 6], [5, 4, 6]),
    ("MOSAIC", [3, 1, 6], [5, 4, 6]),
])
def test_gradients_match_torch_float64_autograd(backend, lens_q, lens_k):
  rng = np.random.default_rng(5)
  # every query sees a key (torch's SDPA gives NaN for a fully masked row)
  q, k, v, cu_q, cu_k = packed(rng, lens_q, lens_k, heads=4, kv_heads=2)
  window, scale = (3, 0), 0.7
  dtype = np.float64 if backend == "XLA" else np.float32
  q, k, v = (x.astype(dtype) for x in (q, k, v))
  weights = rng.standard_normal(q.shape[:2] + v.shape[-1:])
  lse_weights = rng.standard_normal((q.shape[1], q.shape[0]))
  options = INTERPRET.get(backend, {"BACKEND": "XLA"})

  def loss(q, k, v, scale):
    out, lse = varlen_attn(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), window_size=window,
                           enable_gqa=True,
                           scale=scale, return_aux=AuxRequest(lse=True),
                           kernel_options=options)
    return jnp.sum(out * weights) + jnp.sum(lse * lse_weights)

  with jax.default_matmul_precision("highest"):
    got = jax.grad(loss, argnums=(0, 1, 2, 3))(q, k, v, jnp.asarray(scale, dtype))
  tq, tk, tv = (torch.tensor(np.asarray(x, np.float64), requires_grad=True) for x in (q, k, v))
  ts = torch.tensor(scale, dtype=torch.float64, requires_grad=True)
  torch_loss(tq, tk, tv, cu_q, cu_k, window, ts, torch.from_numpy(weights),
             torch.from_numpy(lse_weights)).backward()
  tol = 1e-9 if backend == "XLA" else 2e-4
  for g, t in zip(got, (tq, tk, tv, ts), strict=True):
    assert t.grad is not None
    np.testing.assert_allclose(g, t.grad.numpy(), rtol=tol, atol=tol)


@pytest.mark.parametrize("backend", ["TRITON", "MOSAIC"])
def test_pallas_backends_in_interpret_mode(backend):
  rng = np.random.default_rng(6)
  q, k, v, cu_q, cu_k = packed(rng, [5, 0, 1, 13], [9, 2, 140, 13], dtype=np.float32)
  out, lse = varlen_attn(q, k, v, cu_q, cu_k, 13, 140, window_size=(-1, 0),
                         return_aux=AuxRequest(lse=True), kernel_options=INTERPRET[backend])
  want, want_lse = oracle(q, k, v, cu_q, cu_k, (-1, 0))
  np.testing.assert_allclose(out, want, rtol=2e-5, atol=2e-5)
  np.testing.assert_allclose(lse, want_lse, rtol=2e-5, atol=2e-5)


def test_the_examples_of_docs_inference_run():
  """Every python block of docs/inference.md, in order, in one namespace."""
  import pathlib
  import re

  text = (pathlib.Path(__file__).resolve().parents[1] / "docs" / "inference.md").read_text()
  blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
  assert len(blocks) >= 4
  space: dict = {}
  for block in blocks:
    exec(block, space)  # noqa: S102  (the documentation's own code)
  assert space["out"].shape == (23, 32, 128)
  pool_k, pool_v = space["pool_k"], space["pool_v"]
  q, table, used = jnp.ones((2, 32, 128)), space["table"], space["used"]
  out, new_k, _, new_used = space["decode_step"](q, jnp.ones((2, 8, 128)), jnp.ones((2, 8, 128)),
                                                 pool_k, pool_v, table, used)
  assert out.shape == (2, 32, 128) and new_used.tolist() == [21, 62]
  assert float(new_k[table[1, 61 // 16], 61 % 16].sum()) == 8 * 128


@pytest.mark.parametrize("platform, kernel_call", [("cuda", "__gpu$xla.gpu.triton"),
                                                   ("tpu", "tpu_custom_call")])
@pytest.mark.parametrize("max_q", [1, 64])  # decode (split-KV tables) and prefill
def test_auto_lowers_to_the_platforms_kernel(platform, kernel_call, max_q):
  q = jax.ShapeDtypeStruct((3 * max_q, 8, 64), jnp.float32)
  kv = jax.ShapeDtypeStruct((600, 2, 64), jnp.float32)
  cu = jax.ShapeDtypeStruct((4,), jnp.int32)

  def attend(q, k, v, cu_q, cu_k):
    return varlen_attn(q, k, v, cu_q, cu_k, max_q, 400, window_size=(-1, 0), enable_gqa=True)

  def lowered(fn, on):
    with jmat.attention.kernel_platforms(on):  # AUTO traces the kernels of these platforms
      return jax.jit(fn).trace(q, kv, kv, cu, cu).lower(lowering_platforms=(on,)).as_text()

  assert kernel_call in lowered(attend, platform)
  assert kernel_call not in lowered(attend, "cpu")
  gradient = jax.grad(lambda *a: attend(*a).sum(), argnums=(0, 1, 2))
  assert kernel_call in lowered(gradient, platform)


def test_exported():
  assert jmat.attention.varlen_attn is varlen_attn
  assert jmat.varlen_attn is varlen_attn


def with_sinks(out, lse, sinks):
  """The attention-sinks recipe of docs/inference.md: a per-head logit joins every softmax."""
  return out * jax.nn.sigmoid(lse - sinks[:, None]).T[..., None]


@pytest.mark.parametrize("lens_q, lens_k", [([3, 1, 6], [5, 4, 6]), ([1, 1], [40, 9])])
def test_attention_sinks_recipe_and_its_gradients_match_torch(lens_q, lens_k):
  """torch float64 autograd of softmax over [scores, sink] (gpt-oss's sinks), sliced off."""
  rng = np.random.default_rng(7)
  q, k, v, cu_q, cu_k = packed(rng, lens_q, lens_k, heads=4, kv_heads=2)
  sinks = rng.standard_normal(4)
  weights = rng.standard_normal(q.shape[:2] + v.shape[-1:])
  window = (-1, 0)

  def loss(q, k, v, sinks):
    out, lse = varlen_attn(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), window_size=window,
                           enable_gqa=True, return_aux=AuxRequest(lse=True))
    return jnp.sum(with_sinks(out, lse, sinks) * weights)

  got = jax.grad(loss, argnums=(0, 1, 2, 3))(q, k, v, sinks)
  tq, tk, tv, ts = (torch.tensor(x, requires_grad=True) for x in (q, k, v, sinks))
  total = torch.zeros((), dtype=torch.float64)
  for i in range(len(cu_q) - 1):
    qs, ks = slice(cu_q[i], cu_q[i + 1]), slice(cu_k[i], cu_k[i + 1])
    qq = tq[qs].transpose(0, 1)
    kk = tk[ks].transpose(0, 1).repeat_interleave(2, 0)
    vv = tv[ks].transpose(0, 1).repeat_interleave(2, 0)
    s = (qq @ kk.transpose(1, 2)) / np.sqrt(q.shape[-1])
    s = s.masked_fill(~torch.from_numpy(allowed(qq.shape[1], kk.shape[1], window)), -torch.inf)
    sink = ts[:, None, None].expand(-1, s.shape[1], 1)
    p = torch.softmax(torch.cat([s, sink], dim=-1), dim=-1)[..., :-1]
    total = total + ((p @ vv).transpose(0, 1) * torch.from_numpy(weights[qs])).sum()
  total.backward()
  for g, t in zip(got, (tq, tk, tv, ts), strict=True):
    assert t.grad is not None
    np.testing.assert_allclose(g, t.grad.numpy(), rtol=1e-9, atol=1e-9)


def _bad_inputs():
  q, k, v = np.ones((7, 4, 8)), np.ones((9, 4, 8)), np.ones((9, 4, 8))
  cu_q, cu_k = np.array([0, 3, 7]), np.array([0, 4, 9])
  base = dict(query=q, key=k, value=v, cu_seq_q=cu_q, cu_seq_k=cu_k, max_q=4, max_k=5)
  pool = np.ones((3, 4, 4, 8))
  paged = dict(base, key=pool, value=pool, cu_seq_k=None, seqused_k=np.array([5, 2]),
               block_table=np.array([[0, 1], [2, 2]]))
  return [  # (arguments, error, what the message must say)
      (dict(base, key=np.ones((9, 2, 8)), value=np.ones((9, 2, 8))), ValueError,
       "enable_gqa=True"),
      (dict(base, key=np.ones((9, 3, 8)), value=np.ones((9, 3, 8)), enable_gqa=True),
       ValueError, "do not divide"),
      (dict(base, cu_seq_q=np.array([0, 5, 3])), ValueError, "decreases"),
      (dict(base, cu_seq_k=np.array([1, 4, 9])), ValueError, "start at 0"),
      (dict(base, cu_seq_k=np.array([0, 4, 12])), ValueError, "past the 9"),
      (dict(base, cu_seq_q=np.array([0.0, 3, 7])), TypeError, "integers"),
      (dict(base, cu_seq_k=np.array([0, 9])), ValueError, "shape"),
      (dict(paged, seqused_k=None), ValueError, "block_table without seqused_k"),
      (dict(paged, block_table=np.array([[0, 1], [2, 3]])), ValueError, "past the pool of 3"),
      (dict(base, window_size=(-2, 0)), ValueError, "below -1"),
      (dict(base, window_size=(3,)), ValueError, "pair"),
      (dict(base, query=np.ones((7, 8))), ValueError, "3-D"),
      (dict(base, key=np.ones((9, 4, 5)), value=np.ones((9, 4, 5))), ValueError, "head dims"),
      (dict(base, query=q.astype(np.int32), key=k.astype(np.int32), value=v.astype(np.int32)),
       TypeError, "floating"),
      (dict(base, query=np.ones((7, 4, 8), np.float32)), TypeError, "dtype"),
      (dict(base, max_q=4.0), TypeError, "max_q"),
      (dict(base, num_splits=0), ValueError, "num_splits"),
      (dict(base, return_aux=AuxRequest(lse=True, max_scores=True)), ValueError, "max_scores"),
      (dict(base, max_q=2), ValueError, "max_q"),
  ]


@pytest.mark.parametrize("arguments, error, words", _bad_inputs())
def test_bad_input_names_the_function_and_the_fix(arguments, error, words):
  arguments = dict(arguments)
  positional = [arguments.pop(n) for n in ("query", "key", "value", "cu_seq_q", "cu_seq_k",
                                          "max_q", "max_k")]
  with pytest.raises(error, match="jmat.attention.varlen_attn") as raised:
    varlen_attn(*positional, **arguments)
  assert words in str(raised.value)


def test_torch_refuses_what_jmat_refuses():
  """torch's own checks (before its CUDA kernel): head counts without enable_gqa."""
  from torch.nn.attention.varlen import varlen_attn as torch_varlen

  q, k = torch.ones(7, 4, 8), torch.ones(9, 2, 8)
  cu_q, cu_k = torch.tensor([0, 3, 7]), torch.tensor([0, 4, 9])
  with pytest.raises(ValueError, match="enable_gqa"):
    torch_varlen(q, k, k, cu_q, cu_k, 4, 5)
  with pytest.raises(ValueError, match="enable_gqa"):
    varlen_attn(q.numpy(), k.numpy(), k.numpy(), cu_q.numpy(), cu_k.numpy(), 4, 5)


@pytest.mark.parametrize("lens_q, lens_k", [([1, 1, 2], [300, 5, 40]), ([40, 3], [50, 3])])
def test_bfloat16_computes_in_float32(lens_q, lens_k):
  rng = np.random.default_rng(8)
  q, k, v, cu_q, cu_k = packed(rng, lens_q, lens_k, heads=4, kv_heads=2)
  q, k, v = (jnp.asarray(x, jnp.bfloat16) for x in (q, k, v))
  out, lse = varlen_attn(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), window_size=(-1, 0),
                         enable_gqa=True, return_aux=AuxRequest(lse=True))
  assert out.dtype == jnp.bfloat16 and lse.dtype == jnp.float32
  # the oracle of the bfloat16 values, in float64: only the output's rounding differs
  want, want_lse = oracle(*(np.asarray(x, np.float64) for x in (q, k, v)), cu_q, cu_k, (-1, 0))
  np.testing.assert_allclose(np.asarray(out, np.float64), want, rtol=1e-2, atol=1e-2)
  np.testing.assert_allclose(lse, want_lse, rtol=1e-5, atol=1e-5)
