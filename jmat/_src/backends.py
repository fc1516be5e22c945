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

from jmat._src import block_sparse, checks
from jmat._src.kernels import xla

BACKENDS = ("AUTO", "XLA", "TRITON", "MOSAIC")
PLATFORMS = ("cpu", "cuda", "rocm", "tpu")
# The Pallas kernel of each accelerator platform; every other platform runs XLA.
FUSED = {"cuda": "TRITON", "tpu": "MOSAIC"}
# The platforms AUTO holds a branch for (None: the local one). In jit's cache key, so a function
# traced under one setting is traced again under another.
_KERNEL_PLATFORMS = jax.make_user_context(None)
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
OPTION_KEYS = ("BACKEND", "INTERPRET", *_TRITON_FIELDS, *_PREFIXED)


@dataclasses.dataclass(frozen=True)
class KernelOptions:
  """A checked ``kernel_options`` dict (static: part of the jit cache key).

  Attributes:
    backend: one of :data:`BACKENDS` (or ``"PALLAS"``: SDPA's ``implementation="pallas"``).
    interpret: run a Pallas kernel in Pallas interpret mode.
    triton: the Triton kernel's tiles and launch parameters given, as sorted
      ``(BlockSizes field, value)`` pairs. The XLA and Mosaic kernels compute in
      the blocks of the mask's tables, so these tune the Triton kernel only.
  """

  backend: str = "AUTO"
  interpret: bool = False
  triton: tuple[tuple[str, int], ...] = ()


DEFAULT = KernelOptions()


def kernel_options(op: str, options: Mapping[str, Any] | None) -> KernelOptions:
  """Checks torch's ``kernel_options`` dict; refuses unknown keys or values, listing the valid."""
  options = dict(options or {})
  checks.check_kernel_options(op, options, OPTION_KEYS, BACKENDS)
  fields = {_TRITON_FIELDS[k]: v for k, v in options.items() if k in _TRITON_FIELDS}
  fields |= {_TRITON_FIELDS[_PREFIXED[k]]: v for k, v in options.items() if k in _PREFIXED}
  return KernelOptions(options.get("BACKEND", "AUTO"), bool(options.get("INTERPRET", False)),
                       tuple(sorted(fields.items())))


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


def _unsupported(backend: str, call: block_sparse.Call, options: KernelOptions) -> str | None:
  """Why ``backend`` cannot run ``call`` in its kernel, or None."""
  if backend == "XLA":
    return None
  call = _fitted(backend, call)
  if call.needs_max:
    return "max_scores (return_aux) is computed by the XLA backend only"
  # A Triton kernel run in interpret mode needs no CUDA lowering (which jax 0.11 refuses on a
  # machine without a GPU).
  probe = {"probe": not options.interpret} if backend == "TRITON" else {}
  return _module(backend).unsupported(call.q, call.k, call.v, call.operands, call.mods,
                                      call.block_q, call.block_k,
                                      **_tunables(backend, options), **probe)


def choose(call: block_sparse.Call, platform: str, options: KernelOptions) -> Choice:
  """The backend ``call`` gets when lowered for ``platform`` under ``options``, and why."""
  if options.backend != "AUTO":
    reason = _unsupported(options.backend, call, options)
    if reason is not None:
      return Choice(options.backend, f"refused: {reason}")
    return Choice(options.backend, "asked for with kernel_options BACKEND")
  fused = FUSED.get(platform)
  if fused is None:
    return Choice("XLA", f"{platform}: the XLA loops are the kernel for this platform")
  reason = _unsupported(fused, call, options)
  if reason is None:
    return Choice(fused, f"{platform}: everything the call needs runs in the {fused} kernel")
  return Choice("XLA", f"{platform}: {fused} cannot run it ({reason})")


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
    if reason is not None:
      checks.refuse_backend(op, "TRITON", reason)
    # The Triton kernel on GPUs, interpreted where there is no fused kernel for the call (CPUs;
    # TPUs when the Mosaic kernel cannot run it): a Pallas kernel everywhere, never XLA's loops.
    branches = {"cuda": _branch("TRITON", options)}
    if _unsupported("MOSAIC", call, options) is None:
      branches["tpu"] = _branch("MOSAIC", options)
    interpreted = dataclasses.replace(options, interpret=True)
    # Asked for by name: every platform's branch, whichever platform the program is lowered for.
    return jax.lax.platform_dependent(call, default=_branch("TRITON", interpreted),
                                      **{**branches, **(override or {})})
  if options.backend != "AUTO":
    reason = _unsupported(options.backend, call, options)
    if reason is not None:
      checks.refuse_backend(op, options.backend, reason)
    return _run(options.backend, call, options)
  branches = {p: _branch(choose(call, p, options).backend, options)
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


def _branch(backend: str, options: KernelOptions):
  return lambda call: _run(backend, call, options)


def _run(backend: str, call: block_sparse.Call, options: KernelOptions):
  if backend == "XLA":
    return xla.run(call)
  call = _fitted(backend, call)
  return _module(backend).attend(call.q, call.k, call.v, call.blocks, call.operands, call.scale,
                                 mods=call.mods, block_q=call.block_q, block_k=call.block_k,
                                 interpret=options.interpret, q_offset=call.q_offset,
                                 k_offset=call.k_offset, **_tunables(backend, options))
