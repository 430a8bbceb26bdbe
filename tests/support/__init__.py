"""Test-only support shared by the test folders: the gloo multi-process harness, the collective counter, the
reference data-parallel engines. Importable as `support.*` (tests/ is on sys.path through tests/conftest.py)."""
