"""A long-context training step on packed documents, the sequence sharded over devices.

A one-layer causal language model's attention over a packed batch of documents runs
with ``jmat.parallel.ring_attention`` on a mesh whose ``"seq"`` axis shards the
sequence: each device keeps its shard of queries while the keys and values travel
around the ring, so no device ever holds the whole sequence. The pieces:

* the **mesh**: ``jax.make_mesh((n,), ("seq",))`` over the devices;
* the **layout**: ``"zigzag"`` (2n chunks, device i holds chunks i and 2n-1-i) evens
  out the causal work; ``jmat.parallel.to_layout`` puts globally ordered tokens into
  it, once per batch (the model never needs them in global order again);
* the **BlockMask** of the global sequence: causal within each document
  (``generate_doc_mask_mod``); positions in the mods are global, whatever the layout;
* **ring attention** with that mask, and a next-token loss, differentiated with
  ``jax.value_and_grad`` (the backward pass is a second trip around the ring).

Run it on 8 simulated CPU devices: ``python examples/long_context_training.py``
(``--fast`` for a short sequence, the test suite's setting). Across processes the same
code runs once ``jax.distributed.initialize(...)`` has joined them: ``jax.devices()``
then lists every process's devices (see docs/distributed.md).
"""

from __future__ import annotations

import argparse
import os
import sys

if __name__ == "__main__" and "jax" not in sys.modules:  # 8 CPU devices, before jax starts
  os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import AxisType  # noqa: E402

import jmat  # noqa: E402

VOCAB, EMBED, HEADS = 64, 32, 4
DOCUMENTS = (0.4, 0.25, 0.2, 0.15)  # fractions of the packed sequence


def packed_batch(length: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Token ids ``(1, length)`` and the document of every position (non-decreasing ids)."""
  bounds = np.round(length * np.cumsum((0.0,) + DOCUMENTS)).astype(int)
  ids = np.repeat(np.arange(len(DOCUMENTS)), np.diff(bounds)).astype(np.int32)
  tokens = np.random.default_rng(seed).integers(0, VOCAB, (1, length))
  # Each document repeats a short pattern: learnable, so the loss falls within a few steps.
  return (tokens % 5 + ids * 5)[:, :length], ids


def init(rng: jax.Array) -> dict[str, jax.Array]:
  keys = jax.random.split(rng, 3)
  scale = EMBED ** -0.5
  return {"embed": jax.random.normal(keys[0], (VOCAB, EMBED)) * scale,
          "qkv": jax.random.normal(keys[1], (EMBED, 3 * EMBED)) * scale,
          "out": jax.random.normal(keys[2], (EMBED, VOCAB)) * scale}


def make_step(mesh: jax.sharding.Mesh, block_mask, layout: str = "zigzag"):
  """The jitted training step: ``(params, tokens, targets) -> (loss, params)``.

  ``tokens`` and ``targets`` are ``(B, L)`` in ``layout`` over ``"seq"``.
  """

  def loss_fn(params, tokens, targets):
    x = params["embed"][tokens]  # (B, L, E), sequence in the layout
    q, k, v = jnp.split(x @ params["qkv"], 3, axis=-1)
    heads = [jnp.swapaxes(t.reshape(t.shape[:2] + (HEADS, -1)), 1, 2) for t in (q, k, v)]
    attended = jmat.parallel.ring_attention(*heads, mesh=mesh, axis_name="seq",
                                            block_mask=block_mask, layout=layout)
    y = x + jnp.swapaxes(attended, 1, 2).reshape(x.shape)
    logits = y @ params["out"]
    log_p = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.mean(jnp.take_along_axis(log_p, targets[..., None], axis=-1))

  @jax.jit
  def step(params, tokens, targets):
    loss, grads = jax.value_and_grad(loss_fn)(params, tokens, targets)
    return loss, jax.tree.map(lambda p, g: p - 0.5 * g, params, grads)

  return step


def train(length: int, steps: int, devices: int | None = None) -> list[float]:
  """A few training steps on one packed batch; returns the losses."""
  n = devices or jax.device_count()
  mesh = jax.make_mesh((n,), ("seq",), axis_types=(AxisType.Auto,))
  tokens, ids = packed_batch(length + 1)
  ids = ids[:length]
  # Causal within each document: a token predicts the next one of its own document.
  mask_mod = jmat.mods.generate_doc_mask_mod(jmat.mods.causal_mask, jnp.asarray(ids))
  block_mask = jmat.create_block_mask(mask_mod, None, None, length, length,
                                      BLOCK_SIZE=length // (2 * n))
  inputs, targets = (jmat.parallel.to_layout(jnp.asarray(x), mesh, "seq", "zigzag", axis=-1)
                     for x in (tokens[:, :-1], tokens[:, 1:]))
  step = make_step(mesh, block_mask)
  params = init(jax.random.key(0))
  losses = []
  for _ in range(steps):
    loss, params = step(params, inputs, targets)
    losses.append(float(loss))
  return losses


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--fast", action="store_true", help="a short sequence (the test's)")
  args = parser.parse_args()
  length = 256 if args.fast else 4096
  losses = train(length, steps=5)
  print(f"{jax.device_count()} devices, L = {length}, zigzag layout, documents mask")
  print("loss per step: " + ", ".join(f"{x:.3f}" for x in losses))


if __name__ == "__main__":
  main()
