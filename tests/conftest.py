"""What a test needs from outside the repository, in one place.

A user's clone without ``../shared/data`` (or without ``transformers``) skips the tests that need them and
says why. Under ``CI`` (set to anything but empty/0/false, as CI services do) the same tests FAIL instead:
a CI run must never be green with core tests skipped.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import ModuleType

import pytest

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def missing(reason: str) -> None:
    """Skip with ``reason``, or fail with it under CI."""
    if in_ci():
        pytest.fail(f"{reason} (CI is set: a missing requirement fails instead of skipping)", pytrace=False)
    pytest.skip(reason, allow_module_level=True)


def require_shared_data(relative: str = "") -> Path:
    """The shared data folder, or ``relative`` inside it; skips (fails under CI) where it is absent."""
    path = SHARED_DATA / relative if relative else SHARED_DATA
    if not path.exists():
        missing(f"{path} is absent (the shared data folder ../shared/data is not mounted; see the README)")
    return path


def require_transformers() -> ModuleType:
    """The ``transformers`` module; skips (fails under CI) where it is not installed."""
    try:
        import transformers
    except ImportError as e:
        missing(f"transformers is not installed ({e}); pip install -e '.[dev]'")
    return transformers
