"""jmat attention against torch 2.13 (CPU): SDPA semantics, refusals and gradients; MHA weights.

torch decides shapes, masks, causal alignment, GQA, fully-masked rows, dtypes and which
inputs are refused; values are compared at tests/cases.py's per-dtype tolerances.
"""

import importlib.util
import pathlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import jmat
from tests.cases import tolerance

RNG = np.random.default_rng(5)

DTYPES = {
    np.float64: (torch.float64, jnp.float64),
    np.float32: (torch.float32, jnp.float32),
    "bfloat16": (torch.bfloat16, jnp.bfloat16),
    np.float16: (torch.float16, jnp.float16),
}


def randn(*shape):
  return RNG.standard_normal(shape)


def to_torch(x, dtype=torch.float64, grad=False):
  t = torch.tensor(np.asarray(x)).to(dtype) if not isinstance(x, torch.Tensor) else x
  return t.requires_grad_(grad)


def as_numpy(t):
  return t.detach().to(torch.float64).numpy() if t.is_floating_point() else t.numpy()


# (query, key, value, mask, is_causal, enable_gqa); mask: None, a bool array or a float array.
def sdpa_cases():
  b = lambda *s: RNG.random(s) > 0.4  # noqa: E731
  no_row = np.ones((13, 21), bool)
  no_row[[0, 5]] = False
  inf_row = randn(13, 21)
  inf_row[4] = -np.inf
  return {
      "2d": ((13, 5), (21, 5), (21, 7), None, False, False),
      "3d-causal-L<S": ((3, 13, 5), (3, 21, 5), (3, 21, 7), None, True, False),
      "4d-causal-L>S": ((2, 3, 21, 5), (2, 3, 13, 5), (2, 3, 13, 7), None, True, False),
      "bool-2d": ((2, 3, 13, 5), (2, 3, 21, 5), (2, 3, 21, 7), b(13, 21), False, False),
      "bool-per-key": ((2, 3, 13, 5), (2, 3, 21, 5), (2, 3, 21, 7), b(2, 1, 1, 21), False, False),
      "bool-empty-rows": ((2, 3, 13, 5), (2, 3, 21, 5), (2, 3, 21, 7), no_row, False, False),
      "float-2d": ((2, 3, 13, 5), (2, 3, 21, 5), (2, 3, 21, 7), randn(13, 21), False, False),
      "float-per-head": ((2, 3, 13, 5), (2, 3, 21, 5), (2, 3, 21, 7), randn(3, 1, 21), False,
                         False),
      "float-inf-row": ((2, 3, 13, 5), (2, 3, 21, 5), (2, 3, 21, 7), inf_row, False, False),
      "batch-broadcast": ((2, 3, 13, 5), (1, 3, 21, 5), (2, 1, 21, 7), None, True, False),
      "gqa": ((2, 6, 13, 5), (2, 2, 21, 5), (2, 2, 21, 7), b(6, 13, 21), False, True),
      "gqa-causal": ((2, 6, 13, 5), (1, 2, 21, 5), (1, 2, 21, 7), None, True, True),
      "gqa-3d": ((4, 13, 5), (2, 21, 5), (2, 21, 7), None, False, True),
      "gqa-kv-heads-differ": ((2, 4, 13, 5), (2, 2, 21, 5), (2, 1, 21, 7), None, False, True),
      "size-1": ((1, 1, 1, 1), (1, 1, 1, 1), (1, 1, 1, 3), None, True, False),
      "empty-keys": ((2, 13, 5), (2, 0, 5), (2, 0, 7), None, False, False),
  }


CASES = sdpa_cases()


def torch_sdpa(q, k, v, mask, causal, gqa, torch_dtype=torch.float64, grad=False):
  tq, tk, tv = (to_torch(x, torch_dtype, grad) for x in (q, k, v))
  tm = None
  if mask is not None:
    tm = to_torch(mask, torch.bool if mask.dtype == bool else torch_dtype,
                  grad and mask.dtype != bool)
  out = F.scaled_dot_product_attention(tq, tk, tv, attn_mask=tm, is_causal=causal,
                                       enable_gqa=gqa)
  return out, (tq, tk, tv, tm)


@pytest.mark.parametrize("implementation", ["dense", "blockwise"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_sdpa_matches_torch_float64(case, implementation):
  q_shape, k_shape, v_shape, mask, causal, gqa = CASES[case]
  q, k, v = randn(*q_shape), randn(*k_shape), randn(*v_shape)
  want, _ = torch_sdpa(q, k, v, mask, causal, gqa)
  with jax.default_matmul_precision("highest"):
    got = jmat.scaled_dot_product_attention(
        q, k, v, None if mask is None else jnp.asarray(mask), is_causal=causal,
        enable_gqa=gqa, implementation=implementation, block_size=(16, 8))
  chex.assert_shape(got, tuple(want.shape))
  assert not np.isnan(got).any()
  np.testing.assert_allclose(got, as_numpy(want), **tolerance(np.float64))


@pytest.mark.parametrize("implementation", ["dense", "blockwise"])
@pytest.mark.parametrize("dtype", [np.float32, "bfloat16", np.float16])
def test_sdpa_matches_torch_in_low_precision(dtype, implementation):
  torch_dtype, jax_dtype = DTYPES[dtype]
  q, k, v = randn(2, 3, 13, 8), randn(2, 3, 21, 8), randn(2, 3, 21, 8)
  mask = randn(13, 21)
  tq, tk, tv, tm = (to_torch(x, torch_dtype) for x in (q, k, v, mask))
  want = F.scaled_dot_product_attention(tq, tk, tv, attn_mask=tm)
  args = [jnp.asarray(as_numpy(t)).astype(jax_dtype) for t in (tq, tk, tv, tm)]
  with jax.default_matmul_precision("highest"):
    got = jmat.scaled_dot_product_attention(*args, implementation=implementation)
  assert got.dtype == jax_dtype
  np.testing.assert_allclose(np.asarray(got, np.float64), as_numpy(want), **tolerance(jax_dtype))


def test_float32_mask_with_half_query_is_accepted_as_torch():
  q = randn(2, 5, 4)
  mask = randn(5, 5).astype(np.float32)
  want = F.scaled_dot_product_attention(*(to_torch(q, torch.float16) for _ in range(3)),
                                        attn_mask=torch.tensor(mask))
  got = jmat.scaled_dot_product_attention(*(jnp.asarray(q, jnp.float16) for _ in range(3)),
                                          jnp.asarray(mask))
  np.testing.assert_allclose(np.asarray(got, np.float64), as_numpy(want), **tolerance(np.float16))


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.float64])
def test_attn_mask_and_is_causal_both_apply_as_torch_flash(mask_dtype):
  # torch 2.13 accepts the pair in its CPU flash kernel (4-D, Ev == E) and applies both.
  q, k, v = randn(2, 3, 13, 8), randn(2, 3, 21, 8), randn(2, 3, 21, 8)
  mask = RNG.random((13, 21)) > 0.3 if mask_dtype == torch.bool else randn(13, 21)
  tq, tk, tv = (to_torch(x) for x in (q, k, v))
  want = F.scaled_dot_product_attention(tq, tk, tv, attn_mask=torch.tensor(mask),
                                        is_causal=True)
  for implementation in ("dense", "blockwise"):
    with jax.default_matmul_precision("highest"):
      got = jmat.scaled_dot_product_attention(q, k, v, jnp.asarray(mask), is_causal=True,
                                              implementation=implementation)
    np.testing.assert_allclose(got, as_numpy(want), **tolerance(np.float64))


@pytest.mark.parametrize(
    "case, implementation",
    [("4d-causal-L>S", "blockwise"), ("bool-empty-rows", "dense"),
     ("bool-empty-rows", "blockwise"), ("float-inf-row", "dense"),
     ("float-per-head", "blockwise"), ("gqa-causal", "blockwise"), ("gqa", "dense"),
     ("batch-broadcast", "dense")],
)
def test_sdpa_gradients_match_torch(case, implementation):
  q_shape, k_shape, v_shape, mask, causal, gqa = CASES[case]
  q, k, v = randn(*q_shape), randn(*k_shape), randn(*v_shape)
  want, tensors = torch_sdpa(q, k, v, mask, causal, gqa, grad=True)
  d_out = randn(*want.shape)
  want.backward(torch.tensor(d_out))
  float_mask = mask is not None and mask.dtype != bool

  def loss(q, k, v, mask):
    out = jmat.scaled_dot_product_attention(q, k, v, mask, is_causal=causal, enable_gqa=gqa,
                                            implementation=implementation, block_size=(16, 8))
    return jnp.sum(out * d_out)

  argnums = (0, 1, 2, 3) if float_mask else (0, 1, 2)
  with jax.default_matmul_precision("highest"):
    got = jax.grad(loss, argnums=argnums)(q, k, v, None if mask is None else jnp.asarray(mask))
  for g, t in zip(got, tensors, strict=False):
    assert not np.isnan(g).any()
    np.testing.assert_allclose(g, as_numpy(t.grad), **tolerance(np.float64))


# --- refusals: torch refuses, jmat refuses with a message naming the op and the shapes ---------

REFUSALS = {
    "query-1d": (((4,), (7, 4), (7, 4)), {}, jmat.ShapeError,
                 r"scaled_dot_product_attention: query, key and value must be at least 2-D: "
                 r"query has shape \(4,\)"),
    "E-differs": (((5, 4), (7, 3), (7, 4)), {}, jmat.ShapeError,
                  r"query and key embedding sizes 4 and 3 differ: query has shape \(5, 4\), "
                  r"key has shape \(7, 3\)"),
    "S-differs": (((5, 4), (7, 4), (6, 4)), {}, jmat.ShapeError,
                  r"key and value lengths 7 and 6 differ.*value has shape \(6, 4\)"),
    "heads-without-gqa": (((2, 4, 5, 8), (2, 2, 7, 8), (2, 2, 7, 8)), {}, jmat.ShapeError,
                          r"leading \(batch, heads\) dims do not broadcast.*pass "
                          r"enable_gqa=True"),
    "gqa-not-dividing": (((2, 4, 5, 8), (2, 3, 7, 8), (2, 3, 7, 8)), dict(enable_gqa=True),
                         jmat.ShapeError, r"the 3 heads of key do not divide the 4 heads of "
                         r"query"),
    "gqa-2d": (((5, 8), (7, 8), (7, 8)), dict(enable_gqa=True), jmat.ShapeError,
               r"enable_gqa=True needs a heads dim"),
    "batch-clash": (((3, 5, 8), (2, 7, 8), (2, 7, 8)), {}, jmat.ShapeError,
                    r"do not broadcast: query has shape \(3, 5, 8\), key has shape \(2, 7, 8\)"),
    "mask-1d": (((2, 3, 5, 4), (2, 3, 7, 4), (2, 3, 7, 4)),
                dict(attn_mask=np.zeros(7, np.float32)),
                jmat.ShapeError, r"attn_mask must be at least 2-D, got 1-D.*\(7,\)"),
    "mask-shape": (((2, 3, 5, 4), (2, 3, 7, 4), (2, 3, 7, 4)),
                   dict(attn_mask=np.zeros((5, 6), np.float32)), jmat.ShapeError,
                   r"attn_mask does not broadcast.*\(5, 6\).*\(2, 3, 5, 7\)"),
    "mask-grows-batch": (((2, 3, 5, 4), (2, 3, 7, 4), (2, 3, 7, 4)),
                         dict(attn_mask=np.zeros((2, 1, 1, 5, 7), bool)), jmat.ShapeError,
                         r"attn_mask has more dims than the scores"),
    "mask-int": (((5, 4), (7, 4), (7, 4)), dict(attn_mask=np.zeros((5, 7), np.int32)),
                 TypeError, r"attn_mask has dtype int32; it must be bool"),
    "mask-float64-for-float32": (((5, 4), (7, 4), (7, 4)),
                                 dict(attn_mask=np.zeros((5, 7), np.float64)), TypeError,
                                 r"attn_mask has dtype float64; .*float32 or the query's dtype"),
    "int-inputs": (((5, 4), (7, 4), (7, 4)), dict(dtype=np.int32), TypeError,
                   r"attention needs floating-point inputs"),
    "mixed-dtypes": (((5, 4), (7, 4), (7, 4)), dict(key_dtype=np.float64), TypeError,
                     r"dtypes differ: query is float32, key is float64"),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_refusals_match_torch(case):
  shapes, options, error, message = REFUSALS[case]
  options = dict(options)
  dtype = options.pop("dtype", np.float32)
  key_dtype = options.pop("key_dtype", dtype)
  q, k, v = (np.ones(s, t) for s, t in zip(shapes, (dtype, key_dtype, dtype), strict=True))
  mask = options.pop("attn_mask", None)
  with pytest.raises((RuntimeError, IndexError)):
    F.scaled_dot_product_attention(*(torch.tensor(x) for x in (q, k, v)),
                                   attn_mask=None if mask is None else torch.tensor(mask),
                                   **options)
  with pytest.raises(error, match=message):
    jmat.scaled_dot_product_attention(q, k, v, None if mask is None else jnp.asarray(mask),
                                      **options)


# --- multi-head attention with torch.nn.MultiheadAttention's weights --------------------------


def torch_mha(embed_dim, num_heads, dtype=torch.float64):
  torch.manual_seed(0)
  module = torch.nn.MultiheadAttention(embed_dim, num_heads, batch_first=True, dtype=dtype)
  with torch.no_grad():  # non-zero biases, so that a mix-up of q/k/v slices shows
    module.in_proj_bias.normal_()
    module.out_proj.bias.normal_()
  params = {name: jnp.asarray(p.detach().numpy()) for name, p in module.state_dict().items()}
  return module.eval(), params


def mha_cases():
  kpm = RNG.random((2, 9)) > 0.3
  kpm[1, :] = True  # ... and one sequence with every key padded is avoided below
  kpm[1, 0] = False
  causal = ~np.tril(np.ones((7, 9), bool))
  return {
      "self": dict(),
      "key-padding-bool": dict(key_padding_mask=kpm),
      "key-padding-float": dict(key_padding_mask=randn(2, 9)),
      "attn-mask-bool": dict(attn_mask=RNG.random((7, 9)) > 0.7),
      "attn-mask-float-3d": dict(attn_mask=randn(2 * 3, 7, 9)),
      "causal-hint": dict(attn_mask=causal, is_causal=True),
      "both-masks": dict(attn_mask=RNG.random((7, 9)) > 0.8, key_padding_mask=kpm),
  }


MHA_CASES = mha_cases()


@pytest.mark.parametrize(
    "case, need_weights, average",
    [(case, False, True) for case in sorted(MHA_CASES)]
    + [("self", True, False), ("key-padding-bool", True, True), ("attn-mask-float-3d", True, False),
       ("both-masks", True, True)],
)
def test_multi_head_attention_matches_torch(case, need_weights, average):
  module, params = torch_mha(12, 3)
  query, key, value = randn(2, 7, 12), randn(2, 9, 12), randn(2, 9, 12)
  options = MHA_CASES[case]
  torch_options = {n: torch.tensor(m) if isinstance(m, np.ndarray) else m
                   for n, m in options.items()}
  want, want_w = module(*(torch.tensor(x) for x in (query, key, value)),
                        need_weights=need_weights, average_attn_weights=average, **torch_options)
  with jax.default_matmul_precision("highest"):
    got, got_w = jmat.multi_head_attention(
        params, query, key, value, num_heads=3, need_weights=need_weights,
        average_attn_weights=average,
        **{n: jnp.asarray(m) if isinstance(m, np.ndarray) else m for n, m in options.items()})
  if need_weights and torch.isnan(want).any():
    # torch's need_weights path gives NaN for a query with every key masked; jmat gives the
    # output of torch's need_weights=False path (0 attention, then out_proj) and 0 weights.
    empty = torch.isnan(want_w).all(-1)
    want_w = torch.where(torch.isnan(want_w), 0.0, want_w)
    assert empty.any()
    want, _ = module(*(torch.tensor(x) for x in (query, key, value)), need_weights=False,
                     **torch_options)
  np.testing.assert_allclose(got, as_numpy(want), **tolerance(np.float64))
  if need_weights:
    chex.assert_shape(got_w, tuple(want_w.shape))
    np.testing.assert_allclose(got_w, as_numpy(want_w), **tolerance(np.float64))
  else:
    assert got_w is None and want_w is None


def test_multi_head_attention_unbatched_float32_matches_torch():
  module, params = torch_mha(8, 2, torch.float32)
  x = randn(5, 8).astype(np.float32)
  want, want_w = module(*(torch.tensor(x) for _ in range(3)), need_weights=True)
  with jax.default_matmul_precision("highest"):
    got, got_w = jmat.multi_head_attention(params, x, x, x, num_heads=2, need_weights=True)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(got, as_numpy(want), **tolerance(np.float32))
  np.testing.assert_allclose(got_w, as_numpy(want_w), **tolerance(np.float32))


def test_multi_head_attention_gradients_match_torch():
  module, params = torch_mha(8, 2)
  x = randn(2, 5, 8)
  tx = torch.tensor(x, requires_grad=True)
  out, _ = module(tx, tx, tx, need_weights=False)
  out.sum().backward()

  def loss(params, x):
    return jnp.sum(jmat.multi_head_attention(params, x, x, x, num_heads=2)[0])

  with jax.default_matmul_precision("highest"):
    d_params, d_x = jax.grad(loss, argnums=(0, 1))(params, x)
  np.testing.assert_allclose(d_x, as_numpy(tx.grad), **tolerance(np.float64))
  for name, p in module.named_parameters():
    np.testing.assert_allclose(d_params[name], as_numpy(p.grad), **tolerance(np.float64))


def test_multi_head_attention_refusals():
  _, params = torch_mha(8, 2)
  x = jnp.ones((2, 5, 8))
  mha = jmat.multi_head_attention
  with pytest.raises(ValueError, match=r"num_heads=3 must be a positive int dividing "
                     r"embed_dim=8"):
    mha(params, x, x, x, num_heads=3)
  with pytest.raises(ValueError, match=r"params lacks \['in_proj_bias'\]"):
    mha({k: v for k, v in params.items() if k != "in_proj_bias"}, x, x, x, num_heads=2)
  with pytest.raises(jmat.ShapeError, match=r"query's last dim 6 is not embed_dim=8"):
    mha(params, jnp.ones((2, 5, 6)), x, x, num_heads=2)
  with pytest.raises(jmat.ShapeError, match=r"all be 3-D \(batched\) or all 2-D"):
    mha(params, jnp.ones((5, 8)), x, x, num_heads=2)
  with pytest.raises(jmat.ShapeError, match=r"batch sizes or key/value lengths differ.*"
                     r"key has shape \(2, 5, 8\), value has shape \(2, 6, 8\)"):
    mha(params, x, x, jnp.ones((2, 6, 8)), num_heads=2)
  with pytest.raises(jmat.ShapeError, match=r"key_padding_mask has the wrong shape: "
                     r"key_padding_mask has shape \(2, 4\), expected \(2, 5\)"):
    mha(params, x, x, x, num_heads=2, key_padding_mask=jnp.zeros((2, 4), bool))
  with pytest.raises(TypeError, match=r"key_padding_mask has dtype int32"):
    mha(params, x, x, x, num_heads=2, key_padding_mask=jnp.zeros((2, 5), jnp.int32))
  with pytest.raises(jmat.ShapeError, match=r"params\['out_proj.bias'\] has shape \(7,\), "
                     r"expected \(8,\)"):
    mha({**params, "out_proj.bias": jnp.ones(7)}, x, x, x, num_heads=2)
  # torch refuses the same wrong-shape key padding mask and the same head count.
  module, _ = torch_mha(8, 2)
  with pytest.raises((RuntimeError, AssertionError)):
    module(*(torch.ones(2, 5, 8, dtype=torch.float64) for _ in range(3)),
           key_padding_mask=torch.zeros(2, 4, dtype=torch.bool))
  with pytest.raises(AssertionError):
    torch.nn.MultiheadAttention(8, 3)


def test_init_multi_head_attention_uses_torch_distributions():
  embed_dim = 64
  params = jmat.init_multi_head_attention(jax.random.key(3), embed_dim, 4)
  torch.manual_seed(3)
  module = torch.nn.MultiheadAttention(embed_dim, 4)
  for name, p in module.state_dict().items():
    got, want = np.asarray(params[name], np.float64), p.numpy().astype(np.float64)
    assert got.shape == want.shape and params[name].dtype == jnp.float32
    if not want.any():
      np.testing.assert_array_equal(got, 0.0)
      continue
    # Same uniform distribution: same support, same spread (loose: two samples).
    bound = np.abs(want).max()
    assert np.abs(got).max() <= bound * 1.02 and np.abs(got).max() >= bound * 0.95
    np.testing.assert_allclose(got.std(), want.std(), rtol=0.1)
  with pytest.raises(ValueError, match=r"num_heads=5 must be a positive int dividing "
                     r"embed_dim=64"):
    jmat.init_multi_head_attention(jax.random.key(0), embed_dim, 5)


# --- examples/transformer_block.py against torch.nn.TransformerEncoderLayer -------------------


def load_example():
  path = pathlib.Path(__file__).resolve().parents[2] / "examples" / "transformer_block.py"
  spec = importlib.util.spec_from_file_location("transformer_block", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_example_encoder_block_matches_torch_encoder_layer(activation):
  example = load_example()
  torch.manual_seed(1)
  layer = torch.nn.TransformerEncoderLayer(
      12, 3, dim_feedforward=20, dropout=0.0, activation=activation, batch_first=True,
      norm_first=True, dtype=torch.float64).eval()
  with torch.no_grad():
    for p in layer.parameters():
      p.add_(0.1 * torch.randn_like(p))  # non-trivial norms and biases
  params = {name: jnp.asarray(p.numpy()) for name, p in layer.state_dict().items()}
  x = randn(2, 7, 12)
  padding = np.arange(7) >= np.array([[7], [4]])
  want = layer(torch.tensor(x), src_key_padding_mask=torch.tensor(padding))
  with jax.default_matmul_precision("highest"):
    got = example.encoder_block(params, x, num_heads=3, key_padding_mask=jnp.asarray(padding),
                                activation=activation)
  # torch's fast path leaves padded positions' outputs unspecified: compare the real tokens.
  np.testing.assert_allclose(np.asarray(got)[~padding], as_numpy(want)[~padding],
                             **tolerance(np.float64))
  causal = torch.nn.Transformer.generate_square_subsequent_mask(7, dtype=torch.float64)
  want = layer(torch.tensor(x), src_mask=causal, is_causal=True)
  with jax.default_matmul_precision("highest"):
    got = example.encoder_block(params, x, num_heads=3, is_causal=True, activation=activation)
  np.testing.assert_allclose(got, as_numpy(want), **tolerance(np.float64))


def test_example_runs(capsys):
  load_example().main()
  printed = capsys.readouterr().out
  assert "encoder block: x (2, 10, 64) -> y (2, 10, 64), float32" in printed
  assert "gradient norm" in printed
