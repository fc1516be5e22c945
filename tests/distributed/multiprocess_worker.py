"""One OS process of tests/distributed/test_multiprocess.py (run it by hand as shown there).

    python tests/distributed/multiprocess_worker.py --process-id 0 --num-processes 2 --port 12355

Each process starts JAX on 4 simulated CPU devices, joins the others through
``jax.distributed.initialize`` (gloo collectives between processes) and runs, over
the mesh of every process's devices, ``jmat.parallel.ring_attention`` (values and
gradients, causal and not; a packed batch of documents in the zigzag layout) and a
batch-sharded ``jmat.bmm``. Every process checks the
shards it holds against numpy in float64 and prints one JSON line of its largest errors;
it exits non-zero if one is over the float32 tolerance of tests/cases.py.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys

DEVICES_PER_PROCESS = 4

# Before jax is imported: the CPU device count is read once, when the backend starts.
os.environ["XLA_FLAGS"] = " ".join(
    f for f in (os.environ.get("XLA_FLAGS", ""),
                f"--xla_force_host_platform_device_count={DEVICES_PER_PROCESS}") if f
)
os.environ["JAX_PLATFORMS"] = "cpu"
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))  # the checkout: tests.cases

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import AxisType, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import jmat  # noqa: E402
import jmat._src.layouts  # noqa: E402
from tests.cases import attention_reference, attention_reference_vjp, tolerance  # noqa: E402


def _global(x: np.ndarray, mesh: jax.sharding.Mesh, spec: P) -> jax.Array:
  """One global array from the same host data in every process: each keeps its own shards."""
  return jax.make_array_from_callback(x.shape, NamedSharding(mesh, spec), lambda i: x[i])


def _error(got: jax.Array, want: np.ndarray) -> float:
  """The largest error of the shards this process holds, after checking them."""
  error = 0.0
  for shard in got.addressable_shards:
    ours, theirs = np.asarray(shard.data, np.float64), want[shard.index]
    tol = tolerance(got.dtype)
    np.testing.assert_allclose(ours, theirs, rtol=tol["rtol"], atol=tol["atol"])
    error = max(error, float(np.max(np.abs(ours - theirs), initial=0.0)))
  return error


def run(process_id: int, num_processes: int, port: int) -> dict[str, float]:
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(
      coordinator_address=f"localhost:{port}",
      num_processes=num_processes,
      process_id=process_id,
      local_device_ids=list(range(DEVICES_PER_PROCESS)),
      initialization_timeout=60,
  )
  devices = jax.device_count()
  assert devices == num_processes * DEVICES_PER_PROCESS, jax.devices()
  assert jax.local_device_count() == DEVICES_PER_PROCESS
  # Every process draws the same global arrays (one seed) and keeps its own shards.
  rng = np.random.default_rng(20261129)
  batch, heads, length, embed = 2, 3, 8 * devices, 16
  q, k, v, d_out = (rng.standard_normal((batch, heads, length, embed)).astype(np.float32)
                    for _ in range(4))
  errors: dict[str, float] = {}

  mesh = jax.make_mesh((devices,), ("seq",), axis_types=(AxisType.Auto,))
  spec = P(None, None, "seq", None)
  placed = [_global(x, mesh, spec) for x in (q, k, v)]
  cotangent = _global(d_out, mesh, spec)
  for is_causal in (False, True):
    def ring(q, k, v, is_causal=is_causal):
      return jmat.parallel.ring_attention(q, k, v, mesh=mesh, axis_name="seq",
                                          is_causal=is_causal)

    out, vjp = jax.vjp(ring, *placed)
    name = "causal" if is_causal else "full"
    want_out = np.asarray(attention_reference(q, k, v, is_causal=is_causal))
    errors[f"ring {name} out"] = _error(out, want_out)
    want = attention_reference_vjp(q, k, v, d_out, is_causal=is_causal)
    for label, got, grad in zip("qkv", vjp(cotangent), want[:3], strict=True):
      errors[f"ring {name} d{label}"] = _error(got, grad)

  # A packed batch of documents, causal within each, in the zigzag layout: the host lays the
  # global arrays out as jmat.parallel.to_layout would and each process keeps its shards.
  ids = np.repeat(np.arange(4), [10, 30, 16, length - 56])
  documents = jmat.create_block_mask(
      jmat.mods.generate_doc_mask_mod(jmat.mods.causal_mask, ids), None, None, length, length,
      BLOCK_SIZE=4)
  chunk = length // (2 * devices)
  order = np.concatenate([np.arange(c * chunk, (c + 1) * chunk)
                          for pair in jmat._src.layouts.device_chunks("zigzag", devices)
                          for c in pair])
  laid = [_global(x[..., order, :], mesh, spec) for x in (q, k, v, d_out)]

  def documents_ring(q, k, v):
    return jmat.parallel.ring_attention(q, k, v, mesh=mesh, axis_name="seq",
                                        block_mask=documents, layout="zigzag")

  out, vjp = jax.vjp(documents_ring, *laid[:3])
  allowed = (ids[:, None] == ids[None, :]) & np.tri(length, dtype=bool)
  want = attention_reference_vjp(q, k, v, d_out, allowed=allowed)
  errors["ring documents zigzag out"] = _error(
      out, np.asarray(attention_reference(q, k, v, allowed=allowed))[..., order, :])
  for label, got, grad in zip("qkv", vjp(laid[3]), want[:3], strict=True):
    errors[f"ring documents zigzag d{label}"] = _error(got, grad[..., order, :])

  data = jax.make_mesh((devices,), ("data",), axis_types=(AxisType.Auto,))
  a = rng.standard_normal((2 * devices, 3, 5)).astype(np.float32)
  b = rng.standard_normal((2 * devices, 5, 7)).astype(np.float32)
  with jax.default_matmul_precision("highest"):
    product = jmat.bmm(_global(a, data, P("data")), _global(b, data, P("data")))
  assert product.sharding.spec[0] == "data", product.sharding  # stays batch-sharded
  errors["bmm"] = _error(product, a.astype(np.float64) @ b.astype(np.float64))
  return errors


def main() -> int:
  parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
  parser.add_argument("--process-id", type=int, required=True)
  parser.add_argument("--num-processes", type=int, default=2)
  parser.add_argument("--port", type=int, required=True, help="the coordinator's, on localhost")
  args = parser.parse_args()
  errors = run(args.process_id, args.num_processes, args.port)
  print(json.dumps({"process_id": args.process_id, "devices": jax.device_count(),
                    "max_errors": errors}), flush=True)
  jax.distributed.shutdown()
  return 0


if __name__ == "__main__":
  sys.exit(main())
