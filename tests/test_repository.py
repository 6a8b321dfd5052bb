"""The repository itself: generated files stay out of it."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from tests.conftest import missing

ROOT = Path(__file__).resolve().parents[1]


def test_coverage_data_is_neither_tracked_nor_addable():
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        missing("not a git checkout (git or .git is absent)")
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert ".coverage" not in tracked.split()
    ignored = subprocess.run(["git", "check-ignore", "-q", ".coverage"], cwd=ROOT)
    assert ignored.returncode == 0, ".coverage is not in .gitignore"
