"""The README's set-up commands are what CI runs, and the pinned set (constraints-cpu.txt) is complete and
consistent with pyproject.toml, so pip resolves it without backtracking (the failure of issue 24: pip 23.2
backtracked for 12 minutes over boto3/botocore/aiobotocore, then gave up)."""

from __future__ import annotations

import importlib.metadata as md
import re
import subprocess
import sys
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: the dev extra brings tomli
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
CONSTRAINTS = ROOT / "constraints-cpu.txt"


def pins() -> dict[str, str]:
    out = {}
    for line in CONSTRAINTS.read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, sep, version = line.partition("==")
            assert sep, f"constraints-cpu.txt: {line!r} is not an exact pin"
            out[canonicalize_name(name)] = version.strip()
    return out


def project_requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    reqs = [Requirement(r) for r in project["dependencies"]]
    for extra in project["optional-dependencies"].values():
        reqs += [Requirement(r) for r in extra]
    return reqs


def readme_command(which: str) -> str:
    done = subprocess.run(
        [sys.executable, str(ROOT / ".ci" / "readme_command.py"), which], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_ci_runs_the_readmes_test_command_with_the_venvs_own_pip():
    script = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert "readme_command.py test" in script and 'bash -c "$readme_test"' in script
    assert not re.search(r"pip install[^\n]*(-U|--upgrade)[^\n]*\bpip\b", script), "CI must not upgrade pip"


def test_the_two_readme_commands_install_with_the_pinned_set():
    test, demo = readme_command("test"), readme_command("demo")
    assert test.startswith("python3 -m venv .venv && ") and test.endswith("python -m pytest")
    assert demo.startswith("python3 -m venv .venv && ") and demo.endswith("lmforge train")
    for command in (test, demo):
        assert "-c constraints-cpu.txt" in command and "--upgrade" not in command


def test_every_requirement_of_every_extra_is_pinned_within_its_range():
    locked = pins()
    for req in project_requirements():
        if req.marker is not None and not req.marker.evaluate({"python_version": "3.11", "extra": ""}):
            continue  # the pinned set is for Python 3.11 on x86-64 Linux
        name = canonicalize_name(req.name)
        assert name in locked, f"{req.name} is not in constraints-cpu.txt: run bash requirements/lock.sh"
        assert req.specifier.contains(locked[name], prereleases=True), (
            f"constraints-cpu.txt pins {req.name}=={locked[name]}, outside pyproject's {req.specifier}: relock"
        )


def test_the_installed_dependency_closure_is_exactly_the_pinned_set():
    """Everything lmforge[dev] pulled in is pinned, at the pinned version: nothing was left to the resolver."""
    locked = pins()
    seen, todo, problems = set(), [Requirement("lmforge[dev]")], []
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        if name in seen:
            continue
        seen.add(name)
        try:
            dist = md.distribution(req.name)
        except md.PackageNotFoundError:
            continue  # a requirement whose marker excluded it on this platform
        if name != "lmforge":
            if name not in locked:
                problems.append(f"{name} {dist.version} is installed but not pinned")
            elif dist.version != locked[name] and dist.version.split("+")[0] != locked[name].split("+")[0]:
                problems.append(f"{name} {dist.version} installed, {locked[name]} pinned")
        for spec in dist.requires or []:
            child = Requirement(spec)
            env = default_environment()
            extras = req.extras or {""}
            if child.marker is None or any(child.marker.evaluate({**env, "extra": e}) for e in extras):
                todo.append(child)
    assert len(seen) > 100 and not problems, problems
