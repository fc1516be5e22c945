"""Choosing the kernel backend: kernel_options, flex_attention_backend, return_aux, SDPA's
implementations, and what each public call lowers to for cuda and tpu (no device needed).

The Pallas kernels' values and gradients are tested in interpret mode in
tests/test_kernels_triton.py and tests/test_kernels_mosaic.py; here the question is which
kernel a call gets, and that the one jitted function holds the right kernel for each platform.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jmat
from jmat import mods
from jmat._src import block_sparse
from jmat.attention import AuxRequest, flex_attention_backend
from tests.cases import attention_reference, tolerance

RNG = np.random.default_rng(16)
TRITON_CALL = "__gpu$xla.gpu.triton"
MOSAIC_CALL = "tpu_custom_call"


def randn(*shape, dtype=np.float32):
  return RNG.standard_normal(shape).astype(dtype)


# --- kernel_options ------------------------------------------------------------------------------

@pytest.mark.parametrize("options, words", [
    ({"BACKEND": "FLASH"}, r"BACKEND='FLASH' is not a backend; use one of 'AUTO', 'XLA', "
                           r"'TRITON', 'MOSAIC'"),
    ({"BLOCK_Q": 64}, r"unknown kernel_options key\(s\) \['BLOCK_Q'\]; the valid keys are "
                      r"BACKEND, INTERPRET, BLOCK_M, BLOCK_N"),
    ({"BLOCK_M": 0}, r"BLOCK_M=0 must be a positive int"),
    ({"num_warps": True}, r"num_warps=True must be a positive int"),
])
def test_kernel_options_refuses_unknown_keys_and_values(options, words):
  q = jnp.ones((1, 2, 8, 4))
  with pytest.raises(ValueError, match=r"jmat\.flex_attention: (kernel_options )?" + words):
    jmat.flex_attention(q, q, q, kernel_options=options)
  with pytest.raises(ValueError,
                     match=r"jmat\.scaled_dot_product_attention: (kernel_options )?" + words):
    jmat.scaled_dot_product_attention(q, q, q, kernel_options=options)


def test_torch_block_keys_and_explicit_xla_are_accepted():
  q, k, v = randn(1, 2, 37, 8), randn(1, 2, 29, 8), randn(1, 2, 29, 8)
  options = {"BACKEND": "XLA", "BLOCK_M": 16, "fwd_BLOCK_N": 16, "bwd_BLOCK_M1": 16}
  with jax.default_matmul_precision("highest"):
    out = jmat.flex_attention(q, k, v, kernel_options=options)
  np.testing.assert_allclose(out, attention_reference(q, k, v), **tolerance(np.float32))


# --- which backend, and why -------------------------------------------------------------------

Q = jax.ShapeDtypeStruct((2, 4, 256, 64), jnp.bfloat16)
KV = jax.ShapeDtypeStruct((2, 2, 256, 64), jnp.bfloat16)
CAUSAL = jmat.create_block_mask(mods.causal_mask, None, None, 256, 256)


@pytest.mark.parametrize("platform, backend", [
    ("cpu", "XLA"), ("rocm", "XLA"), ("cuda", "TRITON"), ("tpu", "MOSAIC")])
def test_auto_picks_the_fused_kernel_of_the_platform(platform, backend):
  choice = flex_attention_backend(Q, KV, KV, mods.generate_tanh_softcap(30.0), CAUSAL,
                                  enable_gqa=True, platform=platform)
  assert choice.backend == backend
  assert choice.reason.startswith(f"{platform}: ")


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_auto_falls_back_to_xla_with_the_reason_when_the_kernel_cannot_run_the_call(platform):
  choice = flex_attention_backend(Q, KV, KV, block_mask=CAUSAL, enable_gqa=True,
                                  platform=platform, return_aux=AuxRequest(max_scores=True))
  assert choice.backend == "XLA"
  assert "max_scores (return_aux) is computed by the XLA backend only" in choice.reason


def test_a_pallas_backend_asked_for_by_name_is_refused_with_the_reason():
  q = jnp.ones((1, 2, 16, 8))
  options = {"BACKEND": "TRITON", "INTERPRET": True}
  choice = flex_attention_backend(q, q, q, kernel_options=options, platform="cpu",
                                  return_aux=AuxRequest(max_scores=True))
  assert choice == ("TRITON", "refused: max_scores (return_aux) is computed by the XLA "
                              "backend only")
  with pytest.raises(ValueError, match=r"jmat\.flex_attention: the TRITON backend cannot run "
                                       r"this call: max_scores .*use kernel_options="
                                       r"\{'BACKEND': 'AUTO'\}"):
    jmat.flex_attention(q, q, q, kernel_options=options, return_aux=AuxRequest(max_scores=True))


def test_flex_attention_backend_refuses_an_unknown_platform():
  with pytest.raises(ValueError, match=r"platform='gpu' is not one jax lowers for; use one of "
                                       r"'cpu', 'cuda', 'rocm', 'tpu'"):
    flex_attention_backend(Q, Q, Q, platform="gpu")


# --- return_aux -------------------------------------------------------------------------------

def test_return_aux_gives_lse_and_max_scores_as_the_float64_oracle():
  q, k, v = randn(2, 3, 37, 8, dtype=np.float64), randn(2, 3, 29, 8, dtype=np.float64), randn(
      2, 3, 29, 5, dtype=np.float64)
  window = jmat.create_block_mask(mods.generate_sliding_window(6), None, None, 37, 29,
                                  BLOCK_SIZE=(16, 8))
  with jax.default_matmul_precision("highest"):
    out, aux = jmat.flex_attention(q, k, v, mods.generate_tanh_softcap(4.0), window,
                                   return_aux=AuxRequest(lse=True, max_scores=True))
  allowed = np.array([[0 <= i - j <= 6 for j in range(29)] for i in range(37)])

  def softcap(s, *index):
    return 4.0 * np.tanh(s / 4.0)

  want_out, want_lse = attention_reference(q, k, v, allowed=allowed, score_fn=softcap,
                                           return_lse=True)
  scores = softcap(np.matmul(q, np.swapaxes(k, -1, -2)) / np.sqrt(8))
  want_max = np.where(allowed, scores, -np.inf).max(axis=-1)
  assert np.isneginf(want_max[..., 36]).all()  # query 36 sees no key: -inf, as lse
  for got, want in [(out, want_out), (aux.lse, want_lse), (aux.max_scores, want_max)]:
    np.testing.assert_allclose(got, want, **tolerance(np.float64))


def test_return_aux_fields_not_asked_for_are_none_and_both_ways_at_once_are_refused():
  q = jnp.ones((1, 1, 4, 2))
  _, aux = jmat.flex_attention(q, q, q, return_aux=AuxRequest(lse=True))
  assert aux.max_scores is None and aux.lse.shape == (1, 1, 4)
  with pytest.raises(ValueError, match=r"return_lse and return_aux both given; return_lse is "
                                       r"deprecated"):
    jmat.flex_attention(q, q, q, return_lse=True, return_aux=AuxRequest(lse=True))
  with pytest.raises(TypeError, match=r"return_aux must be a jmat\.attention\.AuxRequest"):
    jmat.flex_attention(q, q, q, return_aux=(True, False))


def test_max_scores_carries_no_gradient_as_torch():
  q = jnp.asarray(randn(1, 1, 5, 4, dtype=np.float64))

  def loss(q):
    return jmat.flex_attention(q, q, q, return_aux=AuxRequest(max_scores=True))[1].max_scores.sum()

  np.testing.assert_array_equal(jax.grad(loss)(q), 0.0)


# --- SDPA's implementations -------------------------------------------------------------------

def test_cudnn_is_refused_with_the_reason_where_it_cannot_run_the_call():
  q = jnp.ones((1, 2, 8, 16), jnp.float32)
  with pytest.raises(ValueError, match=r"scaled_dot_product_attention: the cudnn backend cannot "
                                       r"run this call: cuDNN takes float16 or bfloat16, the "
                                       r"inputs are float32"):
    jmat.scaled_dot_product_attention(q, q, q, implementation="cudnn")
  half = q.astype(jnp.bfloat16)
  with pytest.raises(ValueError, match=r"not an attn_mask"):
    jmat.scaled_dot_product_attention(half, half, half, jnp.ones((8, 8), bool),
                                      implementation="cudnn")


def _lowered(fn, *args, platform):
  """The program of ``fn`` lowered for ``platform`` from this CPU machine: AUTO holds the fused
  kernel of a platform it is told to trace (``kernel_platforms``)."""
  with jmat.attention.kernel_platforms(platform):
    return jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,)).as_text()


def _flex(q, k, v, score_mod=None, block_mask=None):
  return jmat.flex_attention(q, k, v, score_mod, block_mask, enable_gqa=True)


LOWERING_MODS = {
    "causal-softcap": (mods.generate_tanh_softcap(30.0), mods.causal_mask),
    "window": (None, mods.generate_sliding_window(32)),
    "prefix-alibi": (mods.generate_alibi_bias(4), mods.generate_prefix_lm_mask(40)),
    "bottom-right": (None, mods.generate_causal_offset(0)),
}


@pytest.mark.parametrize("platform, kernel_call", [("cuda", TRITON_CALL), ("tpu", MOSAIC_CALL)])
@pytest.mark.parametrize("name", list(LOWERING_MODS))
def test_the_default_lowers_flex_forward_and_gradient_to_the_platforms_kernel(
    platform, kernel_call, name):
  score_mod, mask_mod = LOWERING_MODS[name]
  q = jax.ShapeDtypeStruct((1, 4, 256, 64), jnp.float32)
  kv = jax.ShapeDtypeStruct((1, 2, 256, 64), jnp.float32)
  block_mask = jmat.create_block_mask(mask_mod, None, None, 256, 256)

  def loss(q, k, v):
    return _flex(q, k, v, score_mod, block_mask).sum()

  forward = _lowered(lambda q, k, v: _flex(q, k, v, score_mod, block_mask), q, kv, kv,
                     platform=platform)
  gradient = _lowered(jax.grad(loss, argnums=(0, 1, 2)), q, kv, kv, platform=platform)
  assert kernel_call in forward
  # forward, dq and dk/dv kernels: the backward recomputes the forward's residuals too
  assert len(re.findall(re.escape(kernel_call), gradient)) >= 2
  cpu = _lowered(lambda q, k, v: _flex(q, k, v, score_mod, block_mask), q, kv, kv,
                 platform="cpu")
  assert kernel_call not in cpu


@pytest.mark.parametrize("platform, kernel_call", [("cuda", TRITON_CALL), ("tpu", MOSAIC_CALL)])
def test_the_default_lowers_blockwise_sdpa_to_the_platforms_kernel(platform, kernel_call):
  q = jax.ShapeDtypeStruct((2, 4, 1024, 64), jnp.bfloat16)
  kv = jax.ShapeDtypeStruct((2, 2, 1024, 64), jnp.bfloat16)

  def sdpa(q, k, v):
    return jmat.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

  assert kernel_call in _lowered(sdpa, q, kv, kv, platform=platform)
  assert kernel_call in _lowered(jax.grad(lambda *a: sdpa(*a).astype(jnp.float32).sum()),
                                 q, kv, kv, platform=platform)


# --- the Pallas kernels end to end, in interpret mode: flex's layouts and mods inside them ----

IDS = np.repeat(np.arange(3), [10, 17, 10])  # three documents of a 37-long sequence


def _allowed(kind: str, length: int) -> np.ndarray:
  q, kv = np.arange(length)[:, None], np.arange(length)[None, :]
  if kind == "documents":
    return (IDS[q] == IDS[kv]) & (kv <= q)
  return kv <= q


@pytest.mark.parametrize("backend", ["TRITON", "MOSAIC"])
@pytest.mark.parametrize("kind, mask_b, mask_h", [("causal", None, None),
                                                  ("documents", 2, None),
                                                  ("causal", None, 4)])
def test_flex_on_a_pallas_kernel_matches_the_float64_oracle_with_gradients(
    backend, kind, mask_b, mask_h):
  """GQA, a softcap, an unaligned length, masks shared, per batch entry and per head."""
  q, k, v = randn(2, 4, 37, 8), randn(2, 2, 37, 8), randn(2, 2, 37, 8)
  mask_mod = (mods.generate_doc_mask_mod(mods.causal_mask, jnp.asarray(IDS))
              if kind == "documents" else mods.causal_mask)
  block = (8, 128) if backend == "MOSAIC" else (16, 16)
  block_mask = jmat.create_block_mask(mask_mod, mask_b, mask_h, 37, 37, BLOCK_SIZE=block)
  options = {"BACKEND": backend, "INTERPRET": True}

  def run(q, k, v, scale):
    return jmat.flex_attention(q, k, v, mods.generate_tanh_softcap(5.0), block_mask, scale,
                               enable_gqa=True, kernel_options=options)

  d_out = randn(2, 4, 37, 8)
  with jax.default_matmul_precision("highest"):
    out, vjp = jax.vjp(run, q, k, v, jnp.float32(0.3))
    grads = vjp(jnp.asarray(d_out))

  def softcap(s, *index):
    return 5.0 * np.tanh(s / 5.0)

  allowed = _allowed(kind, 37)
  np.testing.assert_allclose(out, attention_reference(q, k, v, allowed=allowed, scale=0.3,
                                                      score_fn=softcap, enable_gqa=True),
                             **tolerance(np.float32))
  # Gradients: central differences of the float64 oracle along one random direction each.
  inputs = [q, k, v, np.float64(0.3)]
  for n, grad in enumerate(grads):
    direction = randn(*np.shape(inputs[n]), dtype=np.float64)
    eps = 1e-6

    def oracle(x, n=n, direction=direction):
      args = [np.asarray(a, np.float64) for a in inputs]
      args[n] = args[n] + x * direction
      return np.sum(d_out * attention_reference(*args[:3], allowed=allowed, scale=args[3],
                                                score_fn=softcap, enable_gqa=True))

    want = (oracle(eps) - oracle(-eps)) / (2 * eps)
    got = np.sum(np.asarray(grad, np.float64) * direction)
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4, err_msg=f"argument {n}")


def test_sdpa_pallas_runs_the_triton_kernel_in_interpret_mode_off_gpu():
  q, k, v = randn(2, 4, 37, 8), randn(2, 2, 37, 8), randn(2, 2, 37, 8)
  with jax.default_matmul_precision("highest"):
    out = jmat.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True,
                                            implementation="pallas", block_size=16)
  np.testing.assert_allclose(out, attention_reference(q, k, v, is_causal=True, enable_gqa=True),
                             **tolerance(np.float32))


@pytest.mark.parametrize("block_size", [(4, 16), (8, 64), (16, 32)])
def test_a_blockmask_of_any_block_size_runs_on_the_mosaic_kernel(block_size):
  """TPU tiles are 8 x 128: the kernel walks coarser blocks made of the mask's."""
  q, k, v = randn(1, 2, 150, 8), randn(1, 2, 150, 8), randn(1, 2, 150, 8)
  window = jmat.create_block_mask(mods.generate_sliding_window(40), None, None, 150, 150,
                                  BLOCK_SIZE=block_size)
  options = {"BACKEND": "MOSAIC", "INTERPRET": True}
  with jax.default_matmul_precision("highest"):
    out = jmat.flex_attention(q, k, v, block_mask=window, kernel_options=options)
  allowed = np.array([[0 <= i - j <= 40 for j in range(150)] for i in range(150)])
  np.testing.assert_allclose(out, attention_reference(q, k, v, allowed=allowed),
                             **tolerance(np.float32))


def test_coarsen_marks_a_block_full_only_when_every_block_inside_is():
  fine = np.array([[[2, 2, 1, 0, 0],
                    [2, 2, 2, 2, 0],
                    [0, 0, 0, 0, 0],
                    [1, 0, 0, 0, 0]]])
  blocks = block_sparse.key_blocks_from_dense(jnp.asarray(fine == 1), jnp.asarray(fine == 2))
  coarse = block_sparse.block_map(block_sparse.coarsen(blocks, 5, 2, 2), 3)
  # 2 x 2 groups of the fine map, the last column padded with never-visited blocks
  np.testing.assert_array_equal(coarse, [[[2, 1, 0], [1, 0, 0]]])
  np.testing.assert_array_equal(block_sparse.block_map(blocks, 5), fine)


@pytest.mark.parametrize("backend", ["TRITON", "MOSAIC"])
def test_the_lse_output_of_a_pallas_kernel_is_differentiable(backend):
  q, k, v = randn(1, 2, 37, 8), randn(1, 2, 37, 8), randn(1, 2, 37, 8)
  u, w = randn(1, 2, 37), randn(1, 2, 37, 8)
  block = (8, 128) if backend == "MOSAIC" else (16, 16)
  causal = jmat.create_block_mask(mods.causal_mask, None, None, 37, 37, BLOCK_SIZE=block)
  options = {"BACKEND": backend, "INTERPRET": True}

  def loss(q):
    out, aux = jmat.flex_attention(q, k, v, block_mask=causal, kernel_options=options,
                                   return_aux=AuxRequest(lse=True))
    return jnp.sum(out * w) + jnp.sum(aux.lse * u)

  def oracle(q):
    out, lse = attention_reference(q, k, v, is_causal=True, return_lse=True)
    return np.sum(out * w) + np.sum(lse * u)

  with jax.default_matmul_precision("highest"):
    grad = jax.grad(loss)(jnp.asarray(q))
  direction = randn(*q.shape, dtype=np.float64)
  q64 = q.astype(np.float64)
  want = (oracle(q64 + 1e-6 * direction) - oracle(q64 - 1e-6 * direction)) / 2e-6
  np.testing.assert_allclose(np.sum(np.asarray(grad, np.float64) * direction), want,
                             rtol=2e-4, atol=2e-4)


# --- what AUTO traces: the local platform's kernel, others only when asked ------------------------

def _pallas_calls(fn, *args) -> int:
  return str(jax.make_jaxpr(fn)(*args)).count("pallas_call")


@pytest.mark.parametrize("grad", [False, True])
def test_auto_on_a_cpu_traces_no_pallas_kernel_unless_told_to(grad):
  """A CPU-only program under AUTO is the XLA program (nothing else traced or probed); inside
  ``kernel_platforms("cuda", "tpu")`` the same function holds both fused kernels."""
  if jax.default_backend() != "cpu":
    pytest.skip("the local platform is not a CPU")
  q = jnp.zeros((1, 2, 256, 64), jnp.bfloat16)
  block_mask = jmat.create_block_mask(mods.causal_mask, None, None, 256, 256)

  def f(q):
    return jmat.flex_attention(q, q, q, block_mask=block_mask).astype(jnp.float32).sum()

  fn = jax.grad(f) if grad else f
  assert _pallas_calls(fn, q) == 0
  with jmat.attention.kernel_platforms("cuda", "tpu"):
    assert _pallas_calls(fn, q) >= (6 if grad else 2)
    with pytest.raises(ValueError, match=r"jmat\.attention\.kernel_platforms: platform='gpu' "
                                         r"is not one jax lowers for; use one of 'cpu', 'cuda'"):
      jmat.attention.kernel_platforms("gpu")


def test_kernel_platforms_is_part_of_the_jit_cache_key():
  """A function traced on the CPU alone is traced again inside kernel_platforms (not a stale
  XLA-only program lowered for cuda)."""
  q = jax.ShapeDtypeStruct((1, 2, 128, 64), jnp.bfloat16)
  f = jax.jit(lambda q: jmat.flex_attention(q, q, q))
  f.trace(q).lower(lowering_platforms=("cpu",))
  with jmat.attention.kernel_platforms("cuda"):
    assert TRITON_CALL in f.trace(q).lower(lowering_platforms=("cuda",)).as_text()
  assert TRITON_CALL not in f.trace(q).lower(lowering_platforms=("cuda",)).as_text()


def test_a_shared_key_value_pool_reaches_the_fused_kernels_without_a_copy_per_row():
  """flex with a key/value batch of 1 against 3 query rows (a paged pool): lowered for cuda or
  tpu the Triton and Mosaic kernels read the one pool in place.
  (The gradient's dk/dv are per-row float32 buffers summed after the kernel, so only the forward
  is free of (3, ...) key tensors.)"""
  q = jax.ShapeDtypeStruct((3, 4, 256, 64), jnp.float32)
  kv = jax.ShapeDtypeStruct((1, 2, 256, 64), jnp.float32)
  block_mask = jmat.create_block_mask(mods.causal_mask, 3, None, 256, 256)
  repeated = "tensor<3x2x256x64xf32>"

  def attend(q, k, v):
    return _flex(q, k, v, None, block_mask)

  def loss(q, k, v):
    return attend(q, k, v).sum()

  cuda = _lowered(attend, q, kv, kv, platform="cuda")
  assert TRITON_CALL in cuda and repeated not in cuda
  tpu = _lowered(attend, q, kv, kv, platform="tpu")
  assert MOSAIC_CALL in tpu and repeated not in tpu
  assert TRITON_CALL in _lowered(jax.grad(loss, argnums=(0, 1, 2)), q, kv, kv, platform="cuda")
  assert MOSAIC_CALL in _lowered(jax.grad(loss, argnums=(0, 1, 2)), q, kv, kv, platform="tpu")
