"""Test-wide setup: 64-bit types on (float64 oracles, int64, complex128) and doctest names."""

import os

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

import jmat  # noqa: E402


@pytest.hookimpl(optionalhook=True)  # pytest-xdist's hook: without xdist, pytest runs on
def pytest_xdist_auto_num_workers(config):
  """``-n auto`` (pyproject's addopts): one worker per core, at most 4. Each worker imports
  jax and torch (about 1 GB); most tests are single-threaded tracing and compiling, so two
  workers on 2 cores finish in well under the time of one process."""
  del config
  return max(1, min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                    else os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _doctest_names(doctest_namespace):
  doctest_namespace.update(jmat=jmat, jnp=jnp, np=np, jax=jax)
