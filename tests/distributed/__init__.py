"""Tests on a mesh of 8 devices, run by tests/test_parallel.py in a process of their own."""

from __future__ import annotations

import os

import jax
import pytest


def require_8_devices() -> None:
  """Skips the calling test module without 8 devices (the main run has one), or raises where
  tests/test_parallel.py asked for them (``JMAT_REQUIRE_8_DEVICES``) and they did not appear."""
  if jax.device_count() >= 8:
    return
  if os.environ.get("JMAT_REQUIRE_8_DEVICES"):
    raise RuntimeError(f"8 devices were required, {jax.device_count()} exist")
  pytest.skip(
      "needs 8 devices: run through tests/test_parallel.py (XLA_FLAGS="
      "--xla_force_host_platform_device_count=8)",
      allow_module_level=True,
  )
