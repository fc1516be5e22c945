"""Test-wide setup: 64-bit types on (float64 oracles, int64, complex128) and doctest names."""

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

import jmat  # noqa: E402


@pytest.fixture(autouse=True)
def _doctest_names(doctest_namespace):
  doctest_namespace.update(jmat=jmat, jnp=jnp, np=np, jax=jax)
