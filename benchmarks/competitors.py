"""How each library is called, so that every competitor is timed the same way.

Inputs are made once in numpy (a fixed seed) and copied to each library's device
ahead of time: a timed call never includes a host-to-device copy. JAX calls wait
with ``jax.block_until_ready``; torch calls synchronise its CUDA stream when torch
runs on a GPU; numpy is synchronous. jmat functions that other work is still
adding (``jmat.addmm``, ``jmat.scaled_dot_product_attention``, ...) are looked up
when a case is built, and a missing one is a :class:`~benchmarks.timing.Skipped`
competitor, not an error.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import jmat
from benchmarks.timing import Call, Skipped

Shape = tuple[int, ...]

NO_TORCH = Skipped("torch is not installed (pip install -e '.[bench]')")


def torch_device_for(device: jax.Device) -> str | None:
  """The torch device matching the JAX device (None when torch is not installed)."""
  if importlib.util.find_spec("torch") is None:
    return None
  import torch

  if device.platform == "gpu" and torch.cuda.is_available():
    return "cuda"
  return "cpu"


@dataclasses.dataclass(frozen=True)
class Target:
  """Where the competitors run: a JAX device and the matching torch device (or no torch)."""

  device: jax.Device
  torch_device: str | None

  def random(self, shapes: Sequence[Shape], dtype: str, seed: int = 0) -> list[np.ndarray]:
    """Standard-normal host arrays (small integers for integer dtypes) of ``dtype``."""
    rng = np.random.default_rng(seed)
    np_dtype = jnp.dtype(dtype)
    if jnp.issubdtype(np_dtype, jnp.integer):
      return [rng.integers(-3, 4, shape).astype(np_dtype) for shape in shapes]
    return [rng.standard_normal(shape, dtype=np.float32).astype(np_dtype) for shape in shapes]

  def jax(self, *arrays: np.ndarray) -> list[jax.Array]:
    return [jax.device_put(x, self.device) for x in arrays]

  def torch(self, *arrays: np.ndarray) -> list[Any]:
    import torch

    out = []
    for x in arrays:
      if x.dtype == jnp.bfloat16:  # torch cannot read ml_dtypes' bfloat16 buffers
        out.append(torch.from_numpy(x.astype(np.float32)).to(torch.bfloat16))
      else:
        out.append(torch.from_numpy(np.ascontiguousarray(x)))
    return [t.to(self.torch_device) for t in out]

  def torch_call(self, pick: Callable[[Any], Callable[..., Any]], *arrays: np.ndarray,
                 requires_grad: bool = False) -> Call | Skipped:
    """``pick(torch)(*tensors)`` on torch copies of ``arrays``, waited on; Skipped without torch.

    ``pick`` receives the torch module, so a suite names a torch function without
    importing torch itself: ``target.torch_call(lambda torch: torch.matmul, a, b)``.
    ``requires_grad``: the tensors require grad (for a call that differentiates).
    """
    if self.torch_device is None:
      return NO_TORCH
    import torch

    fn = pick(torch)
    tensors = [t.requires_grad_(requires_grad) for t in self.torch(*arrays)]
    if self.torch_device == "cuda":

      def call() -> Any:
        out = fn(*tensors)
        torch.cuda.synchronize()
        return out

      return call
    return lambda: fn(*tensors)

  def jax_call(self, fn: Callable[..., Any], *arrays: np.ndarray) -> Call:
    """``fn(*device_arrays)``, waited on with ``jax.block_until_ready``."""
    args = self.jax(*arrays)
    return lambda: jax.block_until_ready(fn(*args))


def jax_grads(fn: Callable[..., Any]) -> Callable[..., Any]:
  """``(q, k, v, *rest) -> gradients of sum(fn(q, k, v, *rest))`` for q, k and v (an
  attention's forward+backward as the benchmarks time it)."""
  return jax.grad(lambda *args: jnp.sum(fn(*args)), argnums=(0, 1, 2))


def torch_grads(torch: Any, fn: Callable[..., Any]) -> Callable[..., Any]:
  """torch's :func:`jax_grads`: q, k and v must require grad (``torch_call(requires_grad=)``)."""
  return lambda q, k, v: torch.autograd.grad(fn(q, k, v).sum(), (q, k, v))


def numpy_call(fn: Callable[..., Any], *arrays: np.ndarray) -> Call:
  return lambda: fn(*arrays)


def jmat_op(name: str) -> Callable[..., Any] | Skipped:
  """``jmat.<name>`` (dots allowed, e.g. ``linalg.multi_dot``), or Skipped if not there yet."""
  obj: Any = jmat
  for part in name.split("."):
    obj = getattr(obj, part, None)
    if obj is None:
      return Skipped(f"jmat.{name} does not exist yet")
  return obj


def jmat_call(target: Target, name: str, make: Callable[[Any], Callable[..., Any]],
              *arrays: np.ndarray) -> Call | Skipped:
  """``make(jmat.<name>)(*device_arrays)``, or Skipped while ``jmat.<name>`` does not exist."""
  op = jmat_op(name)
  if isinstance(op, Skipped):
    return op
  return target.jax_call(make(op), *arrays)
