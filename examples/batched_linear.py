"""Per-sample linear maps with jmat.bmm, the torch.bmm document's second use, and its two mistakes.

Every sample has its own weight matrix (say, produced by a hypernetwork):

    x (batch, points, in) @ w (batch, in, out) -> (batch, points, out)

``bmm`` multiplies sample ``i``'s points by sample ``i``'s weights and never
broadcasts. The document's two mistakes, batch sizes 2 and 3, and ``(2, 10, 1)``
where ``(2, 1, 10)`` was meant, are refused with jmat's messages.

Run it: ``python examples/batched_linear.py``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

import jmat


@jax.jit
def batched_linear(x: jax.Array, w: jax.Array, b: jax.Array) -> jax.Array:
  """``x (batch, points, in) @ w (batch, in, out) + b (batch, 1, out)``."""
  return jmat.bmm(x, w) + b


def main() -> None:
  batch, points, n_in, n_out = 4, 100, 3, 16
  keys = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(keys[0], (batch, points, n_in), jnp.float32)
  w = jax.random.normal(keys[1], (batch, n_in, n_out), jnp.float32)
  b = jax.random.normal(keys[2], (batch, 1, n_out), jnp.float32)
  y = batched_linear(x, w, b)
  print(f"x {x.shape} (batch, points, in) @ w {w.shape} (batch, in, out) + b {b.shape} "
        f"-> {y.shape}")
  one = jmat.mm(x[2], w[2]) + b[2]
  print(f"sample 2 alone, x[2] {x[2].shape} @ w[2] {w[2].shape}: equal to y[2]: "
        f"{bool(jnp.allclose(one, y[2], atol=1e-5))}")
  print("\nthe bmm document's two mistakes:")
  for a_shape, b_shape in [((2, 1, 10), (3, 10, 4)), ((2, 10, 1), (2, 10, 4))]:
    try:
      jmat.bmm(jnp.ones(a_shape), jnp.ones(b_shape))
    except jmat.ShapeError as error:
      print(f"jmat.bmm({a_shape}, {b_shape}):\n  ShapeError: {error}")


if __name__ == "__main__":
  main()
