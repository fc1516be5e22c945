"""NaN and inf in the inputs come out where torch's do, on every attention path.

jmat's rule is torch's: an output (and lse) is NaN exactly where torch's is, inf
where torch's is, and finite elsewhere with torch's values; one batch element,
head or row never poisons another; a fully masked row stays 0 (lse -inf).
Oracles: torch 2.13's SDPA (its default CPU kernel, float64) and eager
flex_attention (float64) on the same inputs. torch's SDPA backends disagree on
one point: its math backend adds ``-inf`` to a masked NaN score (still NaN), so a
NaN key poisons rows that may not see it; its default kernel and flex select
masked entries out, and jmat follows them: a row is NaN only through what it sees.
Ring and all-gather attention are tested on 4 simulated devices in
tests/distributed/test_context_parallel.py.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

import jmat
from jmat import mods
from tests.cases import tolerance

torch = pytest.importorskip("torch")
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402
from torch.nn.attention import flex_attention as torch_flex  # noqa: E402

B, H, E = 2, 2, 4
BAD_ROW, BAD_KEY = 2, 3


def _inputs(case: str, length: int, seed: int = 0):
  """``q, k, v`` of shape (B, H, length, E), float32, with the case's non-finite entries.

  An infinite value sits at key 0, which every row sees: for a row that may not
  see an infinite value, torch's backends disagree (its math backend gives
  NaN = 0 * inf in every such row, its flash kernel only in the rows of its
  32-query tile, jmat's kernels only in the rows of a computed block).
  """
  rng = np.random.default_rng(seed)
  q, k, v = (rng.standard_normal((B, H, length, E)).astype(np.float32) for _ in range(3))
  if case == "nan query row":
    q[0, 1, BAD_ROW, 1] = np.nan
  elif case == "nan key":
    k[0, 0, BAD_KEY, 2] = np.nan
  elif case == "inf value":
    v[1, 0, 0, 0] = np.inf  # key 0: every row sees it, causal or not (see _inputs' note)
  elif case == "+inf query row":
    q[1, 1, BAD_ROW, :] = np.inf
  elif case == "nan batch element":
    q[1] = np.nan
  elif case == "nan score_mod":
    pass  # the score_mod makes one score NaN
  else:
    raise AssertionError(case)
  return q, k, v


def _nan_score(score, b, h, q_idx, kv_idx):
  """NaN at one (query, key) position of batch 0, head 1; torch's and jmat's score_mod alike."""
  hit = (b == 0) & (h == 1) & (q_idx == BAD_KEY + 2) & (kv_idx == BAD_KEY)  # seen when causal
  where = torch.where if isinstance(score, torch.Tensor) else jax.numpy.where
  return where(hit, float("nan"), score)


CASES = ["nan query row", "nan key", "inf value", "+inf query row", "nan batch element"]


def _torch_sdpa(q, k, v, is_causal):
  with sdpa_kernel(SDPBackend.FLASH_ATTENTION):  # the CPU default, named so it cannot change
    out = torch.nn.functional.scaled_dot_product_attention(
        *(torch.tensor(x, dtype=torch.float64) for x in (q, k, v)), is_causal=is_causal)
  return out.numpy()


def _torch_causal(b, h, q_idx, kv_idx):
  return kv_idx <= q_idx


def _torch_flex(q, k, v, is_causal, score_mod=None):
  length = q.shape[-2]
  block_mask = torch_flex.create_block_mask(_torch_causal, None, None, length, length,
                                            device="cpu") if is_causal else None
  out, aux = _eager_flex(
      *(torch.tensor(x, dtype=torch.float64) for x in (q, k, v)), score_mod=score_mod,
      block_mask=block_mask)
  return out.numpy(), aux.lse.numpy()


def _eager_flex(q, k, v, **kwargs):
  """torch's eager flex_attention (the oracle) with its lse."""
  return torch_flex.flex_attention(q, k, v, return_aux=torch_flex.AuxRequest(lse=True), **kwargs)


def _assert_same_nonfinite(got, want, dtype=np.float32):
  """NaN and inf exactly where ``want`` has them; finite entries equal within tolerance."""
  got = np.asarray(got, np.float64)
  np.testing.assert_array_equal(np.isnan(got), np.isnan(want), "NaN at other places than torch")
  np.testing.assert_array_equal(np.isinf(got), np.isinf(want), "inf at other places than torch")
  np.testing.assert_allclose(got, want, equal_nan=True, **tolerance(dtype))


def _some_nonfinite_and_some_finite(want):
  """A case is worth testing only if torch's output has both (so a silent 0 or a NaN
  everywhere would fail it)."""
  assert not np.all(np.isfinite(want)) and np.any(np.isfinite(want))


@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("implementation, length", [
    ("dense", 8), ("blockwise", 8), (None, 8), (None, 600)])
def test_sdpa_gives_nan_and_inf_where_torch_does(case, is_causal, implementation, length):
  q, k, v = _inputs(case, length)
  want = _torch_sdpa(q, k, v, is_causal)
  _some_nonfinite_and_some_finite(want)
  with jax.default_matmul_precision("highest"):
    got = jmat.scaled_dot_product_attention(q, k, v, is_causal=is_causal,
                                            implementation=implementation)
  _assert_same_nonfinite(got, want)


BACKENDS = {
    "XLA": {"BACKEND": "XLA"},
    "TRITON": {"BACKEND": "TRITON", "INTERPRET": True},
    "MOSAIC": {"BACKEND": "MOSAIC", "INTERPRET": True},
}


@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("case", CASES + ["nan score_mod"])
def test_flex_gives_nan_and_inf_where_torch_does(case, is_causal, backend):
  length = 8
  q, k, v = _inputs(case, length, seed=1)
  score_mod = _nan_score if case == "nan score_mod" else None
  want, want_lse = _torch_flex(q, k, v, is_causal, score_mod)
  _some_nonfinite_and_some_finite(want)
  block_mask = (jmat.create_block_mask(mods.causal_mask, None, None, length, length)
                if is_causal else None)
  with jax.default_matmul_precision("highest"):
    got, lse = jmat.flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask,
                                   return_lse=True, kernel_options=BACKENDS[backend])
  _assert_same_nonfinite(got, want)
  _assert_same_nonfinite(lse, want_lse)


def test_a_fully_masked_row_stays_zero_beside_a_nan_row():
  """Row 0 sees no key (0, lse -inf, as torch's), row BAD_ROW sees a NaN (NaN), the rest finite."""
  length = 8
  q, k, v = _inputs("nan query row", length)

  def mask(b, h, q_idx, kv_idx):
    return (q_idx > 0) & (kv_idx <= q_idx)

  want, aux = _eager_flex(
      *(torch.tensor(x, dtype=torch.float64) for x in (q, k, v)),
      block_mask=torch_flex.create_block_mask(mask, None, None, length, length, device="cpu"))
  want, want_lse = want.numpy(), aux.lse.numpy()
  assert np.all(want[:, :, 0] == 0) and np.all(np.isneginf(want_lse[:, :, 0]))
  with jax.default_matmul_precision("highest"):
    got, lse = jmat.flex_attention(
        q, k, v, block_mask=jmat.create_block_mask(mask, None, None, length, length),
        return_lse=True)
  _assert_same_nonfinite(got, want)
  _assert_same_nonfinite(lse, want_lse)


@pytest.mark.parametrize("blockwise", [False, True])
def test_mha_gives_nan_where_torch_does(blockwise):
  """MultiheadAttention's projections carry a NaN key into every row of its batch element only."""
  rng = np.random.default_rng(3)
  length, embed = 600 if blockwise else 8, 8
  x = rng.standard_normal((2, length, embed)).astype(np.float32)
  x[1, BAD_KEY, 0] = np.nan
  module = torch.nn.MultiheadAttention(embed, 2, batch_first=True, dtype=torch.float64)
  params = {name: p.detach().numpy().astype(np.float32) for name, p in module.state_dict().items()}
  with torch.no_grad():
    xt = torch.tensor(x, dtype=torch.float64)
    want = module(xt, xt, xt, need_weights=False)[0].numpy()
  _some_nonfinite_and_some_finite(want)
  with jax.default_matmul_precision("highest"):
    got = jmat.multi_head_attention(params, x, x, x, num_heads=2)[0]
  _assert_same_nonfinite(got, want)
