"""Fixtures of tests/launchers; the helpers live in launchers_helpers.py (a unique module name: several test
folders have a conftest.py, and `from conftest import ...` would pick whichever was imported first)."""

from launchers_helpers import local_ray, local_slurm, readme_walk, torchrun_reference  # noqa: F401
