"""jmat.attention.flax_attention_fn against flax's own attention (the oracle), and its refusals."""

from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from flax.nnx.nn.attention import dot_product_attention_weights

from jmat import ShapeError
from jmat.attention import flax_attention_fn

OP = "jmat.attention.flax_attention_fn"
# flax's attention compiled as one program (eagerly it dispatches, and compiles, op by op).
flax_attention = jax.jit(nnx.dot_product_attention, static_argnames=("is_causal",))
TOLERANCE = {jnp.float64: 1e-12, jnp.float32: 2e-6, jnp.float16: 4e-3, jnp.bfloat16: 3e-2}


# Inputs are made with numpy: every eager jnp op would compile a program of its own.
def _normal(seed, shape, dtype=jnp.float32):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)


def _qkv(batch, q_len, kv_len, heads, dim, dtype=jnp.float32, kv_heads=None):
  kv_heads = kv_heads or heads
  return (_normal(0, batch + (q_len, heads, dim), dtype),
          _normal(1, batch + (kv_len, kv_heads, dim), dtype),
          _normal(2, batch + (kv_len, kv_heads, dim), dtype))


def _close(actual, expected, dtype):
  chex.assert_equal(actual.dtype, expected.dtype)
  chex.assert_trees_all_close(np.asarray(actual, np.float64), np.asarray(expected, np.float64),
                              atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])


def _padding_mask(batch, q_len, kv_len, dtype):
  """A key-padding mask as flax's make_attention_mask makes it, ``batch + (1, q_len, kv_len)``;
  every query keeps at least one key."""
  lengths = kv_len - np.arange(int(np.prod(batch))) % kv_len
  keep = np.arange(kv_len) < lengths.reshape(batch + (1, 1, 1))
  return jnp.asarray(np.broadcast_to(keep, batch + (1, q_len, kv_len)), dtype)


# (batch, q_len, kv_len, heads, kv_heads, dim, masking): prime-like sizes, grouped-query heads,
# L != S, 0 and 2 batch dims, each mask kind flax makes. (flax's own attention needs value's
# head_dim equal to key's, and masks with every batch dim when there are two.)
CASES = [
    ((3,), 5, 5, 2, 2, 7, "none"),
    ((2,), 7, 5, 6, 2, 4, "float"),
    ((2, 3), 5, 3, 2, 1, 3, "bool"),
    ((2,), 5, 7, 3, 3, 4, "causal"),
    ((3,), 5, 5, 2, 2, 7, "is_causal"),
    ((2,), 7, 5, 6, 2, 4, "bias"),
    ((), 5, 7, 3, 3, 4, "bias"),
]


@pytest.mark.parametrize("batch, q_len, kv_len, heads, kv_heads, dim, masking", CASES)
def test_equals_flax_dot_product_attention(batch, q_len, kv_len, heads, kv_heads, dim, masking):
  q, k, v = _qkv(batch, q_len, kv_len, heads, dim, kv_heads=kv_heads)
  options: dict[str, Any] = {}
  if masking in ("bool", "float"):
    options["mask"] = _padding_mask(batch, q_len, kv_len,
                                    jnp.bool_ if masking == "bool" else jnp.float32)
  elif masking == "causal":
    options["mask"] = jnp.asarray(np.tril(np.ones((q_len, kv_len), np.float32)))
  elif masking == "is_causal":
    options["is_causal"] = True
  elif masking == "bias":
    options["bias"] = _normal(3, (heads, q_len, kv_len))
    if batch:
      options["mask"] = _padding_mask(batch, q_len, kv_len, jnp.float32)
  with jax.default_matmul_precision("highest"):
    expected = flax_attention(q, k, v, **options)
    _close(flax_attention_fn(q, k, v, **options), expected, jnp.float32)


@pytest.mark.parametrize("dtype, masking", [
    (jnp.float32, "is_causal"), (jnp.float16, "causal_mask"), (jnp.bfloat16, "causal_mask"),
])
def test_inside_nnx_multi_head_attention(dtype, masking):
  x = _normal(4, (3, 7, 12), dtype)
  modules = [nnx.MultiHeadAttention(num_heads=3, in_features=12, decode=False, dtype=dtype,
                                    param_dtype=dtype, rngs=nnx.Rngs(0), attention_fn=fn)
             for fn in (nnx.dot_product_attention, flax_attention_fn)]
  options: dict[str, Any] = {
      "causal_mask": {"mask": nnx.make_causal_mask(jnp.ones((3, 7)), dtype=dtype)},
      "is_causal": {"is_causal": True}}[masking]
  with jax.default_matmul_precision("highest"):
    expected, actual = (module(x, **options) for module in modules)
  _close(actual, expected, dtype)


def test_inside_jitted_cross_attention_with_padding():
  queries, keys = _normal(5, (2, 5, 8)), _normal(6, (2, 7, 8))
  mask = _padding_mask((2,), 5, 7, jnp.float32)
  modules = [nnx.MultiHeadAttention(num_heads=2, in_features=8, decode=False, rngs=nnx.Rngs(1),
                                    attention_fn=fn)
             for fn in (nnx.dot_product_attention, flax_attention_fn)]

  @nnx.jit
  def apply(module, q, kv, mask):
    return module(q, kv, mask=mask)

  with jax.default_matmul_precision("highest"):
    expected, actual = (apply(module, queries, keys, mask) for module in modules)
  _close(actual, expected, jnp.float32)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.int32])
def test_fully_masked_query_gives_zero_where_flax_gives_the_mean(dtype):
  q, k, v = _qkv((2,), 3, 5, 2, 4)
  mask = np.ones((2, 2, 3, 5))
  mask[:, :, 1] = 0  # query 1 may attend to no key
  mask = jnp.asarray(mask, dtype)
  out = flax_attention_fn(q, k, v, mask=mask)
  np.testing.assert_array_equal(np.asarray(out[:, 1]), np.zeros((2, 2, 4)))
  flax_out = nnx.dot_product_attention(q, k, v, mask=mask.astype(bool))
  np.testing.assert_allclose(flax_out[:, 1], np.mean(np.asarray(v, np.float64), axis=1),
                             rtol=1e-5, atol=1e-6)
  # the other rows agree with flax
  _close(out[:, ::2], flax_out[:, ::2], jnp.float32)


def test_fully_masked_query_with_bias_gives_zero():
  q, k, v = _qkv((1,), 2, 3, 1, 4)
  mask = jnp.array([[[[True, False, True], [False, False, False]]]])
  out = flax_attention_fn(q, k, v, bias=_normal(7, (1, 1, 2, 3)), mask=mask)
  np.testing.assert_array_equal(np.asarray(out[:, 1]), np.zeros((1, 1, 4)))


def test_dtype_casts_like_flax():
  q, k, v = _qkv((2,), 5, 7, 2, 4)
  out = flax_attention_fn(q, k.astype(jnp.float64), v, dtype=jnp.float64, is_causal=True)
  # flax's weights function: its fast path (jax.nn's) computes float64 scores in float32.
  weights = dot_product_attention_weights(q, k, dtype=jnp.float64, is_causal=True)
  expected = jnp.einsum("...hqk,...khd->...qhd", weights, v.astype(jnp.float64))
  _close(out, expected, jnp.float64)


def test_precision_names():
  q, k, v = _qkv((2,), 5, 5, 2, 4)
  expected = nnx.dot_product_attention(q, k, v, precision=jax.lax.Precision.HIGHEST)
  for precision in ("highest", jax.lax.Precision.HIGHEST, (jax.lax.Precision.HIGHEST,) * 2):
    _close(flax_attention_fn(q, k, v, precision=precision), expected, jnp.float32)


def test_dropout_is_a_function_of_the_key():
  q, k, v = _qkv((2,), 5, 7, 3, 4)
  options: dict[str, Any] = {"dropout_rate": 0.5, "broadcast_dropout": False}
  first, again, other = (flax_attention_fn(q, k, v, dropout_rng=jax.random.key(seed), **options)
                         for seed in (0, 0, 1))
  np.testing.assert_array_equal(first, again)
  assert not np.allclose(first, other)
  dropped = flax_attention_fn(q, k, v, dropout_rng=jax.random.key(0), dropout_rate=1.0,
                              broadcast_dropout=False)
  np.testing.assert_array_equal(dropped, np.zeros(dropped.shape))
  # deterministic=True turns dropout off, as in flax
  _close(flax_attention_fn(q, k, v, deterministic=True, **options),
         nnx.dot_product_attention(q, k, v), jnp.float32)


def test_unused_flax_keywords_are_accepted():
  q, k, v = _qkv((2,), 5, 5, 2, 4)
  _close(flax_attention_fn(q, k, v, some_future_option=None, another=False),
         nnx.dot_product_attention(q, k, v), jnp.float32)


@pytest.mark.parametrize("shapes, message", [
    (((5, 2, 4), (5, 2, 4), (5, 4)), "must be at least 3-D"),
    (((2, 5, 2, 4), (2, 5, 2, 3), (2, 5, 2, 4)), "embedding sizes 4 and 3 differ"),
    (((2, 5, 2, 4), (2, 5, 2, 4), (2, 6, 2, 4)), "key and value lengths 5 and 6 differ"),
    (((2, 5, 6, 4), (2, 5, 4, 4), (2, 5, 4, 4)), "the 4 heads of key do not divide the 6"),
    (((2, 5, 2, 4), (3, 5, 2, 4), (3, 5, 2, 4)), "the batch dims do not broadcast"),
])
def test_shape_errors(shapes, message):
  query, key, value = (jnp.ones(s) for s in shapes)
  with pytest.raises(ShapeError, match=message) as error:
    flax_attention_fn(query, key, value)
  assert str(error.value).startswith(OP)
  assert str(shapes[0]) in str(error.value)


@pytest.mark.parametrize("name, shape", [("mask", (2, 2, 5, 4)), ("bias", (3, 1, 1, 1))])
def test_mask_and_bias_must_broadcast_to_the_scores(name, shape):
  q, k, v = _qkv((2,), 5, 5, 2, 4)
  with pytest.raises(ShapeError, match=f"{name} does not broadcast") as error:
    if name == "mask":
      flax_attention_fn(q, k, v, mask=jnp.ones(shape))
    else:
      flax_attention_fn(q, k, v, bias=jnp.ones(shape))
  assert str(error.value).startswith(OP) and "(2, 2, 5, 5)" in str(error.value)


def test_type_errors():
  q, k, v = _qkv((2,), 5, 5, 2, 4)
  with pytest.raises(TypeError, match=f"^{OP}: dtypes differ"):
    flax_attention_fn(q, k.astype(jnp.float16), v)
  with pytest.raises(TypeError, match=f"^{OP}: .*floating-point"):
    flax_attention_fn(q.astype(jnp.int32), k.astype(jnp.int32), v.astype(jnp.int32))
  with pytest.raises(TypeError, match=f"^{OP}: unsupported keyword arguments \\['qk_norm'\\]"):
    flax_attention_fn(q, k, v, qk_norm=True)
  with pytest.raises(TypeError, match=f"^{OP}: precision"):
    flax_attention_fn(q, k, v, precision=(jax.lax.Precision.HIGH, jax.lax.Precision.HIGHEST))


def test_value_errors():
  q, k, v = _qkv((2,), 5, 5, 2, 4)
  with pytest.raises(ValueError, match=f"^{OP}: dropout_rate=0.1 .* needs dropout_rng"):
    flax_attention_fn(q, k, v, dropout_rate=0.1, broadcast_dropout=False)
  with pytest.raises(ValueError, match=f"^{OP}: broadcast_dropout=True"):
    flax_attention_fn(q, k, v, dropout_rate=0.1, dropout_rng=jax.random.key(0))
  with pytest.raises(ValueError, match=f"^{OP}: dropout_rate must be"):
    flax_attention_fn(q, k, v, dropout_rate=1.5, dropout_rng=jax.random.key(0))
  module = nnx.MultiHeadAttention(num_heads=2, in_features=8, decode=False, rngs=nnx.Rngs(0),
                                  attention_fn=flax_attention_fn)
  with pytest.raises(ValueError, match=f"^{OP}: module=MultiHeadAttention .* sow"):
    module(jnp.ones((1, 3, 8)), sow_weights=True)
