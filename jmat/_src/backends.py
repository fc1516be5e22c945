"""Which backend of the block-sparse kernel runs a call, and why: the one dispatch point.

Three backends implement :mod:`jmat._src.block_sparse`'s interface: ``XLA``
(:mod:`jmat._src.kernels.xla`, nested loops: the CPU kernel, and the fallback
everywhere), ``TRITON`` (a Pallas Triton kernel for GPUs) and ``MOSAIC`` (a
Pallas Mosaic kernel for TPUs). ``AUTO`` decides where the platform is known,
at lowering (``jax.lax.platform_dependent``), so one jitted function serves
CPU, GPU and TPU and exports for all of them: the fused kernel of the platform
when everything the call needs runs inside it, XLA otherwise. Asking for a
Pallas backend that cannot run a call is an error naming what prevents it,
never a silent fallback. ``INTERPRET`` runs a Pallas kernel in Pallas
interpret mode on any platform (how the tests run them on a CPU).
"""

from __future__ import annotations

import dataclasses
import importlib
import math
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.extend
from jax import core as jax_core
from jax.interpreters import mlir

from jmat._src import block_sparse, checks
from jmat._src.kernels import xla

BACKENDS = ("AUTO", "XLA", "TRITON", "MOSAIC")
PLATFORMS = ("cpu", "cuda", "rocm", "tpu")
# The Pallas kernel of each accelerator platform; every other platform runs XLA.
FUSED = {"cuda": "TRITON", "tpu": "MOSAIC"}
# The platforms AUTO holds a branch for (None: the local one). In jit's cache key, so a function
# traced under one setting is traced again under another.
_KERNEL_PLATFORMS = jax.make_user_context(None)
# The platforms each Pallas kernel compiles for (elsewhere it runs only interpreted).
_NATIVE = {"TRITON": ("cuda", "rocm"), "MOSAIC": ("tpu",)}
_MODULES = {"TRITON": "jmat._src.kernels.triton", "MOSAIC": "jmat._src.kernels.mosaic"}
# torch 2.13's kernel_options keys that mean in jmat what they mean in torch's Triton kernels,
# as the fields of the Triton kernel's BlockSizes: the forward's query and key tiles (BLOCK_M,
# BLOCK_N, also fwd_-prefixed), the dk/dv pass's (BLOCK_M1, BLOCK_N1) and the dq pass's
# (BLOCK_M2, BLOCK_N2), also bwd_-prefixed; a prefixed key wins over the plain one.
_TRITON_FIELDS = {"BLOCK_M": "block_q", "BLOCK_N": "block_k", "BLOCK_M1": "block_q_dkv",
                  "BLOCK_N1": "block_k_dkv", "BLOCK_M2": "block_q_dq", "BLOCK_N2": "block_k_dq",
                  "num_warps": "num_warps", "num_stages": "num_stages"}
_PREFIXED = {f"fwd_{k}": k for k in ("BLOCK_M", "BLOCK_N")} | {
    f"bwd_{k}": k for k in ("BLOCK_M1", "BLOCK_N1", "BLOCK_M2", "BLOCK_N2")}
# torch's flex-decoding SPLIT_KV: how many parts the XLA loops cut a short query's keys into.
OPTION_KEYS = ("BACKEND", "INTERPRET", *_TRITON_FIELDS, *_PREFIXED, "SPLIT_KV")


@dataclasses.dataclass(frozen=True)
class KernelOptions:
  """A checked ``kernel_options`` dict (static: part of the jit cache key).

  Attributes:
    backend: one of :data:`BACKENDS` (or ``"PALLAS"``: SDPA's ``implementation="pallas"``).
    interpret: run a Pallas kernel in Pallas interpret mode.
    triton: the Triton kernel's tiles and launch parameters given, as sorted
      ``(BlockSizes field, value)`` pairs. The XLA and Mosaic kernels compute in
      the blocks of the mask's tables, so these tune the Triton kernel only.
    split_kv: torch's ``SPLIT_KV``: the parts the XLA loops cut the key blocks of a
      short query into (:func:`jmat._src.kernels.xla.splits_for`); None: per platform.
  """

  backend: str = "AUTO"
  interpret: bool = False
  triton: tuple[tuple[str, int], ...] = ()
  split_kv: int | None = None


DEFAULT = KernelOptions()


def kernel_options(op: str, options: Mapping[str, Any] | None) -> KernelOptions:
  """Checks torch's ``kernel_options`` dict; refuses unknown keys or values, listing the valid.

  The Triton kernel's tiles and launch parameters are checked here, whatever the
  backend, and refused under the user's key (``BLOCK_M``), not the kernel's field.
  """
  options = checks.check_kernel_options(op, options, OPTION_KEYS, BACKENDS)
  fields = {}
  for key, value in options.items():
    field = _TRITON_FIELDS.get(key) or _TRITON_FIELDS.get(_PREFIXED.get(key, ""))
    if field is None:
      continue
    from jmat._src.kernels import triton

    rule = triton.BlockSizes.rule(field, value)
    if rule is not None:
      raise checks.bad_kernel_option(op, key, value, rule)
    if key in _PREFIXED or field not in fields:  # a prefixed key wins over the plain one
      fields[field] = value
  return KernelOptions(options.get("BACKEND", "AUTO"), options.get("INTERPRET", False),
                       tuple(sorted(fields.items())), options.get("SPLIT_KV"))


class Choice(NamedTuple):
  """The backend a call gets on a platform, and why."""

  backend: str
  reason: str


def _module(backend: str) -> Any:
  return xla if backend == "XLA" else importlib.import_module(_MODULES[backend])


def _tunables(backend: str, options: KernelOptions) -> dict[str, Any]:
  if backend != "TRITON":
    return {}
  from jmat._src.kernels import triton

  return {"block_sizes": triton.BlockSizes(**dict(options.triton))}


def _fitted(backend: str, call: block_sparse.Call) -> block_sparse.Call:
  """``call`` on tables the backend can tile: TPU tiles are multiples of 8 queries by 128 keys,
  so the Mosaic kernel walks coarser blocks made of the mask's (a BlockMask of any BLOCK_SIZE
  runs on every backend; the Triton kernel cuts a table block into tiles itself)."""
  if backend != "MOSAIC":
    return call
  from jmat._src.kernels import mosaic

  def fit(block: int, length: int, unit: int) -> int:
    if block >= length or block % unit == 0:
      return block
    tile = math.lcm(block, unit)
    return tile if tile < length else block_sparse.ceil_div(length, block) * block

  return block_sparse.retiled(call, fit(call.block_q, call.q.shape[-2], mosaic.SUBLANES),
                              fit(call.block_k, call.k.shape[-2], mosaic.LANES))


class _ProbeFailed(NamedTuple):
  """A kernel's lowering probe failed for another reason than the call (see ``_unsupported``)."""

  error: str


def _unsupported(backend: str, call: block_sparse.Call,
                 options: KernelOptions) -> str | _ProbeFailed | None:
  """Why ``backend`` cannot run ``call`` in its kernel, or None.

  The answer does not depend on the machine asking: interpret mode lowers
  nothing for the kernel's platform, so it is not probed (jax 0.11 refuses to
  lower for cuda on a machine without a GPU), and the Mosaic probe lowers for a
  fixed TPU. A probe that fails for another reason than the kernel's limits (a
  jmat bug, a missing device, a crash) is no reason to run another backend:
  the kernel is kept, and lowering it for its platform raises that error.
  """
  if backend == "XLA":
    return None
  call = _fitted(backend, call)
  if call.needs_max:
    return "max_scores (return_aux) is computed by the XLA backend only"
  try:
    return _module(backend).unsupported(call, **_tunables(backend, options),
                                        probe=not options.interpret)
  except Exception as error:  # see above: not a reason to fall back
    summary = (str(error).strip().splitlines() or [""])[0]
    return _ProbeFailed(f"{type(error).__name__}: {summary}")


def _wrong_platform(backend: str, platform: str, options: KernelOptions) -> bool:
  """Whether a Pallas kernel asked for by name cannot be compiled for ``platform``."""
  return not options.interpret and platform not in _NATIVE.get(backend, PLATFORMS)


def choose(call: block_sparse.Call, platform: str, options: KernelOptions) -> Choice:
  """The backend ``call`` gets when lowered for ``platform`` under ``options``, and why."""
  if options.backend != "AUTO":
    reason = _unsupported(options.backend, call, options)
    if isinstance(reason, str):
      return Choice(options.backend, f"refused: {reason}")
    if _wrong_platform(options.backend, platform, options):
      where = " and ".join(_NATIVE[options.backend])
      return Choice(options.backend, f"refused: {platform}: the {options.backend} kernel "
                                     f"compiles for {where} only; \"INTERPRET\": True runs "
                                     f"it interpreted")
    return Choice(options.backend, "asked for with kernel_options BACKEND" + _kept(reason))
  fused = FUSED.get(platform)
  if fused is None:
    return Choice("XLA", f"{platform}: the XLA loops are the kernel for this platform")
  reason = _unsupported(fused, call, options)
  if not isinstance(reason, str):
    return Choice(fused, f"{platform}: everything the call needs runs in the {fused} kernel"
                  + _kept(reason))
  return Choice("XLA", f"{platform}: {fused} cannot run it ({reason})")


def _kept(failed: _ProbeFailed | None) -> str:
  if failed is None:
    return ""
  return (f" (its lowering probe failed here, {failed.error}, which says nothing about the "
          f"call: the kernel is kept, and lowering it for its platform raises that error)")


def attend(op: str, call: block_sparse.Call, options: KernelOptions, *,
           override: Mapping[str, Callable[[block_sparse.Call], tuple]] | None = None):
  """Runs ``call`` on the backend ``options`` ask for, or on each platform's choice (AUTO).

  ``override`` maps a platform to a function that runs the call there instead
  (SDPA's cuDNN). ``options.backend == "PALLAS"`` (SDPA's ``implementation="pallas"``)
  is the Pallas kernel of each platform: Triton on GPUs, Mosaic on TPUs, and the
  Triton kernel in interpret mode elsewhere.
  """
  if options.backend == "PALLAS":
    reason = _unsupported("TRITON", call, options)
    if isinstance(reason, str):
      checks.refuse_backend(op, "TRITON", reason)
    # The Triton kernel on GPUs, interpreted where there is no fused kernel for the call (CPUs;
    # TPUs when the Mosaic kernel cannot run it): a Pallas kernel everywhere, never XLA's loops.
    branches = {"cuda": _branch("TRITON", options)}
    if not isinstance(_unsupported("MOSAIC", call, options), str):
      branches["tpu"] = _branch("MOSAIC", options)
    interpreted = dataclasses.replace(options, interpret=True)
    # Asked for by name: every platform's branch, whichever platform the program is lowered for.
    return jax.lax.platform_dependent(call, default=_branch("TRITON", interpreted),
                                      **{**branches, **(override or {})})
  if options.backend != "AUTO":
    reason = _unsupported(options.backend, call, options)
    if isinstance(reason, str):
      checks.refuse_backend(op, options.backend, reason)
    if options.backend == "XLA":  # the XLA loops, tuned for each platform (split-KV)
      return per_platform(_branch("XLA", options),
                          {p: _branch("XLA", options, p) for p in FUSED})(call)
    if options.interpret:
      return _run(options.backend, call, options)
    # Decided where the platform is known: a program lowered for a CPU is refused there (by
    # jmat, before Pallas would be), one exported for the kernel's platform holds the kernel.
    run = _branch(options.backend, options)
    refused = _refusal(op, options.backend, jax.eval_shape(run, call))
    elsewhere = {p: refused(p) for p in PLATFORMS if _wrong_platform(options.backend, p, options)}
    return jax.lax.platform_dependent(call, default=run, **elsewhere)
  branches = {p: _branch(choose(call, p, options).backend, options, p)
              for p in FUSED if p in traced_platforms()}
  return per_platform(_branch("XLA", options), {**branches, **(override or {})})(call)


def kernel_platforms(*platforms: str):
  """A context in which ``AUTO`` traces the fused kernels of ``platforms``.

  ``AUTO`` chooses a call's kernel where the platform is known, at lowering, so
  one jitted function can hold a branch per platform. Tracing a Pallas kernel
  and checking that it can run the call costs time, so by default ``AUTO``
  holds the branch of the local platform only (``jax.default_backend()``): on
  a CPU machine nothing but the XLA loops is traced (a CPU-only program
  compiles as fast as with ``{"BACKEND": "XLA"}``), on a GPU or TPU machine its
  fused kernel. To lower or export for another platform from this machine,
  trace under this context: the setting is part of jit's cache key, so a
  function traced before is traced again.

  Args:
    *platforms: among ``"cpu"``, ``"cuda"``, ``"rocm"``, ``"tpu"``; none at all
      means the local platform again.

  Example:
    >>> f = jax.jit(lambda q: jmat.flex_attention(q, q, q))
    >>> q = jax.ShapeDtypeStruct((1, 2, 128, 64), jnp.bfloat16)
    >>> with jmat.attention.kernel_platforms("cuda"):
    ...   text = f.trace(q).lower(lowering_platforms=("cuda",)).as_text()
    >>> "triton" in text
    True
  """
  for platform in platforms:
    checks.check_platform("attention.kernel_platforms", platform, PLATFORMS)
  return _KERNEL_PLATFORMS(tuple(sorted(set(platforms))) or None)


def traced_platforms() -> tuple[str, ...]:
  """The platforms ``AUTO`` holds a branch for: :func:`kernel_platforms`' or the local one."""
  chosen = _KERNEL_PLATFORMS.value
  if chosen is not None:
    return chosen
  local = jax.default_backend()
  return ("cuda", "rocm") if local == "gpu" else (local,)


def per_platform(default: Callable, branches: Mapping[str, Callable]) -> Callable:
  """``default``, or ``lax.platform_dependent`` over the ``branches`` of the traced platforms.

  Where no traced platform has a branch (a CPU machine, by default), ``default``
  itself: nothing else is traced.
  """
  kept = {p: f for p, f in branches.items() if p in traced_platforms()}
  if not kept:
    return default
  return lambda *args: jax.lax.platform_dependent(*args, default=default, **kept)


def _branch(backend: str, options: KernelOptions, platform: str = "cpu"):
  return lambda call: _run(backend, call, options, platform)


def _run(backend: str, call: block_sparse.Call, options: KernelOptions, platform: str = "cpu"):
  """``call`` on ``backend`` in a program lowered for ``platform`` (the XLA loops' split-KV
  depends on it: :func:`jmat._src.kernels.xla.splits_for`)."""
  if backend == "XLA":
    return xla.run(call, platform=platform, split_kv=options.split_kv)
  call = _fitted(backend, call)
  return _module(backend).run(call, interpret=options.interpret, **_tunables(backend, options))


# A primitive whose lowering raises: the branch of a platform a Pallas kernel asked for by name
# does not compile for. Tracing it is free, so exporting for the kernel's platform works.
_refused_p = jax.extend.core.Primitive("jmat_refused_backend")
_refused_p.multiple_results = True
_refused_p.def_abstract_eval(lambda *, avals, message: list(avals))


def _refused_lowering(ctx, *, avals, message):
  del ctx, avals
  raise ValueError(message)


mlir.register_lowering(_refused_p, _refused_lowering)


def _refusal(op: str, backend: str, shapes):
  """For a platform, a branch giving ``shapes`` whose lowering raises jmat's refusal there."""
  leaves, tree = jax.tree.flatten(shapes)
  avals = tuple(jax_core.ShapedArray(x.shape, x.dtype) for x in leaves)

  def refused(platform: str):
    message = checks.wrong_platform_message(op, backend, platform, _NATIVE[backend])
    return lambda call: jax.tree.unflatten(tree, _refused_p.bind(avals=avals, message=message))

  return refused
