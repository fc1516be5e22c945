"""The Mosaic (TPU) backend of the block-sparse kernel (jmat._src.kernels.mosaic).

Its three kernels run in Pallas interpret mode on CPU against tests/cases.py's numpy float64
oracle: outputs and logsumexp, and the gradients of q, k, v, the scale, captured float tables
and blocked float operands against central differences of the oracle along random directions
(the directional derivatives ``jax.test_util.check_grads`` takes, here of an independent
function). The mods are written once, for broadcastable ``(m, r, g, q, k)`` index arrays: the
oracle evaluates them on the whole ``(M, R, G, L, S)`` grid, the kernel on its tiles. Mods that
read captured arrays by position (document ids, per-position biases, a user's gather mask) run
with what they read computed outside the kernels. On this CPU-only machine, the TPU lowering
proves the kernels are what runs: the forward pass and the gradient hold their
``tpu_custom_call``, through the public API too, with every value inside them 32-bit.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu
from jax.extend.core import Jaxpr

import jmat
from jmat._src import block_sparse
from jmat._src.kernels import mosaic
from tests.cases import attention_reference, attention_reference_vjp, sum_to_shape, tolerance

RNG = np.random.default_rng(20261130)


class Index(NamedTuple):
  """Broadcastable index arrays of the scores: table row, batch row, head, query, key."""

  m: Any
  r: Any
  g: Any
  q: Any
  k: Any


def kernel_mods(score=None, mask=None) -> block_sparse.Mods:
  """The kernel's mods from rules ``score(s, index, ops)`` and ``mask(index, ops)``."""

  def index(m, r, g, q_pos, k_pos):  # the kernel's (R',), (G',), (bq,), (bk,) vectors
    return Index(m, r[:, None, None, None], g[None, :, None, None], q_pos[:, None],
                 k_pos[None, :])

  return block_sparse.Mods(
      score=None if score is None else (
          lambda s, m, r, g, q_pos, k_pos, ops: score(s, index(m, r, g, q_pos, k_pos), ops)),
      mask=None if mask is None else (
          lambda m, r, g, q_pos, k_pos, ops: mask(index(m, r, g, q_pos, k_pos), ops)))


# --- rules ---------------------------------------------------------------------------------


def causal(idx, ops):
  del ops
  return idx.k <= idx.q


def bottom_right(offset):
  return lambda idx, ops: idx.k <= idx.q + offset


def window(width):
  return lambda idx, ops: (idx.k <= idx.q) & (idx.q - idx.k < width)


def same_document(idx, ops):
  """Causal within documents, per batch row: ``docs[r, q_idx] == docs[r, kv_idx]``."""
  docs = ops[0]["docs"]
  return (docs[idx.r, idx.q] == docs[idx.r, idx.k]) & (idx.k <= idx.q)


def same_shared_document(idx, ops):
  """Causal within documents whose ids every row shares: ``docs[q_idx] == docs[kv_idx]``."""
  docs = ops[0]["docs"]
  return (docs[idx.q] == docs[idx.k]) & (idx.k <= idx.q)


def kept_keys_in_window(idx, ops):
  """A user's gather mask: causal, per-row kept keys ``keep[r, kv_idx]``, and a window whose
  width ``width[q_idx]`` each query reads from a table."""
  keep, width = ops[0]["keep"], ops[0]["width"]
  return keep[idx.r, idx.k] & (idx.k <= idx.q) & (idx.q - idx.k < width[idx.q])


def positional_biases(s, idx, ops):
  """Learnable biases read by position: one per query ``q_bias[q_idx]`` and one per row and key
  ``k_bias[r, kv_idx]`` (their gradients come from the dq and the dk/dv pass)."""
  return s + ops[0]["q_bias"][idx.q] + ops[0]["k_bias"][idx.r, idx.k]


def floor_divided_rows(s, idx, ops):
  """A factor by ``(r - 1) // 2`` (-1, 0, 0 for rows 0, 1, 2): an integer floor division, whose
  jnp form holds an integer sign (rewritten for Mosaic in the kernel)."""
  del ops
  return s * (2 + (idx.r - 1) // 2)


def dense_mask(idx, ops):
  del idx
  return ops[1][0]


def softcap_alibi_biases(s, idx, ops):
  """A temperature, ALiBi slopes per (r, g), three blocked biases, then a tanh softcap."""
  whole, (full_bias, key_bias, query_bias) = ops
  relative = whole["slopes"][idx.r, idx.g] * (idx.k - idx.q)
  s = whole["temp"] * s + relative + full_bias + key_bias + query_bias
  return 4.0 * jnp.tanh(s / 4.0)


# --- block tables --------------------------------------------------------------------------


def block_maps(allowed: np.ndarray, block_q: int, block_k: int):
  """``(full, partial)`` ``(M, n_q, n_k)`` maps of an entry mask ``(M, R|1, G|1, L, S)``.

  Full: every real query row sees every key of the block (so never a block holding padding
  keys); partial: some pair is allowed; the union over the rows and heads of a table row.
  """
  m, r, g, length, keys = allowed.shape
  n_q, n_k = -(-length // block_q), -(-keys // block_k)
  grid = np.zeros((m, r, g, n_q * block_q, n_k * block_k), bool)
  grid[..., :length, :keys] = allowed
  padding_rows = (np.arange(n_q * block_q) >= length)[:, None]
  shape = (m, r, g, n_q, block_q, n_k, block_k)
  full = (grid | padding_rows).reshape(shape).all(axis=(1, 2, 4, 6))
  return full, grid.reshape(shape).any(axis=(1, 2, 4, 6)) & ~full


def tables_from_mask(allowed, block_q, block_k):
  full, partial = block_maps(allowed, block_q, block_k)
  return block_sparse.key_blocks_from_dense(jnp.asarray(partial), jnp.asarray(full)), allowed


def random_tables(allowed, block_q, block_k):
  """Random tables per row (query block 1 of row 0 empty); what the kernel then computes."""
  m, _, _, length, keys = allowed.shape
  n_q, n_k = -(-length // block_q), -(-keys // block_k)
  state = RNG.integers(0, 3, size=(m, n_q, n_k))  # 0 empty, 1 partial, 2 full
  state[0, 1] = 0
  if keys % block_k:  # a block holding padding keys is never full
    state[..., -1] = np.minimum(state[..., -1], 1)
  full, partial = state == 2, state == 1

  def per_entry(x):
    x = np.repeat(np.repeat(x, block_q, axis=1), block_k, axis=2)[:, :length, :keys]
    return x[:, None, None]

  blocks = block_sparse.key_blocks_from_dense(jnp.asarray(partial), jnp.asarray(full))
  return blocks, per_entry(full) | (per_entry(partial) & allowed)


def causal_ranges(allowed, block_q, block_k):
  length, keys = allowed.shape[-2:]
  return block_sparse.causal_key_blocks(length, keys, block_q, block_k), allowed


def causal_ranges_at(q_offset, k_offset):
  """Causal ranges of a ring attention chunk pair: query row 0 at ``q_offset``, key 0 at
  ``k_offset``."""
  def tables(allowed, block_q, block_k):
    length, keys = allowed.shape[-2:]
    return block_sparse.causal_key_blocks(length, keys, block_q, block_k, q_offset=q_offset,
                                          k_offset=k_offset), allowed
  return tables


def dense_ranges(allowed, block_q, block_k):
  length, keys = allowed.shape[-2:]
  return block_sparse.dense_key_blocks(length, keys, block_q, block_k), allowed


# --- cases ---------------------------------------------------------------------------------


# The kernels walk the tables' own blocks (no coarsening): the cases' small blocks make walks of
# several steps at small lengths.
FINE = mosaic.Tiling(largest_q=0, largest_k=0)


@dataclasses.dataclass(frozen=True)
class Case:
  """One attention problem: sizes, block tables, rules and their operands, tiling, offsets."""

  shape: tuple[int, int, int, int, int, int, int]  # M, R, G, L, S, E, Ev
  block_q: int
  block_k: int
  tables: Callable
  mask: Callable | None = None
  score: Callable | None = None
  whole: Callable[..., dict] = lambda *shape: {}
  blocked: Callable[..., tuple] = lambda *shape: ()
  dtype: Any = np.float64
  tiling: mosaic.Tiling = FINE
  offsets: tuple[int, int] = (0, 0)  # the positions of query row 0 and key row 0


def documents(m, r, g, length, keys):
  del m, g, keys
  return {"docs": np.sort(RNG.integers(0, 4, size=(r, length)), axis=1).astype(np.int32)}


def shared_documents(m, r, g, length, keys):
  del m, r, g, keys
  return {"docs": np.sort(RNG.integers(0, 5, size=length))}  # int64: the kernel's are 32-bit


def biases_and_kept_keys(m, r, g, length, keys):
  del m, g
  return {"q_bias": RNG.standard_normal(length), "k_bias": RNG.standard_normal((r, keys)),
          "keep": RNG.random((r, keys)) > 0.2, "width": RNG.integers(3, 30, size=length)}


def random_bool_mask(m, r, g, length, keys):
  del g
  allowed = RNG.random((m, r, 1, length, keys)) > 0.4
  allowed[1, 0, 0, 5] = False  # a query row that sees nothing in a listed block
  return (allowed,)


def alibi_and_temperature(m, r, g, length, keys):
  del m, length, keys
  return {"slopes": RNG.standard_normal((r, g)) * 0.1, "temp": np.asarray(0.8)}


def three_biases(m, r, g, length, keys):
  del m
  return (RNG.standard_normal((1, r, 1, length, keys)), RNG.standard_normal((1, 1, g, 1, keys)),
          RNG.standard_normal((1, r, g, length, 1)))


CASES = {
    "no_mask": Case((1, 2, 1, 37, 261, 16, 24), 16, 128, dense_ranges),
    "causal_gqa_float32": Case((1, 1, 3, 150, 150, 24, 16), 32, 128, causal_ranges,
                               mask=causal, dtype=np.float32),
    "causal_gqa_bfloat16": Case((1, 1, 3, 150, 150, 24, 16), 32, 128, causal_ranges,
                                mask=causal, dtype=jnp.bfloat16),
    "causal_gqa_float16": Case((1, 1, 3, 150, 150, 24, 16), 32, 128, causal_ranges,
                               mask=causal, dtype=np.float16),
    "bottom_right_causal": Case((1, 2, 2, 37, 261, 16, 16), 8, 128, tables_from_mask,
                                mask=bottom_right(261 - 37)),
    "sliding_window": Case((1, 1, 2, 190, 190, 16, 16), 40, 128, tables_from_mask,
                           mask=window(70)),
    "documents_per_row": Case((1, 2, 1, 150, 150, 16, 24), 24, 128, tables_from_mask,
                              mask=same_document, whole=documents),
    "documents_shared_float32": Case((2, 1, 2, 150, 150, 16, 16), 16, 128, tables_from_mask,
                                     mask=same_shared_document, whole=shared_documents,
                                     dtype=np.float32),
    "positional_gathers": Case((1, 2, 2, 37, 261, 16, 16), 16, 128, random_tables,
                               mask=kept_keys_in_window, score=positional_biases,
                               whole=biases_and_kept_keys, dtype=np.float32),
    "dense_mask_two_tables": Case((2, 2, 2, 37, 261, 16, 16), 16, 128, random_tables,
                                  mask=dense_mask, blocked=random_bool_mask),
    "softcap_alibi_biases": Case((2, 2, 2, 37, 261, 16, 24), 16, 128, random_tables,
                                 score=softcap_alibi_biases, whole=alibi_and_temperature,
                                 blocked=three_biases),
    "decode": Case((1, 2, 4, 1, 261, 16, 16), 1, 128, dense_ranges),
    # Decoding with one program per call: the forward splits the key list in two (flash-decoding,
    # one share per TensorCore) and merges the shares by their lse; a forced split in three of
    # uneven shares (8 key blocks: 3, 3, 2) in half precision, with a score mod and gathers.
    "decode_key_split": Case((1, 1, 4, 3, 700, 16, 16), 8, 128, tables_from_mask,
                             mask=kept_keys_in_window, score=positional_biases,
                             whole=biases_and_kept_keys, dtype=np.float32),
    "decode_three_key_splits_bfloat16": Case(
        (2, 1, 2, 5, 1000, 16, 24), 8, 128, tables_from_mask, mask=bottom_right(1000 - 5),
        score=softcap_alibi_biases, whole=alibi_and_temperature, blocked=three_biases,
        dtype=jnp.bfloat16,
        tiling=mosaic.Tiling(largest_q=0, largest_k=0, key_splits=3)),
    "floor_divided_rows": Case((1, 3, 1, 37, 130, 16, 16), 16, 128, dense_ranges,
                               score=floor_divided_rows),
    # Ring attention's chunk pairs: positions shifted by the chunks' offsets (traced int32).
    "causal_chunk_pair_offsets": Case((1, 1, 2, 64, 150, 16, 16), 16, 128,
                                      causal_ranges_at(200, 100), mask=causal,
                                      offsets=(200, 100)),
    "window_chunk_pair_offsets": Case((1, 2, 1, 96, 261, 16, 16), 16, 128, tables_from_mask,
                                      mask=window(150), offsets=(300, 100)),
    "softcap_alibi_offsets": Case((1, 2, 2, 37, 261, 16, 24), 16, 128, random_tables,
                                  score=softcap_alibi_biases, whole=alibi_and_temperature,
                                  blocked=three_biases, offsets=(40, 7)),
    # Tables coarsened to larger tiles (blocks of 48 x 256 of 16 x 128 ones), and a query tile cut
    # below the table's block (G x 8 rows: 3 heads x 32 rows would pass the score-tile cap).
    "coarsened_tables": Case((1, 2, 1, 150, 261, 16, 24), 16, 128, tables_from_mask,
                             mask=bottom_right(261 - 150 - 60), score=positional_biases,
                             whole=biases_and_kept_keys,
                             tiling=mosaic.Tiling(largest_q=48, largest_k=256)),
    "query_tiles_below_the_block": Case((1, 1, 3, 150, 150, 24, 16), 32, 128, random_tables,
                                        mask=causal, score=positional_biases,
                                        whole=biases_and_kept_keys,
                                        tiling=mosaic.Tiling(largest_q=0, largest_k=0,
                                                             score_elements=3 * 8 * 128)),
}


# --- oracle and kernel ---------------------------------------------------------------------


class Problem(NamedTuple):
  """A case's arrays: the float inputs by name (differentiated) and the fixed ones."""

  floats: dict[str, np.ndarray]
  whole_ints: dict[str, np.ndarray]
  blocked: tuple  # None where the blocked operand is float (it is in floats then)


def make_problem(case: Case) -> Problem:
  m, r, g, length, keys, e, ev = case.shape
  floats = {"q": RNG.standard_normal((m, r, g, length, e)),
            "k": RNG.standard_normal((m, r, keys, e)),
            "v": RNG.standard_normal((m, r, keys, ev)), "scale": np.asarray(0.35)}
  floats = {name: np.asarray(x.astype(case.dtype), np.float64) for name, x in floats.items()}
  whole = case.whole(m, r, g, length, keys)
  blocked = case.blocked(m, r, g, length, keys)
  floats.update({f"whole {n}": x for n, x in whole.items() if x.dtype.kind == "f"})
  floats.update({f"blocked {n}": x for n, x in enumerate(blocked) if x.dtype.kind == "f"})
  return Problem(floats, {n: x for n, x in whole.items() if x.dtype.kind != "f"},
                 tuple(None if x.dtype.kind == "f" else x for x in blocked))


def operands(problem: Problem, floats: dict) -> block_sparse.Operands:
  whole = dict(problem.whole_ints)
  whole.update({n.split(" ")[1]: x for n, x in floats.items() if n.startswith("whole ")})
  blocked = tuple(floats[f"blocked {n}"] if x is None else x
                  for n, x in enumerate(problem.blocked))
  return whole, blocked


def positions(case: Case, m, r, g, q, k) -> Index:
  """The index arrays the rules see: query and key rows shifted by the case's offsets."""
  return Index(m, r, g, q + case.offsets[0], k + case.offsets[1])


def entry_mask(case: Case, problem: Problem) -> np.ndarray:
  """The case's mask rule over the ``(M, 1|R, 1|G, L, S)`` grid (all True without one)."""
  m, r, g, length, keys, _, _ = case.shape
  if case.mask is None:
    return np.ones((m, 1, 1, length, keys), bool)
  allowed = np.asarray(case.mask(positions(case, *np.ix_(*(np.arange(n) for n in (
      m, r, g, length, keys)))), operands(problem, problem.floats)))
  return np.broadcast_to(allowed, np.broadcast_shapes(allowed.shape, (m, 1, 1, length, keys)))


def oracle(case: Case, problem: Problem, allowed: np.ndarray, floats: dict):
  """``(out, lse)`` of the numpy float64 oracle; ``allowed`` is what the tables let through."""
  ops = operands(problem, floats)
  score_fn = None
  if case.score is not None:
    def score_fn(s, *index):
      return np.asarray(case.score(s, positions(case, *index), ops))
  k, v = floats["k"][:, :, None], floats["v"][:, :, None]  # one key/value head for G queries
  return attention_reference(floats["q"], k, v, allowed=allowed, score_fn=score_fn,
                             scale=float(floats["scale"]), return_lse=True)


def loss(out, lse, d_out, d_lse) -> float:
  return float(np.sum(d_out * out) + np.sum(d_lse * np.where(np.isfinite(lse), lse, 0.0)))


def kernel_values_and_grads(case: Case, problem: Problem, blocks, d_out, d_lse,
                            interpret: mosaic.Interpret = True):
  mods = kernel_mods(case.score, case.mask)
  names = list(problem.floats)

  @jax.jit
  def values_and_grads(offsets, *arrays):  # traced offsets, as ring attention's
    def attend(*arrays):
      floats = dict(zip(names, arrays, strict=True))
      return mosaic.run(block_sparse.Call(floats["q"], floats["k"], floats["v"], blocks,
                                          operands(problem, floats), floats["scale"], mods=mods,
                                          block_q=case.block_q, block_k=case.block_k,
                                          q_offset=offsets[0], k_offset=offsets[1]),
                        interpret=interpret, tiling=case.tiling)

    (out, lse), vjp = jax.vjp(attend, *arrays)
    return out, lse, vjp((d_out.astype(out.dtype), d_lse.astype(lse.dtype)))

  dtype = case.dtype
  arrays = [jnp.asarray(x, dtype if n in ("q", "k", "v") else np.float64)
            for n, x in problem.floats.items()]
  with jax.default_matmul_precision("highest"):
    out, lse, grads = values_and_grads(jnp.asarray(case.offsets, jnp.int32), *arrays)
  return out, lse, dict(zip(names, grads, strict=True))


# Every case in the HLO interpreter; the richest also in the TPU interpreter, which copies blocks
# in and out as the grid moves (as the TPU does), fills fresh buffers with NaN and refuses an
# output block revisited after the grid left it.
RUNS = [(name, True) for name in CASES] + [("softcap_alibi_biases", pltpu.InterpretParams())]


@pytest.mark.parametrize("name, interpret", RUNS, ids=[
    name + ("" if how is True else "-tpu_interpreter") for name, how in RUNS])
def test_attend_matches_the_oracle_and_its_finite_differences(name, interpret):
  case = CASES[name]
  problem = make_problem(case)
  blocks, allowed = case.tables(entry_mask(case, problem), case.block_q, case.block_k)
  want_out, want_lse = oracle(case, problem, allowed, problem.floats)
  d_out = np.asarray(RNG.standard_normal(want_out.shape).astype(case.dtype), np.float64)
  d_lse = np.where(np.isfinite(want_lse), RNG.standard_normal(want_lse.shape), 0.0)
  out, lse, grads = kernel_values_and_grads(case, problem, blocks, d_out, d_lse, interpret)

  assert out.dtype == case.dtype and out.shape == want_out.shape
  assert lse.dtype == (np.float64 if case.dtype == np.float64 else np.float32)
  tol = tolerance(case.dtype)
  np.testing.assert_allclose(np.asarray(out, np.float64), want_out, **tol)
  np.testing.assert_allclose(lse, want_lse, **tol)
  unseen = np.isneginf(want_lse)  # queries that may see no key: out 0, lse -inf, no gradient
  if name == "dense_mask_two_tables":
    assert unseen.any()
  assert np.all(np.asarray(out)[unseen] == 0) and np.all(np.isneginf(np.asarray(lse)[unseen]))
  assert np.all(np.asarray(grads["q"])[unseen] == 0)

  step = 1e-5
  for n, (input_name, x) in enumerate(problem.floats.items()):
    direction = np.random.default_rng(n).standard_normal(x.shape)
    ends = [loss(*oracle(case, problem, allowed, {**problem.floats, input_name: x + sign * step *
                                                   direction}), d_out, d_lse)
            for sign in (1, -1, 2, -2)]
    # Fourth-order central differences: a slope times a distance of 260 keys curves the loss
    # enough for the second-order ones to be off by more than float64's tolerance.
    want = (8 * (ends[0] - ends[1]) - (ends[2] - ends[3])) / (12 * step)
    grad = np.asarray(grads[input_name], np.float64)
    assert grad.shape == x.shape and np.isfinite(grad).all(), input_name
    assert abs(want) > 1e-3, input_name  # the case does exercise this input
    # Each term of the sum may be off by the dtype's relative error: bound by their magnitudes.
    magnitude = np.sum(np.abs(grad * direction))
    np.testing.assert_allclose(np.sum(grad * direction), want, rtol=0,
                               atol=max(tol["rtol"], 1e-7) * magnitude, err_msg=input_name)


# --- the TPU lowering, unsupported mods, block sizes ----------------------------------------


def softcap_temperature_bias(s, idx, ops):
  """Mods Mosaic lowers: a whole scalar, a blocked bias, a tanh softcap."""
  del idx
  whole, (bias,) = ops
  return 4.0 * jnp.tanh((whole["temp"] * s + bias) / 4.0)


def alibi_gather(s, idx, ops):
  """ALiBi slopes read from a whole table by row and head: read from outside the kernel."""
  return s + ops[0]["slopes"][idx.r, idx.g] * (idx.k - idx.q)


def relative_table(s, idx, ops):
  """A relative-position table read at ``kv_idx - q_idx``: a gather depending on both sides."""
  return s + ops[0]["table"][idx.g, idx.k - idx.q + L - 1]


M, R, G, L, S, E, EV = 1, 2, 2, 37, 261, 16, 24


def _probe_call(q, k, v, operands, mods, block_q, block_k) -> block_sparse.Call:
  """The call ``unsupported`` judges: arrays or shapes, operands, mods and blocks (it reads
  neither the table nor the scale, so they are left out)."""
  return block_sparse.Call(q, k, v, None, operands, None, mods=mods,
                           block_q=block_q, block_k=block_k)


def abstract(dtype=jnp.bfloat16, whole="temp"):
  """Shapes of q, k, v and operands for the TPU lowering: a scalar and a blocked bias, or ALiBi
  slopes, or a relative-position table."""
  f32 = jnp.float32
  shapes = {"temp": (), "slopes": (R, G), "table": (G, L + S - 1)}
  blocked = (jax.ShapeDtypeStruct((1, R, 1, L, S), f32),) if whole == "temp" else ()
  return (jax.ShapeDtypeStruct((M, R, G, L, E), dtype), jax.ShapeDtypeStruct((M, R, S, E), dtype),
          jax.ShapeDtypeStruct((M, R, S, EV), dtype),
          ({whole: jax.ShapeDtypeStruct(shapes[whole], f32)}, blocked))


@pytest.mark.parametrize("gradient", [False, True])
def test_lowers_to_the_tpu_kernels(gradient):
  """One tpu_custom_call forward; the gradient adds the dq and the dk/dv kernels."""
  mods = kernel_mods(softcap_temperature_bias, causal)
  blocks = block_sparse.causal_key_blocks(L, S, 16, 128)

  def forward(q, k, v, ops, scale):
    return mosaic.run(block_sparse.Call(q, k, v, blocks, ops, scale, mods=mods, block_q=16,
                                        block_k=128))

  def gradients(*args):
    def loss(*args):
      out, lse = forward(*args)
      return jnp.sum(out.astype(jnp.float32)) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0))

    return jax.grad(loss, argnums=(0, 1, 2, 3, 4))(*args)

  args = (*abstract(), jax.ShapeDtypeStruct((), jnp.float32))
  text = jax.jit(gradients if gradient else forward).trace(*args).lower(
      lowering_platforms=("tpu",)).as_text()
  assert text.count("tpu_custom_call") == (3 if gradient else 1)
  names = ("fwd", "dq", "dkv") if gradient else ("fwd",)
  assert all(f"jmat_block_sparse_{name}" in text for name in names)


@pytest.mark.parametrize("score, whole", [(softcap_temperature_bias, "temp"),
                                          (alibi_gather, "slopes")])
def test_unsupported_accepts_mods_mosaic_lowers(score, whole):
  q, k, v, ops = abstract(whole=whole)
  mods = kernel_mods(score, causal)
  assert mosaic.unsupported(_probe_call(q, k, v, ops, mods, 16, 128)) is None


@pytest.mark.parametrize("problem, expected", [
    ("gather", "score_mod gathers from an array of shape (2, 297) by an index that "
               "depends on both the query and the key position"),
    ("float64", "float64"), ("block_q", "block_q=12 does not tile 37"),
    ("block_k", "block_k=100 does not tile 261")])
def test_unsupported_says_why(problem, expected):
  q, k, v, ops = abstract(jnp.float64 if problem == "float64" else jnp.bfloat16,
                          whole="table" if problem == "gather" else "temp")
  mods = kernel_mods(relative_table if problem == "gather" else softcap_temperature_bias)
  block_q, block_k = {"block_q": (12, 128), "block_k": (16, 100)}.get(problem, (16, 128))
  reason = mosaic.unsupported(_probe_call(q, k, v, ops, mods, block_q, block_k))
  assert reason is not None and expected in reason, reason


@pytest.mark.parametrize("block_q, block_k, valid", [
    (12, 128, "multiple of 8, i.e. 8, 16, 24, ..., or any size >= 37"),
    (16, 100, "multiple of 128, i.e. 128, 256, 384, ..., or any size >= 261")])
def test_block_sizes_the_tpu_cannot_tile_raise_naming_the_valid_ones(block_q, block_k, valid):
  q, k, v = np.zeros((M, R, G, L, E)), np.zeros((M, R, S, E)), np.zeros((M, R, S, EV))
  blocks = block_sparse.dense_key_blocks(L, S, block_q, block_k)
  with pytest.raises(ValueError, match=re.escape(valid)):
    mosaic.run(block_sparse.Call(q, k, v, blocks, ((), ()), jnp.asarray(1.0),
                                 mods=block_sparse.Mods(), block_q=block_q, block_k=block_k),
               interpret=True)


# --- tables, grids and memory limits ---------------------------------------------------------


def _pallas_calls(fn, *args) -> list:
  return [eqn for eqn in _kernel_eqns(jax.make_jaxpr(fn)(*args).jaxpr)
          if eqn.primitive.name == "pallas_call"]


def _window_tables(length: int, block: int, width: int) -> block_sparse.KeyBlocks:
  allowed = window(width)(Index(0, 0, 0, np.arange(length)[:, None], np.arange(length)), None)
  return tables_from_mask(np.asarray(allowed)[None, None, None], block, block)[0]


@pytest.mark.parametrize("tiling, steps, dtype", [
    (FINE, (3, 3), np.int8),  # 2048 / 128 = 16 blocks: a window of 200 lists 2 or 3 per block
    (mosaic.Tiling(), (2, 2), np.int8)])  # coarsened to 512: 4 blocks, 2 listed per block
def test_a_known_table_shrinks_the_grid_to_its_longest_list_in_narrow_integers(
    tiling, steps, dtype):
  """A window walks the blocks it lists, not every key block (splash's shrunk grid), from int8
  tables; the forward and dq grids per query block, the dk/dv grid per key block."""
  length = 2048
  blocks = _window_tables(length, 128, 200)
  q = jax.ShapeDtypeStruct((1, 2, 1, length, 128), jnp.bfloat16)
  kv = jax.ShapeDtypeStruct((1, 2, length, 128), jnp.bfloat16)

  def loss(q, k, v):
    out, _ = mosaic.run(block_sparse.Call(q, k, v, blocks, ((), ()), jnp.float32(0.1),
                                          mods=kernel_mods(mask=window(200)), block_q=128,
                                          block_k=128), tiling=tiling)
    return out.astype(jnp.float32).sum()

  calls = _pallas_calls(jax.grad(loss, argnums=(0, 1, 2)), q, kv, kv)
  assert len(calls) == 3
  for call, walked in zip(calls, (steps[0], steps[0], steps[1]), strict=True):
    mapping = call.params["grid_mapping"]
    assert mapping.grid[-1] == walked, mapping.grid
    tables = call.invars[:mapping.num_index_operands]
    assert [x.aval.dtype for x in tables[:3]] == [dtype] * 3


def test_a_traced_table_walks_every_key_block():
  length = 1024
  q = jax.ShapeDtypeStruct((1, 1, 1, length, 128), jnp.bfloat16)
  kv = jax.ShapeDtypeStruct((1, 1, length, 128), jnp.bfloat16)

  def forward(q, k, v, blocks):
    return mosaic.run(block_sparse.Call(q, k, v, blocks, ((), ()), jnp.float32(0.1),
                                        mods=kernel_mods(mask=window(200)), block_q=128,
                                        block_k=128), tiling=FINE)

  blocks = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                        _window_tables(length, 128, 200))
  (call,) = _pallas_calls(forward, q, kv, kv, blocks)
  assert call.params["grid_mapping"].grid[-1] == length // 128


@pytest.mark.parametrize("heads", [16, 64])
def test_query_rows_per_program_are_capped_and_the_vmem_limit_set(heads):
  """SDPA's 512-blocks with 16 or 64 query heads per key/value head: the query tile is cut so
  that a program's rows times keys stay within the cap, and the kernels compile with an
  explicit VMEM limit where the default would not do."""
  length, tiling = 2048, mosaic.Tiling()
  q = jax.ShapeDtypeStruct((1, 1, heads, length, 128), jnp.bfloat16)
  kv = jax.ShapeDtypeStruct((1, 1, length, 128), jnp.bfloat16)
  blocks = block_sparse.causal_key_blocks(length, length, 512, 512)

  def forward(q, k, v):
    return mosaic.run(block_sparse.Call(q, k, v, blocks, ((), ()), jnp.float32(0.1),
                                        mods=kernel_mods(mask=causal), block_q=512, block_k=512))

  (call,) = _pallas_calls(forward, q, kv, kv)
  rows = next(aval.shape[-2] for aval in (v.aval for v in call.outvars) if aval.ndim == 5)
  assert rows * 512 <= tiling.score_elements and rows % heads == 0
  params = call.params["compiler_params"]
  params = params.get("mosaic_tpu", params) if isinstance(params, dict) else params
  assert params.vmem_limit_bytes == tiling.vmem_bytes  # the estimate passes v5e's 16 MiB
  assert call.params["cost_estimate"].flops > 0


@pytest.mark.parametrize("tiling, message", [
    (mosaic.Tiling(vmem_bytes=2**20),
     re.escape("a program of 8 query heads x 8 query rows by 128 keys (head dims 128, 128) needs "
               "about ") + r"[0-9.]+" + re.escape(
                   " MiB of VMEM, more than the limit of 1 MiB (use a smaller BLOCK_SIZE for the "
                   "keys, or fewer query heads per key/value head)")),
    # One block (1 x 1 int8 index, two int8 counts) is the smallest table there is.
    (mosaic.Tiling(largest_q=0, largest_k=0, table_bytes=2),
     re.escape("the block tables of 1 masks of 1 x 1 blocks need 3 bytes of scalar memory, more "
               "than the limit of 2 (use a larger BLOCK_SIZE"))])
def test_a_call_that_cannot_fit_a_tpu_core_is_refused_naming_the_limit_and_the_fix(tiling,
                                                                                   message):
  q, k, v = np.zeros((1, 1, 8, 16, 128)), np.zeros((1, 1, 128, 128)), np.zeros((1, 1, 128, 128))
  blocks = block_sparse.dense_key_blocks(16, 128, 16, 128)
  with pytest.raises(ValueError, match=message):
    mosaic.run(block_sparse.Call(q.astype(np.float32), k.astype(np.float32), v.astype(np.float32),
                                 blocks, ((), ()), jnp.asarray(1.0), mods=block_sparse.Mods(),
                                 block_q=16, block_k=128), interpret=True, tiling=tiling)


def test_unsupported_says_why_a_call_cannot_fit_vmem():
  """1024 query heads per key/value head: 8 rows each are 8192 rows, past the VMEM limit; AUTO
  then runs XLA with the reason instead of an XLA resource error at compile time."""
  q = jax.ShapeDtypeStruct((1, 1, 1024, 8, 128), jnp.bfloat16)
  kv = jax.ShapeDtypeStruct((1, 1, 128, 128), jnp.bfloat16)
  reason = mosaic.unsupported(_probe_call(q, kv, kv, ((), ()), block_sparse.Mods(), 8, 128))
  assert reason is not None and "a program of 1024 query heads x 8 query rows by 128 keys" in reason
  assert "more than the limit of 32 MiB" in reason and "fewer query heads" in reason


# --- documents through the public API ------------------------------------------------------

DOC_IDS = np.repeat(np.arange(4), [60, 1, 100, 95]).astype(np.int32)  # four documents, L = 256


def _kernel_eqns(jaxpr):
  """Every equation of ``jaxpr`` and its sub-jaxprs, the Pallas kernels' bodies and a cond's
  branches included (a backend asked for by name sits in the branch of its platform)."""
  for eqn in jaxpr.eqns:
    yield eqn
    for param in eqn.params.values():
      for inner in param if isinstance(param, tuple | list) else (param,):
        inner = getattr(inner, "jaxpr", inner)
        if isinstance(inner, Jaxpr):
          yield from _kernel_eqns(inner)


@pytest.mark.parametrize("per_batch", [False, True], ids=["shared_ids", "per_batch_ids"])
def test_flex_documents_lower_to_the_tpu_kernels_reading_o_l_ids_in_32_bits(per_batch):
  """The documents mask runs in the Mosaic kernels by default on TPU (forward and gradient),
  its ids read as O(L) tiles (never an L x S mask), every value in the kernels 32-bit although
  jax_enable_x64 is on (the document starts jmat.mods computes are int64)."""
  length, batch = 256, 2
  if per_batch:  # a user's mask_mod reading per-batch ids
    ids = jnp.asarray(np.stack([DOC_IDS, np.sort(DOC_IDS[::-1] % 3)]))

    def mask_mod(b, h, q_idx, kv_idx):
      return (ids[b, q_idx] == ids[b, kv_idx]) & (kv_idx <= q_idx)
  else:
    mask_mod = jmat.mods.generate_doc_mask_mod(jmat.mods.causal_mask, jnp.asarray(DOC_IDS))
  block_mask = jmat.create_block_mask(mask_mod, batch if per_batch else None, None, length,
                                      length)
  q = jax.ShapeDtypeStruct((batch, 4, length, 64), jnp.float32)
  kv = jax.ShapeDtypeStruct((batch, 2, length, 64), jnp.float32)

  def gradient(options=None):
    def loss(q, k, v):
      return jmat.flex_attention(q, k, v, block_mask=block_mask, enable_gqa=True,
                                 kernel_options=options).sum()

    return jax.grad(loss, argnums=(0, 1, 2))

  def forward(q, k, v):
    return jmat.flex_attention(q, k, v, block_mask=block_mask, enable_gqa=True)

  choice = jmat.attention.flex_attention_backend(q, kv, kv, block_mask=block_mask,
                                                 enable_gqa=True, platform="tpu")
  assert choice.backend == "MOSAIC", choice.reason
  for fn, kernels in [(forward, 1), (gradient(), 3)]:
    with jmat.attention.kernel_platforms("tpu"):
      text = jax.jit(fn).trace(q, kv, kv).lower(lowering_platforms=("tpu",)).as_text()
    assert text.count("tpu_custom_call") == kernels
  calls = _pallas_calls(gradient({"BACKEND": "MOSAIC"}), q, kv, kv)
  assert len(calls) == 3
  for call in calls:
    for operand in call.invars:  # ids and document starts per batch row and head, step tables
      if not jnp.issubdtype(operand.aval.dtype, jnp.floating):
        assert operand.aval.size <= batch * 4 * length, operand.aval  # L x S would be 65536
    inside = [v.aval for eqn in _kernel_eqns(call.params["jaxpr"])
              for v in (*eqn.invars, *eqn.outvars) if hasattr(v.aval, "dtype")]
    inside += [v.aval for v in call.params["jaxpr"].invars]
    # Python-number literals (weak-typed scalars, float64 under x64) are cast where they are
    # used: no 64-bit value is computed in the kernels.
    inside = [a for a in inside if not (getattr(a, "weak_type", False) and a.shape == ())]
    assert all(getattr(a, "inner_aval", a).dtype.itemsize <= 4 for a in inside)


def test_a_relative_position_table_falls_back_to_xla_on_tpu_with_the_reason():
  q = jax.ShapeDtypeStruct((1, 4, 256, 64), jnp.float32)
  bias = jmat.mods.generate_relative_bias(jnp.zeros((4, 2 * 256 - 1), jnp.float32))
  choice = jmat.attention.flex_attention_backend(q, q, q, bias, platform="tpu")
  assert choice.backend == "XLA"
  assert ("score_mod gathers from an array of shape (4, 511) by an index that depends "
          "on both the query and the key position") in choice.reason


# --- the shrunk grid through the public API (a BlockMask as a jit argument) -------------------


def _rounded_up(count: int, n: int) -> int:
  """The list bound a BlockMask records: the first of 1, 2, 3, 4, 6, 8, 12, ... at least
  ``count`` (masks differing a little share a compiled kernel), at most ``n`` blocks."""
  steps = sorted({1, 2} | {m * 2**e for m in (2, 3) for e in range(20)})
  return min(next(x for x in steps if x >= count), n)


def _window_lists(length: int, width: int, block: int) -> tuple[int, int]:
  """The longest lists of blocks of ``block`` a causal window of ``width + 1`` keys lists (per
  query block, per key block), from the positions: block ``(i, j)`` is listed when some
  ``q - kv`` of it, ``block * (i - j) - block + 1 .. block * (i - j) + block - 1``, lies in
  ``0 .. width``."""
  n = -(-length // block)
  i, j = np.ix_(np.arange(n), np.arange(n))
  listed = (block * (i - j) + block - 1 >= 0) & (block * (i - j) - block + 1 <= width)
  return int(listed.sum(axis=1).max()), int(listed.sum(axis=0).max())


def test_a_block_mask_argument_shrinks_the_tpu_grid_to_its_longest_list():
  """flex with a BlockMask passed to the jitted function (its tables traced): the grid walks
  the longest list the mask recorded when built, not every key block. A window of 1024 at
  L = 8192, tiled by 512 (the kernel coarsens the mask's 128-blocks): 3 key steps per query
  block, not 16; the dk/dv grid as many query steps per key block."""
  length, width, tile = 8192, 1024, 512
  with jmat.attention.kernel_platforms("tpu"):  # a mask records its bounds for a TPU program
    mask = jmat.create_block_mask(jmat.mods.generate_sliding_window(width), None, None, length,
                                  length)
  q = jax.ShapeDtypeStruct((1, 2, length, 128), jnp.bfloat16)

  def loss(q, k, v, block_mask):
    out = jmat.flex_attention(q, k, v, block_mask=block_mask, kernel_options={"BACKEND": "MOSAIC"})
    return out.astype(jnp.float32).sum()

  grad = jax.grad(loss, argnums=(0, 1, 2))
  calls = _pallas_calls(grad, q, q, q, mask)
  per_query, per_key = _window_lists(length, width, tile)
  n = length // tile
  assert [c.params["grid_mapping"].grid[-1] for c in calls] == [
      _rounded_up(per_query, n), _rounded_up(per_query, n), _rounded_up(per_key, n)]
  assert max(c.params["grid_mapping"].grid[-1] for c in calls) < n
  with jmat.attention.kernel_platforms("tpu"):
    text = jax.jit(grad).trace(q, q, q, mask).lower(lowering_platforms=("tpu",)).as_text()
  assert text.count("tpu_custom_call") == 3


@pytest.mark.parametrize("traced", [False, True], ids=["built_outside", "built_under_jit"])
def test_flex_on_a_shrunk_grid_matches_the_oracle(traced):
  """The values and gradients of flex over a window on the shrunk grid (4 key tiles of 512, 2
  walked) equal the float64 oracle's in interpret mode; a mask built under jit (its tables
  traced when built: no bound) walks every key tile and gives them too."""
  length, width, heads, dim = 2048, 200, 1, 32
  mask_mod = jmat.mods.generate_sliding_window(width)
  q, k, v, d_out = (RNG.standard_normal((1, heads, length, dim)).astype(np.float32)
                    for _ in range(4))

  def loss(q, k, v):
    mask = jmat.create_block_mask(mask_mod, None, None, length, length) if traced else outside
    out = jmat.flex_attention(q, k, v, block_mask=mask,
                              kernel_options={"BACKEND": "MOSAIC", "INTERPRET": True})
    return jnp.sum(out * d_out), out

  with jmat.attention.kernel_platforms("tpu"):  # a mask records its bounds for a TPU program
    outside = None if traced else jmat.create_block_mask(mask_mod, None, None, length, length)
  fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))
  steps = {c.params["grid_mapping"].grid[-1] for c in _pallas_calls(fn, q, k, v)}
  n = length // 512
  assert steps == ({n} if traced else {_rounded_up(_window_lists(length, width, 512)[0], n)})
  assert traced or steps != {n}
  with jax.default_matmul_precision("highest"):
    (_, out), grads = fn(q, k, v)
  allowed = np.tril(np.ones((length, length), bool)) & ~np.tril(
      np.ones((length, length), bool), -width - 1)
  tol = tolerance(np.float32)
  np.testing.assert_allclose(out, attention_reference(q, k, v, allowed=allowed), **tol)
  expected = attention_reference_vjp(q, k, v, d_out, allowed=allowed)[:3]
  for got, want in zip(grads, expected, strict=True):
    np.testing.assert_allclose(got, want, **tol)


@pytest.mark.parametrize("kv_heads, splits", [(1, 2), (2, 1)])
def test_a_decode_step_splits_its_keys_where_programs_are_too_few(kv_heads, splits):
  """16 new queries of 8 heads per key/value head against 4096 keys: one program per key/value
  head. With one, the forward's key list is cut in two shares walked by programs of their own
  (a parallel grid axis, one per TensorCore of a megacore chip), merged by lse; with two, no
  split. The backward never splits; the split program lowers for TPU."""
  queries, keys, heads = 16, 4096, 8 * kv_heads
  mask = jmat.create_block_mask(jmat.mods.generate_causal_offset(keys - queries), None, None,
                                queries, keys)
  q = jax.ShapeDtypeStruct((1, heads, queries, 128), jnp.bfloat16)
  kv = jax.ShapeDtypeStruct((1, kv_heads, keys, 128), jnp.bfloat16)

  def loss(q, k, v, block_mask):
    out = jmat.flex_attention(q, k, v, block_mask=block_mask, enable_gqa=True,
                              kernel_options={"BACKEND": "MOSAIC"})
    return out.astype(jnp.float32).sum()

  grad = jax.grad(loss, argnums=(0, 1, 2))
  forward, dq, dkv = (c.params["grid_mapping"] for c in _pallas_calls(grad, q, kv, kv, mask))
  n_k = keys // 512
  if splits == 1:
    assert forward.grid == (1, kv_heads, 1, n_k)
  else:
    assert forward.grid == (1, kv_heads, 1, splits, n_k // splits)
  assert (dq.grid, dkv.grid) == ((1, kv_heads, 1, n_k), (1, kv_heads, n_k, 1))
  if splits == 1:
    return
  with jmat.attention.kernel_platforms("tpu"):
    text = jax.jit(grad).trace(q, kv, kv, mask).lower(lowering_platforms=("tpu",)).as_text()
  assert text.count("tpu_custom_call") == 3


def test_a_key_value_pool_shared_by_every_table_row_is_read_not_copied():
  """Keys and values of M = 1 against two table rows (flex's key/value batch of 1 with a
  query-batch mask, a paged cache): the kernels index the one pool (no (M, ...) copy is an
  operand of any kernel), and the values and the gradients (the pool's summed over the rows)
  equal the float64 oracle's."""
  m, g, length, keys, dim = 2, 2, 37, 261, 16
  # Random tables per row, no mask mod: a listed block's every key is seen.
  blocks, allowed = random_tables(np.ones((m, 1, 1, length, keys), bool), 16, 128)
  q, d_out = (RNG.standard_normal((m, 1, g, length, dim)).astype(np.float32) for _ in range(2))
  k, v = (RNG.standard_normal((1, 1, keys, dim)).astype(np.float32) for _ in range(2))

  def loss(q, k, v):
    out, _ = mosaic.run(block_sparse.Call(q, k, v, blocks, ((), ()), jnp.float32(0.25),
                                          mods=block_sparse.Mods(), block_q=16, block_k=128),
                        interpret=True, tiling=FINE)
    return jnp.sum(out * d_out), out

  fn = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)
  for call in _pallas_calls(fn, q, k, v):
    assert all(x.aval.shape[0] == 1 for x in call.invars
               if x.aval.ndim == 4 and x.aval.shape[-2] >= keys), call.invars
  with jax.default_matmul_precision("highest"):
    (_, out), grads = jax.jit(fn)(q, k, v)
  pool = (k[:, :, None], v[:, :, None])
  tol = tolerance(np.float32)
  np.testing.assert_allclose(out, attention_reference(q, *pool, allowed=allowed, scale=0.25),
                             **tol)
  expected = attention_reference_vjp(q, *pool, d_out, allowed=allowed, scale=0.25)[:3]
  for got, want, like in zip(grads, expected, (q, k, v), strict=True):
    np.testing.assert_allclose(got, sum_to_shape(want, like.shape), **tol)
