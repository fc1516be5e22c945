"""Fixtures shared by the test modules (the root conftest.py turns on 64-bit types)."""
