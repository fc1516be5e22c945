"""The decode suite on a GPU or a TPU: one decoding step over a paged cache, jmat against the
device's own decode kernels, in one interleaved run.

    python -m benchmarks --suite decode --device gpu            # 5 cases (~5 min, estimated)
    python -m benchmarks --suite decode --device gpu --quick    # 2 cases (~1.5 min, estimated)
    python -m benchmarks --suite decode --device tpu

On a CPU the decode suite is :mod:`benchmarks.decode`'s; with ``--device gpu`` or ``tpu`` it
is this one (:func:`benchmarks.accelerators.on_device` swaps it in). Results go to
``benchmarks/results/<gpu|tpu>-<device>-x<count>/`` beside the device's flex and attention
suites (``results.json``, ``results.md``, ``decode.png``).

Every case: one query per sequence, GQA 32:8, D=128, bfloat16, every sequence's cache full
(``S`` keys), pages of 128 positions handed out as torch's PagedAttention hands them out when
sequences grow side by side (interleaved in runs of a few pages:
:func:`benchmarks.decode.page_table`). The inputs are made on the device, every layout a
competitor takes is made from them before the timing (a layout's copy, a transpose or a
reshape, is never timed) and shared where two competitors take the same one. Competitors:

* ``jmat paged``: ``jmat.flex_attention`` of ``(B, 32, 1, 128)`` queries over the pool
  ``(1, 8, pages * 128, 128)``, the logical mask converted by jmat's ``PagedAttention`` in
  the step (``kernel_options`` AUTO: the fused kernel of the device);
* ``jmat varlen paged``: ``jmat.attention.varlen_attn`` over the pages ``(pages, 128, 8, 128)``
  with ``block_table`` and ``seqused_k`` (AUTO: split-KV decode on the fused kernel);
* ``torch`` (CUDA): ``torch.compile(flex_attention, dynamic=False)`` over torch's
  PagedAttention (the same pool, shared with jmat through DLPack), its logical mask
  converted in the step: torch's flex decoding kernel;
* ``torch varlen`` (CUDA): ``torch.nn.attention.varlen.varlen_attn`` with ``block_table`` and
  ``seqused_k`` over the same pages as jmat's, or over pages of 256 (FlashAttention-2 takes
  paged caches in pages of multiples of 256); skipped, with the reason, where the installed
  torch lacks it or those arguments;
* ``jax paged`` (the reference): JAX's Pallas paged attention,
  ``jax.experimental.pallas.ops.gpu.paged_attention`` (GPU; one page per compute block,
  ``k_splits`` up to 16) or ``jax.experimental.pallas.ops.tpu.paged_attention`` (TPU; 4 pages
  per compute block), on the pool seen as ``(8, pages, 128, 128)`` (a reshape inside the
  jitted step, no copy), the query pre-scaled by ``1/sqrt(D)`` (neither scales);
* ``jax decode`` (GPU): the kernel of ``jax.experimental.pallas.ops.gpu.decode_attention.gqa``
  (``decode_attn_unbatched`` under two vmaps, as ``gqa`` runs it, on a contiguous
  ``(B, 8, S, 128)`` cache: ``gqa`` itself takes ``(B, S, 8, 128)`` and would transpose the
  cache in the step);
* ``jax ragged`` (TPU): ``jax.experimental.pallas.ops.tpu.ragged_paged_attention`` (vLLM's TPU
  kernel) over its ``(pages, 128, 16, 128)`` pool of interleaved key and value heads.

Figures: the time per step, and the achieved memory bandwidth: the bytes of keys and values
one step must read (``info["kv_bytes"]``, ``2 * B * S * 8 * 128 * 2``) over the time, as a
share of the device's peak HBM bandwidth (:data:`PEAK_HBM_GBPS`) where it is known; the
summary gives every jmat competitor's time as a ratio to the best peer's (the fastest
non-jmat competitor of the case).
"""

from __future__ import annotations

import functools
import inspect
import math
import os
import sys
import warnings
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import accelerators, decode, machine, plots
from benchmarks import competitors as comp
from benchmarks.decode import HEAD_DIM, HEADS, KV_HEADS, PAGE, page_table, reservations
from benchmarks.formatting import fmt_pct, fmt_span, fmt_time
from benchmarks.spec import Record, SuiteSpec
from benchmarks.timing import Call, Case, Skipped, Suite, failed

DTYPE = "bfloat16"
PLATFORMS = ("gpu", "tpu")
JMAT = ("jmat paged", "jmat varlen paged")
PEERS = {"gpu": ("torch", "torch varlen", "jax paged", "jax decode"),
         "tpu": ("jax paged", "jax ragged")}
REFERENCE = "jax paged"
FUSED = {"gpu": "TRITON", "tpu": "MOSAIC"}  # the backend AUTO picks there (tests name it)
JMAT_PLATFORM = {"gpu": "cuda", "tpu": "tpu"}
# (batch, cache length): every case reads at least 128 MB of keys and values, more than an
# H100's or H200's 50 MB L2, so the bandwidth is HBM's.
QUICK_GRID = ((1, 32768), (32, 4096))
DEFAULT_GRID = ((1, 32768), (8, 32768), (32, 8192), (64, 2048), (64, 16384))
MAX_RESERVATIONS = 256  # pages are reserved in runs so that a case makes at most this many
TORCH_VARLEN_PAGE = 256  # FlashAttention-2's paged caches take pages of multiples of 256

# Peak HBM bandwidth in GB/s (1e9 bytes per second) from the vendors' data sheets, matched in
# order against JAX's device_kind as benchmarks.machine.PEAK_BF16_TFLOPS is: the more
# specific pattern first.
PEAK_HBM_GBPS: tuple[tuple[str, float], ...] = (
    (r"\bH100\b.*\bPCIe\b", 2000.0),
    (r"\bH100\b.*\bNVL\b", 3900.0),
    (r"\bH100\b", 3350.0),  # SXM
    (r"\bH200\b", 4800.0),
    (r"\bA100\b.*\b80GB\b.*\bPCIe\b", 1935.0),
    (r"\bA100\b.*\b80GB\b", 2039.0),
    (r"\bA100\b", 1555.0),
    (r"\bL4\b", 300.0),
    (r"\bTPU v4\b", 1228.0),
    (r"\bTPU v5 ?(lite|e)\b", 819.0),
    (r"\bTPU v5p?\b", 2765.0),
    (r"\bTPU v6 ?(lite|e)\b", 1640.0),
)


def peak_gbps(device_kind: str) -> float | None:
  """The device's peak HBM GB/s from :data:`PEAK_HBM_GBPS`, or None where it is not listed."""
  return machine.peak_of(PEAK_HBM_GBPS, device_kind)


def competitors(platform: str) -> tuple[str, ...]:
  return (*JMAT, *PEERS[platform])


def grid(quick: bool) -> tuple[tuple[int, int], ...]:
  """The ``(batch, cache length)`` cases; ``JMAT_DECODE_GRID=full``: cache 1k-32k x batch
  1-64, all 16 (~15 min, estimated)."""
  if quick:
    return QUICK_GRID
  if os.environ.get("JMAT_DECODE_GRID") == "full":
    return tuple((b, s) for s in (1024, 4096, 16384, 32768) for b in (1, 8, 32, 64))
  return DEFAULT_GRID


def run_of(batch: int, length: int) -> int:
  """Pages per reservation: the least power of two that keeps a case's reservations (each a
  host call that copies the page table) at most :data:`MAX_RESERVATIONS`."""
  run, pages = 1, length // PAGE
  while batch * pages // run > MAX_RESERVATIONS and run < pages:
    run *= 2
  return run


def kv_bytes(batch: int, length: int, kv_heads: int = KV_HEADS, dim: int = HEAD_DIM) -> int:
  """The bytes of keys and values one decode step reads (bfloat16)."""
  return 2 * batch * length * kv_heads * dim * 2


# ---------------------------------------------------------------- the inputs, in every layout


class Inputs(NamedTuple):
  """One case's inputs on the device: the contiguous cache and every layout made from it.

  Attributes:
    q: ``(B, Hq, D)``, one query per sequence.
    q_scaled: ``q / sqrt(D)`` (for the kernels that do not scale).
    k, v: the contiguous ``(B, Hkv, S, D)`` caches.
    table: ``(B, S // PAGE)`` int32, :func:`benchmarks.decode.page_table`.
    lengths: ``(B,)`` int32, ``S`` each.
    cu_q: ``(B + 1,)`` int32, ``0..B`` (one query per sequence).
    k_pool, v_pool: ``(1, Hkv, pages * PAGE, D)``, the pool of flex over PagedAttention.
    k_pages, v_pages: ``(pages, PAGE, Hkv, D)``, the pages of varlen_attn's block_table.
    run: pages per reservation (:func:`run_of`).
  """

  q: jax.Array
  q_scaled: jax.Array
  k: jax.Array
  v: jax.Array
  table: jax.Array
  lengths: jax.Array
  cu_q: jax.Array
  k_pool: jax.Array
  v_pool: jax.Array
  k_pages: jax.Array
  v_pages: jax.Array
  run: int


def _to_pool(x: jax.Array, table: jax.Array, page: int) -> jax.Array:
  """The contiguous ``(B, H, S, D)`` ``x`` as the pages ``(H, pages, page, D)`` of ``table``."""
  batch, heads, length, dim = x.shape
  owner = jnp.argsort(table.reshape(-1))  # the (sequence, logical page) each page holds
  by_page = x.reshape(batch, heads, length // page, page, dim).swapaxes(0, 1)
  return by_page.reshape(heads, -1, page, dim)[:, owner]


def to_pages(x: jax.Array, table: jax.Array, page: int) -> jax.Array:
  """The contiguous ``(B, H, S, D)`` ``x`` as varlen_attn's ``(pages, page, H, D)``."""
  return _to_pool(x, table, page).transpose(1, 2, 0, 3)


@functools.partial(jax.jit, static_argnames=("shapes",))
def _make(key: jax.Array, table: jax.Array, *, shapes: tuple[int, ...]) -> Inputs:
  batch, heads, kv_heads, length, dim = shapes
  kq, kk, kv = jax.random.split(key, 3)
  q = jax.random.normal(kq, (batch, heads, dim), jnp.float32)
  k, v = (jax.random.normal(s, (batch, kv_heads, length, dim), jnp.bfloat16) for s in (kk, kv))
  pools = [_to_pool(x, table, PAGE) for x in (k, v)]
  return Inputs(
      q=q.astype(jnp.bfloat16), q_scaled=(q / math.sqrt(dim)).astype(jnp.bfloat16), k=k, v=v,
      table=table, lengths=jnp.full((batch,), length, jnp.int32),
      cu_q=jnp.arange(batch + 1, dtype=jnp.int32),
      k_pool=pools[0].reshape(1, kv_heads, -1, dim), v_pool=pools[1].reshape(1, kv_heads, -1, dim),
      k_pages=pools[0].transpose(1, 2, 0, 3), v_pages=pools[1].transpose(1, 2, 0, 3), run=0)


def make_inputs(batch: int, length: int, device: jax.Device, *, heads: int = HEADS,
                kv_heads: int = KV_HEADS, dim: int = HEAD_DIM, run: int | None = None,
                seed: int = 0) -> Inputs:
  """Standard-normal inputs made on ``device`` (seconds on the host for the largest cases
  otherwise), laid out for every competitor, pages reserved ``run`` at a time (default
  :func:`run_of`); ready when this returns."""
  run = run or run_of(batch, length)
  with jax.enable_x64(False), jax.default_device(device):
    table = jax.device_put(page_table(batch, length, run), device)
    inputs = _make(jax.random.key(seed), table, shapes=(batch, heads, kv_heads, length, dim))
  return jax.block_until_ready(inputs)._replace(run=run)  # a Python int, not jit's output


# ---------------------------------------------------------------- the JAX competitors


class Step(NamedTuple):
  """A JAX competitor: a jittable function and its arguments (arrays, or pytrees of them)."""

  fn: Callable[..., Any]
  args: tuple[Any, ...]


def _jmat_options(platform: str, interpret: bool) -> dict[str, Any] | None:
  """AUTO on the device; the device's fused kernel in Pallas interpret mode in the tests."""
  return {"BACKEND": FUSED[platform], "INTERPRET": True} if interpret else None


def _valid(lengths):
  return lambda b, h, q_idx, kv_idx: kv_idx < lengths[b]


def logical_mask(lengths: jax.Array, length: int):
  """jmat's logical block mask of the valid keys (blocks of PAGE; converted in the step)."""
  import jmat

  return jmat.create_block_mask(_valid(lengths), lengths.shape[0], None, 1, length,
                                BLOCK_SIZE=PAGE)


def jmat_pages(inputs: Inputs, device: jax.Device):
  """jmat's PagedAttention holding ``inputs``' pages (its page table is ``inputs.table``)."""
  from benchmarks.decode import _pages

  batch, _, length, _ = inputs.k.shape
  with jax.default_device(jax.devices("cpu")[0]):  # host-side bookkeeping, on the host
    paged = _pages(batch, length, inputs.run)
  return jax.device_put(paged, device)


def _jmat_paged(inputs: Inputs, platform: str, interpret: bool, device: jax.Device) -> Step:
  import jmat

  options = _jmat_options(platform, interpret)

  def step(q, k_pool, v_pool, paged, logical):
    physical = paged.convert_logical_block_mask(logical)
    out = jmat.flex_attention(q[:, :, None], k_pool, v_pool, block_mask=physical,
                              enable_gqa=True, kernel_options=options)
    return out[:, :, 0]

  length = inputs.k.shape[2]
  return Step(step, (inputs.q, inputs.k_pool, inputs.v_pool, jmat_pages(inputs, device),
                     logical_mask(inputs.lengths, length)))


def _jmat_varlen(inputs: Inputs, platform: str, interpret: bool) -> Step:
  import jmat

  options = _jmat_options(platform, interpret)
  length = inputs.k.shape[2]

  def step(q, k_pages, v_pages, cu_q, table, lengths):
    return jmat.attention.varlen_attn(q, k_pages, v_pages, cu_q, None, 1, length,
                                      enable_gqa=True, seqused_k=lengths, block_table=table,
                                      kernel_options=options)

  return Step(step, (inputs.q, inputs.k_pages, inputs.v_pages, inputs.cu_q, inputs.table,
                     inputs.lengths))


def _import(module: str):
  """``jax.experimental.pallas.ops.<module>`` (jax 0.11 deprecates the GPU ones: no warning)."""
  import importlib

  with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    return importlib.import_module(f"jax.experimental.pallas.ops.{module}")


def _splits(pages: int, most: int = 16) -> int:
  """JAX's default 16 key splits, fewer where a sequence has fewer pages (they must divide)."""
  return math.gcd(pages, most)


def _jax_paged_gpu(inputs: Inputs, interpret: bool) -> Step:
  ops = _import("gpu.paged_attention")
  kv_heads, pages = inputs.k.shape[1], inputs.table.shape[1]

  def step(q_scaled, k_pool, v_pool, table, lengths):
    k_pages, v_pages = (x.reshape(kv_heads, -1, PAGE, x.shape[-1]) for x in (k_pool, v_pool))
    # Pages of 128: one page per compute block (its default of 8 assumes pages of 16).
    return ops.paged_attention(q_scaled, k_pages, v_pages, table, lengths,
                               pages_per_compute_block=1, k_splits=_splits(pages),
                               interpret=interpret)

  return Step(step, (inputs.q_scaled, inputs.k_pool, inputs.v_pool, inputs.table,
                     inputs.lengths))


def _jax_decode_gpu(inputs: Inputs, interpret: bool) -> Step:
  ops = _import("gpu.decode_attention")
  batch, heads, dim = inputs.q.shape
  kv_heads, length = inputs.k.shape[1], inputs.k.shape[2]
  inner = functools.partial(
      ops.decode_attn_unbatched, sm_scale=1 / math.sqrt(dim), block_h=16, block_k=128,
      k_splits=_splits(length // 128), num_warps=None, num_stages=2, grid=None,
      interpret=interpret, debug=False, return_residuals=False, normalize_output=True)

  def step(q, k, v):
    grouped = q.reshape(batch, kv_heads, heads // kv_heads, dim)
    return jax.vmap(jax.vmap(inner))(grouped, k, v, None, None).reshape(batch, heads, dim)

  return Step(step, (inputs.q, inputs.k, inputs.v))


def _jax_paged_tpu(inputs: Inputs) -> Step:
  ops = _import("tpu.paged_attention")
  kv_heads, pages = inputs.k.shape[1], inputs.table.shape[1]

  def step(q_scaled, k_pool, v_pool, lengths, table):
    k_pages, v_pages = (x.reshape(kv_heads, -1, PAGE, x.shape[-1]) for x in (k_pool, v_pool))
    return ops.paged_attention(q_scaled, k_pages, v_pages, lengths, table,
                               pages_per_compute_block=math.gcd(pages, 4))

  return Step(step, (inputs.q_scaled, inputs.k_pool, inputs.v_pool, inputs.lengths,
                     inputs.table))


@jax.jit
def ragged_pool(k_pages: jax.Array, v_pages: jax.Array) -> jax.Array:
  """ragged_paged_attention's pool ``(pages, page, 2 * Hkv, D)``: key head h at 2h, value
  head h at 2h + 1."""
  pages, page, kv_heads, dim = k_pages.shape
  return jnp.stack([k_pages, v_pages], axis=3).reshape(pages, page, 2 * kv_heads, dim)


def _jax_ragged_tpu(inputs: Inputs, blocks: tuple[int, int] | None) -> Step:
  """``blocks``: (kv pages, queries) per block; None: its tuned table (which reads the TPU's
  generation from ``jax.devices()``, so the tests give them)."""
  ops = _import("tpu.ragged_paged_attention")
  batch, _, dim = inputs.q.shape
  pages_per_block, queries_per_block = blocks or (None, None)

  def step(q, kv_pages, lengths, table, cu_q, num_seqs):
    return ops.ragged_paged_attention(
        q, kv_pages, lengths, table, cu_q, num_seqs, sm_scale=1 / math.sqrt(dim),
        num_kv_pages_per_block=pages_per_block, num_queries_per_block=queries_per_block)

  with jax.enable_x64(False):
    pool = ragged_pool(inputs.k_pages, inputs.v_pages)
  return Step(step, (inputs.q, pool, inputs.lengths, inputs.table, inputs.cu_q,
                     jnp.array([batch], jnp.int32, device=inputs.q.device)))


def jax_steps(inputs: Inputs, platform: str, device: jax.Device, *, interpret: bool = False,
              ragged_blocks: tuple[int, int] | None = None
              ) -> dict[str, Callable[[], Step | Skipped]]:
  """How to make each JAX competitor on ``platform`` ("gpu" or "tpu"), each made when called
  (so one that cannot be made fails alone). ``interpret``: jmat's fused kernel and JAX's GPU
  kernels in Pallas interpret mode, for the tests on a CPU (JAX's TPU kernels take no such
  flag: run them under ``pltpu.force_tpu_interpret_mode()``)."""
  steps: dict[str, Callable[[], Step | Skipped]] = {
      "jmat paged": functools.partial(_jmat_paged, inputs, platform, interpret, device),
      "jmat varlen paged": functools.partial(_jmat_varlen, inputs, platform, interpret),
  }
  if platform == "gpu":
    steps["jax paged"] = functools.partial(_jax_paged_gpu, inputs, interpret)
    steps["jax decode"] = functools.partial(_jax_decode_gpu, inputs, interpret)
  else:
    steps["jax paged"] = functools.partial(_jax_paged_tpu, inputs)
    steps["jax ragged"] = functools.partial(_jax_ragged_tpu, inputs, ragged_blocks)
  return steps


def _timed(step: Step) -> Call:
  """The step jitted, on its arguments, waited on; traced and run with 64-bit types off."""
  fn = jax.jit(step.fn)

  def call() -> Any:
    with jax.enable_x64(False):
      return jax.block_until_ready(fn(*step.args))

  return call


# ---------------------------------------------------------------- torch (CUDA only)


def _say(reason: str) -> Skipped:
  """A skipped competitor, also printed at once (the one device run should say why)."""
  print(f"decode: {reason}", file=sys.stderr)
  return Skipped(reason)


def _torch_tensor(torch: Any, x: jax.Array) -> Any:
  """``x`` as a torch tensor on the same memory (DLPack; no copy on a GPU)."""
  return torch.from_dlpack(x)


def torch_flex_call(inputs: Inputs, device: str, flex: Callable[..., Any]) -> Call:
  """``flex`` (torch's flex_attention, compiled on a GPU) over torch's PagedAttention on
  ``device`` holding the pool of ``inputs`` (the tests run it eagerly on the CPU)."""
  import torch
  from torch.nn.attention.experimental._paged_attention import PagedAttention
  from torch.nn.attention.flex_attention import create_block_mask

  batch, _, length, _ = inputs.k.shape
  paged = PagedAttention(inputs.k_pool.shape[2] // PAGE, PAGE, batch, device=device)
  for b, end in reservations(batch, length, inputs.run):
    paged.reserve(torch.tensor(b), torch.tensor(end))
  # The same pages as jmat's (the tests check both tables against page_table): one pool.
  q, k_pool, v_pool = (_torch_tensor(torch, x) for x in (inputs.q, inputs.k_pool, inputs.v_pool))
  q = q[:, :, None]
  lengths = torch.full((batch,), length, device=device)
  logical = create_block_mask(_valid(lengths), batch, None, 1, length, device=device,
                              BLOCK_SIZE=PAGE)
  wait = torch.cuda.synchronize if device == "cuda" else (lambda: None)

  def call() -> Any:
    out = flex(q, k_pool, v_pool, block_mask=paged.convert_logical_block_mask(logical),
               enable_gqa=True)
    wait()
    return out

  return call


def _torch_flex(inputs: Inputs) -> Call:
  return torch_flex_call(inputs, "cuda", decode._torch_flex())


def torch_varlen(torch: Any) -> Callable[..., Any] | Skipped:
  """torch's ``varlen_attn``, or Skipped saying what this torch lacks."""
  import importlib

  try:
    varlen_attn = importlib.import_module("torch.nn.attention.varlen").varlen_attn
  except (ImportError, AttributeError) as e:
    return Skipped(f"torch {torch.__version__} has no torch.nn.attention.varlen.varlen_attn "
                   f"({e})")
  lacking = varlen_lacks(varlen_attn)
  if lacking:
    return Skipped(f"torch {torch.__version__}'s varlen_attn {lacking}")
  return varlen_attn


def varlen_lacks(varlen_attn: Callable[..., Any]) -> str | None:
  """What a paged decode step needs that this ``varlen_attn`` does not take, or None."""
  params = inspect.signature(varlen_attn).parameters
  missing = [name for name in ("block_table", "seqused_k") if name not in params]
  if missing:
    return f"takes no {' or '.join(missing)} (a paged cache needs torch 2.13's)"
  return None


def _torch_varlen(inputs: Inputs) -> Call | Skipped:
  import torch

  varlen = torch_varlen(torch)
  if isinstance(varlen, Skipped):
    return _say(varlen.reason)
  batch, _, length, _ = inputs.k.shape
  gqa = {"enable_gqa": True} if "enable_gqa" in inspect.signature(varlen).parameters else {}
  q, cu_q, lengths = (_torch_tensor(torch, x) for x in (inputs.q, inputs.cu_q, inputs.lengths))
  cu_k = cu_q * length

  def attend(k_pages: Any, v_pages: Any, table: Any) -> Callable[[], Any]:
    def call() -> Any:
      out = varlen(q, k_pages, v_pages, cu_q, cu_k, 1, length, seqused_k=lengths,
                   block_table=table, **gqa)
      torch.cuda.synchronize()
      return out
    return call

  call = attend(*(_torch_tensor(torch, x) for x in (inputs.k_pages, inputs.v_pages,
                                                    inputs.table)))
  try:
    call()
  except RuntimeError as e:  # FlashAttention-2 takes pages of multiples of 256 only
    print(f"decode: torch varlen over pages of {PAGE}: {failed(e)['reason']}; pages of "
          f"{TORCH_VARLEN_PAGE} instead", file=sys.stderr)
    big = jax.device_put(_big_page_table(batch, length), inputs.q.device)
    with jax.enable_x64(False):
      pages = [to_pages(x, big, TORCH_VARLEN_PAGE) for x in (inputs.k, inputs.v)]
    call = attend(*(_torch_tensor(torch, x) for x in (*pages, big)))
  return call


def _big_page_table(batch: int, length: int) -> np.ndarray:
  """Pages of TORCH_VARLEN_PAGE handed out side by side, page by page."""
  pages = length // TORCH_VARLEN_PAGE
  return (np.arange(pages)[None, :] * batch + np.arange(batch)[:, None]).astype(np.int32)


def _torch_calls(target: comp.Target, inputs: Inputs) -> dict[str, Callable[[], Call | Skipped]]:
  if target.torch_device != "cuda":
    no = Skipped("torch sees no CUDA device here (torch.cuda.is_available() is False, or torch "
                 "is not installed): its CPU kernels are no GPU competitor")
    return {"torch": lambda: no, "torch varlen": lambda: no}
  return {"torch": lambda: _torch_flex(inputs), "torch varlen": lambda: _torch_varlen(inputs)}


# ---------------------------------------------------------------- the suite


def _raising(error: Exception) -> Call:
  def call() -> Any:
    raise error

  return call


def case(target: comp.Target, batch: int, length: int, platform: str | None = None,
         interpret: bool = False) -> Case:
  """One ``(batch, length)`` case on ``target`` with every competitor of ``platform`` (by
  default ``target``'s; the tests build a GPU or TPU case on a CPU, with ``interpret``)."""
  platform = platform or target.device.platform
  info: dict[str, Any] = {"batch": batch, "cache": length, "heads": [HEADS, KV_HEADS],
                          "head_dim": HEAD_DIM, "page_size": PAGE,
                          "pages_per_reservation": run_of(batch, length),
                          "kv_bytes": kv_bytes(batch, length)}

  def build() -> dict[str, Call | Skipped]:
    inputs = make_inputs(batch, length, target.device)
    makers: dict[str, Callable[[], Step | Call | Skipped]] = dict(
        jax_steps(inputs, platform, target.device, interpret=interpret))
    if platform == "gpu":
      makers.update(_torch_calls(target, inputs))
    calls: dict[str, Call | Skipped] = {}
    with jax.enable_x64(False):
      for name in competitors(platform):
        try:
          made = makers[name]()
          if isinstance(made, Step):
            if name == JMAT[0]:
              info["auto_backend"] = _auto_backend(made, platform)
            made = _timed(made)
          calls[name] = made
        except Exception as e:  # e.g. an API another jax or torch moved: this one fails alone
          calls[name] = _raising(e)
    return calls

  flops = 4.0 * batch * HEADS * HEAD_DIM * length
  return Case(f"B={batch} S={length}", flops, DTYPE, build, info)


def _auto_backend(paged: Step, platform: str) -> str:
  """What ``kernel_options`` AUTO picks for jmat paged's flex call there, and why."""
  import jmat

  try:
    q, k_pool, v_pool, pages, logical = paged.args
    return "{}: {}".format(*jmat.attention.flex_attention_backend(
        q[:, :, None], k_pool, v_pool, block_mask=pages.convert_logical_block_mask(logical),
        enable_gqa=True, platform=JMAT_PLATFORM[platform]))
  except Exception as e:  # jmat's own bug, reported with the results, not fatal to them
    return failed(e)["reason"]


def _notes(target: comp.Target) -> tuple[str, ...]:
  platform, kind = target.device.platform, target.device.device_kind
  peak = peak_gbps(kind)
  return (
      "jmat paged: jmat.flex_attention over jmat's PagedAttention pool (1, 8, pages*128, 128), "
      "the logical mask converted in the step; jmat varlen paged: varlen_attn with "
      "block_table over (pages, 128, 8, 128); both kernel_options AUTO "
      "(info.auto_backend: jmat paged's choice).",
      ("torch: torch.compile(flex_attention, dynamic=False) over torch's PagedAttention (the "
       "same pool); torch varlen: torch.nn.attention.varlen.varlen_attn with block_table "
       f"(pages of {PAGE}, or {TORCH_VARLEN_PAGE} where FlashAttention refuses {PAGE}); jax "
       "paged: jax.experimental.pallas.ops.gpu.paged_attention; jax decode: "
       "gpu.decode_attention's gqa kernel on a contiguous (B, 8, S, 128) cache."
       if platform == "gpu" else
       "jax paged: jax.experimental.pallas.ops.tpu.paged_attention; jax ragged: "
       "tpu.ragged_paged_attention (its tuned block sizes) over (pages, 128, 16, 128)."),
      "Pages interleave between sequences in runs of info.pages_per_reservation pages (torch's "
      "reservation order); inputs made on the device, every layout made before the timing.",
      "decode is memory-bound: info.kv_bytes is what a step must read; GB/s = kv_bytes / "
      "median_s (the README summary and decode.png give it; GFLOP/s count 4*B*Hq*D*S).",
      (f"% of peak bandwidth: of {kind}'s {peak:g} GB/s HBM (vendor figure)" if peak else
       f"% of peak bandwidth: n/a, {kind} is not in benchmarks.decode_device.PEAK_HBM_GBPS")
      + ".",
  )


def decode_suite(target: comp.Target, quick: bool) -> Suite:
  platform = target.device.platform
  cases = tuple(case(target, b, s) for b, s in grid(quick))
  return Suite(
      "decode", f"Decode attention on {target.device.device_kind}, one query per sequence, GQA "
      f"{HEADS}:{KV_HEADS}, D={HEAD_DIM}, {DTYPE}, paged cache, every cache full",
      competitors(platform), REFERENCE, cases, notes=_notes(target), jax_enable_x64=False)


# ---------------------------------------------------------------- how the suite is reported


def bandwidth(case: Record, record: Mapping[str, Any]) -> float:
  """GB/s (1e9 bytes per second) of a competitor's median step."""
  return case["info"]["kv_bytes"] / record["median_s"] / 1e9


def best_peer(case: Record) -> tuple[str, Mapping[str, Any]] | None:
  """The fastest non-jmat competitor that ran in ``case``."""
  ran = [(name, r) for name, r in case["results"].items()
         if not name.startswith("jmat") and r.get("status") == "ok"]
  return min(ran, key=lambda item: item[1]["median_s"]) if ran else None


def summary(suite: Record) -> list[str]:
  """Per jmat competitor: its bandwidth (and share of the peak) and its time against the best
  peer's, over the cases."""
  kind = suite["run"].get("device_kind", suite["run"]["device"])
  peak = peak_gbps(kind)
  out = []
  for mine in JMAT:
    cases = [c for c in suite["cases"] if c["results"].get(mine, {}).get("status") == "ok"]
    if not cases:
      continue
    rates = [bandwidth(c, c["results"][mine]) for c in cases]
    share = (f" ({fmt_pct(100 * min(rates) / peak)}–{fmt_pct(100 * max(rates) / peak)} of "
             f"{peak:g} GB/s)" if peak else "")
    text = (f"decode on {kind} ({len(cases)} cases, B x S up to "
            f"{max(c['info']['batch'] * c['info']['cache'] for c in cases)}): {mine} reads the "
            f"cache at {min(rates):.0f}–{max(rates):.0f} GB/s{share}")
    ratios, peers = [], set()
    for c in cases:
      best = best_peer(c)
      if best:
        ratios.append(c["results"][mine]["median_s"] / best[1]["median_s"])
        peers.add(best[0])
    if ratios:
      text += (f", {fmt_span(ratios)} the time of the best peer "
               f"({', '.join(sorted(peers))})")
    out.append(text + ".")
  for c in suite["cases"]:
    record = c["results"][JMAT[0]]
    if record.get("status") == "ok":
      out.append(f"decode {c['name']} on {kind}: {JMAT[0]} {fmt_time(record['median_s'])}.")
      break
  return out


def plot(suite: Record, plt):
  """Time per step (log scale) | achieved bandwidth, per case and competitor, with the device's
  peak bandwidth as a line where it is known."""
  fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.6))
  plots.bars(left, suite, suite["cases"], per_call=True)
  left.set_yscale("log")
  left.set_title("time per step", fontsize=9)
  names = suite["competitors"]
  width = 0.8 / len(names)
  for i, name in enumerate(names):
    xs, ys = [], []
    for j, c in enumerate(suite["cases"]):
      if c["results"][name]["status"] == "ok":
        xs.append(j + (i - (len(names) - 1) / 2) * width)
        ys.append(bandwidth(c, c["results"][name]))
    if xs:  # the colours of the time panel (its bars take the colour cycle in this order)
      right.bar(xs, ys, width, label=name, color=f"C{i}")
  peak = peak_gbps(suite["run"].get("device_kind", ""))
  if peak:
    right.axhline(peak, color="gray", linestyle="--", linewidth=1, label=f"peak {peak:g}")
  right.set_xticks(range(len(suite["cases"])), [c["name"] for c in suite["cases"]],
                   rotation=20, ha="right", fontsize=7)
  right.set_ylabel("GB/s of keys and values read (higher is better)")
  right.set_title("achieved bandwidth", fontsize=9)
  right.grid(axis="y", alpha=0.3)
  right.legend(fontsize=7)
  return fig


DECODE_SPEC: SuiteSpec = accelerators.on_device(decode.DECODE_SPEC, decode_suite, summary, plot)
"""The decode suite: :mod:`benchmarks.decode`'s on a CPU, this module's on a GPU or TPU."""
