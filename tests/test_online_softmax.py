"""The online softmax (jmat._src.online_softmax) against the numpy float64 oracle of tests/cases.py.

The recurrence the block-sparse kernel and ring attention build on: folding key blocks one at
a time must give softmax attention and its logsumexp, also through plain autodiff.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np

import jmat
from tests.cases import attention_reference, attention_reference_vjp, tolerance

RNG = np.random.default_rng(20261124)


def randn(*shape: int) -> np.ndarray:
  return RNG.standard_normal(shape)


def test_folds_blocks_into_softmax_attention_and_its_logsumexp():
  q, k, v = randn(2, 5, 4), randn(2, 11, 4), randn(2, 11, 3)
  allowed = RNG.random((5, 11)) > 0.4
  allowed[1] = False  # a row with no key
  allowed[2, :6] = False  # a row whose first blocks are all masked
  bias = randn(5, 11)
  carry = jmat.attention.online_softmax_init((2,), 5, 3, dtype=jnp.float64)
  for start in range(0, 11, 4):
    block = slice(start, start + 4)
    carry = jmat.attention.online_softmax_update(
        carry, q, k[:, block], v[:, block], scale=0.3, mask=allowed[:, block],
        bias=bias[:, block])
  got = jmat.attention.online_softmax_finish(carry, jnp.float64)
  got_lse = jmat.attention.online_softmax_logsumexp(carry)
  want, want_lse = attention_reference(q, k, v, allowed=allowed, bias=bias, scale=0.3,
                                       return_lse=True)
  assert not np.isnan(got).any()
  np.testing.assert_allclose(got, want, **tolerance(np.float64))
  np.testing.assert_array_equal(got[:, 1], 0.0)
  np.testing.assert_allclose(got_lse, want_lse, **tolerance(np.float64))  # -inf in row 1


def test_fold_of_finished_scores_equals_update():
  """online_softmax_fold takes scores already scaled and masked (-inf), in any block split."""
  q, k, v = randn(3, 4), randn(10, 4), randn(10, 2)
  scores = np.where(RNG.random((3, 10)) > 0.3, q @ k.T * 0.7, -np.inf)
  carry = jmat.attention.online_softmax_init((), 3, 2, dtype=jnp.float64)
  for block in (slice(0, 1), slice(1, 7), slice(7, 10)):
    carry = jmat.attention.online_softmax_fold(carry, scores[:, block], v[block])
  # scores as a bias on a zero product: the oracle applies them as they are.
  want, want_lse = attention_reference(q, k, v, bias=scores, scale=0.0, return_lse=True)
  np.testing.assert_allclose(jmat.attention.online_softmax_finish(carry, jnp.float64), want,
                             **tolerance(np.float64))
  np.testing.assert_allclose(jmat.attention.online_softmax_logsumexp(carry), want_lse,
                             **tolerance(np.float64))


def test_is_differentiable_by_autodiff():
  q, k, v = randn(5, 4), randn(9, 4), randn(9, 3)
  allowed = RNG.random((5, 9)) > 0.3
  allowed[0] = False
  d_out = randn(5, 3)

  def loss(q, k, v):
    carry = jmat.attention.online_softmax_init((), 5, 3, dtype=jnp.float64)
    for start in range(0, 9, 3):
      block = slice(start, start + 3)
      carry = jmat.attention.online_softmax_update(
          carry, q, k[block], v[block], scale=0.5, mask=allowed[:, block])
    return jnp.sum(jmat.attention.online_softmax_finish(carry, jnp.float64) * d_out)

  got = jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
  want = attention_reference_vjp(q, k, v, d_out, allowed=allowed, scale=0.5)[:3]
  for g, w in zip(got, want, strict=True):
    assert not np.isnan(g).any()
    np.testing.assert_allclose(g, w, **tolerance(np.float64))


def test_init_defaults_to_float32():
  acc, row_max, row_sum = jmat.attention.online_softmax_init((2, 3), 5, 7)
  chex.assert_shape([acc, row_max, row_sum], [(2, 3, 5, 7), (2, 3, 5), (2, 3, 5)])
  assert {x.dtype for x in (acc, row_max, row_sum)} == {jnp.dtype(jnp.float32)}
  assert np.all(np.isneginf(row_max)) and not np.any(row_sum)


def test_keys_first_fold_gives_softmax_attention_of_a_cache_laid_out_keys_first():
  """The decode loop's fold (scores ``(Sk, H, Lq)``, values ``(Sk, H, Ev)``, as a packed cache
  holds them) gives the float64 oracle's attention and logsumexp, block after block, with a
  row that sees no key (0 and -inf, no NaN) and a row whose first block is all masked."""
  from jmat._src import online_softmax

  heads, rows, keys = 3, 4, 13
  q, k, v = randn(heads, rows, 5), randn(heads, keys, 5), randn(heads, keys, 2)
  allowed = RNG.random((rows, keys)) > 0.3
  allowed[1] = False
  allowed[3, :5] = False
  scores = np.where(allowed, np.einsum("hqd,hkd->hqk", q, k), -np.inf)
  carry = online_softmax.online_softmax_init((heads,), rows, 2, dtype=jnp.float64)
  for start in range(0, keys, 5):
    block = slice(start, start + 5)
    carry = online_softmax.online_softmax_fold_keys_first(
        carry, jnp.moveaxis(jnp.asarray(scores[..., block]), -1, 0),
        jnp.moveaxis(jnp.asarray(v[:, block]), 1, 0))
  got = online_softmax.online_softmax_finish(carry, jnp.float64)
  want, want_lse = attention_reference(q, k, v, allowed=allowed, scale=1.0, return_lse=True)
  np.testing.assert_allclose(got, want, **tolerance(np.float64))
  np.testing.assert_allclose(online_softmax.online_softmax_logsumexp(carry), want_lse,
                             **tolerance(np.float64))
  np.testing.assert_array_equal(got[:, 1], 0.0)
