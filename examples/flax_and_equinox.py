"""jmat's attention inside flax and equinox models.

flax: ``nnx.MultiHeadAttention`` takes an ``attention_fn``; give it
``jmat.attention.flax_attention_fn`` and the module runs
``jmat.scaled_dot_product_attention`` (inputs are swapped from flax's
``(batch, length, heads, head_dim)`` to torch's ``(batch, heads, length, head_dim)``
and back). With the same parameters it equals flax's own attention, for padding
and causal masks alike.

equinox: ``eqx.nn.MultiheadAttention`` has no such hook, so ``JmatAttention`` is a
small equinox module that takes its projections (``eqx.nn.Linear`` weights are
``(out, in)``, as torch's, so ``jmat.linear`` applies them unchanged) and calls
``jmat.scaled_dot_product_attention``. It equals equinox's module.

The one place they differ: a query whose keys are all masked gets 0 from jmat
(and torch); flax and equinox give it the mean of the values.

Run it: ``python examples/flax_and_equinox.py``. Needs ``pip install -e '.[examples]'``.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
from flax import nnx

import jmat


def flax_modules(features: int, heads: int, seed: int = 0):
  """Two nnx.MultiHeadAttention with equal parameters: flax's attention and jmat's."""
  return [nnx.MultiHeadAttention(num_heads=heads, in_features=features, decode=False,
                                 rngs=nnx.Rngs(seed), attention_fn=attention_fn)
          for attention_fn in (nnx.dot_product_attention, jmat.attention.flax_attention_fn)]


class JmatAttention(eqx.Module):
  """equinox's MultiheadAttention with jmat's attention: the same projections and math."""

  query_proj: eqx.nn.Linear
  key_proj: eqx.nn.Linear
  value_proj: eqx.nn.Linear
  output_proj: eqx.nn.Linear
  num_heads: int = eqx.field(static=True)

  @classmethod
  def from_equinox(cls, module: eqx.nn.MultiheadAttention) -> JmatAttention:
    return cls(module.query_proj, module.key_proj, module.value_proj, module.output_proj,
               module.num_heads)

  def __call__(self, query: jax.Array, key: jax.Array, value: jax.Array,
               mask: jax.Array | None = None) -> jax.Array:
    """Unbatched, as equinox's: ``(q_seq, q_size)``, ``(kv_seq, ...)``; mask True = attend."""
    def heads(linear: eqx.nn.Linear, x: jax.Array) -> jax.Array:  # (seq, size) -> (H, seq, d)
      y = jmat.linear(x, linear.weight, linear.bias)
      return jnp.swapaxes(y.reshape(x.shape[0], self.num_heads, -1), 0, 1)

    out = jmat.scaled_dot_product_attention(
        heads(self.query_proj, query), heads(self.key_proj, key), heads(self.value_proj, value),
        mask)
    out = jnp.swapaxes(out, 0, 1).reshape(query.shape[0], -1)
    return jmat.linear(out, self.output_proj.weight, self.output_proj.bias)


def max_difference(a: jax.Array, b: jax.Array) -> str:
  return f"{float(jnp.max(jnp.abs(a - b))):.1e}"


def main() -> None:
  batch, length, features, heads = 3, 7, 16, 4
  x = jax.random.normal(jax.random.key(1), (batch, length, features), jnp.float32)
  lengths = jnp.array([7, 5, 2])  # key padding: sequence i has lengths[i] tokens
  padding = nnx.make_attention_mask(jnp.ones((batch, length)),
                                    jnp.arange(length) < lengths[:, None])
  causal = nnx.make_causal_mask(jnp.ones((batch, length)))
  own, with_jmat = flax_modules(features, heads)
  print(f"flax nnx.MultiHeadAttention, x {x.shape}, {heads} heads, masks are float 0/1 as "
        f"flax makes them; max |flax attention - jmat attention|:")
  for name, options in [("no mask", {}), ("padding mask", {"mask": padding}),
                        ("causal mask", {"mask": causal}), ("is_causal=True", {"is_causal": True})]:
    print(f"  {name:<15} {max_difference(own(x, **options), with_jmat(x, **options))}")

  module = eqx.nn.MultiheadAttention(heads, features, dtype=jnp.float32, key=jax.random.key(2))
  ported = JmatAttention.from_equinox(module)
  mask = jnp.tril(jnp.ones((length, length), bool))
  expected = jax.vmap(lambda x: module(x, x, x, mask))(x)
  actual = jax.vmap(lambda x: ported(x, x, x, mask))(x)
  print(f"equinox MultiheadAttention (vmapped over the batch), causal mask: max |equinox - jmat| "
        f"{max_difference(expected, actual)}")

  # Where they differ: the last query may attend to no key.
  q = k = v = x[:, :, None, :]  # one head: (batch, length, 1, features)
  nothing = jnp.ones((batch, 1, length, length)).at[:, :, -1, :].set(0.0)
  flax_row = nnx.dot_product_attention(q, k, v, mask=nothing)[:, -1]
  jmat_row = jmat.attention.flax_attention_fn(q, k, v, mask=nothing)[:, -1]
  print(f"a query with every key masked: flax gives the mean of the values (max |flax - mean| "
        f"{max_difference(flax_row, jnp.mean(v, axis=1))}), jmat gives 0 as torch does "
        f"(max |jmat| {float(jnp.max(jnp.abs(jmat_row))):.1f})")

if __name__ == "__main__":
  main()
