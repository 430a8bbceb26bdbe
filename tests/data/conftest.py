"""Fixtures of tests/data; the helpers live in data_helpers.py (a unique module name: several test folders have
a conftest.py, and `from conftest import ...` would pick whichever was imported first)."""

from data_helpers import _one_thread, corpus_copy, tiny_corpus  # noqa: F401
