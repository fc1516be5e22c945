"""A pre-norm Transformer encoder block as pure functions of jmat.

    x = x + multi_head_attention(layer_norm(x))
    x = x + linear2(activation(linear1(layer_norm(x))))

The parameters are a flat dict with the state_dict keys of
``torch.nn.TransformerEncoderLayer(d_model, nhead, dim_feedforward, norm_first=True,
batch_first=True)``, so a trained torch layer runs here unchanged:
``{k: jnp.asarray(v.numpy()) for k, v in layer.state_dict().items()}``.

Run it: ``python examples/transformer_block.py``.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

import jmat


def init_encoder_block(
    rng: jax.Array, embed_dim: int, num_heads: int, mlp_dim: int, dtype=jnp.float32
) -> dict[str, jax.Array]:
  """Parameters initialised as torch initialises a TransformerEncoderLayer."""
  attention_key, key1, key2, bias1, bias2 = jax.random.split(rng, 5)

  def torch_linear(key, bias_key, fan_out, fan_in):  # torch.nn.Linear's default init
    bound = 1.0 / math.sqrt(fan_in)
    return (jax.random.uniform(key, (fan_out, fan_in), dtype, -bound, bound),
            jax.random.uniform(bias_key, (fan_out,), dtype, -bound, bound))

  attention = jmat.init_multi_head_attention(attention_key, embed_dim, num_heads, dtype=dtype)
  w1, b1 = torch_linear(key1, bias1, mlp_dim, embed_dim)
  w2, b2 = torch_linear(key2, bias2, embed_dim, mlp_dim)
  ones, zeros = jnp.ones((embed_dim,), dtype), jnp.zeros((embed_dim,), dtype)
  return {
      **{f"self_attn.{name}": p for name, p in attention.items()},
      "linear1.weight": w1, "linear1.bias": b1, "linear2.weight": w2, "linear2.bias": b2,
      "norm1.weight": ones, "norm1.bias": zeros, "norm2.weight": ones, "norm2.bias": zeros,
  }


def layer_norm(x: jax.Array, weight: jax.Array, bias: jax.Array, eps: float = 1e-5) -> jax.Array:
  """torch.nn.LayerNorm over the last dim (biased variance, eps inside the square root)."""
  mean = jnp.mean(x, axis=-1, keepdims=True)
  variance = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
  return (x - mean) * jax.lax.rsqrt(variance + eps) * weight + bias


@functools.partial(jax.jit, static_argnames=("num_heads", "is_causal", "activation"))
def encoder_block(
    params: dict[str, jax.Array],
    x: jax.Array,
    *,
    num_heads: int,
    key_padding_mask: jax.Array | None = None,
    is_causal: bool = False,
    activation: str = "relu",
) -> jax.Array:
  """One pre-norm encoder block on ``x`` of shape ``(N, L, E)`` (batch first).

  Args:
    params: TransformerEncoderLayer state_dict keys (see the module docstring).
    x: the input sequence batch.
    num_heads: attention heads; divides ``E``.
    key_padding_mask: ``(N, L)`` bool, True = padding (ignored as a key).
    is_causal: causal self-attention (a decoder-style block).
    activation: ``"relu"`` (torch's default) or ``"gelu"`` (exact, erf-based).

  Returns:
    Array of shape ``(N, L, E)``.
  """
  attention = {name.removeprefix("self_attn."): p for name, p in params.items()
               if name.startswith("self_attn.")}
  h = layer_norm(x, params["norm1.weight"], params["norm1.bias"])
  h, _ = jmat.multi_head_attention(attention, h, h, h, num_heads=num_heads,
                                   key_padding_mask=key_padding_mask, is_causal=is_causal)
  x = x + h
  h = layer_norm(x, params["norm2.weight"], params["norm2.bias"])
  h = jmat.linear(h, params["linear1.weight"], params["linear1.bias"])
  h = jax.nn.relu(h) if activation == "relu" else jax.nn.gelu(h, approximate=False)
  return x + jmat.linear(h, params["linear2.weight"], params["linear2.bias"])


def main() -> None:
  """Runs the block forward and backward on a random batch and prints what it did."""
  params = init_encoder_block(jax.random.key(0), embed_dim=64, num_heads=4, mlp_dim=256)
  x = jax.random.normal(jax.random.key(1), (2, 10, 64), jnp.float32)
  padding = jnp.arange(10) >= jnp.array([[10], [7]])  # the 2nd sequence has 7 tokens
  y = encoder_block(params, x, num_heads=4, key_padding_mask=padding)
  print(f"encoder block: x {x.shape} -> y {y.shape}, {y.dtype}")

  def loss(params):
    return jnp.mean(jnp.square(encoder_block(params, x, num_heads=4, is_causal=True)))

  grads = jax.grad(loss)(params)
  norm = math.sqrt(sum(float(jnp.sum(jnp.square(g))) for g in grads.values()))
  print(f"causal block: loss {float(loss(params)):.4f}, gradient norm {norm:.4f} over "
        f"{len(grads)} parameter arrays")


if __name__ == "__main__":
  main()
