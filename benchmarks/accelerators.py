"""The flex and attention suites on a GPU or a TPU: jmat's Pallas kernels against the device's own.

    python -m benchmarks --suite flex --suite attention --device gpu
    python -m benchmarks --suite flex --suite attention --device tpu
    python -m benchmarks --suite flex --suite attention --device gpu --readme README.md
    python -m benchmarks --suite flex --suite attention --device gpu --quick   # a smoke run

On a CPU the two suites are :mod:`benchmarks.flex`'s and :mod:`benchmarks.attention`'s;
with ``--device gpu`` or ``--device tpu`` they are these (:func:`on_device` swaps
them in). Results go to ``benchmarks/results/<gpu|tpu>-<device>-x<count>/`` beside
the CPU ones (``results.json``, ``results.md``, ``flex.png``, ``attention.png``);
``--readme`` writes the device's own block (``<!-- bench:gpu:start -->``) and leaves
the CPU block alone.

Every case: B=1, H=16, D=128, bfloat16, self-attention, inputs on the device before
the timing, block masks (BLOCK_SIZE 128) built once outside it. The flex suite runs
the flex suite's masks (causal, sliding window 256, 4 packed documents, prefix-LM,
causal + tanh softcap 50) forward at L = 4096, 8192, 16384 and forward+backward
(gradients of ``sum(out)`` for q, k, v) at L=16384; the attention suite SDPA causal
and full, the same way.

Competitors on a GPU, in one run:

* ``jmat triton``: ``jmat.flex_attention`` (attention suite:
  ``jmat.scaled_dot_product_attention(implementation="blockwise")``) with
  ``kernel_options={"BACKEND": "TRITON"}``, jmat's Pallas Triton kernel, jitted;
* ``jmat xla``: the same with ``{"BACKEND": "XLA"}``, jmat's nested-loop kernel (the
  fallback); the flex suite's ``ratio_vs_jnp`` reference;
* ``torch``: ``torch.compile(flex_attention, dynamic=False)`` with torch's
  ``create_block_mask(..., device="cuda")`` (attention suite: torch's SDPA, which
  picks its flash kernel) on CUDA tensors, waited on with ``torch.cuda.synchronize()``;
* ``cudnn``: ``jax.jit(jax.nn.dot_product_attention(implementation="cudnn"))`` on the
  ``(B, L, H, D)`` layout it takes: causal, full and the sliding window (its
  ``local_window_size``); it has no document, prefix or score_mod masks. The
  attention suite's reference.

On a TPU: ``jmat mosaic`` (``{"BACKEND": "MOSAIC"}``), ``jmat xla`` and ``splash``,
jax's splash attention (``jax.experimental.pallas.ops.tpu.splash_attention``, the
reference of both suites) with the same masks: ``CausalMask``, ``LocalMask``,
``SegmentIds`` for the documents, ``CausalMask | NumpyMask`` for prefix-LM,
``attn_logits_soft_cap`` for the softcap; its default 128 blocks, the tiles jmat's
Mosaic kernel takes from a BLOCK_SIZE 128 mask. Splash does not scale the scores,
so its q is scaled by ``1/sqrt(D)`` when the inputs are made.

Figures: the median time per call; TFLOP/s over the computed blocks, ``4 B H D``
per (query, key) pair of every 128 x 128 block the block mask lists, full or
partial (masked-out pairs of partial blocks included), 3.5x that for
forward+backward: one count for every competitor (:func:`benchmarks.flex.computed_pairs`);
and that as a percentage of the device's peak dense bf16 TFLOP/s
(:data:`benchmarks.machine.PEAK_BF16_TFLOPS`; ``n/a`` for a device not listed).
``results.md`` also has the GFLOP/s of the useful work (allowed pairs only).

Each jmat case records ``info["auto_backend"]``: the backend ``kernel_options``
``AUTO`` would pick there, and why (``jmat.attention.flex_attention_backend``).

JAX runs these suites with 64-bit types off, as users run attention (the runner
turns them on for the dtypes suite's float64; nothing here is 64-bit), and as
splash attention needs: its TPU kernels do not lower with them on (index
arithmetic mixing int32 and int64).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import competitors as comp
from benchmarks import flex, machine, plots
from benchmarks.attention import to_jax_nn_layout
from benchmarks.formatting import fmt_pct, fmt_span, fmt_tflops
from benchmarks.spec import Record, SuiteSpec
from benchmarks.timing import Call, Case, Skipped, Suite, failed

BATCH, HEADS, HEAD_DIM, DTYPE = 1, 16, 128, "bfloat16"
BLOCK = 128  # the block masks' BLOCK_SIZE (jmat's and torch's), and the computed blocks' size
LENGTHS, BACKWARD_LENGTHS = (4096, 8192, 16384), (16384,)
QUICK_LENGTHS = (1024,)  # --quick: forward and forward+backward at this length only
FLEX_MASKS = (("causal", False), ("sliding window", False), ("documents", False),
              ("prefix-LM", False), ("causal", True))  # (mask, softcap)
QUICK_FLEX_MASKS = (("causal", False), ("documents", False))
SDPA_MASKS = ("causal", "full")
PLATFORMS = ("gpu", "tpu")
JMAT_PLATFORM = {"gpu": "cuda", "tpu": "tpu"}  # JAX's device platform -> jmat's platform name
FUSED = {"gpu": ("jmat triton", "TRITON"), "tpu": ("jmat mosaic", "MOSAIC")}
PEERS = {"gpu": ("torch", "cudnn"), "tpu": ("splash",)}
REFERENCE = {("gpu", "flex"): "jmat xla", ("gpu", "attention"): "cudnn",
             ("tpu", "flex"): "splash", ("tpu", "attention"): "splash"}
CUDNN_MASKS = ("causal", "full", "sliding window")


def competitors(platform: str) -> tuple[str, ...]:
  """The competitors on ``platform`` ("gpu" or "tpu"), jmat's fused kernel first."""
  return (FUSED[platform][0], "jmat xla", *PEERS[platform])


@dataclasses.dataclass(frozen=True)
class Problem:
  """One attention problem of the device suites.

  Attributes:
    kind: a mask of :data:`benchmarks.flex.MASKS`, or ``"full"`` (SDPA only).
    length: L = S.
    softcap: with the tanh softcap score_mod (flex only).
    backward: forward+backward (gradients of ``sum(out)`` for q, k, v).
    sdpa: through ``scaled_dot_product_attention`` (causal or full), not flex_attention.
    heads: H (the tests run fewer).
  """

  kind: str
  length: int
  softcap: bool = False
  backward: bool = False
  sdpa: bool = False
  heads: int = HEADS

  @property
  def shape(self) -> tuple[int, int, int, int]:
    return (BATCH, self.heads, self.length, HEAD_DIM)

  @property
  def name(self) -> str:
    return flex.case_name(self.kind, self.length, self.softcap, self.backward)

  def flops(self, computed: bool = False) -> float:
    """The useful work (allowed pairs), or with ``computed`` the computed blocks' work."""
    pairs = (flex.computed_pairs(self.kind, self.length, BLOCK) if computed
             else float(flex.allowed_keys(self.kind, self.length).sum()))
    return flex.attention_flops(pairs, BATCH, self.heads, HEAD_DIM, self.backward)


class Peer(NamedTuple):
  """A JAX competitor: a function of JAX arrays, and its arguments from the host's q, k, v."""

  fn: Callable[..., Any]
  inputs: Callable[[np.ndarray, np.ndarray, np.ndarray], tuple[np.ndarray, ...]]

  def call(self, target: comp.Target, q: np.ndarray, k: np.ndarray, v: np.ndarray) -> Call:
    """The timed call on ``target``'s copies of the inputs, traced and run without x64."""
    call = target.jax_call(self.fn, *self.inputs(q, k, v))

    def without_x64() -> Any:
      with jax.enable_x64(False):
        return call()

    return without_x64


def _same(q: np.ndarray, k: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, ...]:
  return q, k, v


def _jax_nn_layout(q: np.ndarray, k: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, ...]:
  return tuple(to_jax_nn_layout(x) for x in (q, k, v))


def _options(backend: str, interpret: bool) -> dict[str, Any]:
  return {"BACKEND": backend, **({"INTERPRET": True} if interpret and backend != "XLA" else {})}


def _jmat_peer(problem: Problem, platform: str, backend: str, interpret: bool) -> Peer | Skipped:
  """jmat's kernel ``backend`` (Skipped, with jmat's reason, where jmat refuses it)."""
  import jmat

  options = _options(backend, interpret)
  if problem.sdpa:
    attend = functools.partial(jmat.scaled_dot_product_attention,
                               is_causal=problem.kind == "causal", implementation="blockwise",
                               kernel_options=options)
    return Peer(jax.jit(comp.jax_grads(attend) if problem.backward else attend), _same)
  choice = _backend(problem, platform, options)
  if choice.reason.startswith("refused"):
    return Skipped(f"jmat BACKEND={backend}: {choice.reason}")
  fn, mask = flex.jmat_fn(problem.kind, problem.length, problem.softcap, problem.backward,
                          options)
  return Peer(lambda q, k, v: fn(q, k, v, mask), _same)


def _backend(problem: Problem, platform: str, options: Mapping[str, Any] | None):
  """``jmat.attention.flex_attention_backend`` of the problem's flex call on ``platform``."""
  import jmat

  score_mod, mask = flex.jmat_mods(problem.kind, problem.length, problem.softcap)
  x = jax.ShapeDtypeStruct(problem.shape, jnp.dtype(DTYPE))
  return jmat.attention.flex_attention_backend(
      x, x, x, score_mod, mask, kernel_options=None if options is None else dict(options),
      platform=JMAT_PLATFORM[platform])


def _cudnn_peer(problem: Problem) -> Peer | Skipped:
  if problem.softcap or problem.kind not in CUDNN_MASKS:
    what = "score_mod" if problem.softcap else f"{problem.kind} mask"
    return Skipped(f"jax.nn.dot_product_attention(implementation='cudnn') has no {what}")
  window = (flex.WINDOW, 0) if problem.kind == "sliding window" else None
  attend = functools.partial(jax.nn.dot_product_attention, is_causal=problem.kind != "full",
                             local_window_size=window, implementation="cudnn")
  return Peer(jax.jit(comp.jax_grads(attend) if problem.backward else attend), _jax_nn_layout)


def splash_mask(kind: str, length: int):
  """The splash attention mask of ``kind`` (documents: causal, with segment ids at the call)."""
  from jax.experimental.pallas.ops.tpu import splash_attention as splash

  shape = (length, length)
  if kind == "full":
    return splash.FullMask(shape)
  if kind == "sliding window":
    return splash.LocalMask(shape, (flex.WINDOW, 0), offset=0)
  if kind == "prefix-LM":
    prefix = np.zeros(shape, bool)
    prefix[:, : length // 4] = True
    return splash.CausalMask(shape) | splash.NumpyMask(prefix)
  return splash.CausalMask(shape)


@functools.cache
def _splash_kernel(kind: str, length: int, softcap: bool, heads: int, interpret: bool):
  """Splash's kernel for the mask, made once for forward and forward+backward: making one
  processes the mask block by block (~40 s for prefix-LM's NumpyMask at L=16384)."""
  from jax.experimental.pallas.ops.tpu import splash_attention as splash

  return splash.make_splash_mha_single_device(
      splash.MultiHeadMask([splash_mask(kind, length)] * heads),
      attn_logits_soft_cap=flex.SOFTCAP if softcap else None, interpret=interpret)


def _splash_peer(problem: Problem, interpret: bool) -> Peer | Skipped:
  try:
    from jax.experimental.pallas.ops.tpu import splash_attention as splash
  except ImportError as e:
    return Skipped(f"no splash attention in this jax: {e}")
  kernel = _splash_kernel(problem.kind, problem.length, problem.softcap, problem.heads,
                          interpret)
  scale = np.float32(1 / np.sqrt(HEAD_DIM))

  if problem.kind == "documents":
    ids = np.broadcast_to(flex.document_ids(problem.length), (BATCH, problem.length))

    def attend(q, k, v, ids):
      segments = splash.SegmentIds(q=ids, kv=ids)
      return jax.vmap(lambda *a: kernel(*a[:3], segment_ids=a[3]))(q, k, v, segments)

    def inputs(q, k, v):
      return (q * scale).astype(q.dtype), k, v, np.ascontiguousarray(ids)
  else:

    def attend(q, k, v):
      return jax.vmap(kernel)(q, k, v)

    def inputs(q, k, v):
      return (q * scale).astype(q.dtype), k, v

  return Peer(jax.jit(comp.jax_grads(attend) if problem.backward else attend), inputs)


def jax_peers(problem: Problem, platform: str, interpret: bool = False
              ) -> dict[str, Callable[[], Peer | Skipped]]:
  """How to make each JAX competitor of ``problem`` on ``platform`` ("gpu" or "tpu").

  Each is made when called, so one that cannot be made fails alone.
  ``interpret``: jmat's and splash's Pallas kernels in Pallas interpret mode, so
  the tests run a device suite's calls on a CPU (cuDNN has no such mode).
  """
  name, backend = FUSED[platform]
  peers = {name: functools.partial(_jmat_peer, problem, platform, backend, interpret),
           "jmat xla": functools.partial(_jmat_peer, problem, platform, "XLA", interpret)}
  if platform == "gpu":
    peers["cudnn"] = functools.partial(_cudnn_peer, problem)
  else:
    peers["splash"] = functools.partial(_splash_peer, problem, interpret)
  return peers


def _raising(error: Exception) -> Call:
  """A call that raises ``error``: timing.measure reports the competitor as failed, with it."""

  def call() -> Any:
    raise error

  return call


def _torch_call(target: comp.Target, problem: Problem, q, k, v) -> Call | Skipped:
  if target.torch_device != "cuda":
    return Skipped("torch sees no CUDA device here (torch.cuda.is_available() is False, or "
                   "torch is not installed): its CPU kernels are no GPU competitor")
  if problem.sdpa:
    def pick(torch: Any) -> Callable[..., Any]:
      attend = functools.partial(torch.nn.functional.scaled_dot_product_attention,
                                 is_causal=problem.kind == "causal")
      return comp.torch_grads(torch, attend) if problem.backward else attend
  else:
    pick = flex.torch_pick(problem.kind, problem.length, problem.softcap, "cuda",
                           problem.backward)
  return target.torch_call(pick, q, k, v, requires_grad=problem.backward)


def case(target: comp.Target, problem: Problem, platform: str | None = None,
         interpret: bool = False) -> Case:
  """``problem`` as a timed case on ``target``: every competitor of ``platform`` (by default
  ``target``'s; the tests build a GPU or TPU case on a CPU, with ``interpret``)."""
  platform = platform or target.device.platform
  area = problem.length**2
  info: dict[str, Any] = {
      "length": problem.length, "mask": problem.kind,
      "softcap": flex.SOFTCAP if problem.softcap else None, "causal": problem.kind != "full",
      "shape": list(problem.shape), "pass": "forward+backward" if problem.backward else "forward",
      "block_size": BLOCK,
      "allowed_fraction": round(float(flex.allowed_keys(problem.kind, problem.length).sum())
                                / area, 4),
      "computed_fraction": round(flex.computed_pairs(problem.kind, problem.length, BLOCK)
                                 / area, 4),
  }

  def build() -> dict[str, Call | Skipped]:
    q, k, v = target.random([problem.shape] * 3, DTYPE)

    def jax_call(make: Callable[[], Peer | Skipped]) -> Call | Skipped:
      peer = make()
      return peer if isinstance(peer, Skipped) else peer.call(target, q, k, v)

    makers: dict[str, Callable[[], Call | Skipped]] = {
        name: functools.partial(jax_call, make)
        for name, make in jax_peers(problem, platform, interpret).items()}
    if platform == "gpu":
      makers["torch"] = lambda: _torch_call(target, problem, q, k, v)
    calls: dict[str, Call | Skipped] = {}
    with jax.enable_x64(False):
      if not problem.sdpa:
        try:
          info["auto_backend"] = "{}: {}".format(*_backend(problem, platform, None))
        except Exception as e:  # jmat's own bug, reported with the results, not fatal to them
          info["auto_backend"] = failed(e)["reason"]
      for name in competitors(platform):
        try:
          calls[name] = makers[name]()
        except Exception as e:  # e.g. an API another jax or torch moved: this one fails alone
          calls[name] = _raising(e)
    return calls

  return Case(problem.name, problem.flops(), DTYPE, build, info,
              computed_flops=problem.flops(computed=True))


def problems(suite: str, quick: bool) -> tuple[Problem, ...]:
  """The problems of ``suite`` ("flex" or "attention"): forward at every length, then
  forward+backward."""
  lengths, backward = (QUICK_LENGTHS, QUICK_LENGTHS) if quick else (LENGTHS, BACKWARD_LENGTHS)
  masks = (tuple((kind, False) for kind in SDPA_MASKS) if suite == "attention"
           else QUICK_FLEX_MASKS if quick else FLEX_MASKS)
  return tuple(
      Problem(kind, length, softcap, backward=back, sdpa=suite == "attention")
      for back, sizes in ((False, lengths), (True, backward))
      for length in sizes for kind, softcap in masks
  )


def _notes(target: comp.Target, suite: str) -> tuple[str, ...]:
  platform, kind = target.device.platform, target.device.device_kind
  peak = machine.peak_bf16_tflops(kind)
  fused, backend = FUSED[platform]
  api = ("jmat.scaled_dot_product_attention(implementation='blockwise', block_size 512)"
         if suite == "attention" else "jmat.flex_attention")
  peers = {
      "torch": ("torch.nn.functional.scaled_dot_product_attention" if suite == "attention"
                else "torch.compile(flex_attention, dynamic=False) with torch's "
                "create_block_mask of the same mask") + " on CUDA",
      "cudnn": "jax.nn.dot_product_attention(implementation='cudnn'), jitted, on (B, L, H, D)",
      "splash": "splash attention (make_splash_mha_single_device, default 128 blocks) with "
                "the same mask, q pre-scaled by 1/sqrt(D)",
  }
  return (
      f"{fused}: {api} with kernel_options BACKEND={backend}; jmat xla: the same with "
      "BACKEND=XLA; " + "; ".join(f"{p}: {peers[p]}" for p in PEERS[platform]) + ".",
      *(() if suite == "attention" else (flex.MASK_NOTE,)),
      f"TFLOP/s (after the time) count 4*B*H*D per (query, key) pair of every computed "
      f"{BLOCK}x{BLOCK} block (the blocks the block mask lists, full or partial, masked-out "
      "pairs included; 3.5x for fwd+bwd), the same count for every competitor "
      "(info.computed_fraction of L^2); results.md's GFLOP/s count the allowed pairs only.",
      (f"% of peak: of {kind}'s {peak:g} TFLOP/s dense bf16 (vendor figure)" if peak else
       f"% of peak: n/a, {kind} is not in benchmarks.machine.PEAK_BF16_TFLOPS") + ".",
      "fwd+bwd: gradients of sum(out) for q, k, v.",
  )


def _suite(name: str, title: str) -> Callable[[comp.Target, bool], Suite]:
  def build(target: comp.Target, quick: bool) -> Suite:
    platform = target.device.platform
    cases = tuple(case(target, problem) for problem in problems(name, quick))
    return Suite(
        name, f"{title} on {target.device.device_kind}, B={BATCH}, H={HEADS}, D={HEAD_DIM}, "
        f"{DTYPE}, forward and forward+backward",
        competitors(platform), REFERENCE[platform, name], cases, notes=_notes(target, name),
        jax_enable_x64=False)

  return build


flex_suite = _suite("flex", "Flex attention")
attention_suite = _suite("attention", "SDPA")


# ---------------------------------------------------------------- how the suites are reported


def _ran_on_device(suite: Record) -> bool:
  return suite["run"]["device"] in PLATFORMS


def _span(values: list[float], fmt: Callable[[float], str]) -> str:
  low, high = fmt(min(values)), fmt(max(values))
  return low if low == high else f"{low}–{high}"


def summary(suite: Record) -> list[str]:
  """At the longest length, forward and forward+backward: the first competitor's TFLOP/s
  and share of the peak, and its time against every other competitor's."""
  focus, others = suite["competitors"][0], suite["competitors"][1:]
  device = suite["run"].get("device_kind", suite["run"]["device"])
  longest = max(c["info"]["length"] for c in suite["cases"])
  out = []
  for kind in ("forward", "forward+backward"):
    cases = [c for c in suite["cases"] if c["info"]["length"] == longest
             and c["info"]["pass"] == kind and c["results"][focus]["status"] == "ok"]
    if not cases:
      continue
    mine = [c["results"][focus] for c in cases]
    pcts = [r["pct_of_device_peak"] for r in mine if r.get("pct_of_device_peak") is not None]
    parts = [f"{suite['name']} {kind} on {device}, L={longest} "
             f"({', '.join(c['name'].rsplit(' L=', 1)[0] for c in cases)}): {focus} "
             f"{_span([r['tflops_computed'] for r in mine], fmt_tflops)} TFLOP/s over the "
             "computed blocks" + (f" ({_span(pcts, fmt_pct)} of peak)" if pcts else "")]
    for other in others:
      ratios = [c["results"][focus]["median_s"] / c["results"][other]["median_s"]
                for c in cases if c["results"][other]["status"] == "ok"]
      if ratios:
        parts.append(f"{fmt_span(ratios)} the time of {other}")
    out.append(", ".join(parts) + ".")
  return out


def plot(suite: Record, plt):
  """TFLOP/s over the computed blocks per case and competitor, forward | forward+backward,
  with the device's peak as a line where it is known."""
  passes = list(dict.fromkeys(c["info"]["pass"] for c in suite["cases"]))
  groups = [[c for c in suite["cases"] if c["info"]["pass"] == p] for p in passes]
  fig, axes = plt.subplots(1, len(groups), figsize=(12, 4.6), squeeze=False, sharey=True,
                           gridspec_kw={"width_ratios": [len(g) for g in groups]})
  peak = machine.peak_bf16_tflops(suite["run"].get("device_kind", ""))
  for ax, kind, cases in zip(axes[0], passes, groups, strict=True):
    plots.bars(ax, suite, cases, per_call=True, computed=True)
    if peak:
      ax.axhline(peak, color="gray", linestyle="--", linewidth=1, label=f"peak {peak:g}")
    ax.set_title(kind, fontsize=9)
  axes[0][0].legend(fontsize=7)
  return fig


def on_device(spec: SuiteSpec, build: Callable[[comp.Target, bool], Suite],
              device_summary: Callable[[Record], list[str]] = summary,
              device_plot: Callable[[Record, Any], Any] = plot) -> SuiteSpec:
  """``spec`` on a CPU; on a GPU or TPU, ``build``'s suite reported with ``device_summary`` and
  ``device_plot`` (by default this module's: TFLOP/s over the computed blocks)."""
  cpu_build, cpu_summary, cpu_plot = spec.build, spec.summary, spec.plot
  if cpu_build is None:
    raise ValueError(f"suite {spec.name} is not a timed suite")

  def either_build(target: comp.Target, quick: bool) -> Suite:
    return (build if target.device.platform in PLATFORMS else cpu_build)(target, quick)

  def either_summary(suite: Record) -> list[str]:
    return (device_summary if _ran_on_device(suite) else cpu_summary)(suite)

  def either_plot(suite: Record, plt):
    if _ran_on_device(suite):
      return device_plot(suite, plt)
    return cpu_plot(suite, plt) if cpu_plot else plots.default_plot(spec, suite, plt)

  return dataclasses.replace(spec, build=either_build, summary=either_summary, plot=either_plot)
