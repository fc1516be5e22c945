"""Flex attention on a packed batch: a sliding window inside each document, a learnable bias.

Four documents of different lengths are packed into one sequence; ``segment_ids``
says which document each position belongs to. Every query attends to the last
``WINDOW + 1`` keys of its own document (a causal sliding window, Mistral-style,
that never crosses a document boundary), and a learnable relative-position bias
table (one entry per head and distance) is added to the scores::

    mask_mod  = generate_doc_mask_mod(generate_sliding_window(WINDOW), segment_ids)
    score_mod = generate_relative_bias(table)          # score + table[h, kv - q + WINDOW]

The BlockMask is built once; only its non-empty blocks are computed. The example
checks the forward pass against dense attention with the same mask and bias, then
takes gradients with respect to q, k, v and the captured bias table.

Run it: ``python examples/flex_attention.py`` (``--fast`` for a small sequence,
the test suite's setting).
"""

from __future__ import annotations

import argparse
import math

import jax
import jax.numpy as jnp
import numpy as np

import jmat

HEADS, HEAD_DIM, WINDOW = 4, 64, 256
DOCUMENTS = (0.375, 0.25, 0.21875, 0.15625)  # fractions of the sequence: 1536, 1024, 896, 640


def segment_ids(length: int) -> jax.Array:
  """The document of every position of a packed sequence (non-decreasing ids)."""
  bounds = np.round(length * np.cumsum((0.0,) + DOCUMENTS)).astype(int)
  return jnp.asarray(np.repeat(np.arange(len(DOCUMENTS)), np.diff(bounds)), jnp.int32)


def attention(q, k, v, table, block_mask):
  """Flex attention with the relative bias ``table`` added to every score."""
  return jmat.flex_attention(q, k, v, jmat.mods.generate_relative_bias(table),
                             block_mask=block_mask)


def dense_attention(q, k, v, table, mask):
  """The same attention with a dense ``(L, L)`` mask: the check of the block-sparse one."""
  length = q.shape[-2]
  position = jnp.arange(length)
  bias = table[:, position[None, :] - position[:, None] + WINDOW]  # (H, L, L), clipped
  scores = q @ jnp.swapaxes(k, -1, -2) / math.sqrt(q.shape[-1]) + bias
  scores = jnp.where(mask, scores, -jnp.inf)
  return jax.nn.softmax(scores, axis=-1) @ v


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description="Flex attention on a packed batch.")
  parser.add_argument("--fast", action="store_true", help="L=1024 in blocks of 64 (the test's)")
  args = parser.parse_args(argv)
  length, block = (1024, 64) if args.fast else (4096, 128)

  ids = segment_ids(length)
  mask_mod = jmat.mods.generate_doc_mask_mod(jmat.mods.generate_sliding_window(WINDOW), ids)
  block_mask = jmat.create_block_mask(mask_mod, None, None, length, length, BLOCK_SIZE=block)
  sizes = np.bincount(np.asarray(ids)).tolist()
  print(f"{len(sizes)} documents of {sizes} tokens packed into L={length}; window {WINDOW}")
  print(f"{block_mask}")
  print(f"blocks of {block}x{block}: █ full (no mask evaluated), ░ partial (mask evaluated), "
        f"· skipped; {block_mask.sparsity():.1f}% skipped")
  print(block_mask.to_string())

  keys = jax.random.split(jax.random.key(0), 4)
  q, k, v = (jax.random.normal(key, (1, HEADS, length, HEAD_DIM)) for key in keys[:3])
  table = 0.1 * jax.random.normal(keys[3], (HEADS, 2 * WINDOW + 1))

  out = jax.jit(attention)(q, k, v, table, block_mask)
  dense_mask = jmat.attention.create_mask(mask_mod, None, None, length, length)
  with jax.default_matmul_precision("highest"):
    error = float(jnp.max(jnp.abs(out - dense_attention(q, k, v, table, dense_mask))))
  print(f"forward: q, k, v {q.shape} -> out {out.shape}; max |flex - dense| = {error:.1e}")

  def loss(q, k, v, table, block_mask):
    return jnp.mean(jnp.square(attention(q, k, v, table, block_mask)))

  grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))(q, k, v, table, block_mask)
  for name, grad in zip(("q", "k", "v", "table"), grads, strict=True):
    norm = float(jnp.linalg.norm(grad))
    print(f"backward: d loss / d {name:5} {str(grad.shape):18} norm {norm:.3e}")


if __name__ == "__main__":
  main()
