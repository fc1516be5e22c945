"""The Triton backend of the block-sparse kernel (jmat._src.kernels.triton) vs float64 oracles.

Values run in Pallas' interpreter on CPU (``interpret=True``) against tests/cases.py's numpy
attention oracle; gradients (q, k, v, scale, whole and blocked float operands) against torch
float64 autograd of a dense reference. Every mod is written once for an array namespace ``xp``
(numpy, torch or jax.numpy), so the kernel and both oracles evaluate the same formula. Block
tables come from a numpy reduction of the dense mask. Lowering for CUDA proves the forward and
the gradient compile to the Triton custom call.
"""

from __future__ import annotations

import dataclasses
import functools
import zlib
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.extend import core as jax_core

from jmat._src import block_sparse
from jmat._src.kernels import triton
from tests.cases import attention_reference, tolerance

TRITON_CALL = "__gpu$xla.gpu.triton"


@dataclasses.dataclass(frozen=True)
class Case:
  """A problem in the kernel's layout: sizes, the mask and score formulas, their operands.

  ``mask(xp, b, h, q, k, whole, blocked)`` and ``score(xp, s, b, h, q, k, whole, blocked)`` take
  broadcastable index arrays: ``b`` the batch/head row ``r``, ``h = r * G + g`` the query head,
  ``q``/``k`` positions; ``whole`` a dict of arrays read as they are, ``blocked`` arrays of shape
  ``(M|1, R|1, G|1, L|1, S|1)`` (the kernel passes tiles of them).
  """

  name: str
  m: int
  r: int
  g: int
  length: int
  keys: int
  head: int
  v_head: int
  block_q: int
  block_k: int
  dtype: Any = np.float64
  mask: Callable[..., Any] | None = None
  score: Callable[..., Any] | None = None
  whole: Callable[[np.random.Generator], dict[str, Any]] = lambda rng: {}
  blocked: Callable[[np.random.Generator], tuple[np.ndarray, ...]] = lambda rng: ()
  ranges: Callable[[], block_sparse.KeyBlocks] | None = None  # a range table instead of lists
  empty_query_block: bool = False  # row 0 of the table lists nothing for query block 1
  sizes: triton.BlockSizes = triton.BlockSizes(16, 16, 16, 16, 16, 16)
  # Ring attention's chunk pairs: the positions of query and key row 0 (traced in `run`).
  q_offset: int = 0
  k_offset: int = 0


def causal(xp, b, h, q, k, whole, blocked):
  del xp, b, h, whole, blocked
  return q >= k


def bottom_right_window(offset, window):
  def mask(xp, b, h, q, k, whole, blocked):
    del xp, b, h, whole, blocked
    return (q + offset >= k) & (q + offset - k <= window)

  return mask


def documents(xp, b, h, q, k, whole, blocked):
  """Causal within a document of a packed batch: ``docs (R, L)`` int ids, a gather by (b, q)."""
  del xp, h, blocked
  docs = whole["docs"]
  return (docs[b, q] == docs[b, k]) & (q >= k)


def per_query_temperature(xp, s, b, h, q, k, whole, blocked):
  """``s / t[q]``: a blocked ``(1, 1, 1, L, 1)`` operand, inf on the padding rows (zeros)."""
  del xp, b, h, q, k, whole
  return s / blocked[0]


def softcap(xp, s, b, h, q, k, whole, blocked):
  del b, h, q, k, whole, blocked
  return 5.0 * xp.tanh(s / 5.0)


def alibi_relative(xp, s, b, h, q, k, whole, blocked):
  """ALiBi slopes indexed by head and a learnable relative bias ``(H, L + S - 1)``."""
  del b, blocked
  distance = k - q
  return s + whole["slopes"][h] * distance + whole["table"][h, distance + whole["table_mid"]]


def blocked_mask(xp, b, h, q, k, whole, blocked):
  del xp, b, h, q, k, whole
  return blocked[0]


def tempered_bias(xp, s, b, h, q, k, whole, blocked):
  """A whole float scalar (read whole, not gathered) and two broadcast blocked float biases.

  ``1 / blocked[2]`` is inf on the zero padding of its head and query dims: the kernel must keep
  the padding heads and rows out of the gradients.
  """
  del xp, b, h, q, k
  return whole["temp"] * s + blocked[1] + 1.0 / blocked[2]


def random_mask(rng, shape, masked_row):
  """A random bool mask (70% allowed) with row ``masked_row = (m, l)`` fully masked."""
  mask = rng.random(shape) > 0.3
  mask[masked_row[0], ..., masked_row[1], :] = False
  return mask


CASES = [
    # No mask, every block full; table blocks of 32 cut into tiles of 16; x64 off (float32).
    Case("dense", 1, 2, 1, 37, 53, 16, 24, 32, 32, np.float32,
         ranges=lambda: block_sparse.dense_key_blocks(37, 53, 32, 32)),
    # Top-left causal as a range table: partial diagonal blocks, empty blocks above, full blocks
    # holding padding rows; GQA G = 2; a per-query temperature.
    Case("causal", 1, 1, 2, 37, 37, 24, 8, 16, 16, mask=causal, score=per_query_temperature,
         blocked=lambda rng: (1.0 + rng.random((1, 1, 1, 37, 1)),),
         ranges=lambda: block_sparse.causal_key_blocks(37, 37, 16, 16)),
    Case("bottom_right_window", 1, 2, 1, 21, 53, 16, 16, 16, 16, "bfloat16",
         mask=bottom_right_window(53 - 21, 12)),
    Case("documents_softcap", 1, 2, 2, 45, 45, 16, 16, 16, 16, mask=documents, score=softcap,
         whole=lambda rng: {"docs": np.repeat(np.array([[0, 1, 2], [0, 0, 1]]), 15, axis=1)}),
    Case("alibi_relative_gqa4", 1, 1, 4, 37, 29, 16, 16, 16, 16, score=alibi_relative,
         whole=lambda rng: {"slopes": rng.standard_normal(4), "table": rng.standard_normal((4, 65)),
                        "table_mid": np.int32(36)}),
    # M = 2 rows with different tables, a dense bool mask and float biases as blocked operands,
    # a scalar temperature; query block 1 of row 0 is empty and one more row is fully masked.
    Case("blocked_m2", 2, 2, 3, 37, 29, 5, 4, 16, 16, mask=blocked_mask, score=tempered_bias,
         whole=lambda rng: {"temp": np.float64(0.8)},
         blocked=lambda rng: (random_mask(rng, (2, 1, 1, 37, 29), masked_row=(1, 3)),
                              rng.standard_normal((1, 2, 1, 37, 29)),
                              1.0 + rng.random((1, 1, 3, 37, 1))),
         empty_query_block=True),
    # Decoding as flex attention calls it: one block per side, each as long as its side. 4 heads
    # share a key/value head (tiles of 4 queries x 4 heads); the caller's full key block of 53
    # becomes the kernel's 64 keys, whose padding full blocks must now mask.
    Case("decode", 1, 2, 4, 1, 53, 16, 16, 1, 53, np.float16,
         ranges=lambda: block_sparse.dense_key_blocks(1, 53, 1, 53)),
    # Decoding split 3 ways (flash-decoding): 2 queries x 2 heads over 7 key blocks; query 0 sees
    # keys of the first split only (the others give it -inf to merge), query 1 some of each.
    Case("decode_splits", 1, 2, 2, 2, 100, 16, 16, 16, 16, "bfloat16", mask=blocked_mask,
         blocked=lambda rng: (np.concatenate([np.arange(100) < 10, rng.random(100) > 0.3]
                                             ).reshape(1, 1, 1, 2, 100),),
         sizes=triton.BlockSizes(16, 16, 16, 16, 16, 16, num_splits=3)),
    # A ring attention chunk pair: queries 40..76 against keys 13..57 (global positions), causal
    # within documents whose ids are gathered at global positions, a softcap, table blocks of 32
    # cut into tiles of 16 (the flat loop's inner tiles).
    Case("offsets_documents", 1, 2, 2, 37, 45, 16, 16, 32, 32, mask=documents, score=softcap,
         whole=lambda rng: {"docs": np.array([[0] * 30 + [1] * 50,
                                              [0] * 10 + [1] * 35 + [2] * 35])},
         q_offset=40, k_offset=13),
]


def grids(case: Case, xp=np):
  """Broadcastable ``(b, h, q, k)`` over ``(M, R, G, L, S)``: the mods' index arrays."""
  shape = (case.m, case.r, case.g, case.length, case.keys)
  r, g, q, k = (xp.arange(n).reshape([n if a == axis else 1 for a in range(5)])
                for axis, n in list(enumerate(shape))[1:])
  return r, r * case.g + g, q + case.q_offset, k + case.k_offset


def block_maps(allowed: np.ndarray, case: Case) -> tuple[np.ndarray, np.ndarray]:
  """``(full, partial)`` ``(M, n_q, n_k)`` maps of a dense ``allowed (M, R|1, G|1, L, S)``.

  Full: every real entry allowed in every row sharing the table row, and no padding key in the
  block; partial: some but not all; padding rows and keys never count as allowed.
  """
  n_q, n_k = -(-case.length // case.block_q), -(-case.keys // case.block_k)
  padded = np.zeros((case.m, n_q * case.block_q, n_k * case.block_k), bool)
  real = np.zeros_like(padded)
  real[:, :case.length, :case.keys] = True
  padded[:, :case.length, :case.keys] = np.all(allowed, axis=(1, 2))
  some = np.zeros_like(padded)
  some[:, :case.length, :case.keys] = np.any(allowed, axis=(1, 2))
  blocks = (case.m, n_q, case.block_q, n_k, case.block_k)
  full = np.all(padded.reshape(blocks) | ~real.reshape(blocks), axis=(2, 4))
  full &= np.all((np.arange(n_k * case.block_k) < case.keys).reshape(n_k, -1), axis=1)
  return full, np.any(some.reshape(blocks), axis=(2, 4)) & ~full


def problem(case: Case):
  """Inputs, cotangents, the block table and the dense mask the kernel applies (numpy).

  Random values come from a generator seeded by the case's name: the same whatever ran before.
  """
  rng = np.random.default_rng(zlib.crc32(case.name.encode()))
  shape = (case.m, case.r)
  q = rng.standard_normal(shape + (case.g, case.length, case.head))
  k = rng.standard_normal(shape + (case.keys, case.head))
  v = rng.standard_normal(shape + (case.keys, case.v_head))
  d_out = rng.standard_normal(q.shape[:-1] + (case.v_head,))
  d_lse = rng.standard_normal(q.shape[:-1])
  dtype = jnp.dtype(case.dtype)
  q, k, v = (np.asarray(jnp.asarray(x, dtype)) for x in (q, k, v))  # exact in the test dtype
  whole, blocked = case.whole(rng), case.blocked(rng)
  allowed = np.ones((case.m, 1, 1, case.length, case.keys), bool)
  if case.mask is not None:
    allowed = np.broadcast_to(case.mask(np, *grids(case), whole, blocked),
                              (case.m, case.r, case.g, case.length, case.keys))
  if case.ranges is not None:
    blocks = case.ranges()
  else:
    full, partial = block_maps(allowed, case)
    if case.empty_query_block:
      full[0, 1], partial[0, 1] = False, False
    blocks = block_sparse.key_blocks_from_dense(jnp.asarray(partial), jnp.asarray(full))
  if case.empty_query_block:
    allowed = allowed.copy()
    allowed[0, ..., case.block_q:2 * case.block_q, :] = False
  return (q, k, v), whole, blocked, blocks, allowed, (d_out, d_lse)


def kernel_mods(case: Case) -> block_sparse.Mods:
  """The case's formulas as the kernel's mods (tiles: ``r (1,)``, ``g (G',)``, positions)."""

  def indices(r, g, q_pos, k_pos):
    b = r[:, None, None, None]
    return b, b * case.g + g[None, :, None, None], q_pos[:, None], k_pos[None, :]

  score = mask = None
  if case.score is not None:
    def score(s, m, r, g, q_pos, k_pos, ops):
      del m
      return case.score(jnp, s, *indices(r, g, q_pos, k_pos), *ops)
  if case.mask is not None:
    def mask(m, r, g, q_pos, k_pos, ops):
      del m
      return case.mask(jnp, *indices(r, g, q_pos, k_pos), *ops)
  return block_sparse.Mods(score, mask)


def compute_dtype(case: Case) -> np.dtype:
  return np.dtype(np.float64 if case.dtype == np.float64 else np.float32)


def _probe_call(q, k, v, operands, mods, block_q, block_k) -> block_sparse.Call:
  """The call ``unsupported`` judges: arrays or shapes, operands, mods and blocks (it reads
  neither the table nor the scale, so they are left out)."""
  return block_sparse.Call(q, k, v, None, operands, None, mods=mods,
                           block_q=block_q, block_k=block_k)


def is_float(x) -> bool:
  return bool(jnp.issubdtype(np.asarray(x).dtype, jnp.floating))  # bfloat16's numpy kind is "V"


def floats(tree) -> list[str]:
  return [name for name, x in tree.items() if is_float(x)]


def torch_oracle(case: Case, qkv, whole, blocked, allowed, scale, d_out, d_lse):
  """Gradients of ``sum(out * d_out) + sum(lse * d_lse)`` by torch float64 autograd.

  Returns:
    ``(gradients by name, sum of |terms| of d_scale)``.
  """
  def tensor(x, grad):
    x = np.asarray(x)
    kind = np.float64 if is_float(x) else np.bool_ if x.dtype == np.bool_ else np.int64
    return torch.tensor(x.astype(kind)).requires_grad_(grad)

  q, k, v = (tensor(x, True) for x in qkv)
  scale_t = tensor(scale, True)
  whole_t = {n: tensor(x, is_float(x)) for n, x in whole.items()}
  blocked_t = [tensor(x, is_float(x)) for x in blocked]
  products = torch.einsum("mrgle,mrse->mrgls", q, k)
  s = scaled = scale_t * products
  scaled.retain_grad()
  if case.score is not None:
    s = case.score(torch, s, *grids(case, torch), whole_t, blocked_t)
  ok = torch.tensor(np.asarray(allowed)) & (s != -torch.inf)
  seen = ok.any(dim=-1, keepdim=True)
  # Rows that see nothing take a constant instead of -inf everywhere (no 0 * NaN in autograd).
  s = torch.where(ok, s, -torch.inf)
  s = torch.where(seen, s, torch.zeros_like(s))
  lse = torch.logsumexp(s, dim=-1, keepdim=True)
  w = torch.where(ok, torch.exp(s - lse), torch.zeros_like(s))
  out = torch.einsum("mrgls,mrse->mrgle", w, v)
  lse = torch.where(seen, lse, torch.zeros_like(lse))[..., 0]
  (torch.sum(out * tensor(d_out, False)) + torch.sum(lse * tensor(d_lse, False))).backward()
  grads = {"q": q.grad, "k": k.grad, "v": v.grad, "scale": scale_t.grad}
  grads.update({f"whole {n}": whole_t[n].grad for n in floats(whole)})
  grads.update({f"blocked {i}": t.grad for i, t in enumerate(blocked_t) if t.requires_grad})
  # d_scale sums L * S * G terms of either sign: the scale of its rounding error.
  terms = torch.sum(torch.abs(scaled.grad * products)).item()
  return {name: g.numpy() for name, g in grads.items()}, terms


def run(case: Case, qkv, whole, blocked, blocks, scale, d_out, d_lse, interpret=True):
  """``(out, lse, grads by name)`` of the Triton kernel, jitted, with ``jax.vjp``."""
  mods = kernel_mods(case)
  float_names = floats(whole)
  float_blocked = [i for i, x in enumerate(blocked) if is_float(x)]

  def attend(q, k, v, scale, whole_f, blocked_f, offsets):
    ops_whole = {n: whole_f.get(n, x) for n, x in whole.items()}
    ops_blocked = tuple(blocked_f.get(i, x) for i, x in enumerate(blocked))
    return triton.run(block_sparse.Call(q, k, v, blocks, (ops_whole, ops_blocked), scale, mods=mods,
                                        block_q=case.block_q, block_k=case.block_k,
                                        q_offset=offsets[0], k_offset=offsets[1]),
                      interpret=interpret, block_sizes=case.sizes)

  @jax.jit
  def values_and_grads(q, k, v, scale, whole_f, blocked_f, offsets):
    (out, lse), vjp = jax.vjp(functools.partial(attend, offsets=offsets), q, k, v, scale,
                              whole_f, blocked_f)
    return out, lse, vjp((d_out.astype(out.dtype), d_lse.astype(lse.dtype)))

  compute = compute_dtype(case)  # scale's dtype; the float operands' too, as callers pass them
  whole_f = {n: jnp.asarray(whole[n], compute) for n in float_names}
  blocked_f = {i: jnp.asarray(blocked[i], compute) for i in float_blocked}
  with jax.default_matmul_precision("highest"):
    out, lse, grads = values_and_grads(*(jnp.asarray(x) for x in qkv),
                                       jnp.asarray(scale, compute), whole_f, blocked_f,
                                       jnp.asarray([case.q_offset, case.k_offset], jnp.int32))
  d_q, d_k, d_v, d_scale, d_whole, d_blocked = grads
  named = {"q": d_q, "k": d_k, "v": d_v, "scale": d_scale}
  named.update({f"whole {n}": d_whole[n] for n in float_names})
  named.update({f"blocked {i}": d_blocked[i] for i in float_blocked})
  return out, lse, named


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_values_and_gradients_match_float64_oracles(case):
  qkv, whole, blocked, blocks, allowed, (d_out, d_lse) = problem(case)
  scale = 0.35

  def score_fn(s, m, r, g, q, k):
    del m, g
    return case.score(np, s, r, grids(case)[1], q, k, whole, blocked)

  k_g, v_g = qkv[1][:, :, None], qkv[2][:, :, None]  # one key/value head for the G query heads
  want_out, want_lse = attention_reference(
      qkv[0], k_g, v_g, allowed=allowed, scale=scale, return_lse=True,
      score_fn=None if case.score is None else score_fn)
  d_lse = np.where(np.isfinite(want_lse), d_lse, 0.0)
  with jax.enable_x64(case.dtype != np.float32):  # float32 runs with 64-bit types off
    out, lse, grads = run(case, qkv, whole, blocked, blocks, scale, d_out, d_lse)
  want_grads, scale_terms = torch_oracle(case, qkv, whole, blocked, allowed, scale, d_out, d_lse)

  compute = compute_dtype(case)
  assert out.dtype == jnp.dtype(case.dtype) and lse.dtype == compute
  assert out.shape == want_out.shape and lse.shape == want_lse.shape
  unseen = np.isneginf(want_lse)
  assert unseen.any() == case.empty_query_block
  np.testing.assert_array_equal(np.isneginf(lse), unseen)
  np.testing.assert_array_equal(np.asarray(out)[unseen], 0.0)
  tol = tolerance(case.dtype)
  np.testing.assert_allclose(np.asarray(out, np.float64), want_out, **tol)
  np.testing.assert_allclose(np.where(unseen, 0.0, lse), np.where(unseen, 0.0, want_lse),
                             **tolerance(compute))
  assert sorted(grads) == sorted(want_grads)
  for name, want in want_grads.items():
    got = np.asarray(grads[name], np.float64)
    assert np.isfinite(got).all(), name
    assert np.abs(want).max() > 0, name  # every gradient is really exercised
    # In half precision out is rounded before delta = rowsum(d_out * out) (as torch does): every
    # term of d_scale carries that rounding, and the sum may cancel far below its terms.
    atol = tol["atol"] * (scale_terms if name == "scale" else 1.0)
    np.testing.assert_allclose(got, want.reshape(got.shape), rtol=tol["rtol"], atol=atol,
                               err_msg=f"d {name}")
  if case.empty_query_block:
    rows = np.broadcast_to(unseen[..., None], grads["q"].shape)
    np.testing.assert_array_equal(np.asarray(grads["q"])[rows], 0.0)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_forward_and_gradient_lower_to_the_triton_kernel(case):
  """For CUDA: the forward holds one Triton call, the gradient three (forward, dq, dk/dv)."""
  qkv, whole, blocked, blocks, _, _ = problem(case)
  mods = kernel_mods(case)
  dtype = jnp.dtype(case.dtype)
  args = [jax.ShapeDtypeStruct(x.shape, dtype) for x in qkv] + [
      jax.ShapeDtypeStruct((), compute_dtype(case))]

  def attend(q, k, v, scale):
    return triton.run(block_sparse.Call(q, k, v, blocks, (whole, blocked), scale, mods=mods,
                                        block_q=case.block_q, block_k=case.block_k,
                                        q_offset=case.q_offset, k_offset=case.k_offset),
                      block_sizes=case.sizes)

  def loss(*args):
    out, lse = attend(*args)
    return jnp.sum(out.astype(jnp.float32)) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0))

  with jax.enable_x64(case.dtype == np.float64):
    forward = jax.jit(attend).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    gradient = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3))).trace(*args).lower(
        lowering_platforms=("cuda",)).as_text()
  assert forward.count(TRITON_CALL) == 1
  assert gradient.count(TRITON_CALL) == 3


def test_odd_sizes_make_no_padded_copy_of_the_arrays():
  """G = 3 heads, L = 37, S = 29, E = 80, Ev = 72 (no power of two), and a dense bool mask
  ``(1, 2, 1, L, S)`` as a blocked operand: the tiles are padded, the arrays are not. Lowered
  for CUDA, the gradient program (forward, dq, dk/dv) holds no pad of q, k, v, dO or the mask
  and no slice of out, lse, dq, dk or dv back to size: the kernels read and write them through
  masked loads and stores, and each Triton call takes and gives the true shapes."""
  blocks = block_sparse.causal_key_blocks(37, 29, 16, 16)
  mods = kernel_mods(dataclasses.replace(CASES[1], score=softcap, mask=blocked_mask))
  allowed = np.random.default_rng(5).random((1, 2, 1, 37, 29)) > 0.3
  shapes = {"q": (1, 2, 3, 37, 80), "k": (1, 2, 29, 80), "v": (1, 2, 29, 72)}

  def loss(q, k, v, scale):
    out, lse = triton.run(block_sparse.Call(q, k, v, blocks, ((), (allowed,)), scale, mods=mods,
                                            block_q=16, block_k=16))
    return jnp.sum(out.astype(jnp.float32)) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0))

  args = [jax.ShapeDtypeStruct(shapes[n], jnp.bfloat16) for n in "qkv"] + [
      jax.ShapeDtypeStruct((), jnp.float32)]
  text = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3))).trace(*args).lower(
      lowering_platforms=("cuda",)).as_text()
  assert text.count(TRITON_CALL) == 3
  assert "stablehlo.pad" not in text and "stablehlo.slice" not in text
  calls = [line for line in text.splitlines() if TRITON_CALL in line]
  for shape in ("1x2x3x37x80xbf16", "1x2x29x80xbf16", "1x2x29x72xbf16", "1x2x3x37x72xbf16",
                "1x2x1x37x29xi1"):
    assert any(shape in line for line in calls), shape  # q, k, v, out/dO, mask: true sizes


def test_unsupported_names_what_triton_cannot_do():
  q = jax.ShapeDtypeStruct((1, 2, 3, 37, 16), jnp.float32)
  k = jax.ShapeDtypeStruct((1, 2, 53, 16), jnp.float32)
  none = ((), ())
  causal_mods = kernel_mods(dataclasses.replace(CASES[1], score=None))
  assert triton.unsupported(_probe_call(q, k, k, none, causal_mods, 16, 16)) is None

  reason = triton.unsupported(_probe_call(q, k, k, none, block_sparse.Mods(), 24, 16))
  assert "block_q=24" in reason and "16, 32, 64, 128" in reason
  # block_q=64 covers L
  assert triton.unsupported(_probe_call(q, k, k, none, block_sparse.Mods(), 64, 16)) is None
  wide = jax.ShapeDtypeStruct((1, 2, 3, 37, 300), jnp.float32)
  assert "E=300" in triton.unsupported(_probe_call(wide, wide, k, none, block_sparse.Mods(), 16,
                                                   16))

  def sorted_scores(s, m, r, g, q_pos, k_pos, ops):
    return jnp.sort(s, axis=-1)

  def reads_whole(s, m, r, g, q_pos, k_pos, ops):  # a (3,) leaf loaded whole: not a power of 2
    return s + jnp.sum(ops[0][0])

  assert "sort" in triton.unsupported(_probe_call(q, k, k, none, block_sparse.Mods(sorted_scores),
                                                  16, 16))
  three = ((jnp.zeros(3, jnp.float32),), ())
  assert "power of 2" in triton.unsupported(_probe_call(q, k, k, three,
                                                        block_sparse.Mods(reads_whole), 16, 16))


def test_untileable_sizes_raise_value_errors_naming_the_valid_ones():
  q, k = jnp.zeros((1, 1, 1, 40, 16)), jnp.zeros((1, 1, 40, 16))
  blocks = block_sparse.dense_key_blocks(40, 40, 24, 16)
  with pytest.raises(ValueError, match=r"block_q=24 .* 16, 32, 64, 128"):
    triton.run(block_sparse.Call(q, k, k, blocks, ((), ()), jnp.asarray(1.0),
                                 mods=block_sparse.Mods(), block_q=24, block_k=16))
  with pytest.raises(ValueError, match=r"block_k_dq=48 .* 16, 32, 64, 128"):
    triton.BlockSizes(block_k_dq=48)
  with pytest.raises(ValueError, match=r"num_splits=0 .* positive int"):
    triton.BlockSizes(num_splits=0)


def test_empty_sides_see_nothing():
  q, k = jnp.ones((1, 2, 3, 0, 16)), jnp.ones((1, 2, 5, 16))
  blocks = block_sparse.dense_key_blocks(0, 5, 16, 16)
  out, lse = triton.run(block_sparse.Call(q, k, k[..., :4], blocks, ((), ()), jnp.asarray(1.0),
                                          mods=block_sparse.Mods(), block_q=16, block_k=16))
  assert out.shape == (1, 2, 3, 0, 4) and lse.shape == (1, 2, 3, 0)
  q, k = jnp.ones((1, 2, 3, 7, 16)), jnp.ones((1, 2, 0, 16))
  out, lse = triton.run(block_sparse.Call(q, k, k[..., :4],
                                          block_sparse.dense_key_blocks(7, 0, 16, 16), ((), ()),
                                          jnp.asarray(1.0), mods=block_sparse.Mods(), block_q=16,
                                          block_k=16))
  np.testing.assert_array_equal(out, np.zeros((1, 2, 3, 7, 4)))
  assert np.isneginf(lse).all() and lse.shape == (1, 2, 3, 7)


@pytest.mark.parametrize("lists", [False, True])
def test_key_major_blocks_transpose_the_table(lists):
  rng = np.random.default_rng(3)
  m, n_q, n_k = 2, 3, 5
  state = rng.integers(0, 3, size=(m, n_q, n_k))  # 0 empty, 1 partial, 2 full
  if lists:
    blocks = block_sparse.key_blocks_from_dense(jnp.asarray(state == 1), jnp.asarray(state == 2))
  else:  # ranges: full_num full blocks from 0, then num partial ones
    full_num, num = rng.integers(0, 3, size=(2, m, n_q))
    num = np.minimum(num, n_k - full_num)
    j = np.arange(n_k)
    state = np.where(j < full_num[..., None], 2, np.where(j < (full_num + num)[..., None], 1, 0))
    blocks = block_sparse.KeyBlocks(jnp.asarray(num, jnp.int32), None,
                                    jnp.asarray(full_num, jnp.int32), None)
  by_key = block_sparse.key_major_blocks(blocks, n_k)
  for name, count, listed, kind in (("full", by_key.full_num, by_key.full_indices, 2),
                                    ("partial", by_key.num, by_key.indices, 1)):
    for row, j in np.ndindex(m, n_k):
      got = np.asarray(listed)[row, j, :np.asarray(count)[row, j]]
      np.testing.assert_array_equal(got, np.flatnonzero(state[row, :, j] == kind),
                                    err_msg=f"{name} {row, j}")


def pallas_calls(fn, *args) -> list[Any]:
  """The ``pallas_call`` equations of ``fn``'s jaxpr (at any depth)."""
  found: list[Any] = []

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == "pallas_call":
        found.append(eqn)
      for sub in jax_core.jaxprs_in_params(eqn.params):
        walk(sub)

  walk(jax.make_jaxpr(fn)(*args).jaxpr)
  return found


def kernel_products(fn, *args) -> dict[str, list[Any]]:
  """The ``dot_general`` equations inside each Pallas kernel of ``fn``'s jaxpr, by kernel name."""
  found: dict[str, list[Any]] = {}

  def dots(jaxpr, into):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == "dot_general":
        into.append(eqn)
      for sub in jax_core.jaxprs_in_params(eqn.params):
        dots(sub, into)

  for call in pallas_calls(fn, *args):
    dots(call.params["jaxpr"], found.setdefault(call.params["name"], []))
  return found


def gradient_of_attend(dtype):
  """``(grad fn, args)`` of a causal call of the kernel with ``dtype`` inputs (d = 64)."""
  blocks = block_sparse.causal_key_blocks(200, 200, 64, 64)
  mods = kernel_mods(dataclasses.replace(CASES[1], score=softcap))

  def loss(q, k, v, scale):
    out, lse = triton.run(block_sparse.Call(q, k, v, blocks, ((), ()), scale, mods=mods, block_q=64,
                                            block_k=64))
    return jnp.sum(out.astype(jnp.float32)) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0))

  args = [jax.ShapeDtypeStruct((1, 2, 2, 200, 64), dtype)] + [
      jax.ShapeDtypeStruct((1, 2, 200, 64), dtype)] * 2 + [jax.ShapeDtypeStruct((), jnp.float32)]
  return jax.grad(loss, argnums=(0, 1, 2, 3)), args


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_half_precision_products_take_half_precision_operands(dtype):
  """Every product of the three kernels (QK^T, P@V, dO@V^T, dS@K, dS^T@Q, P^T@dO) multiplies
  ``dtype`` operands into float32, as FlashAttention's: a float32 operand would run as TF32 at
  half the tensor-core rate with twice the registers."""
  grad, args = gradient_of_attend(dtype)
  found = kernel_products(grad, *args)
  # forward: 2; dq: QK^T, dO V^T, dS K; dk/dv: QK^T, dO V^T, dS^T Q, P^T dO; in the loop over
  # full blocks and in the loop over partial ones
  assert {name: len(eqns) for name, eqns in found.items()} == {
      "jmat_block_sparse_forward": 4, "jmat_block_sparse_dq": 6, "jmat_block_sparse_dkv": 8}
  for name, eqns in found.items():
    for eqn in eqns:
      assert [x.aval.dtype for x in eqn.invars] == [jnp.dtype(dtype)] * 2, (name, eqn)
      assert eqn.outvars[0].aval.dtype == jnp.float32, (name, eqn)


@pytest.mark.parametrize("precision", [None, "highest"])
def test_float32_products_follow_the_default_matmul_precision(precision):
  """float32 operands: TF32 under the default precision, full float32 under "highest" (what the
  Triton lowering makes of a ``dot_general``'s precision), as ``jnp.matmul``."""
  grad, args = gradient_of_attend(jnp.float32)
  with jax.default_matmul_precision(precision):
    found = kernel_products(grad, *args)
    matmul = jax.make_jaxpr(jnp.matmul)(jnp.ones((2, 2)), jnp.ones((2, 2))).eqns[0]
  want = matmul.params["precision"]
  assert want == (None if precision is None else (jax.lax.Precision.HIGHEST,) * 2)
  assert sum(len(eqns) for eqns in found.values()) == 18
  for name, eqns in found.items():
    for eqn in eqns:
      assert [x.aval.dtype for x in eqn.invars] == [jnp.dtype(jnp.float32)] * 2, (name, eqn)
      assert eqn.params["precision"] == want, (name, eqn)


def test_default_forward_tiles_are_torchs_h100_flex_defaults():
  """torch's flex forward defaults for sm90 (read from torch's CUDAConfigHeuristic), except half
  precision with head dim 64, which takes 8 warps (4 spill, says the sm90 compile check)."""
  from torch._inductor.template_heuristics.triton import CUDAConfigHeuristic

  torch_h100 = CUDAConfigHeuristic().h100_default_flex_config
  for (dtype, head), want in torch_h100.items():
    if head & (head - 1):  # the kernel pads 192 to 256 and runs 256's tiles
      continue
    got = triton.BlockSizes().launches(head, jnp.dtype(str(dtype).removeprefix("torch.")))
    warps = 8 if (dtype != torch.float32 and head == 64) else want.num_warps
    assert got["forward"] == (want.block_m, want.block_n, warps, want.num_stages), (dtype, head)
  given = triton.BlockSizes(block_q=32, num_warps=2).launches(128, jnp.bfloat16)
  assert given["forward"] == (32, 64, 2, 3) and given["dkv"].num_warps == 2


def test_every_kernel_tells_xla_its_cost():
  """A ``pl.CostEstimate`` on each pallas_call (XLA's scheduler otherwise sees it as free): at
  least the products of the listed blocks (here every block of the causal table is listed at
  most once, and the estimate is the bound with every block listed)."""
  grad, args = gradient_of_attend(jnp.bfloat16)
  calls = pallas_calls(grad, *args)
  assert sorted(c.params["name"] for c in calls) == [
      "jmat_block_sparse_dkv", "jmat_block_sparse_dq", "jmat_block_sparse_forward"]
  pairs = 2 * 2 * 256 * 256  # R * G * padded L * padded S: (4 tiles of 64)^2 blocks
  products = {"jmat_block_sparse_forward": 2, "jmat_block_sparse_dq": 3,
              "jmat_block_sparse_dkv": 4}
  for call in calls:
    cost = call.params["cost_estimate"]
    assert cost.flops == 2 * 64 * pairs * products[call.params["name"]]
    assert cost.transcendentals == pairs
    assert cost.bytes_accessed >= 3 * 2 * 2 * 200 * 64 * 2  # q, k, v read once in bfloat16


def test_decoding_splits_the_keys_across_programs():
  """One query tile per row and few rows: the forward grid splits the key tiles (flash-decoding),
  up to one program per key tile; a long query side gets one program per query tile."""

  def grid(length: int, block_q: int) -> tuple[int, ...]:
    blocks = block_sparse.dense_key_blocks(length, 4096, block_q, 128)

    def forward(q, k, v):
      return triton.run(block_sparse.Call(q, k, v, blocks, ((), ()), jnp.float32(1.0),
                                          mods=block_sparse.Mods(), block_q=block_q, block_k=128))

    k = jax.ShapeDtypeStruct((1, 2, 4096, 128), jnp.bfloat16)
    q = jax.ShapeDtypeStruct((1, 2, 4, length, 128), jnp.bfloat16)
    (call,) = pallas_calls(forward, q, k, k)
    return tuple(call.params["grid_mapping"].grid)

  assert grid(1, 1) == (16, 1, 2)  # 16 splits of 64 key tiles, 2 rows
  assert grid(4096, 128) == (4096 * 4 // 128, 1, 2)  # 4 stacked heads: 32 positions a tile


def tile_kinds(length: int, keys: int, tq: int, tk: int, exact: bool) -> np.ndarray:
  """``(n_q, n_k)`` NEVER/PARTIAL/FULL of torch's top-left causal mask cut into ``tq x tk``
  tiles, from the dense mask: full when every pair of a real query is visible and no key is
  padding (with an attn_mask, ``exact=False``, no tile is full), never when no pair is."""
  n_q, n_k = -(-length // tq), -(-keys // tk)
  visible = np.zeros((n_q * tq, n_k * tk), bool)
  visible[:length, :keys] = np.tril(np.ones((length, keys), bool))
  some = visible.reshape(n_q, tq, n_k, tk).any(axis=(1, 3))
  visible[length:] = True  # padding queries are dropped: they need no mask
  every = visible.reshape(n_q, tq, n_k, tk).all(axis=(1, 3))
  every &= (np.arange(n_k) + 1) * tk <= keys
  full = every if exact else np.zeros_like(every)
  return np.where(full, block_sparse.FULL, np.where(some, block_sparse.PARTIAL, block_sparse.NEVER))


SDPA_SIZES = triton.BlockSizes(block_q=32, block_k=16, block_q_dq=16, block_k_dq=32,
                               block_q_dkv=16, block_k_dkv=16)


@pytest.mark.parametrize("attn_mask", [False, True])
def test_sdpa_causal_tables_list_the_kernels_own_tiles(attn_mask):
  """SDPA's is_causal declares the causal rule on its mask, so every pass walks the causal table
  at its own tile instead of SDPA's 64-blocks cut into tiles: no tile wholly above the diagonal
  is listed, the tiles crossing it are partial, those below full (with an attn_mask, every
  listed tile is partial: the mask applies everywhere). L = 140 > S = 100 (top-left causal)."""
  from jmat._src import attention

  length, keys = 140, 100
  q = jnp.zeros((1, 2, 1, length, 16), jnp.bfloat16)
  k = jnp.zeros((1, 2, keys, 16), jnp.bfloat16)
  allowed = jnp.ones((1, 1, 1, length, keys), jnp.bool_) if attn_mask else None
  call = attention._blockwise(q, k, k, allowed, None, jnp.float32(0.25), True, (64, 64))
  assert (call.block_q, call.block_k) == (64, 64)
  tables = triton.pass_tables(call, block_sizes=SDPA_SIZES)
  assert {kind: tile for kind, (tile, _) in tables.items()} == {
      "forward": (32, 16), "dq": (16, 32), "dkv": (16, 16)}
  for kind, ((tq, tk), blocks) in tables.items():
    n_k = -(-keys // tk)
    got = np.asarray(block_sparse.block_map(blocks, n_k))
    want = tile_kinds(length, keys, tq, tk, exact=not attn_mask)
    np.testing.assert_array_equal(got, np.broadcast_to(want, got.shape), err_msg=kind)
    # 64-blocks cut into these tiles would list tiles wholly above the diagonal
    assert (want == block_sparse.NEVER)[:64 // tq, :64 // tk].any(), kind


@pytest.mark.parametrize("attn_mask", [False, True])
def test_sdpa_causal_on_the_kernels_tiles_matches_float64_oracles(attn_mask):
  """SDPA causal (top-left, L = 37 > S = 29, with and without an attn_mask) on the Triton kernel,
  interpreted, with table blocks of 32 and smaller tiles: values and gradients of q, k, v against
  the numpy float64 oracles."""
  import jmat
  from tests.cases import attention_reference_vjp

  rng = np.random.default_rng(21)
  q = rng.standard_normal((2, 3, 37, 24))
  k, v = rng.standard_normal((2, 3, 29, 24)), rng.standard_normal((2, 3, 29, 8))
  d_out = rng.standard_normal((2, 3, 37, 8))
  mask = rng.random((37, 29)) > 0.2 if attn_mask else None
  options = {"BACKEND": "TRITON", "INTERPRET": True, "BLOCK_M": 16, "BLOCK_N": 16,
             "BLOCK_M1": 16, "BLOCK_N1": 16, "BLOCK_M2": 16, "BLOCK_N2": 16}

  def sdpa(q, k, v):
    return jmat.scaled_dot_product_attention(q, k, v, None if mask is None else jnp.asarray(mask),
                                             is_causal=True, implementation="blockwise",
                                             block_size=32, kernel_options=options)

  with jax.default_matmul_precision("highest"):
    out, vjp = jax.vjp(sdpa, *(jnp.asarray(x) for x in (q, k, v)))
    grads = vjp(jnp.asarray(d_out))
  allowed = mask if mask is not None else None
  want = attention_reference(q, k, v, allowed=allowed, is_causal=True)
  tol = tolerance(np.float64)
  np.testing.assert_allclose(np.asarray(out), want, **tol)
  want_grads = attention_reference_vjp(q, k, v, d_out, allowed=allowed, is_causal=True)
  for name, got, w in zip("qkv", grads, want_grads, strict=False):
    assert np.abs(w).max() > 0, name
    np.testing.assert_allclose(np.asarray(got), w, **tol, err_msg=f"d{name}")


def test_a_shared_key_value_pool_is_read_in_place():
  """K/V with one table row (M = 1: flex's batch broadcast, a paged cache's pool) against two
  rows of queries with different masks: every row reads the one pool (lowered for CUDA, the
  forward holds no copy of k or v per row) and the pool's gradients are the sums over the rows;
  values and gradients against the float64 oracles of the pool repeated per row."""
  case = Case("shared_pool", 2, 2, 2, 21, 29, 16, 8, 16, 16, mask=blocked_mask,
              blocked=lambda rng: (rng.random((2, 1, 1, 21, 29)) > 0.3,))
  qkv, whole, blocked, blocks, allowed, (d_out, d_lse) = problem(case)
  pool = (qkv[0], qkv[1][:1], qkv[2][:1])
  repeated = (qkv[0], *(np.broadcast_to(x, (2,) + x.shape[1:]) for x in pool[1:]))
  scale = 0.35
  want_out, want_lse = attention_reference(repeated[0], repeated[1][:, :, None],
                                           repeated[2][:, :, None], allowed=allowed, scale=scale,
                                           return_lse=True)
  out, lse, grads = run(case, pool, whole, blocked, blocks, scale, d_out, d_lse)
  want_grads, _ = torch_oracle(case, repeated, whole, blocked, allowed, scale, d_out, d_lse)
  tol = tolerance(np.float64)
  np.testing.assert_allclose(np.asarray(out), want_out, **tol)
  np.testing.assert_allclose(np.asarray(lse), want_lse, **tol)
  for name in "qkv":
    want = want_grads[name] if name == "q" else want_grads[name].sum(axis=0, keepdims=True)
    assert grads[name].shape == want.shape, name
    np.testing.assert_allclose(np.asarray(grads[name]), want, **tol, err_msg=f"d {name}")

  def attend(q, k, v):
    return triton.run(block_sparse.Call(q, k, v, blocks, ((), blocked), jnp.float32(scale),
                                        mods=kernel_mods(case), block_q=16, block_k=16))

  args = [jax.ShapeDtypeStruct(x.shape, jnp.bfloat16) for x in pool]
  text = jax.jit(attend).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
  assert text.count(TRITON_CALL) == 1 and "2x2x29x" not in text
  (call,) = [line for line in text.splitlines() if TRITON_CALL in line]
  assert "1x2x29x16xbf16" in call and "1x2x29x8xbf16" in call  # the pool itself
