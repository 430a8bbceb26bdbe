"""Fixtures shared by every test folder. Also puts tests/ on sys.path (pytest's rootdir conftest rule), so test
files and the ranks they spawn import the shared test-only code as `support.*` (tests/support/)."""

from __future__ import annotations

import pytest
from support.models import small_s2t, small_s2t_config


@pytest.fixture
def tiny_s2t_config():
    """Factory: the shared tiny S2T ModelConfig with overrides, tiny_s2t_config(ctc_weight=0.3)."""
    return small_s2t_config


@pytest.fixture
def tiny_s2t():
    """Factory: the shared tiny S2T model with head selection, tiny_s2t(strategy="subset", kl_weight=0.1)."""
    return small_s2t
