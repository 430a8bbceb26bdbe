"""Fixtures of tests/export; the helpers live in export_helpers.py (a unique module name: several test folders
have a conftest.py, and `from conftest import ...` would pick whichever was imported first)."""

from export_helpers import trained  # noqa: F401
