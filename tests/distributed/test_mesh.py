"""jmat on a mesh of 8 devices: sharded products, head-parallel attention, ring attention.

These tests need 8 devices. ``tests/test_parallel.py`` runs this module in its
own process with ``XLA_FLAGS=--xla_force_host_platform_device_count=8`` (8
simulated CPU devices); collected by the main run, which has one device, it
skips itself. Oracles: numpy in float64 for values, torch 2.13's autograd for
gradients, the compiled HLO for which collectives run.
"""

from __future__ import annotations

import collections
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import jmat
from benchmarks import ring_attention as ring_bench
from jmat._src import online_softmax
from tests.cases import attention_reference, attention_reference_vjp, tolerance
from tests.distributed import require_8_devices

require_8_devices()

torch = pytest.importorskip("torch")

AUTO, EXPLICIT = AxisType.Auto, AxisType.Explicit
_COLLECTIVE = re.compile(
    r"\b(all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute|collective-broadcast)"
    r"(?:-start)?\("
)


def mesh(shape: tuple[int, ...], names: tuple[str, ...], kind: AxisType = AUTO):
  return jax.make_mesh(shape, names, axis_types=(kind,) * len(shape))


def put(x, mesh_, *spec):
  return jax.device_put(jnp.asarray(x), NamedSharding(mesh_, P(*spec)))


def collectives(fn, *args) -> collections.Counter:
  """The collective operations in the compiled (partitioned) HLO of ``jit(fn)(*args)``."""
  text = jax.jit(fn).lower(*args).compile().as_text()
  return collections.Counter(_COLLECTIVE.findall(text))


def randn(rng, *shape):
  return rng.standard_normal(shape)


# ---------------------------------------------------------------------------
# Products given sharded inputs.

MESHES = {
    "8": ((8,), ("data",)),
    "2x4": ((2, 4), ("data", "model")),
}

# (op, numpy oracle, [(shape, spec)], mesh, collectives the partitioned product needs).
PRODUCT_CASES = [
    ("bmm", np.matmul, [((8, 3, 5), ("data",)), ((8, 5, 7), ("data",))], "8", {}),
    ("matmul", np.matmul, [((8, 3, 5), ("data",)), ((8, 5, 7), ("data",))], "8", {}),
    # A batch dim broadcast against a replicated matrix, and a stretched size-1 dim.
    ("matmul", np.matmul, [((2, 8, 3, 5), (None, "data")), ((5, 7), ())], "8", {}),
    ("matmul", np.matmul, [((8, 1, 3, 5), ("data",)), ((13, 5, 7), ())], "8", {}),
    ("mm", np.matmul, [((8, 5), ("data",)), ((5, 7), ())], "8", {}),
    ("mv", np.matmul, [((8, 5), ("data",)), ((5,), ())], "8", {}),
    # Batch over one mesh axis, rows or columns over the other.
    ("bmm", np.matmul, [((2, 4, 5), ("data", "model")), ((2, 5, 7), ("data",))], "2x4", {}),
    ("bmm", np.matmul, [((2, 3, 5), ("data",)), ((2, 5, 8), ("data", None, "model"))], "2x4", {}),
    ("matmul", np.matmul, [((2, 4, 3, 5), ("data", "model")), ((4, 5, 7), ("model",))], "2x4", {}),
    # A sharded contraction: each device has a partial sum, one all-reduce completes it.
    ("mm", np.matmul, [((3, 8), (None, "data")), ((8, 7), ("data",))], "8", {"all-reduce": 1}),
    ("dot", np.dot, [((8,), ("data",)), ((8,), ("data",))], "8", {"all-reduce": 1}),
    ("matmul", np.matmul, [((2, 3, 4), ("data", None, "model")), ((4, 7), ("model",))], "2x4",
     {"all-reduce": 1}),
    # The rest of the family, rows or batch sharded.
    ("addmm", lambda i, a, b: i + a @ b, [((8, 7), ("data",)), ((8, 5), ("data",)), ((5, 7), ())],
     "8", {}),
    ("addmv", lambda i, a, x: i + a @ x, [((8,), ("data",)), ((8, 5), ("data",)), ((5,), ())],
     "8", {}),
    ("addr", lambda i, x, y: i + np.outer(x, y), [((8, 7), ("data",)), ((8,), ("data",)),
                                                   ((7,), ())], "8", {}),
    ("baddbmm", lambda i, a, b: i + a @ b,
     [((8, 3, 7), ("data",)), ((8, 3, 5), ("data",)), ((8, 5, 7), ("data",))], "8", {}),
    ("outer", np.outer, [((8,), ("data",)), ((7,), ())], "8", {}),
    ("linear", lambda x, w, b: x @ w.T + b, [((8, 5), ("data",)), ((7, 5), ()), ((7,), ())],
     "8", {}),
    ("tensordot", lambda a, b: np.tensordot(a, b, 1), [((8, 3, 5), ("data",)), ((5, 7), ())],
     "8", {}),
    ("multi_dot", lambda a, b, c: a @ b @ c,
     [((8, 5), ("data",)), ((5, 3), ()), ((3, 7), ())], "8", {}),
    # ... and summing over the sharded dim: one all-reduce.
    ("addbmm", lambda i, a, b: i + (a @ b).sum(0),
     [((3, 7), ()), ((8, 3, 5), ("data",)), ((8, 5, 7), ("data",))], "8", {"all-reduce": 1}),
    ("inner", np.inner, [((3, 8), (None, "data")), ((5, 8), (None, "data"))], "8",
     {"all-reduce": 1}),
    ("vdot", np.vdot, [((8,), ("data",)), ((8,), ("data",))], "8", {"all-reduce": 1}),
]

_CALLS = {
    "tensordot": lambda a, b: jmat.tensordot(a, b, dims=1),
    "multi_dot": lambda *xs: jmat.multi_dot(list(xs)),
}


def _case_id(case):
  op, _, operands, mesh_name, _ = case
  return f"{op}-{'x'.join(str(s) for s in operands[0][0])}-{mesh_name}-{len(case[4]) or 'local'}"


@pytest.mark.parametrize("case", PRODUCT_CASES, ids=[_case_id(c) for c in PRODUCT_CASES])
def test_sharded_product_values_and_collectives(case):
  op, oracle, operands, mesh_name, expected = case
  rng = np.random.default_rng(7)
  m = mesh(*MESHES[mesh_name])
  arrays = [randn(rng, *shape) for shape, _ in operands]
  placed = [put(x, m, *spec) for x, (_, spec) in zip(arrays, operands, strict=True)]
  fn = _CALLS.get(op) or getattr(jmat, op)
  with jax.default_matmul_precision("highest"):
    got = jax.jit(fn)(*placed)
    assert collectives(fn, *placed) == collections.Counter(expected)
  np.testing.assert_allclose(np.asarray(got), oracle(*arrays), **tolerance(np.float64))


@pytest.mark.parametrize("op", ["bmm", "matmul"])
def test_batch_sharded_product_keeps_its_sharding_on_explicit_mesh(op):
  """With sharding in the types (jax.make_mesh's default), the result is typed batch-sharded."""
  rng = np.random.default_rng(3)
  m = mesh((2, 4), ("data", "model"), EXPLICIT)
  a, b = randn(rng, 8, 3, 5), randn(rng, 8, 5, 7)
  fn = getattr(jmat, op)
  with jax.set_mesh(m), jax.default_matmul_precision("highest"):
    a_s, b_s = put(a, m, ("data", "model")), put(b, m, ("data", "model"))
    out = jax.jit(fn)(a_s, b_s)
    assert collectives(fn, a_s, b_s) == collections.Counter()
  assert out.sharding.spec == P(("data", "model"), None, None)
  np.testing.assert_allclose(np.asarray(out), a @ b, **tolerance(np.float64))


# (op, [(shape, spec)], out_sharding): the contracted dim is sharded over "model", so on
# Explicit axes the result's sharding is ambiguous and must be given, as for jnp.matmul.
OUT_SHARDING_CASES = [
    ("matmul", [((4, 16, 32), ("data", None, "model")), ((4, 32, 8), ("data", "model"))], P()),
    ("matmul", [((4, 16, 32), ("data", None, "model")), ((4, 32, 8), ("data", "model"))],
     P("data", "model", None)),
    ("matmul", [((4, 16, 32), ("data", None, "model")), ((4, 32, 8), ("data", "model"))],
     P(None, ("data", "model"))),
    ("matmul", [((4, 16, 32), ("data", None, "model")), ((4, 32, 8), ("data", "model"))],
     P(None, "model", "data")),
    ("matmul", [((32,), ("model",)), ((4, 32, 8), ("data", "model"))], P("data", None)),
    ("matmul", [((4, 16, 32), (None, None, "model")), ((32,), ("model",))], P("data", "model")),
    ("bmm", [((4, 16, 32), ("data", None, "model")), ((4, 32, 8), ("data", "model"))],
     P(None, ("data", "model"))),
    ("mm", [((16, 32), (None, "model")), ((32, 8), ("model",))], P("data", None)),
    ("mv", [((16, 32), (None, "model")), ((32,), ("model",))], P("data")),
    ("dot", [((32,), ("model",)), ((32,), ("model",))], P()),
]


@pytest.mark.parametrize(
    "op, operands, out_sharding", OUT_SHARDING_CASES,
    ids=[f"{c[0]}-{len(c[1][0][0])}d-{len(c[1][1][0])}d-{c[2]}" for c in OUT_SHARDING_CASES],
)
def test_out_sharding_resolves_a_sharded_contraction_on_explicit_axes(op, operands, out_sharding):
  rng = np.random.default_rng(11)
  m = mesh((2, 4), ("data", "model"), EXPLICIT)
  arrays = [randn(rng, *shape) for shape, _ in operands]
  fn = getattr(jmat, op)
  with jax.set_mesh(m), jax.default_matmul_precision("highest"):
    placed = [put(x, m, *spec) for x, (_, spec) in zip(arrays, operands, strict=True)]
    with pytest.raises(Exception, match="out_sharding"):  # JAX's own refusal, as for jnp
      fn(*placed)
    out = jax.jit(functools.partial(fn, out_sharding=out_sharding))(*placed)
    expected = np.matmul(*arrays)
    assert out.shape == expected.shape
    assert out.sharding.spec == P(*out_sharding, *(None,) * (out.ndim - len(out_sharding)))
    # Where the batch dims keep their input sharding, jmat partitions as jnp.matmul does
    # (elsewhere XLA may move an axis between batch and matrix dims another way).
    if op == "dot" or (op == "matmul" and out_sharding in (P(), P("data", "model", None))):
      ours = collectives(functools.partial(fn, out_sharding=out_sharding), *placed)
      theirs = collectives(functools.partial(jnp.matmul, out_sharding=out_sharding), *placed)
      assert ours == theirs
  np.testing.assert_allclose(np.asarray(out), expected, **tolerance(np.float64))


def test_out_sharding_on_auto_axes_is_refused_with_advice():
  m = mesh((8,), ("data",), AUTO)
  a = put(np.ones((16, 32)), m, None, "data")
  with pytest.raises(ValueError, match=r"jmat.mm: out_sharding names mesh axis 'data', which is "
                     r"not an Explicit axis .*jax.lax.with_sharding_constraint"):
    jmat.mm(a, a.T, out_sharding=NamedSharding(m, P("data")))


def _tensor_parallel_mlp(x, w1, b1, w2, b2):
  return jmat.linear(jax.nn.relu(jmat.linear(x, w1, b1)), w2, b2)


@pytest.mark.skipif(not hasattr(jmat, "linear"), reason="jmat.linear is not there yet")
def test_tensor_parallel_linear_pair_needs_exactly_one_all_reduce():
  """Megatron's MLP: w1 split by output rows, w2 by input columns; one all-reduce at the end."""
  rng = np.random.default_rng(11)
  m = mesh((2, 4), ("data", "model"))
  x, w1, b1 = randn(rng, 6, 5), randn(rng, 8, 5), randn(rng, 8)
  w2, b2 = randn(rng, 3, 8), randn(rng, 3)
  placed = (
      put(x, m, "data"),
      put(w1, m, "model"),
      put(b1, m, "model"),
      put(w2, m, None, "model"),
      put(b2, m),
  )
  with jax.default_matmul_precision("highest"):
    got = jax.jit(_tensor_parallel_mlp)(*placed)
    assert collectives(_tensor_parallel_mlp, *placed) == collections.Counter({"all-reduce": 1})
  expected = np.maximum(x @ w1.T + b1, 0) @ w2.T + b2
  np.testing.assert_allclose(np.asarray(got), expected, **tolerance(np.float64))


# ---------------------------------------------------------------------------
# Attention: tests/cases.py's numpy oracle for values, torch's autograd for gradients.


def torch_attention_grads(q, k, v, d_out, *, is_causal=False, scale=None):
  """Gradients of ``sum(d_out * sdpa(q, k, v))`` by torch's autograd, in float64."""
  tq, tk, tv = (torch.tensor(np.asarray(x, np.float64), requires_grad=True) for x in (q, k, v))
  sdpa = torch.nn.functional.scaled_dot_product_attention
  out = sdpa(tq, tk, tv, is_causal=is_causal, scale=scale)
  (out * torch.tensor(np.asarray(d_out, np.float64))).sum().backward()
  return tuple(t.grad.numpy() for t in (tq, tk, tv))


@pytest.mark.parametrize("is_causal", [False, True])
def test_head_parallel_attention_needs_no_collectives(is_causal):
  rng = np.random.default_rng(5)
  m = mesh((2, 4), ("data", "heads"))
  q, k, v = randn(rng, 2, 8, 5, 3), randn(rng, 2, 8, 7, 3), randn(rng, 2, 8, 7, 4)
  placed = [put(x, m, "data", "heads") for x in (q, k, v)]
  sdpa = functools.partial(jmat.scaled_dot_product_attention, is_causal=is_causal)
  with jax.default_matmul_precision("highest"):
    got = jax.jit(sdpa)(*placed)
    assert collectives(sdpa, *placed) == collections.Counter()
  assert got.sharding.spec[:2] == ("data", "heads")
  np.testing.assert_allclose(
      np.asarray(got), attention_reference(q, k, v, is_causal=is_causal), **tolerance(np.float64)
  )


# ---------------------------------------------------------------------------
# Ring attention.

# (mesh shape, axis names, axis kind, lead shape, L, S, lead spec)
RING_CASES = {
    "8-ring": ((8,), ("seq",), AUTO, (2, 3), 16, 24, ()),
    "8-ring-explicit": ((8,), ("seq",), EXPLICIT, (2, 3), 24, 16, ()),
    "8-ring-one-per-device": ((8,), ("seq",), AUTO, (3,), 8, 8, ()),
    "2x4-data-seq": ((2, 4), ("data", "seq"), AUTO, (2, 3), 12, 20, ("data",)),
    "2x4-data-seq-explicit": ((2, 4), ("data", "seq"), EXPLICIT, (2, 3), 12, 20, ("data",)),
    "4x2-heads-seq": ((4, 2), ("heads", "seq"), AUTO, (1, 4), 6, 10, (None, "heads")),
}


def ring_over_seq(m, is_causal):
  return functools.partial(
      jmat.parallel.ring_attention, mesh=m, axis_name="seq", is_causal=is_causal
  )


def _ring_inputs(case, dtype, seed=0):
  shape, names, kind, lead, q_len, k_len, lead_spec = RING_CASES[case]
  rng = np.random.default_rng(seed)
  q, k, v = randn(rng, *lead, q_len, 5), randn(rng, *lead, k_len, 5), randn(rng, *lead, k_len, 7)
  m = mesh(shape, names, kind)
  spec = (*lead_spec, *([None] * (len(lead) - len(lead_spec))), "seq", None)
  placed = [put(x.astype(dtype), m, *spec) for x in (q, k, v)]
  return m, spec, (q, k, v), placed


# Every case in float64 (tight tolerances), a few in float32 and bfloat16 (a float32 carry).
RING_RUNS = [(c, causal, jnp.float64) for c in RING_CASES for causal in (False, True)] + [
    (c, causal, jnp.float32)
    for c in ("8-ring", "2x4-data-seq-explicit")
    for causal in (False, True)
] + [("8-ring", True, jnp.bfloat16)]


@pytest.mark.parametrize(("case", "is_causal", "dtype"), RING_RUNS)
def test_ring_attention_values_gradients_and_sharding(case, is_causal, dtype):
  m, spec, (q, k, v), placed = _ring_inputs(case, dtype)
  d_out = np.random.default_rng(1).standard_normal(q.shape[:-1] + (7,))
  ring = ring_over_seq(m, is_causal)
  with jax.set_mesh(m), jax.default_matmul_precision("highest"):
    out, vjp = jax.vjp(ring, *placed)
    grads = vjp(put(d_out.astype(dtype), m, *spec))
  tol = tolerance(dtype)
  assert out.dtype == dtype and out.shape == q.shape[:-1] + (7,)
  assert out.sharding.spec == P(*spec)
  np.testing.assert_allclose(np.asarray(out), attention_reference(q, k, v, is_causal=is_causal),
                             **tol)
  expected = torch_attention_grads(q, k, v, d_out, is_causal=is_causal)
  for name, got, want, placed_x in zip("qkv", grads, expected, placed, strict=True):
    assert got.sharding.spec == placed_x.sharding.spec, name
    np.testing.assert_allclose(np.asarray(got), want, **tol, err_msg=f"d{name}")


@pytest.mark.parametrize("fn", [jmat.parallel.ring_attention, jmat.parallel.allgather_attention])
@pytest.mark.parametrize("case", ["8-ring", "2x4-data-seq"])
def test_traced_scale_value_and_gradient_sum_every_devices_part(fn, case):
  m, spec, (q, k, v), placed = _ring_inputs(case, jnp.float64, seed=2)
  d_out = np.random.default_rng(3).standard_normal(q.shape[:-1] + (7,))

  def attend(scale):
    return fn(*placed, mesh=m, axis_name="seq", is_causal=True, scale=scale)

  with jax.default_matmul_precision("highest"):
    out, vjp = jax.vjp(attend, jnp.float64(0.3))
    (d_scale,) = vjp(put(d_out, m, *spec))
  np.testing.assert_allclose(np.asarray(out), attention_reference(q, k, v, is_causal=True,
                                                                  scale=0.3),
                             **tolerance(np.float64))
  # The scores are scale * q @ k^T: d scale = sum(d scores * q @ k^T), over every device's queries.
  d_scores = attention_reference_vjp(q, k, v, d_out, is_causal=True, scale=0.3)[3]
  want = np.sum(d_scores * np.matmul(q, np.swapaxes(k, -1, -2)))
  np.testing.assert_allclose(d_scale, want, **tolerance(np.float64))


@pytest.mark.parametrize("is_causal", [False, True])
def test_ring_attention_value_and_gradients_of_a_loss_match_numpy(is_causal):
  m, _, (q, k, v), placed = _ring_inputs("2x4-data-seq", jnp.float64, seed=4)
  ring = ring_over_seq(m, is_causal)

  def loss(*xs):
    return jnp.sum(jnp.sin(ring(*xs)))

  value, grads = jax.value_and_grad(loss, argnums=(0, 1, 2))(*placed)
  out = attention_reference(q, k, v, is_causal=is_causal)
  # d sum(sin(out)) / d out = cos(out)
  want = attention_reference_vjp(q, k, v, np.cos(out), is_causal=is_causal)[:3]
  np.testing.assert_allclose(value, np.sum(np.sin(out)), **tolerance(np.float64))
  for got, expected in zip(grads, want, strict=True):
    np.testing.assert_allclose(np.asarray(got), expected, **tolerance(np.float64))


@pytest.mark.parametrize("fn", [jmat.parallel.ring_attention, jmat.parallel.allgather_attention])
def test_sequence_that_does_not_split_evenly_is_refused(fn):
  m = mesh((8,), ("seq",))
  q, k = jnp.ones((2, 12, 3)), jnp.ones((2, 16, 3))
  with pytest.raises(jmat.ShapeError) as info:
    fn(q, k, k, mesh=m, axis_name="seq")
  message = str(info.value)
  assert message.startswith(f"jmat.parallel.{fn.__name__}: ")
  assert "sequence length 12 of query is not divisible by the 8 devices of mesh axis 'seq'" in (
      message
  )
  assert "query has shape (2, 12, 3)" in message
  assert "pad the sequence to a multiple of 8" in message


def test_leading_dims_sharded_over_the_ring_axis_are_refused():
  m = mesh((8,), ("seq",), EXPLICIT)
  with jax.set_mesh(m):
    q = put(jnp.ones((8, 16, 3)), m, "seq")
    with pytest.raises(ValueError, match=r"query of shape \(8, 16, 3\) has dim 0 sharded over"):
      jmat.parallel.ring_attention(q, q, q, mesh=m, axis_name="seq")


def test_allgather_attention_matches_numpy():
  m, spec, (q, k, v), placed = _ring_inputs("2x4-data-seq", jnp.float64, seed=6)
  out = jmat.parallel.allgather_attention(*placed, mesh=m, axis_name="seq", is_causal=True)
  assert out.sharding.spec == P(*spec)
  np.testing.assert_allclose(
      np.asarray(out), attention_reference(q, k, v, is_causal=True), **tolerance(np.float64)
  )


@pytest.mark.parametrize(
    ("case", "is_causal"),
    [("8-ring", False), ("8-ring", True), ("2x4-data-seq", True), ("2x4-data-seq-explicit", True)],
)
def test_ring_attention_only_passes_blocks_around_the_ring(case, is_causal):
  """Forward and backward: collective-permutes only (no gather), each moving one block."""
  m, _, (q, k, v), placed = _ring_inputs(case, jnp.float32)
  ring = ring_over_seq(m, is_causal)

  def loss(*xs):
    return jnp.sum(ring(*xs))

  with jax.set_mesh(m):
    forward = jax.jit(ring).lower(*placed).compile().as_text()
    backward = collectives(jax.grad(loss, argnums=(0, 1, 2)), *placed)
  assert set(_COLLECTIVE.findall(forward)) == {"collective-permute"}
  assert set(backward) == {"collective-permute"}
  # Every permute moves one local key or value block, never the whole sequence.
  local = {tuple(x.sharding.shard_shape(x.shape)) for x in placed[1:]}
  moved = re.findall(r"= f32\[([\d,]*)\][^ ]* collective-permute(?:-start)?\(", forward)
  assert moved and {tuple(int(d) for d in s.split(",")) for s in moved} <= local


def _fresh_ring(**options):
  """ring_attention traced anew (the module's tile sizes and update are read at trace time): its
  jitted implementation's cached traces are cleared first."""
  jax.clear_caches()
  return jax.jit(functools.partial(jmat.parallel.ring_attention, **options))


# (L, S, query tile, key tile): one tile per block, and tiles inside the blocks.
SKIP_CASES = [(16, 16, None, None), (16, 24, None, None), (24, 16, None, None),
              (8, 40, None, None), (32, 48, 2, 3), (48, 32, 3, 2)]


@pytest.mark.parametrize(("q_len", "k_len", "tile_q", "tile_k"), SKIP_CASES)
def test_ring_attention_skips_exactly_the_fully_masked_causal_tiles(
    monkeypatch, q_len, k_len, tile_q, tile_k
):
  """Count the tiles each device folds in: those with at least one visible (query, key) pair."""
  n, seen = 8, []
  tq, tk = tile_q or q_len // n, tile_k or k_len // n
  m = mesh((n,), ("seq",))
  rng = np.random.default_rng(9)
  q, k, v = randn(rng, 1, q_len, 3), randn(rng, 1, k_len, 3), randn(rng, 1, k_len, 2)
  # The first value of key tile j is unique (== j) and tells which tile is being folded.
  v[0, ::tk, 0] = np.arange(k_len // tk)
  fold = online_softmax.online_softmax_fold

  def counting_fold(carry, s, v):
    jax.debug.callback(
        lambda i, j: seen.append((int(i), int(j))), jax.lax.axis_index("seq"), v[0, 0, 0, 0]
    )
    return fold(carry, s, v)

  monkeypatch.setattr(online_softmax, "online_softmax_fold", counting_fold)
  blocks = {"block_size": (tile_q, tile_k)} if tile_q else {}
  ring = _fresh_ring(mesh=m, axis_name="seq", is_causal=True, **blocks)
  jax.block_until_ready(ring(*(put(x, m, None, "seq") for x in (q, k, v))))
  visible = np.tril(np.ones((q_len, k_len), bool))
  tiles = visible.reshape(q_len // tq, tq, k_len // tk, tk).any(axis=(1, 3))
  query_tiles_per_device = q_len // n // tq
  expected = [(a // query_tiles_per_device, b) for a, b in zip(*np.nonzero(tiles), strict=True)]
  assert sorted(seen) == sorted(expected)


@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize(("q_len", "k_len"), [(32, 48), (48, 32)])
def test_ring_attention_in_tiles_matches_torch(q_len, k_len, is_causal):
  """Blocks of 4 and 6 rows folded in tiles of 2 and 3: values and gradients still exact."""
  m = mesh((8,), ("seq",))
  rng = np.random.default_rng(12)
  q, k, v = randn(rng, 2, q_len, 5), randn(rng, 2, k_len, 5), randn(rng, 2, k_len, 7)
  d_out = randn(rng, 2, q_len, 7)
  ring = _fresh_ring(mesh=m, axis_name="seq", is_causal=is_causal, block_size=(2, 3))
  out, vjp = jax.vjp(ring, *(put(x, m, None, "seq") for x in (q, k, v)))
  grads = vjp(put(d_out, m, None, "seq"))
  np.testing.assert_allclose(
      np.asarray(out), attention_reference(q, k, v, is_causal=is_causal), **tolerance(np.float64)
  )
  expected = torch_attention_grads(q, k, v, d_out, is_causal=is_causal)
  for name, got, want in zip("qkv", grads, expected, strict=True):
    np.testing.assert_allclose(np.asarray(got), want, **tolerance(np.float64), err_msg=f"d{name}")


# ---------------------------------------------------------------------------
# Memory: ring vs gathering the keys and values (formulas of docs/distributed.md).


@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize(("length", "tile"), [(512, None), (2048, 64)])
def test_ring_attention_memory_matches_the_formulas(monkeypatch, is_causal, length, tile):
  """XLA's per-device memory_analysis against docs/distributed.md's formulas."""
  n, h, e = 8, 2, 8
  if tile:
    monkeypatch.setattr(ring_bench, "_tile", lambda rows, limit=512: min(rows, tile))
  m = mesh((n,), ("seq",))
  arg = jax.ShapeDtypeStruct(
      (h, length, e), jnp.float32, sharding=NamedSharding(m, P(None, "seq", None))
  )
  formula = ring_bench.formulas(h, length, length, e, e, n, 4)

  def temp(fn):
    options = dict(mesh=m, axis_name="seq", is_causal=is_causal)
    if tile:
      options["block_size"] = tile
    compiled = jax.jit(functools.partial(fn, **options)).lower(arg, arg, arg).compile()
    stats = compiled.memory_analysis()
    assert stats.argument_size_in_bytes == 3 * h * (length // n) * e * 4
    return stats.temp_size_in_bytes

  ring, gathered = temp(jmat.parallel.ring_attention), temp(jmat.parallel.allgather_attention)
  # Gathering holds every key and value, and tiles of scores as the ring does.
  score_rows = h * (length // n) * length * 4
  assert formula["gathered_kv"] <= gathered
  assert 0.75 * formula["allgather"] <= gathered <= 1.5 * formula["allgather"]
  # The ring: two key/value blocks, two tiles of scores and the carry (causal: plus the
  # mask and the masked copy of a score tile).
  assert 0.75 * formula["ring"] <= ring <= 1.5 * formula["ring"]
  # Less than what gathering must hold; tiled, less than one (L / n, S / n) block of scores.
  assert ring < formula["gathered_kv"] + score_rows
  if tile:
    assert ring < 2 * h * (length // n) ** 2 * 4
