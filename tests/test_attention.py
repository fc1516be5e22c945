"""jmat attention against numpy float64: values, gradients, jit/vmap, structure and memory.

The oracle is tests/cases.py's numpy float64 attention; the online softmax is tested in
tests/test_online_softmax.py and the block-sparse kernel in tests/test_block_sparse.py. The
torch-oracle tests (semantics, refusals shared with torch, multi-head attention with
torch weights) are in tests/parity/test_torch_attention.py.
"""

import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

import jmat
from jmat._src import attention as attention_src
from tests.cases import (
  attention_reference,
  attention_reference_vjp,
  attention_weights,
  sum_to_shape,
  tolerance,
)

RNG = np.random.default_rng(20261123)


def randn(*shape: int) -> np.ndarray:
  return RNG.standard_normal(shape)


# Blocks of 16 queries and 8 keys, so small inputs span many blocks of the blockwise kernel.
SMALL = (16, 8)


# --- attention_scores -----------------------------------------------------------------------


class AttentionScoresTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(
      ((5, 3), (7, 3)), ((2, 5, 3), (7, 3)), ((3, 1, 5, 4), (2, 7, 4)), ((0, 3), (7, 3)),
      ((1, 1), (1, 1)),
  )
  def test_is_q_at_k_transposed(self, q_shape, k_shape):
    q, k = randn(*q_shape), randn(*k_shape)
    with jax.default_matmul_precision("highest"):
      got = self.variant(jmat.attention_scores)(q, k, scale=0.5)
    want = np.matmul(q, np.swapaxes(k, -1, -2)) * 0.5
    chex.assert_shape(got, want.shape)
    np.testing.assert_allclose(got, want, **tolerance(np.float64))


def test_attention_scores_is_one_dot_general():
  hlo = jax.jit(jmat.attention_scores).lower(jnp.ones((2, 8, 5, 4)), jnp.ones((2, 8, 7, 4)))
  assert hlo.as_text().count("dot_general") == 1


def test_attention_scores_errors():
  with pytest.raises(jmat.ShapeError, match=r"attention_scores.*embedding sizes 4 and 3 differ.*"
                     r"query has shape \(5, 4\), key has shape \(7, 3\)"):
    jmat.attention_scores(jnp.ones((5, 4)), jnp.ones((7, 3)))
  with pytest.raises(jmat.ShapeError, match=r"key must be at least 2-D.*\(4,\)"):
    jmat.attention_scores(jnp.ones((5, 4)), jnp.ones((4,)))
  with pytest.raises(jmat.ShapeError, match=r"do not broadcast.*\(2, 5, 4\).*\(3, 7, 4\)"):
    jmat.attention_scores(jnp.ones((2, 5, 4)), jnp.ones((3, 7, 4)))


# --- dense and blockwise against numpy -------------------------------------------------------

MASK_CASES = {
    "none": lambda length, keys: (None, None),
    "bool": lambda length, keys: (RNG.random((length, keys)) > 0.4, None),
    "bool-rows-empty": lambda length, keys: (
        np.concatenate([np.zeros((2, keys), bool), RNG.random((length - 2, keys)) > 0.4]), None),
    "bool-per-key": lambda length, keys: (RNG.random((1, keys)) > 0.3, None),
    "float": lambda length, keys: (None, randn(length, keys)),
    "float-with-inf": lambda length, keys: (
        None, np.where(RNG.random((length, keys)) > 0.5, -np.inf, randn(length, keys))),
    "float-per-head": lambda length, keys: (None, randn(3, 1, keys)),
}


@pytest.mark.parametrize("implementation", ["dense", "blockwise"])
@pytest.mark.parametrize(
    "mask_kind, length, keys, causal",
    [(kind, 13, 21, kind != "none") for kind in sorted(MASK_CASES) if kind not in ("bool", "float")]
    + [("none", 21, 13, True), ("bool", 21, 13, True), ("float", 21, 13, False)],
)
def test_sdpa_matches_numpy(implementation, mask_kind, length, keys, causal):
  q, k, v = randn(2, 3, length, 5), randn(2, 3, keys, 5), randn(2, 3, keys, 7)
  allowed, bias = MASK_CASES[mask_kind](length, keys)
  mask = allowed if allowed is not None else bias
  with jax.default_matmul_precision("highest"):
    got = jmat.scaled_dot_product_attention(
        q, k, v, mask, is_causal=causal, implementation=implementation, block_size=SMALL)
  want = attention_reference(q, k, v, allowed=allowed, bias=bias, is_causal=causal)
  chex.assert_shape(got, (2, 3, length, 7))
  np.testing.assert_allclose(got, want, **tolerance(np.float64))


@pytest.mark.parametrize("implementation", ["dense", "blockwise"])
def test_sdpa_grouped_query_heads_match_numpy(implementation):
  q, k, v = randn(2, 6, 13, 5), randn(1, 2, 21, 5), randn(1, 2, 21, 3)
  allowed = RNG.random((6, 13, 21)) > 0.3
  with jax.default_matmul_precision("highest"):
    got = jmat.scaled_dot_product_attention(
        q, k, v, allowed, is_causal=True, enable_gqa=True, implementation=implementation,
        block_size=SMALL)
  want = attention_reference(q, k, v, allowed=allowed, is_causal=True, enable_gqa=True)
  np.testing.assert_allclose(got, want, **tolerance(np.float64))


@pytest.mark.parametrize("implementation", ["dense", "blockwise"])
@pytest.mark.parametrize("mask_kind", ["bool-rows-empty", "float-with-inf", "float-per-head"])
def test_sdpa_gradients_match_numpy(implementation, mask_kind):
  q, k, v = randn(2, 3, 13, 5), randn(2, 3, 21, 5), randn(2, 3, 21, 7)
  d_out = randn(2, 3, 13, 7)
  allowed, bias = MASK_CASES[mask_kind](13, 21)
  mask = jnp.asarray(allowed if allowed is not None else bias)

  def loss(q, k, v, mask):
    out = jmat.scaled_dot_product_attention(q, k, v, mask, is_causal=True,
                                            implementation=implementation, block_size=SMALL)
    return jnp.sum(out * d_out)

  argnums = (0, 1, 2) if allowed is not None else (0, 1, 2, 3)
  with jax.default_matmul_precision("highest"):
    got = jax.grad(loss, argnums=argnums)(q, k, v, mask)
  d_q, d_k, d_v, d_s = attention_reference_vjp(q, k, v, d_out, allowed=allowed, bias=bias,
                                               is_causal=True)
  want = (d_q, d_k, d_v) if allowed is not None else (d_q, d_k, d_v, sum_to_shape(d_s, bias.shape))
  for g, w in zip(got, want, strict=True):
    assert not np.isnan(g).any()
    np.testing.assert_allclose(g, w, **tolerance(np.float64))


@pytest.mark.parametrize("implementation", ["dense", "blockwise"])
@pytest.mark.parametrize("rank, sizes", [(2, ((7, 5), (1, 1))), (3, ((0, 5), (7, 0), (1, 3)))])
def test_sdpa_low_rank_and_empty_inputs(implementation, rank, sizes):
  lead = (3,) * (rank - 2)
  for length, keys in sizes:
    q, k, v = randn(*lead, length, 4), randn(*lead, keys, 4), randn(*lead, keys, 2)
    with jax.default_matmul_precision("highest"):
      got = jmat.scaled_dot_product_attention(q, k, v, is_causal=True,
                                              implementation=implementation)
    want = attention_reference(q, k, v, is_causal=True)
    chex.assert_shape(got, lead + (length, 2))
    np.testing.assert_allclose(got, want, **tolerance(np.float64))


@pytest.mark.parametrize("implementation", ["dense", "blockwise"])
def test_sdpa_float32_and_custom_scale(implementation):
  q, k, v = (randn(2, 33, 8).astype(np.float32) for _ in range(3))
  with jax.default_matmul_precision("highest"):
    got = jmat.scaled_dot_product_attention(q, k, v, scale=0.2, implementation=implementation)
  assert got.dtype == jnp.float32
  want = attention_reference(q, k, v, scale=0.2)
  np.testing.assert_allclose(got, want, **tolerance(np.float32))


def test_sdpa_works_with_x64_off():
  q = randn(3, 9, 4).astype(np.float32)
  with jax.enable_x64(False), jax.default_matmul_precision("highest"):
    for implementation in ("dense", "blockwise"):
      got = jmat.scaled_dot_product_attention(q, q, q, is_causal=True,
                                              implementation=implementation)
      assert got.dtype == jnp.float32
      want = attention_reference(q, q, q, is_causal=True)
      np.testing.assert_allclose(got, want, **tolerance(np.float32))


# --- jit, vmap, retracing --------------------------------------------------------------------


@pytest.mark.parametrize("implementation", ["dense", "blockwise"])
def test_sdpa_vmap_matches_numpy_per_item(implementation):
  q, k, v = randn(4, 2, 9, 4), randn(4, 2, 11, 4), randn(4, 2, 11, 3)
  allowed = RNG.random((4, 9, 11)) > 0.3

  def one(q, k, v, m):
    return jmat.scaled_dot_product_attention(q, k, v, m, is_causal=True,
                                             implementation=implementation)

  with jax.default_matmul_precision("highest"):
    got = jax.jit(jax.vmap(one))(q, k, v, allowed)
  for i in range(4):
    want = attention_reference(q[i], k[i], v[i], allowed=allowed[i], is_causal=True)
    np.testing.assert_allclose(got[i], want, **tolerance(np.float64))


@pytest.mark.parametrize("implementation", ["dense", "blockwise"])
def test_sdpa_does_not_retrace(implementation):
  """jmat's own jitted function compiles once for repeated calls of one signature."""
  q = jnp.asarray(randn(2, 5, 4))
  # The public function checks kernel_options, then calls its jitted body.
  before = attention_src._sdpa._cache_size()
  for i in range(3):
    jmat.scaled_dot_product_attention(q + i, q, q, is_causal=True, implementation=implementation)
  assert attention_src._sdpa._cache_size() == before + 1


# --- dropout ---------------------------------------------------------------------------------


def test_dropout_zeroes_or_rescales_each_weight_and_is_deterministic():
  q, k = randn(2, 6, 4), randn(2, 5, 4)
  eye = np.broadcast_to(np.eye(5), (2, 5, 5))  # value = identity: the output IS the weights
  rng = jax.random.key(7)
  with jax.default_matmul_precision("highest"):
    got = jmat.scaled_dot_product_attention(q, k, eye, dropout_p=0.4, dropout_rng=rng)
    again = jmat.scaled_dot_product_attention(q, k, eye, dropout_p=0.4, dropout_rng=rng)
    other = jmat.scaled_dot_product_attention(q, k, eye, dropout_p=0.4,
                                              dropout_rng=jax.random.key(8))
    none = jmat.scaled_dot_product_attention(q, k, eye, dropout_p=1.0, dropout_rng=rng)
  w, _ = attention_weights(q, k)
  kept = np.isclose(got, w / 0.6, rtol=1e-12, atol=0)
  dropped = got == 0
  assert np.all(kept | dropped) and kept.any() and dropped.any()
  np.testing.assert_array_equal(got, again)
  assert not np.array_equal(got, other)
  np.testing.assert_array_equal(none, 0.0)


# --- refusals that torch has no equivalent for -----------------------------------------------


def test_refusals_of_jmat_only_arguments():
  q = jnp.ones((2, 5, 4))
  sdpa = jmat.scaled_dot_product_attention
  with pytest.raises(ValueError, match=r"scaled_dot_product_attention: dropout_p=0.1 needs an "
                     r"explicit random key: pass dropout_rng"):
    sdpa(q, q, q, dropout_p=0.1)
  with pytest.raises(ValueError, match=r"dropout_p must be a Python float in \[0, 1\], got 1.5"):
    sdpa(q, q, q, dropout_p=1.5, dropout_rng=jax.random.key(0))
  with pytest.raises(ValueError, match=r"dropout_p must be .* got -0.5"):
    sdpa(q, q, q, dropout_p=-0.5)
  with pytest.raises(ValueError, match=r"implementation must be None .* got 'flash'"):
    sdpa(q, q, q, implementation="flash")
  with pytest.raises(ValueError, match=r"'blockwise' does not support dropout"):
    sdpa(q, q, q, dropout_p=0.5, dropout_rng=jax.random.key(0), implementation="blockwise")
  with pytest.raises(TypeError, match=r"must be an array, got list"):
    sdpa([[1.0]], q, q)


# --- implementation=None, memory -------------------------------------------------------------


def test_default_implementation_threshold():
  small = jnp.ones((1, 8, 128, 16))
  big = jnp.ones((1, 8, 256, 16))  # 8 * 256 * 256 = 2**19 scores > DENSE_MAX_SCORES

  def while_loops(x):
    lowered = jax.jit(jmat.scaled_dot_product_attention).lower(x, x, x)
    return lowered.as_text().count("stablehlo.while")

  assert 8 * 128 * 128 <= attention_src.DENSE_MAX_SCORES < 8 * 256 * 256
  assert while_loops(small) == 0
  assert while_loops(big) > 0


def temp_bytes(implementation, length, heads=2, dim=16):
  x = jax.ShapeDtypeStruct((heads, length, dim), jnp.float32)

  def loss(q, k, v):
    out = jmat.scaled_dot_product_attention(q, k, v, is_causal=True,
                                            implementation=implementation, block_size=SMALL)
    return jnp.sum(out)

  compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))).lower(x, x, x).compile()
  return compiled.memory_analysis().temp_size_in_bytes


def test_blockwise_memory_grows_linearly_dense_quadratically():
  blockwise = [temp_bytes("blockwise", n) for n in (512, 1024, 2048)]
  dense = [temp_bytes("dense", n) for n in (512, 1024)]
  for smaller, larger in zip(blockwise, blockwise[1:], strict=False):
    assert larger <= 2.2 * smaller, blockwise
  assert dense[1] >= 3.5 * dense[0], dense
  assert blockwise[-1] < dense[-1] / 4


def test_blockwise_causal_never_touches_blocks_above_the_diagonal():
  # NaN values in the last key block (keys 40..47): a kernel that computed the blocks above
  # the diagonal would multiply them by 0 weights and get NaN (0 * NaN) in earlier rows.
  q, k, v = randn(2, 48, 4), randn(2, 48, 4), randn(2, 48, 3)
  v[:, 40:] = np.nan
  blockwise = jmat.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                implementation="blockwise", block_size=SMALL)
  dense = jmat.scaled_dot_product_attention(q, k, v, is_causal=True, implementation="dense")
  want = attention_reference(q[:, :32], k[:, :32], v[:, :32], is_causal=True)
  # Query blocks [0, 16) and [16, 32) end before key 40: their key loops stop earlier.
  np.testing.assert_allclose(blockwise[:, :32], want, **tolerance(np.float64))
  assert np.isnan(dense[:, :32]).all()  # the dense kernel does touch every block


def test_blockwise_float64_gradient_does_not_abort_xla_cpu():
  """jaxlib 0.10.2's XLA:CPU aborted the process (LLVM "Cannot select: X86ISD::SUBV_BROADCAST_LOAD
  ... multiply_bitcast_fusion") compiling the float64 blockwise backward on AVX-512 CPUs (AMD
  Zen 4), where the backward selected masked probabilities and multiplied them. Run in a child
  process: an abort would take the test run with it. It can only fail on such a CPU."""
  program = """
import jax, jax.numpy as jnp, numpy as np
jax.config.update("jax_enable_x64", True)
import jmat
q, k, v, g = (jnp.asarray(np.random.default_rng(i).standard_normal((2, 3, 8, 16)))
              for i in range(4))
def loss(q, k, v):
  return (jmat.scaled_dot_product_attention(q, k, v, is_causal=True,
                                            implementation="blockwise") * g).sum()
print(float(jax.grad(loss, argnums=(0, 1, 2))(q, k, v)[0].sum()))
"""
  result = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True,
                          timeout=300, check=False)
  assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.parametrize("call", ["sdpa", "flex", "ring"])
@pytest.mark.parametrize("scale, error, words", [
    (2 + 1j, TypeError, r"scale has dtype complex(64|128); it must be a real number"),
    (np.ones(3), jmat.ShapeError, r"scale is not a scalar: scale has shape \(3,\); pass one "
                                  r"factor for every score"),
    (True, TypeError, r"scale has dtype bool; it must be a real number"),
])
def test_a_scale_that_is_not_a_real_scalar_is_refused(call, scale, error, words):
  x = jnp.ones((1, 2, 4, 3))
  fns = {
      "sdpa": (jmat.scaled_dot_product_attention, "scaled_dot_product_attention", {}),
      "flex": (jmat.flex_attention, "flex_attention", {}),
      "ring": (jmat.parallel.ring_attention, r"parallel\.ring_attention",
               {"mesh": jax.make_mesh((1,), ("seq",)), "axis_name": "seq"}),
  }
  fn, name, options = fns[call]
  with pytest.raises(error, match=rf"jmat\.{name}: {words}"):
    fn(x, x, x, scale=scale, **options)
