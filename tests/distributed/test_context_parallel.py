"""Context parallelism on 8 devices: ring and all-gather attention with flex's mods and masks.

Run by ``tests/test_parallel.py`` in its own process with 8 simulated CPU devices; collected by
the main run, which has one device, it skips itself. Global arrays go into a layout with
``jmat.parallel.to_layout`` and come back with ``from_layout``; values and gradients (q, k, v,
the scale, a captured float table) are checked against the numpy float64 oracle of
``tests/cases.py`` (gradients along a random direction, by central differences of the oracle).
"""

from __future__ import annotations

import importlib.util
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import jmat
from jmat import mods
from tests.cases import attention_reference, tolerance
from tests.distributed import require_8_devices

require_8_devices()

RNG = np.random.default_rng(17)
L = 128  # 8 devices x 2 zigzag chunks x 8 positions: 8-position blocks
BLOCK = 8
MESH = jax.make_mesh((8,), ("seq",), axis_types=(AxisType.Auto,))
IDS = np.repeat(np.arange(4), [20, 50, 30, 28])  # a packed batch of four documents


def randn(*shape):
  return RNG.standard_normal(shape)


# (mask_mod, numpy allowed (L, L), score_mod maker or None, numpy score_fn maker or None)
def _window(q, kv):
  return (kv <= q) & (q - kv <= 24)


CASES = {
    "causal": (mods.causal_mask, lambda q, kv: kv <= q, None, None),
    "sliding-window": (mods.generate_sliding_window(24), _window, None, None),
    "documents": (mods.generate_doc_mask_mod(mods.causal_mask, jnp.asarray(IDS)),
                  lambda q, kv: (IDS[q] == IDS[kv]) & (kv <= q), None, None),
    "prefix-lm": (mods.generate_prefix_lm_mask(40), lambda q, kv: (kv < 40) | (kv <= q),
                  None, None),
    "softcap": (mods.causal_mask, lambda q, kv: kv <= q, "softcap", None),
    "alibi": (mods.causal_mask, lambda q, kv: kv <= q, "alibi", None),
}


def _scores(kind, slopes):
  """The score_mod for jmat and the numpy score_fn of the oracle, from the same slopes."""
  if kind == "softcap":
    return (mods.generate_tanh_softcap(6.0),
            lambda s, b, h, q, kv: 6.0 * np.tanh(s / 6.0))

  def alibi(score, b, h, q_idx, kv_idx):  # learnable slopes: a captured float table
    return score + slopes[h] * (kv_idx - q_idx).astype(score.dtype)

  return alibi, lambda s, b, h, q, kv: s + np.asarray(slopes, np.float64)[h] * (kv - q)


def _run(fn, layout, case, q, k, v, scale, slopes, gqa):
  mask_mod, _, kind, _ = CASES[case]
  block_mask = jmat.create_block_mask(mask_mod, None, None, L, L, BLOCK_SIZE=BLOCK)
  score_mod = _scores(kind, slopes)[0] if kind else None
  placed = [jmat.parallel.to_layout(x, MESH, "seq", layout) for x in (q, k, v)]
  out = fn(*placed, mesh=MESH, axis_name="seq", scale=scale, score_mod=score_mod,
           block_mask=block_mask, enable_gqa=gqa, layout=layout)
  return jmat.parallel.from_layout(out, MESH, "seq", layout)


RUNS = [(fn, layout, case) for fn in ("ring", "allgather") for layout in ("contiguous", "zigzag")
        for case in CASES]


@pytest.mark.parametrize("fn_name, layout, case", RUNS)
def test_values_and_gradients_match_the_float64_oracle(fn_name, layout, case):
  fn = getattr(jmat.parallel, f"{fn_name}_attention")
  gqa = case in ("documents", "alibi")
  q = randn(2, 4, L, 8)
  k, v = randn(2, 2 if gqa else 4, L, 8), randn(2, 2 if gqa else 4, L, 8)
  slopes = RNG.random(4) - 0.5
  kind = CASES[case][2]
  _, allowed_fn, _, _ = CASES[case]
  allowed = allowed_fn(np.arange(L)[:, None], np.arange(L)[None, :])
  score_fn = _scores(kind, slopes)[1] if kind else None

  def oracle(q, k, v, scale, slopes):
    fn_np = _scores(kind, slopes)[1] if kind else None
    return attention_reference(q, k, v, allowed=allowed, scale=scale, score_fn=fn_np,
                               enable_gqa=gqa)

  args = [q, k, v, np.float64(0.3), slopes]
  with jax.default_matmul_precision("highest"):
    out, vjp = jax.vjp(lambda *a: _run(fn, layout, case, *a, gqa), *map(jnp.asarray, args))
    d_out = randn(*out.shape)
    grads = vjp(jnp.asarray(d_out))
  np.testing.assert_allclose(out, attention_reference(q, k, v, allowed=allowed, scale=0.3,
                                                      score_fn=score_fn, enable_gqa=gqa),
                             **tolerance(np.float64))
  names = ["q", "k", "v", "scale"] + (["slopes"] if kind == "alibi" else [])
  for n, name in enumerate(names):
    direction = randn(*np.shape(args[n]))
    eps = 1e-6

    def along(x, n=n, direction=direction):
      moved = list(args)
      moved[n] = moved[n] + x * direction
      return np.sum(d_out * oracle(*moved))

    want = (along(eps) - along(-eps)) / (2 * eps)
    np.testing.assert_allclose(np.sum(np.asarray(grads[n]) * direction), want, rtol=1e-6,
                               atol=1e-6, err_msg=f"d {name}")


def test_return_lse_comes_in_the_layout_of_the_inputs():
  q, k, v = randn(1, 2, L, 8), randn(1, 2, L, 8), randn(1, 2, L, 8)
  window = jmat.create_block_mask(mods.generate_sliding_window(24), None, None, L, L,
                                  BLOCK_SIZE=BLOCK)
  placed = [jmat.parallel.to_layout(x, MESH, "seq", "zigzag") for x in (q, k, v)]
  with jax.default_matmul_precision("highest"):
    out, lse = jmat.parallel.ring_attention(*placed, mesh=MESH, axis_name="seq",
                                            block_mask=window, layout="zigzag", return_lse=True)
  allowed = _window(np.arange(L)[:, None], np.arange(L)[None, :])
  want_out, want_lse = attention_reference(q, k, v, allowed=allowed, return_lse=True)
  back = jmat.parallel.from_layout(lse[..., None], MESH, "seq", "zigzag")[..., 0]
  np.testing.assert_allclose(back, want_lse, **tolerance(np.float64))
  np.testing.assert_allclose(jmat.parallel.from_layout(out, MESH, "seq", "zigzag"), want_out,
                             **tolerance(np.float64))


def test_zigzag_balances_causal_work_and_the_ring_skips_hidden_pairs():
  causal = jmat.create_block_mask(mods.causal_mask, None, None, 1024, 1024, BLOCK_SIZE=64)
  contiguous = jmat.parallel.work_per_device(causal, 8, "contiguous")
  zigzag = jmat.parallel.work_per_device(causal, 8, "zigzag")
  assert max(zigzag) / np.mean(zigzag) <= 1.1 < 1.7 < max(contiguous) / np.mean(contiguous)
  assert sum(zigzag) == sum(contiguous)


def test_the_ring_sends_the_next_shard_before_the_step_computes():
  """In the ring's loop the key/value collective-permutes come before the kernel's loops.

  XLA's CPU runtime runs collectives synchronously, so the scheduled HLO shows the order: each
  step issues the transfer of the next shard, which the step's compute does not depend on,
  before that compute (on GPUs and TPUs XLA makes it an asynchronous start ... done pair
  around the compute).
  """
  arg = jax.ShapeDtypeStruct((2, 4, 256, 16), jnp.float32,
                             sharding=NamedSharding(MESH, P(None, None, "seq", None)))

  def ring(q, k, v):
    return jmat.parallel.ring_attention(q, k, v, mesh=MESH, axis_name="seq", is_causal=True,
                                        layout="zigzag")

  text = jax.jit(ring).lower(arg, arg, arg).compile().as_text()
  bodies = [c for c in text.split("\n\n") if "collective-permute(" in c]
  assert bodies, "no collective-permute in the compiled ring"
  for body in bodies:
    lines = body.split("\n")
    sends = [i for i, line in enumerate(lines) if re.search(r"collective-permute(-start)?\(", line)]
    loops = [i for i, line in enumerate(lines) if re.search(r"\bwhile\(", line)]
    assert loops and max(sends) < min(loops), "a transfer waits for the step's compute"


@pytest.mark.parametrize("fn", [jmat.parallel.ring_attention, jmat.parallel.allgather_attention])
def test_refusals_name_the_sizes_and_what_is_valid(fn):
  q = jnp.ones((1, 2, L, 8))
  other = jmat.create_block_mask(mods.causal_mask, None, None, 2 * L, 2 * L, BLOCK_SIZE=BLOCK)
  name = fn.__name__
  with pytest.raises(jmat.ShapeError, match=rf"parallel\.{name}: the block_mask does not fit the "
                                            r"inputs: it was built for Q_LEN=256, KV_LEN=256"):
    fn(q, q, q, mesh=MESH, axis_name="seq", block_mask=other)
  odd = jnp.ones((1, 2, 120, 8))
  with pytest.raises(jmat.ShapeError, match=r"the sequence length 120 of query does not split "
                                            r"into the 16 equal chunks of layout='zigzag'"):
    fn(odd, odd, odd, mesh=MESH, axis_name="seq", layout="zigzag")
  coarse = jmat.create_block_mask(mods.causal_mask, None, None, L, L, BLOCK_SIZE=16)
  with pytest.raises(jmat.ShapeError, match=r"a query chunk of 8 positions \(layout='zigzag' "
                                            r"over 8 devices\) is not a whole number of the "
                                            r"block_mask's 16-blocks"):
    fn(q, q, q, mesh=MESH, axis_name="seq", block_mask=coarse, layout="zigzag")
  with pytest.raises(ValueError, match=r"is_causal=True with a block_mask"):
    fn(q, q, q, mesh=MESH, axis_name="seq", block_mask=coarse, is_causal=True)
  with pytest.raises(ValueError, match=r"the mesh has no axis 'sequence'"):
    fn(q, q, q, mesh=MESH, axis_name="sequence", block_mask=coarse)
  with pytest.raises(jmat.ShapeError, match=r"the 3 key/value heads do not divide the 2 query "
                                            r"heads: query has shape \(1, 2, 128, 8\)"):
    fn(q, jnp.ones((1, 3, L, 8)), jnp.ones((1, 3, L, 8)), mesh=MESH, axis_name="seq",
       enable_gqa=True)


def test_the_long_context_training_example_learns():
  """examples/long_context_training.py: a training step on packed documents, zigzag, 8 devices."""
  spec = importlib.util.spec_from_file_location(
      "long_context_training",
      pathlib.Path(__file__).resolve().parents[2] / "examples" / "long_context_training.py")
  example = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(example)
  losses = example.train(256, steps=4)
  assert np.isfinite(losses).all() and (np.diff(losses) < 0).all()


@pytest.mark.parametrize("fn", [jmat.parallel.ring_attention, jmat.parallel.allgather_attention])
def test_the_lse_output_is_differentiable(fn):
  """A loss of both outputs: the backward's delta takes the lse's cotangent too."""
  q, k, v = randn(1, 2, L, 8), randn(1, 2, L, 8), randn(1, 2, L, 8)
  u, w = randn(1, 2, L), randn(1, 2, L, 8)
  window = jmat.create_block_mask(mods.generate_sliding_window(24), None, None, L, L,
                                  BLOCK_SIZE=BLOCK)
  allowed = _window(np.arange(L)[:, None], np.arange(L)[None, :])

  def loss(q, k, v):
    placed = [jmat.parallel.to_layout(x, MESH, "seq", "zigzag") for x in (q, k, v)]
    out, lse = fn(*placed, mesh=MESH, axis_name="seq", block_mask=window, layout="zigzag",
                  return_lse=True)
    out = jmat.parallel.from_layout(out, MESH, "seq", "zigzag")
    lse = jmat.parallel.from_layout(lse[..., None], MESH, "seq", "zigzag")[..., 0]
    return jnp.sum(out * w) + jnp.sum(lse * u)

  def oracle(q, k, v):
    out, lse = attention_reference(q, k, v, allowed=allowed, return_lse=True)
    return np.sum(out * w) + np.sum(lse * u)

  with jax.default_matmul_precision("highest"):
    grads = jax.grad(loss, argnums=(0, 1, 2))(*map(jnp.asarray, (q, k, v)))
  args = [q, k, v]
  for n, name in enumerate("qkv"):
    direction = randn(*args[n].shape)
    moved = [list(args), list(args)]
    moved[0][n] = args[n] + 1e-6 * direction
    moved[1][n] = args[n] - 1e-6 * direction
    want = (oracle(*moved[0]) - oracle(*moved[1])) / 2e-6
    np.testing.assert_allclose(np.sum(np.asarray(grads[n]) * direction), want, rtol=1e-6,
                               atol=1e-6, err_msg=f"d {name}")


# --- NaN and inf (issue 20): where torch's SDPA has them, on 4 devices --------------------------

MESH4 = jax.make_mesh((4,), ("seq",), axis_types=(AxisType.Auto,), devices=jax.devices()[:4])


@pytest.mark.parametrize("fn", ["ring", "allgather"])
@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("case", ["nan query row", "nan key", "inf value", "+inf query row",
                                  "nan batch element"])
def test_nan_and_inf_come_out_where_torch_has_them(fn, is_causal, case):
  torch = pytest.importorskip("torch")
  rng = np.random.default_rng(5)
  q, k, v = (rng.standard_normal((2, 2, 32, 4)) for _ in range(3))
  bad = {"nan query row": (q, (0, 1, 9, 1), np.nan), "nan key": (k, (0, 0, 11, 2), np.nan),
         "inf value": (v, (1, 0, 0, 0), np.inf), "+inf query row": (q, (1, 1, 9), np.inf),
         "nan batch element": (q, (1,), np.nan)}
  array, where, value = bad[case]
  array[where] = value
  want = torch.nn.functional.scaled_dot_product_attention(
      *(torch.tensor(x) for x in (q, k, v)), is_causal=is_causal).numpy()
  assert not np.all(np.isfinite(want)) and np.any(np.isfinite(want))
  attend = jmat.parallel.ring_attention if fn == "ring" else jmat.parallel.allgather_attention
  got = np.asarray(attend(*(jax.device_put(x, NamedSharding(MESH4, P(None, None, "seq")))
                            for x in (q, k, v)),
                          mesh=MESH4, axis_name="seq", is_causal=is_causal, block_size=4))
  np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
  np.testing.assert_array_equal(np.isinf(got), np.isinf(want))
  np.testing.assert_allclose(got, want, equal_nan=True, **tolerance(np.float64))


# --- each chunk pair on a fused kernel (issue 21): Triton and Mosaic, interpreted ---------------

FUSED_L = 128  # 4 devices x 32 positions: 2 blocks of 16 per chunk (Triton tiles are >= 16)


@pytest.mark.parametrize("fn_name", ["ring", "allgather"])
@pytest.mark.parametrize("backend", ["TRITON", "MOSAIC"])
def test_chunk_pairs_on_the_fused_kernels_match_the_float64_oracle(fn_name, backend):
  """Every (query chunk, key chunk) pair is one call of the named Pallas kernel with the chunks'
  global offsets (the causal rule and ALiBi read global positions), merged by lse; values and the
  gradients of q, k, v, the scale and the captured slopes against the float64 oracle."""
  fn = getattr(jmat.parallel, f"{fn_name}_attention")
  rng = np.random.default_rng(23)
  q, k, v = (rng.standard_normal(s).astype(np.float32)
             for s in ((1, 4, FUSED_L, 8), (1, 2, FUSED_L, 8), (1, 2, FUSED_L, 8)))
  slopes = (rng.random(4) - 0.5).astype(np.float32)
  causal = jmat.create_block_mask(mods.causal_mask, None, None, FUSED_L, FUSED_L, BLOCK_SIZE=16)
  allowed = np.tril(np.ones((FUSED_L, FUSED_L), bool))
  options = {"BACKEND": backend, "INTERPRET": True}

  def run(q, k, v, scale, slopes):
    def alibi(score, b, h, q_idx, kv_idx):
      return score + slopes[h] * (kv_idx - q_idx).astype(score.dtype)

    placed = [jax.device_put(x, NamedSharding(MESH4, P(None, None, "seq"))) for x in (q, k, v)]
    return fn(*placed, mesh=MESH4, axis_name="seq", scale=scale, score_mod=alibi,
              block_mask=causal, enable_gqa=True, kernel_options=options)

  def oracle(q, k, v, scale, slopes):
    score = lambda s, b, h, qi, kv: s + np.asarray(slopes, np.float64)[h] * (kv - qi)  # noqa: E731
    return attention_reference(q, k, v, allowed=allowed, scale=scale, score_fn=score,
                               enable_gqa=True)

  args = [q, k, v, np.float32(0.3), slopes]
  out, vjp = jax.vjp(run, *map(jnp.asarray, args))
  np.testing.assert_allclose(out, oracle(*args), **tolerance(np.float32))
  d_out = rng.standard_normal(out.shape)
  grads = vjp(jnp.asarray(d_out, jnp.float32))
  wide = [np.asarray(a, np.float64) for a in args]
  for n, name in enumerate(["q", "k", "v", "scale", "slopes"]):
    direction = rng.standard_normal(np.shape(args[n]))

    def along(x, n=n, direction=direction):
      moved = list(wide)
      moved[n] = moved[n] + x * direction
      return np.sum(d_out * oracle(*moved))

    want = (along(1e-6) - along(-1e-6)) / 2e-6
    np.testing.assert_allclose(np.sum(np.asarray(grads[n], np.float64) * direction), want,
                               rtol=2e-4, atol=2e-4, err_msg=f"d {name}")


@pytest.mark.parametrize("platform, kernel_call", [("cuda", "__gpu$xla.gpu.triton"),
                                                   ("tpu", "tpu_custom_call")])
def test_ring_lowered_for_an_accelerator_holds_its_fused_kernel(platform, kernel_call):
  """Under AUTO, lowered for cuda or tpu from this machine (kernel_platforms), every chunk pair
  of the ring is the platform's Pallas kernel, forward and backward; for cpu, none."""
  arg = jax.ShapeDtypeStruct((1, 4, 512, 64), jnp.bfloat16,
                             sharding=NamedSharding(MESH4, P(None, None, "seq")))
  causal = jmat.create_block_mask(mods.causal_mask, None, None, 512, 512)

  def ring(q, k, v):
    return jmat.parallel.ring_attention(q, k, v, mesh=MESH4, axis_name="seq", block_mask=causal)

  def grad(q, k, v):
    return jax.grad(lambda *a: ring(*a).astype(jnp.float32).sum(), argnums=(0, 1, 2))(q, k, v)

  with jmat.attention.kernel_platforms(platform):
    forward = jax.jit(ring).trace(arg, arg, arg).lower(lowering_platforms=(platform,)).as_text()
    backward = jax.jit(grad).trace(arg, arg, arg).lower(lowering_platforms=(platform,)).as_text()
  assert kernel_call in forward
  # the backward pass runs each pair's forward again, then its dq and dk/dv kernels
  assert backward.count(kernel_call) >= 3
  cpu = jax.jit(ring).trace(arg, arg, arg).lower(lowering_platforms=("cpu",)).as_text()
  assert kernel_call not in cpu
