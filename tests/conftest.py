"""Fixtures shared by the test modules (the root conftest.py turns on 64-bit types)."""

import jax
import pytest

from jmat._src import attention as attention_src


@pytest.fixture
def small_blocks(monkeypatch):
  """Blocks of 16 queries (2 chains of 8) and 8 keys, so small inputs span many blocks."""
  monkeypatch.setattr(attention_src, "BLOCK_Q", 16)
  monkeypatch.setattr(attention_src, "BLOCK_K", 8)
  jax.clear_caches()
  yield
  jax.clear_caches()
