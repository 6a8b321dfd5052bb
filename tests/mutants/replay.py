"""Replay the mutation catalogue: apply each recorded slip to a copy of the code, run the tests, report.

Each ``tests/mutants/<area>.yaml`` names a module, the tests that guard it, and its slips::

    module: src/lmforge/serve/scheduler.py
    tests: [tests/serve/test_scheduler.py]
    mutants:
      - slip: "off by one: the queue admits one request more than its limit"
        find: "if len(self.waiting) >= self.max_queue:"   # must occur exactly once in the module
        replace: "if len(self.waiting) > self.max_queue:"
        killed_by: tests/serve/test_limits.py::test_queue_full   # the test that turns red (run first)
        before: survived        # what the suite did before the killing test was written (killed/survived)
      - slip: "..."
        equivalent: "why no test can tell the difference"

Usage (from the repository root, in the dev venv)::

    python tests/mutants/replay.py                 # every area; exit 1 if a mutant survives
    python tests/mutants/replay.py serve energy    # some areas
    python tests/mutants/replay.py --check         # only check every slip still applies (fast; no tests run)
    python tests/mutants/replay.py --catalogue     # rewrite tests/MUTANTS.md from the YAML files

The slips are applied to a copy of ``src/`` and ``tests/`` in a temporary folder (with ``../shared`` linked
beside it), never to the working tree, so an interrupted replay leaves nothing behind. For each mutant the
recorded killing test runs first; only if it passes does the area's whole test list run. Functional runs set
``OMP_NUM_THREADS=1`` (torch's default threads crawl on a busy 2-core machine).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
CATALOGUE = ROOT / "tests" / "MUTANTS.md"
AREA_KEYS = {"module", "tests", "mutants"}
MUTANT_KEYS = {"slip", "find", "replace", "killed_by", "before", "equivalent"}


@dataclass(frozen=True)
class Mutant:
    area: str
    index: int
    module: str
    slip: str
    find: str
    replace: str
    killed_by: str | None
    before: str | None
    equivalent: str | None

    @property
    def name(self) -> str:
        return f"{self.area}#{self.index}"


@dataclass(frozen=True)
class Area:
    name: str
    module: str
    tests: tuple[str, ...]
    mutants: tuple[Mutant, ...]


def load_area(path: Path) -> Area:
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    if not isinstance(raw, dict) or set(raw) - AREA_KEYS or not {"module", "tests", "mutants"} <= set(raw):
        raise ValueError(f"{path}: needs exactly the keys {sorted(AREA_KEYS)}")
    mutants = []
    for i, m in enumerate(raw["mutants"], start=1):
        unknown = set(m) - MUTANT_KEYS
        if unknown or not {"slip", "find", "replace"} <= set(m):
            raise ValueError(f"{path}: mutant {i}: needs slip/find/replace; unknown keys {sorted(unknown)}")
        if m["find"] == m["replace"]:
            raise ValueError(f"{path}: mutant {i}: find and replace are the same")
        if m.get("before") not in (None, "killed", "survived"):
            raise ValueError(f"{path}: mutant {i}: before must be killed or survived")
        mutants.append(
            Mutant(
                area=path.stem,
                index=i,
                module=raw["module"],
                slip=m["slip"],
                find=m["find"],
                replace=m["replace"],
                killed_by=m.get("killed_by"),
                before=m.get("before"),
                equivalent=m.get("equivalent"),
            )
        )
    return Area(path.stem, raw["module"], tuple(raw["tests"]), tuple(mutants))


def load_areas(names: list[str] | None = None) -> list[Area]:
    paths = sorted(HERE.glob("*.yaml"))
    known = {p.stem for p in paths}
    for n in names or []:
        if n not in known:
            raise SystemExit(f"no area {n!r} in {HERE} (have: {', '.join(sorted(known))})")
    return [load_area(p) for p in paths if not names or p.stem in names]


def problems(area: Area, root: Path = ROOT) -> list[str]:
    """What is wrong with the area against the code in ``root``: a slip that no longer applies, a missing file."""
    out = []
    source = root / area.module
    if not source.is_file():
        return [f"{area.name}: module {area.module} does not exist"]
    text = source.read_text(encoding="utf-8")
    for t in area.tests:
        if not (root / t.split("::")[0]).exists():
            out.append(f"{area.name}: test path {t} does not exist")
    for m in area.mutants:
        n = text.count(m.find)
        if n != 1:
            out.append(
                f"{m.name}: `find` occurs {n} times in {area.module} (must be exactly once): {m.find!r}"
            )
        if m.killed_by is None and m.equivalent is None:
            out.append(f"{m.name}: neither killed_by nor equivalent is recorded")
        if m.killed_by and not (root / m.killed_by.split("::")[0]).exists():
            out.append(f"{m.name}: killing test file {m.killed_by} does not exist")
    return out


def copy_tree(dest: Path) -> Path:
    """A copy of the repository's code and tests at ``dest/repo``, with ``dest/shared`` -> the real shared/."""
    repo = dest / "repo"
    repo.mkdir(parents=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache")
    for name in ("src", "tests", "benchmarks", "configs"):
        if (ROOT / name).exists():
            shutil.copytree(ROOT / name, repo / name, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, repo / name)
    shared = ROOT.parent / "shared"
    if shared.exists():
        (dest / "shared").symlink_to(shared)
    return repo


FAILED = re.compile(r"^(?:FAILED|ERROR) (.+?)(?: - .*)?$", re.M)  # ids may hold spaces (parameters)
NOT_RUN = (4, 5)  # pytest: usage error (a test id that names nothing), no tests collected: never a kill


def run_tests(repo: Path, targets: list[str], timeout: float) -> tuple[bool, str]:
    """(passed, first failing test or reason) for ``pytest -x targets`` in the copy."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(repo / "src"), PYTHONDONTWRITEBYTECODE="1")
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *targets]
    try:
        done = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return False, f"timeout after {timeout:.0f} s"
    if done.returncode == 0:
        return True, ""
    if done.returncode in NOT_RUN:
        raise RuntimeError(
            f"pytest ran nothing for {targets} (exit {done.returncode}): {done.stdout.strip()[-300:]}"
        )
    hit = FAILED.search(done.stdout)
    return False, hit.group(1) if hit else f"pytest exit {done.returncode}: {done.stdout.strip()[-300:]}"


def replay(areas: list[Area], timeout: float, only: str | None = None) -> list[tuple[Mutant, str, str]]:
    results = []
    with tempfile.TemporaryDirectory(prefix="lmforge-mutants-") as tmp:
        repo = copy_tree(Path(tmp))
        for area in areas:
            source = repo / area.module
            original = source.read_text(encoding="utf-8")
            for m in area.mutants:
                if only and m.name != only:
                    continue
                if m.equivalent is not None:
                    results.append((m, "equivalent", m.equivalent))
                    continue
                if original.count(m.find) != 1:
                    results.append((m, "stale", "`find` does not occur exactly once"))
                    continue
                source.write_text(original.replace(m.find, m.replace), encoding="utf-8")
                t0 = time.monotonic()
                try:
                    status, why = "survived", ""
                    if m.killed_by:
                        passed, why = run_tests(repo, [m.killed_by], timeout)
                        status = "survived" if passed else "killed"
                    if status == "survived":
                        passed, why = run_tests(repo, list(area.tests), timeout)
                        status = "survived" if passed else "killed"
                finally:
                    source.write_text(original, encoding="utf-8")
                print(f"{m.name:<22} {status:<9} {time.monotonic() - t0:6.1f} s  {m.slip}  {why}", flush=True)
                results.append((m, status, why))
    return results


def catalogue(areas: list[Area]) -> str:
    lines = [
        "# Mutation catalogue",
        "",
        "Realistic slips applied one at a time to the code, each of which some test must turn red. Written from",
        "`tests/mutants/*.yaml` by `python tests/mutants/replay.py --catalogue`; replay them all with",
        "`python tests/mutants/replay.py` (or name areas). `before`: what the suite did to the slip before its",
        "killing test was written. `tests/test_mutants.py` checks on every run that each slip still applies.",
        "",
    ]
    total = sum(len(a.mutants) for a in areas)
    before_killed = sum(1 for a in areas for m in a.mutants if m.before == "killed")
    equivalent = sum(1 for a in areas for m in a.mutants if m.equivalent)
    lines += [
        f"{total} slips in {len(areas)} modules; {before_killed} killed before this catalogue's tests were "
        f"added, {total - equivalent} killed now, {equivalent} equivalent (reason given).",
        "",
        "| module | slips | killed before | killed now | equivalent |",
        "|---|---|---|---|---|",
    ]
    for a in areas:
        eq = sum(1 for m in a.mutants if m.equivalent)
        kb = sum(1 for m in a.mutants if m.before == "killed")
        lines.append(f"| `{a.module}` | {len(a.mutants)} | {kb} | {len(a.mutants) - eq} | {eq} |")
    for a in areas:
        lines += [
            "",
            f"## {a.name}: `{a.module}`",
            "",
            "| # | slip | before | killed by |",
            "|---|---|---|---|",
        ]
        for m in a.mutants:
            by = f"equivalent: {m.equivalent}" if m.equivalent else f"`{m.killed_by}`"
            lines.append(f"| {m.index} | {m.slip} | {m.before or '-'} | {by} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("areas", nargs="*", help="areas (YAML file stems) to replay; all by default")
    p.add_argument("--check", action="store_true", help="only check that every slip still applies")
    p.add_argument("--catalogue", action="store_true", help="rewrite tests/MUTANTS.md")
    p.add_argument("--only", help="one mutant, as area#index")
    p.add_argument("--timeout", type=float, default=600, help="seconds per pytest run (default 600)")
    args = p.parse_args(argv)
    areas = load_areas(args.areas)
    found = [x for a in areas for x in problems(a)]
    for line in found:
        print(line, file=sys.stderr)
    if args.catalogue:
        CATALOGUE.write_text(catalogue(load_areas()), encoding="utf-8")
        print(f"wrote {CATALOGUE}")
    if args.check or args.catalogue:
        return 1 if found else 0
    results = replay(areas, args.timeout, args.only)
    survived = [m.name for m, status, _ in results if status in ("survived", "stale")]
    print(
        f"{len(results)} mutants: {sum(s == 'killed' for _, s, _ in results)} killed, "
        f"{sum(s == 'equivalent' for _, s, _ in results)} equivalent, {len(survived)} survived or stale"
    )
    if survived:
        print("survived: " + ", ".join(survived))
    return 1 if survived or found else 0


if __name__ == "__main__":
    sys.exit(main())
