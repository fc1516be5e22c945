"""Gradient completeness: every float argument of every public attention function, vs torch.

Each case is a jmat call written as a function of named float arrays and the same computation
written with torch float64 ops (tests/torch_oracle.py); ``jax.vjp`` of the jmat call with a
random cotangent must equal torch's autograd for EVERY argument: queries, keys, values, the
scale, float masks, parameters and the arrays a score_mod captures. A silently zero gradient
fails here, as the traced-scale gradient of the block-sparse kernel once was: each case also
checks that torch's gradient is not zero, so a case cannot pass by computing nothing.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jmat
from jmat import mods
from tests.cases import tolerance
from tests.torch_oracle import dense_attention

RNG = np.random.default_rng(15)
MESH = jax.make_mesh((1,), ("seq",), axis_types=(jax.sharding.AxisType.Auto,))


@dataclasses.dataclass(frozen=True)
class Case:
  """A jmat call and its torch twin, both functions of the same named float arrays."""

  functions: tuple[str, ...]  # the public functions it differentiates (completeness check)
  jmat_fn: Callable[..., jax.Array]
  torch_fn: Callable[..., torch.Tensor]
  shapes: dict[str, tuple[int, ...]]


def randn(shape):
  return RNG.standard_normal(shape)


# --- torch twins of the mods (written again with torch ops, not taken from jmat) -------------

def t_window(before):
  return lambda q, kv: (q - kv <= before) & (kv <= q)


def t_alibi_softcap(slopes):
  return lambda s, b, h, q, kv: 20.0 * torch.tanh((s + slopes[h] * (kv - q)) / 20.0)


def t_relative(table, middle):
  return lambda s, b, h, q, kv: s + table[h, kv - q + middle]


def allowed_from(fn, q_len, kv_len):
  q, kv = torch.arange(q_len)[:, None], torch.arange(kv_len)[None, :]
  return fn(q, kv)


# --- the cases ---------------------------------------------------------------------------------

BOOL_MASK = RNG.random((1, 3, 37, 29)) < 0.7
BOOL_MASK[0, 1, 4] = False  # a query that sees no key: its gradients are 0, not NaN


def sdpa_case(implementation, *, causal, gqa=False, float_mask=False):
  heads_kv = 1 if gqa else 3
  shapes = dict(q=(2, 3, 37, 8), k=(2, heads_kv, 29, 8), v=(2, heads_kv, 29, 5), scale=())
  if float_mask:
    shapes["mask"] = (1, 3, 37, 29)

  def jmat_fn(q, k, v, scale, mask=None):
    return jmat.scaled_dot_product_attention(
        q, k, v, mask if float_mask else jnp.asarray(BOOL_MASK), is_causal=causal, scale=scale,
        enable_gqa=gqa, implementation=implementation, block_size=(16, 8))

  def torch_fn(q, k, v, scale, mask=None):
    allowed = None if float_mask else torch.tensor(BOOL_MASK)
    return dense_attention(q, k, v, scale=scale, bias=mask, allowed=allowed,
                           is_causal=causal, gqa=gqa)[0]

  return Case(("scaled_dot_product_attention",), jmat_fn, torch_fn, shapes)


def flex_alibi_case():
  """Sliding window (a BlockMask of 8 x 16 blocks), GQA, a softcap over learnable ALiBi slopes."""
  shapes = dict(q=(2, 4, 45, 6), k=(2, 2, 45, 6), v=(2, 2, 45, 3), scale=(), slopes=(4,))
  window = jmat.create_block_mask(mods.generate_sliding_window(9), None, None, 45, 45,
                                  BLOCK_SIZE=(8, 16))

  def jmat_fn(q, k, v, scale, slopes):
    def score(s, b, h, q_idx, kv_idx):
      return 20.0 * jnp.tanh((s + slopes[h] * (kv_idx - q_idx)) / 20.0)

    return jmat.flex_attention(q, k, v, score, window, scale=scale, enable_gqa=True)

  def torch_fn(q, k, v, scale, slopes):
    allowed = allowed_from(t_window(9), 45, 45)
    return dense_attention(q, k, v, scale=scale, allowed=allowed,
                           score=t_alibi_softcap(slopes), gqa=True)[0]

  return Case(("flex_attention",), jmat_fn, torch_fn, shapes)


def flex_relative_case():
  """No block mask (every block full), unaligned lengths, a relative-position bias table, lse."""
  q_len, kv_len = 37, 29
  middle = max(q_len, kv_len) - 1
  shapes = dict(q=(1, 2, q_len, 8), k=(1, 2, kv_len, 8), v=(1, 2, kv_len, 8), scale=(),
                table=(2, 2 * middle + 1))

  def jmat_fn(q, k, v, scale, table):
    out, lse = jmat.flex_attention(q, k, v, mods.generate_relative_bias(table), scale=scale,
                                   return_lse=True)
    return out + lse[..., None]

  def torch_fn(q, k, v, scale, table):
    out, lse = dense_attention(q, k, v, scale=scale, score=t_relative(table, middle))
    return out + lse[..., None]

  return Case(("flex_attention",), jmat_fn, torch_fn, shapes)


def mha_case():
  embed, heads = 8, 2
  shapes = {"in_proj_weight": (3 * embed, embed), "in_proj_bias": (3 * embed,),
            "out_proj.weight": (embed, embed), "out_proj.bias": (embed,),
            "query": (2, 7, embed), "key": (2, 5, embed), "value": (2, 5, embed),
            "attn_mask": (7, 5), "key_padding_mask": (2, 5)}
  names = list(shapes)

  def jmat_fn(*arrays):
    a = dict(zip(names, arrays, strict=True))
    params = {n: a[n] for n in names[:4]}
    out, _ = jmat.multi_head_attention(params, a["query"], a["key"], a["value"],
                                       num_heads=heads, attn_mask=a["attn_mask"],
                                       key_padding_mask=a["key_padding_mask"], is_causal=True)
    return out

  def torch_fn(*tensors):
    a = dict(zip(names, tensors, strict=True))
    w_q, w_k, w_v = a["in_proj_weight"].chunk(3)
    b_q, b_k, b_v = a["in_proj_bias"].chunk(3)

    def split(x, w, b):
      x = x @ w.T + b
      return x.view(x.shape[0], x.shape[1], heads, -1).transpose(1, 2)

    bias = a["attn_mask"] + a["key_padding_mask"][:, None, None, :]
    out, _ = dense_attention(split(a["query"], w_q, b_q), split(a["key"], w_k, b_k),
                             split(a["value"], w_v, b_v), bias=bias, is_causal=True)
    out = out.transpose(1, 2).reshape(a["query"].shape)
    return out @ a["out_proj.weight"].T + a["out_proj.bias"]

  return Case(("multi_head_attention",), jmat_fn, torch_fn, shapes)


def sequence_sharded_case(fn, *, causal):
  shapes = dict(q=(2, 3, 12, 8), k=(2, 3, 12, 8), v=(2, 3, 12, 4), scale=())
  options = dict(block_size=(4, 8)) if fn is jmat.parallel.ring_attention else {}

  def jmat_fn(q, k, v, scale):
    return fn(q, k, v, mesh=MESH, axis_name="seq", is_causal=causal, scale=scale, **options)

  def torch_fn(q, k, v, scale):
    return dense_attention(q, k, v, scale=scale, is_causal=causal)[0]

  return Case((f"parallel.{fn.__name__}",), jmat_fn, torch_fn, shapes)


def scores_case():
  shapes = dict(q=(2, 5, 8), k=(2, 7, 8), scale=())

  def torch_fn(q, k, scale):
    return (q @ k.transpose(-1, -2)) * scale

  return Case(("attention_scores",), lambda q, k, scale: jmat.attention_scores(q, k, scale=scale),
              torch_fn, shapes)


def online_softmax_case():
  """init -> update (scale, bias) -> fold -> finish and logsumexp: the building blocks."""
  shapes = dict(q=(3, 5, 4), k=(3, 6, 4), v=(3, 6, 2), scale=(), bias=(5, 6), scores=(3, 5, 3),
                v2=(3, 3, 2))
  attention = jmat.attention

  def jmat_fn(q, k, v, scale, bias, scores, v2):
    carry = attention.online_softmax_init((3,), 5, 2, dtype=jnp.float64)
    carry = attention.online_softmax_update(carry, q, k, v, scale=scale, bias=bias)
    carry = attention.online_softmax_fold(carry, scores, v2)
    out = attention.online_softmax_finish(carry, jnp.float64)
    return out + attention.online_softmax_logsumexp(carry)[..., None]

  def torch_fn(q, k, v, scale, bias, scores, v2):
    s = torch.cat([(q @ k.transpose(-1, -2)) * scale + bias, scores], dim=-1)
    p = torch.softmax(s, dim=-1)
    return p @ torch.cat([v, v2], dim=-2) + torch.logsumexp(s, dim=-1)[..., None]

  return Case(("online_softmax_update", "online_softmax_fold", "online_softmax_finish",
               "online_softmax_logsumexp"), jmat_fn, torch_fn, shapes)


def flax_case():
  shapes = dict(q=(2, 7, 3, 4), k=(2, 5, 3, 4), v=(2, 5, 3, 6), bias=(1, 3, 7, 5))

  def torch_fn(q, k, v, bias):
    out, _ = dense_attention(*(x.transpose(1, 2) for x in (q, k, v)), bias=bias)
    return out.transpose(1, 2)

  return Case(("flax_attention_fn",),
              lambda q, k, v, bias: jmat.attention.flax_attention_fn(q, k, v, bias),
              torch_fn, shapes)


def paged_case():
  """A decoding step: new keys/values written by PagedAttention.assign, flex over the pool."""
  paged = jmat.attention.PagedAttention(6, 4, 2).reserve(0, 5).reserve(1, 9).reserve(0, 11)
  positions = np.array([10, 4])
  shapes = dict(q=(2, 4, 1, 6), k_val=(2, 2, 1, 6), v_val=(2, 2, 1, 5), k_cache=(1, 2, 24, 6),
                v_cache=(1, 2, 24, 5))
  table = np.asarray(paged.page_table)[:, :3]
  slots = torch.tensor((table[:, :, None] * 4 + np.arange(4)).reshape(2, 12))

  def jmat_fn(q, k_val, v_val, k_cache, v_cache):
    k_cache, v_cache = paged.assign(jnp.arange(2), positions[:, None], k_val, v_val, k_cache,
                                    v_cache)
    logical = jmat.create_block_mask(lambda b, h, q, kv: kv <= jnp.asarray(positions)[b], 2,
                                     None, 1, 12, BLOCK_SIZE=(1, 4))
    return jmat.flex_attention(q, k_cache, v_cache,
                               block_mask=paged.convert_logical_block_mask(logical),
                               enable_gqa=True)

  def torch_fn(q, k_val, v_val, k_cache, v_cache):
    new = torch.nn.functional.one_hot(torch.tensor(positions), 12).bool()[:, None, :, None]
    keys = torch.where(new, k_val, k_cache[0][:, slots].permute(1, 0, 2, 3))
    values = torch.where(new, v_val, v_cache[0][:, slots].permute(1, 0, 2, 3))
    allowed = (torch.arange(12) <= torch.tensor(positions)[:, None])[:, None, None, :]
    return dense_attention(q, keys, values, allowed=allowed, gqa=True)[0]

  return Case(("PagedAttention", "flex_attention"), jmat_fn, torch_fn, shapes)
def varlen_case():
  """Three packed sequences (5, 1 and 9 queries against 7, 6 and 9 keys), causal bottom-right,
  GQA 4:2; torch's twin is SDPA per sequence."""
  cu_q, cu_k = [0, 5, 6, 15], [0, 7, 13, 22]
  shapes = dict(q=(15, 4, 8), k=(22, 2, 8), v=(22, 2, 5), scale=())

  def jmat_fn(q, k, v, scale):
    return jmat.attention.varlen_attn(q, k, v, jnp.array(cu_q), jnp.array(cu_k), 9, 9,
                                      scale=scale, window_size=(-1, 0), enable_gqa=True)

  def torch_fn(q, k, v, scale):
    outs = []
    for i in range(3):
      qq = q[cu_q[i]:cu_q[i + 1]].transpose(0, 1)[None]
      kk, vv = (x[cu_k[i]:cu_k[i + 1]].transpose(0, 1)[None] for x in (k, v))
      shift = kk.shape[2] - qq.shape[2]  # the queries sit at the end of the keys
      allowed = allowed_from(lambda a, b, s=shift: b <= a + s, qq.shape[2], kk.shape[2])
      outs.append(dense_attention(qq, kk, vv, scale=scale, allowed=allowed, gqa=True)[0][0]
                  .transpose(0, 1))
    return torch.cat(outs)

  return Case(("varlen_attn",), jmat_fn, torch_fn, shapes)


CASES = {
    "sdpa-dense-float-mask-causal": sdpa_case("dense", causal=True, float_mask=True),
    "sdpa-blockwise-float-mask-causal": sdpa_case("blockwise", causal=True, float_mask=True),
    "sdpa-dense-bool-mask-gqa": sdpa_case("dense", causal=False, gqa=True),
    "sdpa-blockwise-bool-mask-gqa": sdpa_case("blockwise", causal=False, gqa=True),
    "sdpa-blockwise-causal-gqa": sdpa_case("blockwise", causal=True, gqa=True),
    "flex-window-gqa-alibi-softcap": flex_alibi_case(),
    "flex-relative-bias-lse-unaligned": flex_relative_case(),
    "mha-float-masks-causal": mha_case(),
    "ring": sequence_sharded_case(jmat.parallel.ring_attention, causal=False),
    "ring-causal": sequence_sharded_case(jmat.parallel.ring_attention, causal=True),
    "allgather-causal": sequence_sharded_case(jmat.parallel.allgather_attention, causal=True),
    "attention-scores": scores_case(),
    "online-softmax": online_softmax_case(),
    "flax-attention-fn": flax_case(),
    "paged-assign-flex": paged_case(),
    "varlen-causal-gqa": varlen_case(),
}


@pytest.mark.parametrize("name", list(CASES))
def test_every_float_argument_has_torchs_gradient(name):
  case = CASES[name]
  arrays = {n: (np.asarray(0.37) if shape == () else randn(shape))
            for n, shape in case.shapes.items()}
  with jax.default_matmul_precision("highest"):
    out, vjp = jax.vjp(case.jmat_fn, *(jnp.asarray(x) for x in arrays.values()))
    d_out = randn(out.shape)
    got = vjp(jnp.asarray(d_out))
  tensors = [torch.tensor(x, requires_grad=True) for x in arrays.values()]
  want = case.torch_fn(*tensors)
  np.testing.assert_allclose(out, want.detach().numpy(), **tolerance(np.float64))
  want.backward(torch.tensor(d_out))
  for arg, g, t in zip(case.shapes, got, tensors, strict=True):
    expected = t.grad.numpy()
    assert np.abs(expected).max() > 1e-3, f"{name}: the case gives {arg} no gradient to check"
    assert np.isfinite(g).all(), f"{name}: d {arg}"
    np.testing.assert_allclose(g, expected, **tolerance(np.float64), err_msg=f"{name}: d {arg}")


# The public attention names that differentiate no float array: they build masks, parameters or
# option types, or only answer which kernel a call would get or trace (kernel_platforms is a
# context; parallel.work_per_device counts a mask's blocks). parallel.to_layout and from_layout
# take float arrays but are permutations: tests/test_layouts.py and
# tests/distributed/test_layouts.py check that their gradient is the inverse permutation.
NO_FLOAT_INPUT = {"AuxOutput", "AuxRequest", "BlockMask", "and_masks", "create_block_mask",
                  "create_mask", "flex_attention_backend", "init_multi_head_attention",
                  "kernel_platforms", "noop_mask", "online_softmax_init", "or_masks",
                  "parallel.block_is_masked", "parallel.from_layout", "parallel.to_layout",
                  "parallel.work_per_device"}


def test_every_public_attention_function_has_a_gradient_case():
  covered = {name for case in CASES.values() for name in case.functions}
  public = set(jmat.attention.__all__) | {f"parallel.{n}" for n in jmat.parallel.__all__}
  public = (public | {"scaled_dot_product_attention"}) - NO_FLOAT_INPUT
  assert public <= covered, f"no gradient case for {sorted(public - covered)}"


@pytest.mark.parametrize("implementation", ["dense", "blockwise"])
def test_traced_scale_gradient_equals_the_reference_in_float32(implementation):
  # The table: (1, 2, 16, 8) float32, d/d scale of sum(sdpa(q, k, v, scale=s)) at 0.3.
  q, k, v = (randn((1, 2, 16, 8)).astype(np.float32) for _ in range(3))

  def loss(scale):
    return jmat.scaled_dot_product_attention(q, k, v, scale=scale,
                                             implementation=implementation).sum()

  scale = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
  dense_attention(*(torch.tensor(x, dtype=torch.float64) for x in (q, k, v)),
                  scale=scale)[0].sum().backward()
  with jax.default_matmul_precision("highest"):
    got = jax.grad(loss)(jnp.float32(0.3))
  np.testing.assert_allclose(got, scale.grad.numpy(), rtol=1e-4, atol=1e-5)
