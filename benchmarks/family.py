"""The family suite: multi_dot's ordering and the fused ``beta * input + alpha * product`` ops.

Competitors (all compiled; numpy and torch called directly):

* ``jmat``: ``jmat.multi_dot`` / ``jmat.addmm`` / ``jmat.baddbmm`` / ``jmat.linear``;
* ``jnp``: the jnp way, jitted (the reference of ``ratio_vs_jnp``):
  ``jnp.linalg.multi_dot``, ``beta * input + alpha * (a @ b)``, ``x @ w.T + b``;
* ``jnp left-to-right``: ``((a @ b) @ c) @ d`` jitted, the order a naive chain
  takes (multi_dot cases only);
* ``numpy``: the same expressions in numpy (``np.linalg.multi_dot`` for chains);
* ``torch``: ``torch.linalg.multi_dot``, ``torch.addmm``, ``torch.baddbmm``,
  ``torch.nn.functional.linear``.

GFLOP/s count the useful work: the cheapest parenthesisation for a chain, the
product alone for the fused ops.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import competitors as comp
from benchmarks import derive
from benchmarks.formatting import fmt_ratio, fmt_span
from benchmarks.spec import Record, SuiteSpec
from benchmarks.timing import Call, Case, Skipped, Suite

COMPETITORS = ("jmat", "jnp", "jnp left-to-right", "numpy", "torch")
BETA, ALPHA = 0.5, 2.0
ONLY_CHAINS = Skipped("only measured for multi_dot chains")


def cheapest_chain_flops(shapes: Sequence[tuple[int, int]]) -> float:
  """FLOPs of the cheapest parenthesisation of a chain of 2-D shapes (brute force)."""

  @functools.cache
  def cost(i: int, j: int) -> int:
    if i == j:
      return 0
    return min(
        cost(i, m) + cost(m + 1, j) + 2 * shapes[i][0] * shapes[m][1] * shapes[j][1]
        for m in range(i, j)
    )

  return float(cost(0, len(shapes) - 1))


def _chain(*xs: jax.Array) -> jax.Array:
  return functools.reduce(jnp.matmul, xs)


def _chain_case(target: comp.Target, shapes: Sequence[tuple[int, int]]) -> Case:
  def build() -> dict[str, Call | Skipped]:
    arrays = target.random(shapes, "float32")
    return {
        "jmat": comp.jmat_call(target, "multi_dot", _listed, *arrays),
        "jnp": target.jax_call(_jnp_multi_dot, *arrays),
        "jnp left-to-right": target.jax_call(_left_to_right, *arrays),
        "numpy": comp.numpy_call(lambda *xs: np.linalg.multi_dot(xs), *arrays),
        "torch": target.torch_call(lambda torch: lambda *xs: torch.linalg.multi_dot(xs), *arrays),
    }

  label = "multi_dot " + "".join(f"({n}x{p})" for n, p in shapes)
  info = {"op": "jmat.multi_dot", "shapes": [list(s) for s in shapes]}
  return Case(label, cheapest_chain_flops(shapes), "float32", build, info)


def _listed(op: Callable) -> Callable:
  """``jmat.multi_dot`` takes one sequence of arrays; the timing harness passes them apart."""
  return lambda *xs: op(list(xs))


_jnp_multi_dot = jax.jit(lambda *xs: jnp.linalg.multi_dot(xs))
_left_to_right = jax.jit(_chain)


@jax.jit
def _jnp_addmm(x: jax.Array, a: jax.Array, b: jax.Array) -> jax.Array:
  return BETA * x + ALPHA * jnp.matmul(a, b)


@jax.jit
def _jnp_linear(x: jax.Array, w: jax.Array, bias: jax.Array) -> jax.Array:
  return jnp.matmul(x, w.T) + bias


def _np_addmm(x: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
  return BETA * x + ALPHA * np.matmul(a, b)


def _np_linear(x: np.ndarray, w: np.ndarray, bias: np.ndarray) -> np.ndarray:
  return np.matmul(x, w.T) + bias


def _fused_case(
    target: comp.Target, op: str, shapes: Sequence[tuple[int, ...]], flops: float
) -> Case:
  """addmm / baddbmm (``beta * input + alpha * product``) or linear (``x @ w.T + b``)."""

  def build() -> dict[str, Call | Skipped]:
    arrays = target.random(shapes, "float32")
    if op == "linear":
      return {
          "jmat": comp.jmat_call(target, "linear", lambda f: f, *arrays),
          "jnp": target.jax_call(_jnp_linear, *arrays),
          "jnp left-to-right": ONLY_CHAINS,
          "numpy": comp.numpy_call(_np_linear, *arrays),
          "torch": target.torch_call(lambda torch: torch.nn.functional.linear, *arrays),
      }
    return {
        "jmat": comp.jmat_call(
            target, op, lambda f: functools.partial(f, beta=BETA, alpha=ALPHA), *arrays
        ),
        "jnp": target.jax_call(_jnp_addmm, *arrays),
        "jnp left-to-right": ONLY_CHAINS,
        "numpy": comp.numpy_call(_np_addmm, *arrays),
        "torch": target.torch_call(
            lambda torch: functools.partial(getattr(torch, op), beta=BETA, alpha=ALPHA), *arrays
        ),
    }

  label = f"{op} " + ", ".join(str(tuple(s)) for s in shapes)
  info = {"op": f"jmat.{op}", "shapes": [list(s) for s in shapes]}
  if op != "linear":
    info.update(beta=BETA, alpha=ALPHA)
  return Case(label, flops, "float32", build, info)


def family_suite(target: comp.Target, quick: bool) -> Suite:
  n, b, m, t, e = (128, 8, 64, 64, 128) if quick else (1024, 64, 256, 4096, 1024)
  chain = ((n, 10), (10, n), (n, 10), (10, n))
  cases = (
      _chain_case(target, chain),
      _fused_case(target, "addmm", [(n, n), (n, n), (n, n)], 2.0 * n**3),
      _fused_case(target, "baddbmm", [(b, m, m)] * 3, 2.0 * b * m**3),
      # linear: (8, 512, 1024) inputs through a (1024, 1024) weight, like a Transformer layer.
      _fused_case(target, "linear", [(8, t // 8, e), (e, e), (e,)], 2.0 * t * e * e),
  )
  return Suite(
      "family", "multi_dot ordering and fused addmm / baddbmm / linear, float32",
      COMPETITORS, "jnp", cases,
      notes=(
          f"addmm and baddbmm use beta={BETA}, alpha={ALPHA}.",
          "A chain's GFLOP/s count the cheapest order's FLOPs, so a worse order shows as fewer "
          "GFLOP/s.",
      ),
  )



# ---------------------------------------------------------------- how the suite is reported


def _summary(suite: Record) -> list[str]:
  out = []
  chain = [c for c in suite["cases"] if c["name"].startswith("multi_dot")]
  fused = [c["name"] for c in suite["cases"] if not c["name"].startswith("multi_dot")]
  mine = chain and chain[0]["results"]["jmat"]
  if mine and mine["status"] == "ok":
    naive = chain[0]["results"]["jnp left-to-right"]
    if naive["status"] == "ok":
      faster = derive.paired_ratio(mine, naive)
      out.append(
          f"multi_dot: jmat runs at {fmt_ratio(mine['ratio_vs_jnp'])} the speed of "
          f"jnp.linalg.multi_dot and {fmt_ratio(1 / faster if faster else None)} that of the "
          "left-to-right jnp chain."
      )
  fused_ratios = derive.ratios(suite, "jmat", cases=fused)
  if fused_ratios:
    out.append(
        f"addmm / baddbmm / linear: jmat runs at {fmt_span(fused_ratios)} the speed of the "
        "equivalent jitted jnp expression."
    )
  return out


FAMILY_SPEC = SuiteSpec("family", build=family_suite, summary=_summary, gemm=True)
