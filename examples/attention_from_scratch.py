"""Attention from scratch with jmat.matmul, the torch.matmul document's walk-through.

    scores = matmul(query, key.transpose(-2, -1))   # (batch, seq_q, d_k) @ (batch, d_k, seq_k)
    weights = softmax(scores / sqrt(d_k))           # (batch, seq_q, seq_k)
    output = matmul(weights, value)                 # (batch, seq_q, d_v)

each step printed with its shape, then the same with one call of
``jmat.scaled_dot_product_attention``: the two agree.

Run it: ``python examples/attention_from_scratch.py``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

import jmat


def attention_from_scratch(query: jax.Array, key: jax.Array, value: jax.Array,
                           verbose: bool = False) -> jax.Array:
  """``softmax(query @ key^T / sqrt(d_k)) @ value`` with two jmat.matmul calls."""
  def show(name, x):
    if verbose:
      print(f"  {name:<42} {tuple(x.shape)}")

  show("query (batch, seq_q, d_k)", query)
  key_t = jnp.swapaxes(key, -2, -1)  # torch: key.transpose(-2, -1)
  show("key.transpose(-2, -1) (batch, d_k, seq_k)", key_t)
  scores = jmat.matmul(query, key_t) / math.sqrt(query.shape[-1])
  show("scores (batch, seq_q, seq_k)", scores)
  weights = jax.nn.softmax(scores, axis=-1)
  show("weights = softmax(scores)", weights)
  output = jmat.matmul(weights, value)
  show("output = weights @ value", output)
  return output


def main() -> None:
  batch, seq_q, seq_k, d_k, d_v = 2, 5, 7, 8, 16
  keys = jax.random.split(jax.random.key(0), 3)
  query = jax.random.normal(keys[0], (batch, seq_q, d_k), jnp.float32)
  key = jax.random.normal(keys[1], (batch, seq_k, d_k), jnp.float32)
  value = jax.random.normal(keys[2], (batch, seq_k, d_v), jnp.float32)
  print("from scratch with jmat.matmul:")
  manual = attention_from_scratch(query, key, value, verbose=True)
  fused = jmat.scaled_dot_product_attention(query, key, value)
  print(f"jmat.scaled_dot_product_attention(query, key, value): {tuple(fused.shape)}")
  difference = float(jnp.max(jnp.abs(manual - fused)))
  print(f"max |from scratch - scaled_dot_product_attention| = {difference:.1e}: "
        f"{'equal' if difference < 1e-5 else 'DIFFERENT'} (float32)")


if __name__ == "__main__":
  main()
