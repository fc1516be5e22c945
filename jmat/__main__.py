"""``python -m jmat``: the tour (default), ``explain`` and ``bench``.

    python -m jmat                      # the tour: every source-document example, run
    python -m jmat explain 5,1,4,2 3,2,1 [--op bmm]
    python -m jmat explain 2,3 3,4 --op addmm --input-shape 4
    python -m jmat explain 3,4,5 4,5,6 --op tensordot --dims "[[1,2],[0,1]]"
    python -m jmat explain 10,100 100,5 5,50 --op multi_dot
    python -m jmat bench [--suite ...]  # the benchmarks (a source checkout, the bench extra)
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import sys
from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np

import jmat
from jmat._src.shapes import OPS


def _section(title: str) -> None:
  print(f"\n== {title} ==")


def _show(label: str, value: jnp.ndarray) -> None:
  print(f"{label} -> shape {tuple(value.shape)}, dtype {value.dtype}")


def _refusal(label: str, call) -> None:
  try:
    call()
  except (jmat.ShapeError, TypeError) as e:
    print(f"{label}\n  {type(e).__name__}: {e}")
  else:  # the tour is a demonstration: a mistake that passes is a jmat bug
    raise SystemExit(f"jmat tour: {label} was expected to be refused")


def tour() -> None:
  """Runs every example of the torch.matmul and torch.bmm explainers with jmat."""
  rng = np.random.default_rng(0)

  def randn(*shape: int) -> jnp.ndarray:
    return jnp.asarray(rng.standard_normal(shape), dtype=jnp.float32)

  print("jmat tour: torch's matrix products as jitted JAX functions (torch.matmul/torch.bmm docs)")

  _section("1-D @ 1-D: dot product")
  vec1, vec2 = jnp.array([1, 2, 3]), jnp.array([4, 5, 6])
  print(f"jmat.matmul([1, 2, 3], [4, 5, 6]) = {jmat.matmul(vec1, vec2)}  (1*4 + 2*5 + 3*6)")
  print(f"jmat.dot([1, 2, 3], [4, 5, 6])    = {jmat.dot(vec1, vec2)}")

  _section("2-D @ 2-D: matrix product")
  mat1, mat2 = jnp.array([[1, 2], [3, 4]]), jnp.array([[5, 6], [7, 8]])
  print(f"jmat.matmul([[1, 2], [3, 4]], [[5, 6], [7, 8]]) =\n{jmat.matmul(mat1, mat2)}")
  print(f"jmat.mm gives the same:\n{jmat.mm(mat1, mat2)}")

  _section("batched: (3, 4, 5) @ (3, 5, 6)")
  _show("jmat.matmul((3, 4, 5), (3, 5, 6))", jmat.matmul(randn(3, 4, 5), randn(3, 5, 6)))

  _section("broadcasting: (5, 1, 4, 2) @ (3, 2, 1)")
  _show("jmat.matmul((5, 1, 4, 2), (3, 2, 1))", jmat.matmul(randn(5, 1, 4, 2), randn(3, 2, 1)))
  print(jmat.explain((5, 1, 4, 2), (3, 2, 1)))

  _section("attention scores: matmul(query, swapaxes(key, -2, -1))")
  batch, seq_q, seq_k, d_k = 2, 5, 7, 8
  query, key = randn(batch, seq_q, d_k), randn(batch, seq_k, d_k)
  scores = jmat.matmul(query, jnp.swapaxes(key, -2, -1))
  _show(f"query {tuple(query.shape)} @ key^T {(batch, d_k, seq_k)}", scores)

  _section("bmm: (2, 1, 10) @ (2, 10, 4)")
  a, b = randn(2, 1, 10), randn(2, 10, 4)
  _show("jmat.bmm((2, 1, 10), (2, 10, 4))", jmat.bmm(a, b))
  _show("jmat.matmul gives the same shape", jmat.matmul(a, b))
  print(jmat.explain((2, 1, 10), (2, 10, 4), op="bmm"))

  _section("the bmm document's two mistakes")
  _refusal("batch sizes 2 and 3:", lambda: jmat.bmm(randn(2, 1, 10), randn(3, 10, 4)))
  _refusal("(2, 10, 1) instead of (2, 1, 10):", lambda: jmat.bmm(randn(2, 10, 1), randn(2, 10, 4)))

  _section("where the matmul document is wrong: 0-D operands")
  _refusal(
      "matmul(scalar, vector) (torch 2.x refuses it too):",
      lambda: jmat.matmul(jnp.float32(2.0), randn(3)),
  )
  _refusal(
      "mixed dtypes (jnp.matmul would promote silently; torch refuses):",
      lambda: jmat.matmul(randn(2, 3), jnp.ones((3, 2), jnp.int32)),
  )


def _shape(text: str) -> tuple[int, ...]:
  text = text.strip().strip("()[]")
  try:
    return tuple(int(d) for d in text.split(",") if d.strip())
  except ValueError:
    raise argparse.ArgumentTypeError(f"not a shape: {text!r} (write it as 5,1,4,2)") from None


def _dims(text: str) -> object:
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    raise argparse.ArgumentTypeError(f"not a dims value: {text!r} (e.g. 2 or [[1],[0]])") from None


# What ``bench`` needs beyond jmat: the benchmarks live in the repository, not in the wheel.
_BENCH_MODULES = ("benchmarks.__main__", "tqdm", "matplotlib")


def _bench(argv: list[str]) -> int:
  """Runs ``python -m benchmarks`` with ``argv``, or says in one line how to get it."""
  missing = []
  for name in _BENCH_MODULES:
    try:
      found = importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:  # the parent package (benchmarks) is not there
      found = False
    if not found:
      missing.append(name.split(".")[0])
  if missing:
    print(
        f"python -m jmat bench: {', '.join(missing)} not installed; the benchmarks are not part "
        f"of the jmat wheel: run them from a source checkout (git clone the repository, then "
        f"pip install -e '.[bench]' && python -m jmat bench)",
        file=sys.stderr,
    )
    return 2
  from benchmarks.__main__ import main as bench_main

  return bench_main(argv)


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m jmat", description="jmat: the tour (default), explain and bench"
  )
  commands = parser.add_subparsers(dest="command", metavar="{tour,explain,bench}")
  commands.add_parser("tour", help="run every source-document example (the default)")
  explain = commands.add_parser("explain", help="derive a result shape step by step")
  explain.add_argument("shape_a", type=_shape, help="e.g. 5,1,4,2 (a 0-D shape is '()')")
  explain.add_argument("shape_b", type=_shape, help="e.g. 3,2,1")
  explain.add_argument("more_shapes", type=_shape, nargs="*", help="the rest of a multi_dot chain")
  explain.add_argument("--op", default="matmul", choices=sorted(OPS))
  explain.add_argument("--input-shape", type=_shape, help="input of the add* ops")
  explain.add_argument("--bias-shape", type=_shape, help="bias of linear")
  explain.add_argument("--dims", type=_dims, help="dims of tensordot: 2, or [[1, 2], [0, 1]]")
  explain.add_argument("--dim", type=int, help="dim of vecdot")
  commands.add_parser("bench", help="the benchmarks, with their options (the bench extra)")
  argv = sys.argv[1:] if argv is None else list(argv)
  if argv[:1] == ["bench"]:  # everything after it, --options included, is the benchmarks'
    return _bench(argv[1:])
  args = parser.parse_args(argv)

  if args.command == "explain":
    text = jmat.explain(
        args.shape_a,
        args.shape_b,
        *args.more_shapes,
        op=args.op,
        input_shape=args.input_shape,
        bias_shape=args.bias_shape,
        dims=args.dims,
        dim=args.dim,
    )
    print(text)
    return 0 if text.splitlines()[-1].startswith("result: (") else 1
  tour()
  return 0


if __name__ == "__main__":
  sys.exit(main())
