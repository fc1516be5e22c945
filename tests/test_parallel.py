"""jmat.parallel on one device (checks, a 1-device ring) and the launcher of the 8-device tests.

The 8-device tests (``tests/distributed/``) need ``XLA_FLAGS`` set before jax
is imported, and this process has imported jax with one device (the root
conftest), so they run in a child pytest process with 8 simulated CPU devices.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jmat
from tests.cases import attention_reference, tolerance

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_eight_device_suite_passes_in_its_own_process():
  env = dict(os.environ)
  env["XLA_FLAGS"] = " ".join(
      f for f in (env.get("XLA_FLAGS", ""), "--xla_force_host_platform_device_count=8") if f
  )
  # The child module raises instead of skipping if the 8 devices did not appear.
  env["JMAT_REQUIRE_8_DEVICES"] = "1"
  env["JAX_PLATFORMS"] = "cpu"
  result = subprocess.run(
      [sys.executable, "-m", "pytest", "tests/distributed", "-q", "-p", "no:cacheprovider"],
      cwd=ROOT,
      env=env,
      capture_output=True,
      text=True,
      timeout=600,
      check=False,
  )
  report = result.stdout[-6000:] + result.stderr[-3000:]
  assert result.returncode == 0, report
  assert " passed" in result.stdout and " failed" not in result.stdout, report


@pytest.mark.parametrize("fn", [jmat.parallel.ring_attention, jmat.parallel.allgather_attention])
@pytest.mark.parametrize("is_causal", [False, True])
def test_one_device_ring_is_plain_attention(fn, is_causal):
  rng = np.random.default_rng(0)
  q, k = rng.standard_normal((3, 5, 7)), rng.standard_normal((3, 13, 7))
  v = rng.standard_normal((3, 13, 2))
  mesh = jax.make_mesh((1,), ("seq",))
  out = fn(q, k, v, mesh=mesh, axis_name="seq", is_causal=is_causal)
  want = attention_reference(q, k, v, is_causal=is_causal)
  np.testing.assert_allclose(np.asarray(out), want, **tolerance(np.float64))


@pytest.mark.parametrize("fn", [jmat.parallel.ring_attention, jmat.parallel.allgather_attention,
                                jmat.scaled_dot_product_attention])
@pytest.mark.parametrize("is_causal", [False, True])
def test_empty_embedding_gives_the_mean_of_the_visible_values_as_sdpa(fn, is_causal):
  """E = 0: every score is 0 whatever the scale (SDPA's default is 1 there, not 1 / sqrt(0))."""
  v = np.random.default_rng(1).standard_normal((2, 6, 3))
  q = k = np.zeros((2, 6, 0))
  sdpa = fn is jmat.scaled_dot_product_attention
  options = {} if sdpa else {"mesh": MESH, "axis_name": "seq"}
  out = fn(q, k, v, is_causal=is_causal, **options)
  want = attention_reference(q, k, v, is_causal=is_causal, scale=1.0)
  np.testing.assert_allclose(np.asarray(out), want, **tolerance(np.float64))


MESH = jax.make_mesh((1,), ("seq",))


@pytest.mark.parametrize(
    ("shapes", "kind", "words"),
    [
        (((5,), (5,), (5,)), jmat.ShapeError, ["at least 2-D", "query has shape (5,)"]),
        (((2, 4, 3), (1, 4, 3), (1, 4, 3)), jmat.ShapeError,
         ["leading (batch, head) dims differ", "query has shape (2, 4, 3)",
          "key has shape (1, 4, 3)", "does not broadcast them"]),
        (((2, 4, 3), (3, 4, 3), (3, 4, 3)), jmat.ShapeError,
         ["do not broadcast", "query has shape (2, 4, 3)", "key has shape (3, 4, 3)"]),
        (((4, 3), (4, 5), (4, 3)), jmat.ShapeError,
         ["embedding sizes 3 and 5 differ", "query has shape (4, 3)", "key has shape (4, 5)"]),
        (((4, 3), (4, 3), (6, 3)), jmat.ShapeError,
         ["key and value lengths 4 and 6 differ", "value has shape (6, 3)"]),
    ],
)
def test_ring_attention_refuses_bad_shapes(shapes, kind, words):
  q, k, v = (jnp.ones(s) for s in shapes)
  with pytest.raises(kind) as info:
    jmat.parallel.ring_attention(q, k, v, mesh=MESH, axis_name="seq")
  message = str(info.value)
  assert message.startswith("jmat.parallel.ring_attention: ")
  for word in words:
    assert word in message


def test_ring_attention_refuses_an_unknown_mesh_axis():
  q = jnp.ones((4, 3))
  with pytest.raises(ValueError, match=r"mesh has no axis 'sequence'; its axes are \('seq',\)"):
    jmat.parallel.ring_attention(q, q, q, mesh=MESH, axis_name="sequence")


def test_ring_attention_refuses_integer_and_mixed_dtypes():
  q = jnp.ones((4, 3), jnp.int32)
  with pytest.raises(TypeError, match="have dtype int32; attention needs floating-point"):
    jmat.parallel.ring_attention(q, q, q, mesh=MESH, axis_name="seq")
  f32, f64 = jnp.ones((4, 3), jnp.float32), jnp.ones((4, 3), jnp.float64)
  with pytest.raises(TypeError, match="dtypes differ: query is float32, key is float64"):
    jmat.parallel.ring_attention(f32, f64, f32, mesh=MESH, axis_name="seq")


@pytest.mark.parametrize("q_len, k_len, n", [(6, 9, 3), (16, 24, 8)])
def test_block_is_masked_follows_the_top_left_causal_mask(q_len, k_len, n):
  visible = np.tril(np.ones((q_len, k_len), bool))
  blocks = visible.reshape(n, q_len // n, n, k_len // n).any(axis=(1, 3))
  for i in range(n):
    for j in range(n):
      masked = jmat.parallel.block_is_masked(i, j, q_len // n, k_len // n)
      assert bool(masked) == (not blocks[i, j])
