"""The machine a run measured: CPU, cores, memory, accelerator, library versions, load."""

from __future__ import annotations

import os
import platform
import re
from importlib import metadata
from typing import Any

import jax

from benchmarks.formatting import describe_accelerator


def _cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def _cpu_flags() -> list[str]:
  """The SIMD/matrix extensions that decide GEMM speed (AVX-512, AMX), where Linux reports them."""
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("flags"):
          flags = line.split(":", 1)[1].split()
          wanted = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_tile")
          return [flag for flag in wanted if flag in flags]
  except OSError:
    pass
  return []


def _memory_bytes() -> int | None:
  try:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
  except (ValueError, OSError, AttributeError):
    return None


def _version(package: str) -> str | None:
  try:
    return metadata.version(package)
  except metadata.PackageNotFoundError:
    return None


# Peak dense bfloat16 TFLOP/s (no 2:4 sparsity) from the vendors' data sheets, matched in order
# against JAX's device_kind ("NVIDIA H100 80GB HBM3", "TPU v5 lite", ...): the more specific
# pattern first, since an H100 PCIe or a TPU v5 lite also matches "H100" or "v5".
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    (r"\bH100\b.*\bPCIe\b", 756.0),
    (r"\bH100\b.*\bNVL\b", 835.0),
    (r"\bH100\b", 989.0),  # SXM
    (r"\bG?H200\b", 989.0),
    (r"\bA100\b", 312.0),
    (r"\bL4\b", 121.0),
    (r"\bTPU v4\b", 275.0),
    (r"\bTPU v5 ?(lite|e)\b", 197.0),
    (r"\bTPU v5p?\b", 459.0),
    (r"\bTPU v6 ?(lite|e)\b", 918.0),
)


def peak_of(table: tuple[tuple[str, float], ...], device_kind: str) -> float | None:
  """The value of the first ``(pattern, value)`` row of ``table`` whose pattern is found in
  ``device_kind`` (case-insensitive), or None where none is."""
  for pattern, value in table:
    if re.search(pattern, device_kind, re.IGNORECASE):
      return value
  return None


def peak_bf16_tflops(device_kind: str) -> float | None:
  """The device's peak dense bfloat16 TFLOP/s from :data:`PEAK_BF16_TFLOPS`, or None if unknown."""
  return peak_of(PEAK_BF16_TFLOPS, device_kind)


# The packages that decide what runs on an accelerator, recorded where installed.
ACCELERATOR_PACKAGES = ("jax-cuda12-plugin", "jax-cuda13-plugin", "libtpu", "triton")


def accelerator(device: jax.Device) -> dict[str, Any] | None:
  """The GPU or TPU a run measured on: its name, how many JAX sees, its peak; None on a CPU."""
  if device.platform == "cpu":
    return None
  versions = {name: _version(name) for name in ACCELERATOR_PACKAGES}
  return {
      "name": device.device_kind,
      "count": len(jax.devices(device.platform)),
      "peak_bf16_tflops": peak_bf16_tflops(device.device_kind),
      "versions": {name: v for name, v in versions.items() if v},
  }


def load_average() -> list[float] | None:
  """The 1, 5 and 15 minute load averages (``uptime``): other work sharing the machine."""
  try:
    return [round(x, 2) for x in os.getloadavg()]
  except OSError:
    return None


def info(device: jax.Device, torch_device: str | None) -> dict[str, Any]:
  """Everything a reader needs to compare a result with one from another machine."""
  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  threads = None
  if torch_device is not None:
    import torch

    threads = torch.get_num_threads()
  return {
      "cpu_model": _cpu_model(),
      "cpu_flags": _cpu_flags(),
      "cores": cores,
      "memory_bytes": _memory_bytes(),
      "os": platform.platform(),
      "python": platform.python_version(),
      "device_platform": device.platform,
      "device_kind": device.device_kind,
      "device_count": len(jax.devices(device.platform)),
      "accelerator": accelerator(device),
      "torch_device": torch_device,
      "torch_threads": threads,
      "versions": {
          name: _version(name) for name in ("jmat", "jax", "jaxlib", "numpy", "torch")
      },
  }


def tag(machine: dict[str, Any]) -> str:
  """A folder name for the machine, e.g. ``cpu-intel-xeon-processor-2cores``."""
  if machine["device_platform"] == "cpu":
    name, count = machine["cpu_model"], f"{machine['cores']}cores"
  else:
    name, count = machine["device_kind"], f"x{machine['device_count']}"
  name = re.sub(r"\((r|tm)\)", "", name.lower())
  slug = re.sub(r"[^a-z0-9]+", "-", name).strip("-")
  return f"{machine['device_platform']}-{slug}-{count}"


def short(machine: dict[str, Any]) -> str:
  acc = describe_accelerator(machine)
  return (
      f"{machine['cpu_model']}, {machine['cores']} cores, "
      + (acc or f"{machine['device_platform']} ({machine['device_kind']})")
  )
