"""The repository itself: generated files stay out of it; the README names the extras pyproject.toml has."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: the dev extra brings tomli
    import tomli as tomllib

from tests.conftest import missing

ROOT = Path(__file__).resolve().parents[1]


def test_coverage_data_is_neither_tracked_nor_addable():
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        missing("not a git checkout (git or .git is absent)")
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert ".coverage" not in tracked.split()
    ignored = subprocess.run(["git", "check-ignore", "-q", ".coverage"], cwd=ROOT)
    assert ignored.returncode == 0, ".coverage is not in .gitignore"


def _extras() -> dict[str, list[str]]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"][
        "optional-dependencies"
    ]


def test_the_readme_lists_exactly_the_extras_of_pyproject():
    import re

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("Optional extras (", 1)[1].split("\n\n", 2)[1]  # the list after the lead line
    listed = re.findall(r"^- `([a-z0-9_-]+)`: ", section, flags=re.MULTILINE)
    assert len(listed) == len(section.strip().splitlines())  # every line of the list names one extra
    extras = _extras()
    assert sorted(listed) == sorted(extras)
    installed = re.findall(r"(?:lmforge|\.)\[([a-z0-9_,-]+)\]", readme)  # pip install ".[dev]", 'lmforge[x]'
    assert "dev" in installed and {n for group in installed for n in group.split(",")} <= set(extras)

    # dev: "the above except llama-cpp-python and nvidia-ml-py"
    def name(requirement: str) -> str:
        return re.split(r"[<>=\[ ;]", requirement, maxsplit=1)[0]

    others = {name(r) for extra, reqs in extras.items() if extra != "dev" for r in reqs}
    assert others - {name(r) for r in extras["dev"]} == {"llama-cpp-python", "nvidia-ml-py"}
