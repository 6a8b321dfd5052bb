"""What a test needs from outside the repository, in one place.

A user's clone without ``../shared/data`` (or without an optional package such as ``transformers``) skips the tests that need them and
says why. Under ``CI`` (set to anything but empty/0/false, as CI services do) the same tests FAIL instead:
a CI run must never be green with core tests skipped.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType

import pytest

from tests.skip_report import SkipReport, in_ci

pytest_plugins = ["pytester"]

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def pytest_configure(config):
    config.pluginmanager.register(SkipReport(), "lmforge-skip-report")  # the skips, listed at the end


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


def require_module(name: str, extra: str = "dev", hint: str = "") -> ModuleType:
    """The module ``name``; skips (fails under CI) where it is not installed, naming the extra that brings it.

    Every test that needs an optional package goes through here, never ``pytest.importorskip``, so that a CI
    run cannot be green with a whole file skipped for a package its set-up forgot."""
    try:
        return importlib.import_module(name)
    except ImportError as e:
        missing(f"{name} is not installed ({e}); pip install -e '.[{extra}]'{hint}")
