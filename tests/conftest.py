"""Shared fixtures. Real data comes from $DATA_ROOT; with REQUIRE_REAL_DATA=1 (CI) its absence fails."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="session")
def real_data_root() -> Path:
    """The folder named by DATA_ROOT (mnist/ and cifar10-jpeg.tar.xz inside)."""
    root = os.environ.get("DATA_ROOT")
    if root and Path(root).is_dir():
        return Path(root).resolve()
    message = f"real data not found: set DATA_ROOT to the shared data folder (got {root!r})"
    if os.environ.get("REQUIRE_REAL_DATA") == "1":
        pytest.fail(message)
    pytest.skip(message)
