"""A 1x1 convolution is a matrix product: torch's Conv2d(kernel_size=1) on NCHW as jmat.matmul.

With a 1x1 kernel every output pixel is ``weight (C_out, C_in) @ x[n, :, h, w]``, so
flattening the pixels gives one broadcast product,

    (C_out, C_in) @ (N, C_in, H*W) -> (N, C_out, H*W)

(jmat.matmul broadcasts the 2-D weight over the batch), equal to
``jax.lax.conv_general_dilated`` with NCHW/OIHW layouts. Both are jitted and timed.

Run it: ``python examples/conv1x1_as_matmul.py`` (``--fast`` for a small size).
"""

from __future__ import annotations

import argparse
import math
import time

import jax
import jax.numpy as jnp
import numpy as np

import jmat


@jax.jit
def conv1x1_matmul(x: jax.Array, weight: jax.Array, bias: jax.Array) -> jax.Array:
  """``x (N, C_in, H, W)``, ``weight (C_out, C_in, 1, 1)``, ``bias (C_out,)`` -> NCHW output."""
  n, c_in, h, w = x.shape
  out = jmat.matmul(weight[:, :, 0, 0], x.reshape(n, c_in, h * w))
  return out.reshape(n, -1, h, w) + bias[:, None, None]


@jax.jit
def conv1x1_lax(x: jax.Array, weight: jax.Array, bias: jax.Array) -> jax.Array:
  """The same with XLA's convolution."""
  out = jax.lax.conv_general_dilated(x, weight, window_strides=(1, 1), padding="VALID",
                                     dimension_numbers=("NCHW", "OIHW", "NCHW"))
  return out + bias[:, None, None]


def median_seconds(fns, *args, repeats: int) -> list[float]:
  """Median time of each jitted function, called in turn so load hits them alike."""
  for fn in fns:
    jax.block_until_ready(fn(*args))  # compile
  times = [[] for _ in fns]
  for _ in range(repeats):
    for fn, samples in zip(fns, times, strict=True):
      start = time.perf_counter()
      jax.block_until_ready(fn(*args))
      samples.append(time.perf_counter() - start)
  return [float(np.median(samples)) for samples in times]


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
  parser.add_argument("--fast", action="store_true", help="a small size, few repeats")
  args = parser.parse_args(argv)
  n, c_in, c_out, hw = (2, 16, 32, 8) if args.fast else (16, 256, 256, 32)
  keys = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(keys[0], (n, c_in, hw, hw), jnp.float32)
  weight = jax.random.normal(keys[1], (c_out, c_in, 1, 1), jnp.float32) / math.sqrt(c_in)
  bias = jax.random.normal(keys[2], (c_out,), jnp.float32)
  print(f"x {x.shape} (N, C_in, H, W), weight {weight.shape} (C_out, C_in, 1, 1)")
  print(f"as a product: weight[:, :, 0, 0] {weight.shape[:2]} @ x.reshape(N, C_in, H*W) "
        f"{(n, c_in, hw * hw)} -> {(n, c_out, hw * hw)} -> reshape {(n, c_out, hw, hw)}")
  with jax.default_matmul_precision("highest"):
    product, conv = conv1x1_matmul(x, weight, bias), conv1x1_lax(x, weight, bias)
  difference = float(jnp.max(jnp.abs(product - conv)))
  print(f"max |jmat.matmul - lax.conv_general_dilated| = {difference:.1e} "
        f"({'equal' if difference < 1e-4 else 'DIFFERENT'}, float32)")
  repeats = 5 if args.fast else 50
  t_matmul, t_conv = median_seconds([conv1x1_matmul, conv1x1_lax], x, weight, bias,
                                    repeats=repeats)
  flops = 2 * n * c_out * c_in * hw * hw
  for name, seconds in [("jmat.matmul", t_matmul), ("lax.conv_general_dilated", t_conv)]:
    print(f"{name + ':':<26}{seconds * 1e3:8.3f} ms ({flops / seconds / 1e9:6.1f} GFLOP/s)")
  print(f"conv time / matmul time: {t_conv / t_matmul:.2f} "
        f"(medians of {repeats} interleaved jitted calls)")


if __name__ == "__main__":
  main()
