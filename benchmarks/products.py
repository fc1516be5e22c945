"""The matrix-product suites: compiled throughput (products, dtypes) and eager overhead (eager).

Competitors of a compiled product, all called on inputs already on the device:

* ``jmat``: the jmat function itself (``jmat.mm``, ``jmat.bmm`` or ``jmat.matmul``),
  which is jitted at definition;
* ``jnp``: ``jax.jit(jnp.matmul)``, the reference of ``ratio_vs_jnp``;
* ``jnp again``: a second, separately jitted ``jnp.matmul`` (its own executable,
  the same HLO): an A/A control, whose ratio to ``jnp`` is what noise alone
  makes of two identical programs on the machine that day;
* ``lax``: ``jax.jit`` of ``jax.lax.dot_general`` with dimension numbers written by
  hand for the case (what an expert would write with no broadcasting help);
* ``einsum``: ``jax.jit(jnp.einsum)`` with ``"...nk,...kp->...np"``;
* ``numpy``: ``np.matmul`` (its BLAS); ``torch``: ``torch.matmul``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import jmat
from benchmarks import competitors as comp
from benchmarks import derive, plots
from benchmarks.formatting import fmt_gflops, fmt_ratio, fmt_span
from benchmarks.spec import Record, SuiteSpec
from benchmarks.timing import Call, Case, Skipped, Suite

COMPILED = ("jmat", "jnp", "jnp again", "lax", "einsum", "numpy", "torch")
EAGER = ("jmat", "jnp", "numpy", "torch")

_jnp_matmul = jax.jit(jnp.matmul)
_jnp_matmul_again = jax.jit(lambda a, b: jnp.matmul(a, b))
_einsum = jax.jit(functools.partial(jnp.einsum, "...nk,...kp->...np"))


@dataclasses.dataclass(frozen=True)
class Product:
  """A product of two shapes, how jmat spells it and how ``lax.dot_general`` spells it.

  ``lax`` is ``(dimension_numbers, axes of a to squeeze first, permutation of the
  dot_general result)``: dot_general puts batch dims first, then a's free dims,
  then b's, so a broadcast needs a squeeze before and a transpose after.
  """

  label: str
  op: str
  shape_a: tuple[int, ...]
  shape_b: tuple[int, ...]
  lax: tuple[tuple, tuple[int, ...], tuple[int, ...] | None]

  @property
  def flops(self) -> float:
    return 2.0 * math.prod(jmat.matmul_shape(self.shape_a, self.shape_b)) * self.shape_a[-1]


def _mm(n: int, k: int, p: int) -> Product:
  return Product(f"mm {n}x{k}x{p}", "mm", (n, k), (k, p), ((((1,), (0,)), ((), ())), (), None))


# The core issue's shapes: a plain GEMM, a bmm, a batch against one weight matrix,
# attention-shaped scores (4-D batch) and a broadcast of a size-1 batch dim.
ISSUE_SHAPES = (
    _mm(1024, 1024, 1024),
    Product("bmm 64x256x256x256", "bmm", (64, 256, 256), (64, 256, 256),
            ((((2,), (1,)), ((0,), (0,))), (), None)),
    Product("(8,512,1024)@(1024,1024)", "matmul", (8, 512, 1024), (1024, 1024),
            ((((2,), (0,)), ((), ())), (), None)),
    Product("(8,12,512,64)@(8,12,64,512)", "matmul", (8, 12, 512, 64), (8, 12, 64, 512),
            ((((3,), (2,)), ((0, 1), (0, 1))), (), None)),
    Product("(5,1,400,200)@(3,200,100)", "matmul", (5, 1, 400, 200), (3, 200, 100),
            ((((2,), (1,)), ((), ())), (1,), (0, 2, 1, 3))),
)


@functools.cache
def _lax_product(dimension_numbers: tuple, squeeze: tuple[int, ...], perm: tuple[int, ...] | None):
  def product(a: jax.Array, b: jax.Array) -> jax.Array:
    out = lax.dot_general(lax.squeeze(a, squeeze), b, dimension_numbers)
    return out if perm is None else lax.transpose(out, perm)

  return jax.jit(product)


def _numpy_call(product: Product, dtype: str, a: np.ndarray, b: np.ndarray) -> Call | Skipped:
  if dtype in ("bfloat16", "float16"):
    return Skipped(f"numpy has no BLAS kernel for {dtype} (an element loop, minutes per call)")
  if jnp.issubdtype(jnp.dtype(dtype), jnp.integer) and product.flops > 1e9:
    return Skipped(f"numpy's {dtype} matmul is a non-BLAS loop (seconds per call at this size)")
  return comp.numpy_call(np.matmul, a, b)


def optimized_hlo(fn: Callable, *arrays: np.ndarray) -> list[str]:
  """The instructions of ``fn``'s optimized HLO, without metadata (source lines, op names)."""
  text = jax.jit(fn).lower(*arrays).compile().as_text()
  return [re.sub(r", metadata=\{[^}]*\}", "", line.strip()) for line in text.splitlines()
          if " = " in line and not line.lstrip().startswith(("HloModule", "//"))]


def compiled_case(target: comp.Target, product: Product, dtype: str = "float32") -> Case:
  info = {"op": f"jmat.{product.op}", "shapes": [product.shape_a, product.shape_b]}

  def build() -> dict[str, Call | Skipped]:
    a, b = target.random([product.shape_a, product.shape_b], dtype)
    args = target.jax(a, b)
    # The first thing to check when jmat and jnp differ: do they compile to the same program?
    info["same_hlo_as_jnp"] = (
        optimized_hlo(getattr(jmat, product.op), *args) == optimized_hlo(_jnp_matmul, *args)
    )
    return {
        "jmat": target.jax_call(getattr(jmat, product.op), a, b),
        "jnp": target.jax_call(_jnp_matmul, a, b),
        "jnp again": target.jax_call(_jnp_matmul_again, a, b),
        "lax": target.jax_call(_lax_product(*product.lax), a, b),
        "einsum": target.jax_call(_einsum, a, b),
        "numpy": _numpy_call(product, dtype, a, b),
        "torch": target.torch_call(lambda torch: torch.matmul, a, b),
    }

  return Case(product.label, product.flops, dtype, build, info)


def products_suite(target: comp.Target, quick: bool) -> Suite:
  sizes = (64, 128, 256) if quick else (64, 128, 256, 512, 1024, 2048, 4096)
  issue = ISSUE_SHAPES[:2] if quick else ISSUE_SHAPES
  sweep = tuple(dataclasses.replace(_mm(n, n, n), label=f"square {n}") for n in sizes)
  sweep = tuple(dataclasses.replace(p, op="matmul") for p in sweep)
  cases = tuple(compiled_case(target, p) for p in issue + sweep)
  return Suite(
      "products", "Compiled products, float32", COMPILED, "jnp", cases,
      notes=(
          "square n: jmat.matmul on (n, n) @ (n, n).",
          "jnp again is a second, separately jitted jnp.matmul: an A/A control. Its ratio to jnp "
          "is the difference noise alone makes between two identical programs in this run.",
      ),
  )


def dtypes_suite(target: comp.Target, quick: bool) -> Suite:
  n = 256 if quick else 2048
  dtypes = ("float32", "bfloat16", "float16", "float64", "int32")
  cases = tuple(
      compiled_case(target, dataclasses.replace(_mm(n, n, n), label=f"{dtype} {n}^3"), dtype)
      for dtype in dtypes
  )
  return Suite(
      "dtypes", f"One {n}^3 GEMM per dtype", COMPILED, "jnp", cases,
      notes=(
          "jmat accumulates float16/bfloat16 in float32 (as torch does on the CPU) and casts back. "
          "For bfloat16 that is also faster than jnp.matmul on the CPU: the compiled HLO sends "
          "jmat's bf16 x bf16 -> f32 dot straight to XLA's YNNPACK GEMM fusion (__ynn_fusion), "
          "while jnp.matmul's (and lax's) bf16 -> bf16 dot compiles to a convert of both inputs "
          "to f32, an f32 GEMM and a convert back.",
          "torch's bfloat16 GEMM runs on oneDNN, which uses the AMX tiles of CPUs that have them "
          "(amx_bf16 in cpu_flags): that gap between torch and every JAX competitor is XLA's, "
          "not jmat's.",
      ),
  )


# The source documents' examples: dot, a 2x2 product, a batch, a broadcast, a bmm and
# attention scores; small enough that the time is all per-call overhead.
EAGER_SHAPES = (
    Product("dot (3,).(3,)", "dot", (3,), (3,), ((((0,), (0,)), ((), ())), (), None)),
    _mm(2, 2, 2),
    Product("(3,4,5)@(3,5,6)", "matmul", (3, 4, 5), (3, 5, 6),
            ((((2,), (1,)), ((0,), (0,))), (), None)),
    Product("(5,1,4,2)@(3,2,1)", "matmul", (5, 1, 4, 2), (3, 2, 1),
            ((((2,), (1,)), ((), ())), (1,), (0, 2, 1, 3))),
    Product("bmm (2,1,10)@(2,10,4)", "bmm", (2, 1, 10), (2, 10, 4),
            ((((2,), (1,)), ((0,), (0,))), (), None)),
    Product("scores (2,5,8)@(2,8,7)", "matmul", (2, 5, 8), (2, 8, 7),
            ((((2,), (1,)), ((0,), (0,))), (), None)),
)


def eager_case(target: comp.Target, product: Product) -> Case:
  def build() -> dict[str, Call | Skipped]:
    a, b = target.random([product.shape_a, product.shape_b], "float32")
    return {
        "jmat": target.jax_call(getattr(jmat, product.op), a, b),
        "jnp": target.jax_call(jnp.matmul, a, b),
        "numpy": comp.numpy_call(np.matmul, a, b),
        "torch": target.torch_call(lambda torch: torch.matmul, a, b),
    }

  info = {"op": f"jmat.{product.op}", "shapes": [product.shape_a, product.shape_b]}
  return Case(product.label, product.flops, "float32", build, info)


def eager_suite(target: comp.Target, quick: bool) -> Suite:
  cases = tuple(eager_case(target, p) for p in EAGER_SHAPES)
  return Suite(
      "eager", "Eager per-call time on the source documents' tiny shapes", EAGER, "jnp", cases,
      notes=(
          "jnp is jnp.matmul called eagerly; jmat is the jmat function, jitted at definition.",
          "The time is dispatch overhead: the arithmetic is a few dozen FLOPs.",
      ),
  )


# ---------------------------------------------------------------- how the suites are reported


def _products_summary(suite: Record) -> list[str]:
  mine, control = derive.ratios(suite, "jmat"), derive.ratios(suite, "jnp again")
  if not (mine and control):
    return []
  same = [c["info"].get("same_hlo_as_jnp") for c in suite["cases"]]
  return [
      f"Compiled products: jmat runs at {fmt_span(mine)} the speed of jax.jit(jnp.matmul) over "
      f"all {len(mine)} cases; a second, identical jnp.matmul program (the A/A control) runs "
      f"at {fmt_span(control)} in the same rounds, so differences of that size are noise. "
      "jmat's optimized HLO is instruction for instruction jnp.matmul's on "
      f"{sum(map(bool, same))} of the {len(same)} cases (checked in the run)."
  ]


def _products_plot(suite: Record, plt):
  sweep = [c for c in suite["cases"] if c["name"].startswith("square")]
  shaped = [c for c in suite["cases"] if not c["name"].startswith("square")]
  fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
  plots.lines(axes[0], suite, sweep, lambda c: c["info"]["shapes"][0][0], lambda r: r["gflops"],
              log_y=False)
  axes[0].set_xlabel("n, for (n, n) @ (n, n)")
  axes[0].set_ylabel("GFLOP/s (median)")
  axes[0].set_title("square sweep")
  plots.bars(axes[1], suite, shaped, per_call=False)
  axes[1].set_title("issue shapes")
  axes[0].legend(fontsize=7)
  return fig


def _eager_summary(suite: Record) -> list[str]:
  mine = derive.ratios(suite, "jmat")
  if not mine:
    return []
  return [f"Eager calls on tiny shapes: jmat runs at {fmt_span(mine)} the speed of jnp.matmul."]


def _eager_plot(suite: Record, plt):
  fig, axes = plt.subplots(1, 1, figsize=(8, 4.2))
  plots.bars(axes, suite, suite["cases"], per_call=True)
  axes.legend(fontsize=7)
  axes.set_yscale("log")
  return fig


def _dtypes_summary(suite: Record) -> list[str]:
  bf16 = [c for c in suite["cases"] if c["dtype"] == "bfloat16"]
  if not bf16:
    return []
  r = bf16[0]["results"]
  if r["jmat"]["status"] != "ok" or r["jnp"]["status"] != "ok":
    return []
  jax_best = max((r[n]["gflops"] for n in ("jmat", "jnp", "lax", "einsum")
                  if r[n]["status"] == "ok"), default=None)
  torch = (f"; torch {fmt_gflops(r['torch']['gflops'])} GFLOP/s through oneDNN against the best"
           f" JAX {fmt_gflops(jax_best)}" if r["torch"]["status"] == "ok" and jax_best else "")
  return [
      f"bfloat16 GEMM: jmat {fmt_gflops(r['jmat']['gflops'])} GFLOP/s, "
      f"{fmt_ratio(r['jmat']['ratio_vs_jnp'])} jnp.matmul (float32 accumulation compiles "
      f"to a native bf16 GEMM){torch}."
  ]


PRODUCTS_SPEC = SuiteSpec("products", build=products_suite, summary=_products_summary,
                          plot=_products_plot, gemm=True)
EAGER_SPEC = SuiteSpec("eager", build=eager_suite, summary=_eager_summary, plot=_eager_plot,
                       per_call=True, of_peak=False)
DTYPES_SPEC = SuiteSpec("dtypes", build=dtypes_suite, summary=_dtypes_summary, gemm=True)
