"""The machine a run measured: CPU, cores, memory, device, library versions, load."""

from __future__ import annotations

import os
import platform
import re
from importlib import metadata
from typing import Any

import jax


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
  return (
      f"{machine['cpu_model']}, {machine['cores']} cores, "
      f"{machine['device_platform']} ({machine['device_kind']})"
  )
