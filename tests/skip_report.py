"""A pytest plugin (loaded by tests/conftest.py): lists every skipped test and why at the end of the run, and
under ``CI`` fails the run if anything skipped at all (a CI run must exercise everything; a skip there means
its set-up forgot a package, a file or a service)."""

from __future__ import annotations

import os

import pytest


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


class SkipReport:
    def __init__(self) -> None:
        self.skips: list[tuple[str, str]] = []

    def _record(self, report) -> None:
        if report.skipped and not hasattr(report, "wasxfail"):
            reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
            self.skips.append((report.nodeid, reason.removeprefix("Skipped: ")))

    def pytest_runtest_logreport(self, report):
        self._record(report)

    def pytest_collectreport(self, report):
        self._record(report)

    def pytest_terminal_summary(self, terminalreporter):
        terminalreporter.section("skips")
        if not self.skips:
            terminalreporter.write_line("no test skipped")
            return
        for nodeid, reason in self.skips:
            terminalreporter.write_line(f"SKIPPED {nodeid}: {reason}")
        if in_ci():
            terminalreporter.write_line(
                f"{len(self.skips)} skipped under CI, where nothing may skip: the run fails (install what they name)"
            )

    def pytest_sessionfinish(self, session, exitstatus):
        if in_ci() and self.skips and exitstatus == pytest.ExitCode.OK:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_configure(config):
    config.pluginmanager.register(SkipReport(), "lmforge-skip-report")
